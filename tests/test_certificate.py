"""The Lipschitz contract and the certificate part: a layer that breaks the contract is refused
when its class is made, the walk bounds layers it has never heard of, the layer check measures
the layer as applied (not the number the layer reports), and certificates are float32 whatever
the autocast around them."""

import pytest
import torch
from torch import nn

from sepnet.certificate import CertificateConfig, Certifier, layer_norm_check
from sepnet.lipschitz import CertificateError, LipschitzChain, LipschitzModule, lipschitz_bound
from sepnet.module import ImageClassifier
from sepnet.network import build_network


def test_a_lipschitz_layer_without_its_constant_or_rule_is_refused_when_its_class_is_made():
    with pytest.raises(TypeError, match="NoConstant breaks the LipschitzModule contract"):
        class NoConstant(LipschitzModule):
            lipschitz_rule = "claims nothing"

    with pytest.raises(TypeError, match="NoRule breaks the LipschitzModule contract"):
        class NoRule(LipschitzModule):
            def lipschitz_constant(self):
                return 1.0


class Scale(LipschitzModule):
    """A layer sepnet has never heard of: y = s x, whose constant it states (honestly or not)."""

    lipschitz_rule = "scale, stated"
    lipschitz_fixed = False

    def __init__(self, applied: float, stated: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(applied))
        self.stated = stated

    def forward(self, x):
        return self.weight * x

    def lipschitz_constant(self):
        return self.stated


class Pair(LipschitzChain, nn.Module):
    lipschitz_parts = ("first", "second")

    def __init__(self, first, second) -> None:
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


def test_the_walk_bounds_any_chain_of_contract_layers_and_the_check_catches_a_false_claim():
    net = Pair(Scale(2.0, 2.0), nn.Sequential(nn.ReLU(), Scale(0.5, 0.5)))
    bound = lipschitz_bound(net)
    assert bound.value == pytest.approx(1.0) and [f.name for f in bound.factors] == ["first", "second.0", "second.1"]
    assert not bound.fixed  # Scale says training changes it
    x = torch.randn(4, 6)
    rows = layer_norm_check(net, x)
    assert [r["spectral_norm"] for r in rows] == pytest.approx([2.0, 0.5])
    assert all(r["how"] == "SVD of the layer as applied (exact)" for r in rows)
    liar = Pair(Scale(3.0, 1.0), nn.Identity())  # applies 3, tells the bound 1
    assert lipschitz_bound(liar).value == 1.0
    with pytest.raises(CertificateError, match=r"layer first: spectral norm 3.000000 as applied exceeds the constant 1"):
        layer_norm_check(liar, x)
    missing = Pair(Scale(1.0, 1.0), nn.Tanh())
    assert lipschitz_bound(missing, strict=False).missing.startswith("no Lipschitz bound for second (Tanh)")
    assert not Certifier(missing, CertificateConfig()).certifiable


def test_a_layer_too_large_for_its_matrix_is_checked_by_power_iteration_from_below():
    net = Pair(Scale(1.5, 1.5), nn.Identity())
    (row,) = layer_norm_check(net, torch.randn(2, 8, 8), max_elements=16)
    assert row["spectral_norm"] == pytest.approx(1.5, rel=1e-6) and "power iteration" in row["how"]


def test_bf16_autocast_certifies_exactly_what_float32_certifies():
    """Under the GPU presets' bf16-mixed precision, Lightning runs the evaluation step under
    autocast; the certificate must come from float32 logits, never from the bf16 ones (which
    moved by up to 0.08 in an audit and certified images float32 does not)."""
    torch.manual_seed(0)
    net = build_network(10, (3, 8, 8), backbone="lipconvnet", head="dense", scale_inputs=False,
                        backbone_kwargs={"widths": [4, 8], "depth": 1}).eval()
    certifier = Certifier(net, CertificateConfig(radii=(0.01, 0.02, 0.05)))
    certifier.measure()
    x, y = torch.rand(256, 3, 8, 8), torch.randint(0, 10, (256,))
    with torch.no_grad():
        y = net(x).argmax(-1)  # every image correct: the margins decide
        reference = certifier.masks(x, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits = net(x)
            under_autocast = certifier.masks(x, y, bf16_logits)
    naive = certifier.masks(x, y, bf16_logits.float())  # what certifying the bf16 logits would give
    assert bf16_logits.dtype == torch.bfloat16
    for r in reference:
        assert torch.equal(under_autocast[r], reference[r])
    assert any(not torch.equal(naive[r], reference[r]) for r in reference)  # the hole was real here


def test_the_old_certify_radii_field_is_a_one_line_migration_error():
    with pytest.raises(ValueError, match=r"validation.certify_radii is now certificate.radii"):
        ImageClassifier(validation={"batches": 0, "certify_radii": [0.1]})
    with pytest.raises(ValueError, match=r"certificate.radii must be > 0"):
        CertificateConfig(radii=(0.1, -1.0))


def _ends_in_a_plain_linear():
    """An orthogonal-separable feature map, then a dense nn.Linear whose rows are far from
    orthonormal (its trained norm counts in the sqrt(2) L certificate)."""
    from sepnet.activations import MaxMin
    from sepnet.layers import SeparableLinear

    torch.manual_seed(0)
    linear = nn.Linear(64, 10)
    with torch.no_grad():
        linear.weight.mul_(torch.linspace(0.2, 3.0, 10)[:, None])  # rows of very different norms
    return nn.Sequential(SeparableLinear((3, 8, 8), (4, 4, 4), orthogonal=True), MaxMin(dim=1), nn.Flatten(), linear).eval()


def test_the_pairwise_certificate_is_exact_for_the_last_layer_and_never_looser():
    from sepnet.lipschitz import certified_from_logits, pairwise_bound, pairwise_certified

    net = _ends_in_a_plain_linear()
    bound, pairwise = lipschitz_bound(net), pairwise_bound(net)
    w = net[3].weight.detach().double()
    assert pairwise.layer == "3" and pairwise.feature == pytest.approx(bound.value / float(torch.linalg.matrix_norm(w, 2)))
    torch.testing.assert_close(pairwise.distances[2, 7], (w[2] - w[7]).norm())
    x = torch.rand(512, 3, 8, 8)
    with torch.no_grad():
        logits = net(x)
    y = logits.argmax(-1)
    radii = [0.01, 0.03, 0.1]
    tight, loose = pairwise_certified(logits, y, radii, pairwise), certified_from_logits(logits, y, radii, bound.value)
    for r in radii:
        assert bool((loose[r] <= tight[r]).all())  # never looser
    assert sum(int(tight[r].sum()) for r in radii) > sum(int(loose[r].sum()) for r in radii)  # tighter here
    # sound: no perturbation inside the radius flips an image the pairwise certificate certified
    r, certified = 0.03, tight[0.03]
    noise = torch.randn(certified.sum(), 3, 8, 8)
    noise = r * noise / noise.flatten(1).norm(dim=1)[:, None, None, None]
    with torch.no_grad():
        assert torch.equal(net(x[certified] + noise).argmax(-1), y[certified])


def test_the_checks_attack_what_the_pairwise_certificate_certifies_and_fail_on_a_wrong_norm():
    """A pairwise certificate whose row distances are 100x too small certifies images an attack
    breaks: the attack check fails loudly. The honest one passes."""
    from sepnet.attacks import Attacker
    from sepnet.certificate import soundness_checks
    from sepnet.lipschitz import PairwiseBound, pairwise_bound

    net = _ends_in_a_plain_linear()
    x = torch.rand(128, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(-1)
    attacker, bound, honest = Attacker(net, (3, 8, 8), 10), lipschitz_bound(net), pairwise_bound(net)
    report = soundness_checks(net, attacker, x, y, [0.05], bound, attack_steps=20, pairwise=honest)
    assert report["certificate"] == "pairwise"
    wrong = PairwiseBound(honest.feature, honest.distances / 100, honest.layer)
    with pytest.raises(CertificateError, match=r"an L2 attack at radius 0.5 broke \d+ of the \d+ images certified"):
        soundness_checks(net, attacker, x, y, [0.5], bound, attack_steps=20, pairwise=wrong)


def test_the_bound_is_rounded_up_and_a_bound_that_moves_during_an_evaluation_fails_loudly():
    from sepnet.certificate import BOUND_SLACK

    net = Pair(Scale(2.0, 2.0), nn.Identity())
    certifier = Certifier(net, CertificateConfig())
    assert certifier.measure().value == pytest.approx(2.0 * (1 + BOUND_SLACK), rel=1e-12)
    net.first.stated = 2.0 * (1 + BOUND_SLACK / 2)  # within the rounding: a kernel's drift
    assert certifier.verify() == pytest.approx(2.0 * (1 + BOUND_SLACK / 2))
    net.first.stated = 2.001  # the weights changed inside an evaluation
    with pytest.raises(CertificateError, match="the Lipschitz bound moved during the evaluation"):
        certifier.verify()
