import lightning as L
import pytest
import torch

from sepnet.export import dense_state_dict, export_checkpoint, main, sparse_state_dict, to_torchscript
from sepnet.module import ImageClassifier


def _model():
    torch.manual_seed(0)
    return ImageClassifier(network={"backbone": "vgg16", "backbone_kwargs": {"width": 1 / 16}, "head": "separable",
                                    "head_kwargs": {"hidden_shapes": [[4, 4, 4]]}}).eval()


def test_torchscript_matches_for_any_batch(tmp_path):
    model = _model()
    path = to_torchscript(model.net, (3, 32, 32), tmp_path / "m.pt")
    loaded = torch.jit.load(str(path))
    for batch in (1, 5):
        x = torch.rand(batch, 3, 32, 32)
        torch.testing.assert_close(loaded(x), model.net(x), rtol=1e-5, atol=1e-5)


def test_sparse_state_dict_round_trip_and_size(tmp_path):
    model = _model()
    with torch.no_grad():
        model.net.head.layers[0].factors[0][0].zero_()
        conv = model.net.backbone[-3].weight  # the largest tensor, pruned to ~80% zeros
        conv[conv.abs() < conv.abs().quantile(0.8)] = 0
    sparse = sparse_state_dict(model.net)
    assert isinstance(sparse["backbone.40.weight"], dict) and torch.is_tensor(sparse["backbone.3.weight"])
    restored = dense_state_dict(sparse)
    assert all(torch.equal(restored[k], v) for k, v in model.net.state_dict().items())
    torch.save(sparse, tmp_path / "s.pt"), torch.save(model.net.state_dict(), tmp_path / "d.pt")
    assert (tmp_path / "s.pt").stat().st_size < (tmp_path / "d.pt").stat().st_size


def test_export_checkpoint_and_errors(tmp_path, capsys):
    model = _model()
    trainer = L.Trainer(logger=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    paths = export_checkpoint(str(tmp_path / "m.ckpt"), str(tmp_path / "out"))
    # both files give the checkpoint's logits
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.net(x)
        torch.testing.assert_close(torch.jit.load(str(paths["torchscript"]))(x), expected, rtol=1e-5, atol=1e-5)
        fresh = _model().net
        for p in fresh.parameters():
            p.data.zero_()
        fresh.load_state_dict(dense_state_dict(torch.load(paths["sparse_state_dict"])))
        torch.testing.assert_close(fresh.eval()(x), expected)
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out2")])
    assert err.value.code == 2 and "missing.ckpt does not exist" in capsys.readouterr().err
