import pytest
import timm
import torch
from torch import nn

from sepnet.convert import balanced_factorization, factor_shapes, separable_
from sepnet.layers import FlatSeparableLinear


@pytest.mark.parametrize(
    "n,modes,expected",
    [(4096, 3, (16, 16, 16)), (768, 2, (24, 32)), (25088, 3, (28, 28, 32)), (10, 2, (2, 5)), (12, 1, (12,))],
)
def test_balanced_factorization(n, modes, expected):
    assert balanced_factorization(n, modes) == expected


def test_unsplittable_count_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot split 7 features into 2 factors"):
        balanced_factorization(7, 2)
    with pytest.raises(ValueError, match="cannot split 12 features into 4 factors"):
        balanced_factorization(12, 4)
    with pytest.raises(ValueError, match="cannot split 10 features into 3 factors"):
        factor_shapes(64, 10, 3)


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             num_classes=10, depth=2, embed_dim=48, num_heads=3)


def test_convert_timm_vit_blocks_from_linear():
    torch.manual_seed(0)
    model = _tiny_vit().eval()
    x = torch.rand(2, 3, 32, 32)
    replaced = separable_(model, include=["blocks.*.mlp.fc1", "blocks.*.mlp.fc2", "blocks.*.attn.qkv",
                                          "blocks.*.attn.proj", "head"], rank=2, init="random")
    assert len(replaced) == 2 * 4 + 1
    assert isinstance(model.blocks[0].mlp.fc1, FlatSeparableLinear)
    assert model(x).shape == (2, 10)


def test_convert_full_rank_two_mode_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 6)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = model(x)
    # rank = min of the rearranged matrix's dims reproduces any matrix exactly
    replaced = separable_(model, include=["0"], shapes={"0": ((2, 3), (2, 2))}, rank=4)
    assert list(replaced) == ["0"] and replaced["0"].approximation_error < 1e-12
    torch.testing.assert_close(model(x), expected)
    assert isinstance(model[2], nn.Linear)


def test_convert_errors():
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"6 -> 6 layer, but the linear layer is 6 -> 4"):
        separable_(model, shapes={"0": ((2, 3), (2, 3))})
    with pytest.raises(ValueError, match=r"not matched"):
        separable_(model, shapes={"fc": ((2, 3), (2, 2))})
    with pytest.raises(ValueError, match="unknown init"):
        separable_(model, init="svd")
