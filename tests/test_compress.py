"""The compression section: TT, separable and magnitude pruning applied to a built network."""

import pytest
import torch
from torch import nn

from sepnet.compress import CompressionSpec, compress_, remove_pruning_
from sepnet.compress.tt import TTLinear
from sepnet.layers import FlatSeparableLinear
from sepnet.masks import masked_layers
from sepnet.measures import fc_parameter_counts, parameter_counts
from sepnet.network import build_network

DENSE_MLP = dict(num_classes=10, image_shape=(1, 8, 8), mean=(0.3,), std=(0.4,), backbone="mlp",
                 backbone_kwargs={"hidden_shapes": [[4, 16, 16], [4, 16, 16]], "dense": True}, head="dense")


def _net(compression=()):
    torch.manual_seed(0)
    return build_network(**DENSE_MLP, compression=list(compression))


@pytest.mark.parametrize("method,kind", [("tt", TTLinear), ("separable", FlatSeparableLinear)])
def test_factorizations_meet_their_budget_and_keep_the_dense_equivalent(method, kind):
    dense = parameter_counts(_net())
    net = _net([{"method": method, "targets": ["backbone.*"], "budget": 20}])
    layers = [m for m in net.modules() if isinstance(m, kind)]
    assert len(layers) == 2
    ratio = sum(m.dense_parameters() for m in layers) / sum(m.stored_parameters() for m in layers)
    assert 20 <= ratio < 60  # the targets together meet the budget, not far beyond it
    counts = parameter_counts(net)
    assert counts.dense == dense.dense and counts.stored < dense.stored / 10
    x = torch.rand(3, 1, 8, 8)
    assert net(x).shape == (3, 10)
    assert len(net.compression_summary) == 2 and method in net.compression_summary[0]


def test_tt_from_linear_keeps_the_function_at_full_rank():
    net = _net()
    x = torch.rand(4, 1, 8, 8)
    before = net(x)
    compress_(net, [{"method": "tt", "targets": ["head.*"], "options": {"rank": 10**6, "init": "from_linear",
                                                                     "modes": 2}}])
    assert isinstance(net.head.layers[-1], TTLinear)
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def test_global_magnitude_keeps_exactly_the_budget_and_the_largest_weights():
    net = _net()
    weights = torch.cat([m.weight.detach().abs().flatten() for m in (net.backbone[0][1], net.backbone[3][1])])
    compress_(net, [{"method": "magnitude", "targets": ["backbone.*"], "budget": 8, "options": {"scope": "global"}}])
    masks = [masked.mask for _, _, masked in masked_layers(net)]
    kept = sum(int(mask.sum()) for mask in masks)
    assert kept == round(weights.numel() / 8)
    threshold = weights.sort(descending=True).values[kept - 1]
    survivors = torch.cat([m.weight.detach().abs()[masked.mask.bool()] for _, m, masked in masked_layers(net)])
    assert survivors.min() >= threshold
    assert parameter_counts(net).nonzero == parameter_counts(_net()).nonzero - (weights.numel() - kept)


def test_layerwise_magnitude_keeps_its_fraction_and_one_weight_per_output():
    net = _net([{"method": "magnitude", "targets": ["*"], "options": {"amount": 0.999}}])
    for name, m, masked in masked_layers(net):
        kept = int(masked.mask.sum())
        assert kept == max(round(0.001 * m.weight.numel()), m.weight.shape[0]), name
    assert fc_parameter_counts(net).nonzero < fc_parameter_counts(_net()).nonzero / 100


def test_masks_survive_a_checkpoint_and_removal_keeps_the_logits():
    spec = [{"method": "magnitude", "targets": ["backbone.*"], "budget": 10}]
    net = _net(spec)
    with torch.no_grad():  # training moves the surviving weights; masks must stay as saved
        for _, m, _ in masked_layers(net):
            m.parametrizations.weight.original.add_(0.01)
    state = net.state_dict()
    torch.manual_seed(1)
    other = build_network(**DENSE_MLP, compression=spec)  # another init: other masks before loading
    other.load_state_dict(state)
    for (_, _, a), (_, _, b) in zip(masked_layers(net), masked_layers(other)):
        assert torch.equal(a.mask, b.mask)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(other(x), net(x))
    remove_pruning_(other)
    assert not masked_layers(other)
    torch.testing.assert_close(other(x), net(x))
    assert int((other.backbone[0][1].weight == 0).sum()) >= 0.89 * other.backbone[0][1].weight.numel()


def test_a_budget_holds_for_the_targets_together_small_layers_keep_their_rank():
    net = _net([{"method": "tt", "targets": ["backbone.*", "head.*"], "budget": 50}])
    layers = dict((n, m) for n, m in net.named_modules() if isinstance(m, TTLinear))
    stored = sum(m.stored_parameters() for m in layers.values())
    dense = sum(m.dense_parameters() for m in layers.values())
    assert 50 <= dense / stored < 75
    classifier, big = layers["head.layers.1"], layers["backbone.3.1"]  # 1024 -> 10 and 1024 -> 1024
    assert classifier.dense_parameters() / classifier.stored_parameters() < 50  # near its full rank
    assert big.dense_parameters() / big.stored_parameters() > 50  # carries the compression


def test_global_magnitude_never_empties_an_output_unit():
    torch.manual_seed(0)
    net = build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16",
                        backbone_kwargs={"width": 1 / 16}, head="dense",
                        compression=[{"method": "magnitude", "targets": ["*"], "budget": 30,
                                      "options": {"scope": "global"}}])
    for name, _, masked in masked_layers(net):  # at init the deep convs' weights are the smallest
        assert (masked.mask.flatten(1).sum(1) >= 1).all(), name
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def _vgg4(compression):
    torch.manual_seed(0)
    return build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 1 / 4},
                         head="dense", head_kwargs={"hidden": [512, 512], "dropout": 0.5}, compression=compression)


@pytest.mark.parametrize("method", ["magnitude", "hydra"])
def test_layerwise_pruning_leaves_no_output_unit_empty(method):
    """Layer-scope pruning kept the layer's top-k: on the VGG/4 at budget 10 the RGB stem
    (backbone.0, 16 x 27 weights, 43 kept) lost 2 of its 16 output channels."""
    net = _vgg4([{"method": method, "targets": ["*"], "budget": 10}])
    masks = [(n, masked.current_mask()) for n, _, masked in masked_layers(net)]  # every pruner: one mechanism
    assert len(masks) == 16
    for name, mask in masks:
        assert (mask.flatten(1).sum(1) >= 1).all(), name
        assert int(mask.sum()) == max(round(mask.numel() / 10), mask.shape[0]), name


def test_global_magnitude_meets_a_whole_model_budget_exactly():
    """The weights given back to empty output units were added on top of the global top-k: the
    VGG/4 at model30 kept 48,949 non-zero parameters against 48,409 allowed."""
    dense = parameter_counts(_vgg4([]))
    net = _vgg4([{"method": "magnitude", "targets": ["*"], "budget": 30, "budget_of": "model",
                  "options": {"scope": "global"}}])
    assert parameter_counts(net).nonzero <= dense.dense / 30 + 1
    for name, _, masked in masked_layers(net):
        assert (masked.mask.flatten(1).sum(1) >= 1).all(), name


@pytest.mark.parametrize("spec,match", [
    ({"method": "tucker"}, "unknown compression method 'tucker'"),
    ({"method": "tt", "budget": 1.0}, "expected a compression factor > 1"),
    ({"method": "tt", "budget": 0}, "expected a compression factor > 1"),
    ({"method": "tt", "targets": ["nothing.*"], "budget": 4}, r"targets \['nothing.\*'\] match no Linear layer"),
    ({"method": "tt", "targets": ["head.*"], "budget": 1000},
     r"budget 1000x is unreachable for \['head.\*'\]: rank 1 already stores 114 of their 10,250 parameters"),
    ({"method": "magnitude", "targets": ["head.*"]}, "expected a budget or options.amount"),
])
def test_bad_compression_is_a_one_line_error(spec, match):
    with pytest.raises(ValueError, match=match):
        compress_(_net(), [CompressionSpec(**spec) if spec["method"] != "tucker" else spec])


def test_factorizing_a_pruned_layer_is_refused():
    with pytest.raises(ValueError, match="already pruned"):
        _net([{"method": "magnitude", "targets": ["head.*"], "budget": 2},
              {"method": "tt", "targets": ["head.*"], "budget": 2}])


def test_init_from_prunes_and_decomposes_the_given_weights(tmp_path):
    trained = _net()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(torch.rand_like(p) * 3)  # other weights than any fresh init
    torch.save(trained.state_dict(), tmp_path / "net.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "m.ckpt")
    for path in ("net.pt", "m.ckpt"):
        torch.manual_seed(5)
        pruned = build_network(**DENSE_MLP, init_from=str(tmp_path / path),
                               compression=[{"method": "magnitude", "targets": ["backbone.*"], "budget": 4}])
        reference = _net()
        reference.load_state_dict(trained.state_dict())
        compress_(reference, [{"method": "magnitude", "targets": ["backbone.*"], "budget": 4}])
        for (_, _, a), (_, _, b) in zip(masked_layers(pruned), masked_layers(reference)):
            assert torch.equal(a.mask, b.mask)
    x = torch.rand(4, 1, 8, 8)
    decomposed = build_network(**DENSE_MLP, init_from=str(tmp_path / "net.pt"),
                               compression=[{"method": "tt", "targets": ["head.*"],
                                             "options": {"rank": 10**6, "init": "from_linear", "modes": 2}}])
    torch.testing.assert_close(decomposed(x), trained(x), rtol=1e-4, atol=1e-5)


def test_init_from_that_does_not_fit_is_a_one_line_error(tmp_path):
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for path, match in (("missing.pt", "does not exist"), ("junk.pt", "is unreadable"),
                        ("other.pt", "does not fit the network before compression: normalize.mean is missing")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            build_network(**DENSE_MLP, init_from=str(tmp_path / path))


def test_tt_conv_compresses_the_convolutions_to_a_budget():
    from sepnet.compress.tt_conv import TTConv2d

    def vgg(compression):
        torch.manual_seed(0)
        return build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16",
                             backbone_kwargs={"width": 1 / 8}, head="dense", compression=compression)

    dense = vgg([])
    convs = sum(p.numel() for m in dense.modules() if isinstance(m, nn.Conv2d) for p in m.parameters())
    net = vgg([{"method": "tt_conv", "targets": ["backbone.*"], "exclude": ["backbone.0"], "budget": 5}])
    layers = [m for m in net.modules() if isinstance(m, TTConv2d)]
    assert len(layers) == 12 and isinstance(net.backbone[0], nn.Conv2d)
    assert sum(m.dense_parameters() for m in layers) / sum(m.stored_parameters() for m in layers) >= 5
    assert parameter_counts(net).dense == parameter_counts(dense).dense
    assert parameter_counts(net).stored < parameter_counts(dense).stored - 0.7 * convs
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    # from_conv at full rank keeps the function
    full = vgg([{"method": "tt_conv", "targets": ["backbone.3"], "options": {"rank": 10**6, "init": "from_conv"}}])
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(full.eval()(x), dense.eval()(x), rtol=1e-4, atol=1e-4)


def _hydra(budget=10, score_epochs=1):
    return _net([{"method": "hydra", "targets": ["backbone.*", "head.*"], "budget": budget,
                  "options": {"score_epochs": score_epochs}}])


def test_hydra_starts_from_magnitude_pruning_and_trains_only_scores_then_only_weights():
    from sepnet.compress import compression_epoch_

    hydra, magnitude = _hydra(), _net([{"method": "magnitude", "targets": ["backbone.*", "head.*"], "budget": 10}])
    for (_, _, a), (_, _, b) in zip(masked_layers(hydra), masked_layers(magnitude)):
        assert torch.equal(a.current_mask(), b.mask)  # the first mask is magnitude pruning's
    compression_epoch_(hydra, 0)
    weights = {n: p.detach().clone() for n, p in hydra.named_parameters() if "scores" not in n}
    scores = {n: p.detach().clone() for n, p in hydra.named_parameters() if "scores" in n}
    opt = torch.optim.SGD([p for p in hydra.parameters() if p.requires_grad], lr=1.0)
    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(hydra(x), y).backward()
        opt.step()
    named = dict(hydra.named_parameters())
    assert all(torch.equal(named[n], w) for n, w in weights.items())  # weights frozen
    assert any(not torch.equal(named[n], s) for n, s in scores.items())  # scores moved
    for _, _, masked in masked_layers(hydra):
        assert int(masked.current_mask().sum()) == masked.keep
    compression_epoch_(hydra, 1)  # score phase over: mask fixed, weights train, scores frozen
    fixed = [masked.mask.clone() for _, _, masked in masked_layers(hydra)]
    assert all(int(m.phase) == 1 for _, _, m in masked_layers(hydra))
    assert all(p.requires_grad != ("scores" in n) for n, p in hydra.named_parameters())
    opt = torch.optim.SGD([p for p in hydra.parameters() if p.requires_grad], lr=1.0)
    opt.zero_grad()
    nn.functional.cross_entropy(hydra(x), y).backward()
    opt.step()
    for mask, (_, layer, masked) in zip(fixed, masked_layers(hydra)):
        assert torch.equal(masked.mask, mask)
        assert int((layer.weight != 0).sum()) <= masked.keep  # the effective weight obeys the mask


def test_hydra_phase_and_mask_survive_a_checkpoint_and_export_keeps_the_logits():
    from sepnet.compress import compression_epoch_

    net = _hydra()
    with torch.no_grad():
        for _, _, masked in masked_layers(net):
            masked.scores.mul_(torch.rand_like(masked.scores))  # another ranking than at init
    compression_epoch_(net, 1)
    other = _hydra()
    other.load_state_dict(net.state_dict())
    for (_, _, a), (_, _, b) in zip(masked_layers(net), masked_layers(other)):
        assert int(b.phase) == 1 and torch.equal(a.mask, b.mask)
    x = torch.rand(4, 1, 8, 8)
    expected = net(x)
    with torch.no_grad():  # once fixed, the scores no longer choose the mask
        for _, _, masked in masked_layers(other):
            masked.scores.copy_(torch.rand_like(masked.scores))
    torch.testing.assert_close(other(x), expected)
    remove_pruning_(other)
    assert not masked_layers(other)
    torch.testing.assert_close(other(x), expected)
    counts = parameter_counts(net)
    assert counts.nonzero < counts.stored / 5 and counts.stored == parameter_counts(_net()).stored


def _deadwood(**options):
    return _net([{"method": "deadwood", "targets": ["backbone.*", "head.*"], "budget": 10,
                  "options": {"kick_in": 1, "penalty_epochs": 3, "dual_step": 0.5, **options}}])


def test_deadwood_dual_variable_grows_while_violated_and_the_penalty_works():
    """tolerance 0: the constraint cannot be met before the mask, and lambda only ramps."""
    from sepnet.compress.hooks import compression_epoch_, compression_hooks, compression_loss

    torch.manual_seed(0)
    net = _deadwood(kd_weight=0.0, tolerance=0.0)
    (dead,) = compression_hooks(net)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    lams, violations = [], []
    for epoch in range(3):
        compression_epoch_(net, epoch)
        for _ in range(5):
            logits = net(x)
            extra, parts = compression_loss(net, x, logits)
            loss = nn.functional.cross_entropy(logits, y) + extra
            opt.zero_grad()
            loss.backward()
            opt.step()
            lams.append(float(dead.lam))
            violations.append(float(parts["train/deadwood_violation"]))
    assert lams[:5] == [0.0] * 5  # kick-in: no dual ascent in epoch 0
    assert all(b >= a for a, b in zip(lams, lams[1:])) and lams[-1] > 0  # never decreases
    assert all(b > a for a, b, v in zip(lams[5:], lams[6:], violations[6:]) if v > 0)  # grows while violated
    assert violations[-1] < violations[5]  # the penalty pushes mass into the budget


def test_deadwood_uses_this_steps_lambda_and_its_dual_settles_once_the_constraint_is_met():
    from sepnet.compress.hooks import compression_epoch_, compression_hooks
    from sepnet.masks import topk_masks

    net = _deadwood(kd_weight=0.0, tolerance=0.3, kick_in=0)
    (dead,) = compression_hooks(net)
    compression_epoch_(net, 0)
    x = torch.rand(4, 1, 8, 8)
    dead.lam.fill_(2.0)
    extra, parts = dead.loss(x, net(x))
    violation = float(parts["train/deadwood_violation"])
    assert float(extra.detach()) == pytest.approx(2.0 * violation)  # lambda before this step's update
    assert float(parts["train/deadwood_lambda"]) == 2.0
    assert float(dead.lam) == pytest.approx(2.0 + 0.5 * (violation - 0.3))
    with torch.no_grad():  # the mass moves inside the top-k: the constraint is met
        originals = [layer.parametrizations.weight.original for layer in dead._layers]
        for original, keep in zip(originals, topk_masks([o.abs() for o in originals], dead.keep)):
            original[~keep] *= 1e-3
    lams = []
    for _ in range(20):
        dead.loss(x, net(x))
        lams.append(float(dead.lam))
    assert float(dead.violation()) < 0.3
    assert all(b <= a for a, b in zip(lams, lams[1:])) and lams[-1] == 0.0  # falls, then rests at 0


def test_deadwood_final_mask_keeps_exactly_the_budget_and_resumes():
    from sepnet.compress.hooks import compression_epoch_, compression_hooks

    net = _deadwood()
    (dead,) = compression_hooks(net)
    total = sum(m.weight.numel() for _, m, _ in masked_layers(net))
    assert dead.keep == round(total / 10)
    compression_epoch_(net, 2)
    assert int(dead.phase) == 0 and all(bool(masked.mask.all()) for _, _, masked in masked_layers(net))
    compression_epoch_(net, 3)  # the penalty phase is over
    assert int(dead.phase) == 1
    assert sum(int(masked.mask.sum()) for _, _, masked in masked_layers(net)) == dead.keep
    x = torch.rand(4, 1, 8, 8)
    extra, parts = compression_hooks(net)[0].loss(x, net(x))
    assert float(extra) == 0 and not parts  # fine-tuning: the mask alone
    other = _deadwood()  # a fresh build (penalty phase, all-ones masks) loads either phase
    other.load_state_dict(net.state_dict())
    assert int(compression_hooks(other)[0].phase) == 1
    torch.testing.assert_close(other(x), net(x))
    assert parameter_counts(other).nonzero == parameter_counts(_net()).nonzero - (total - dead.keep)


def test_a_whole_model_budget_fills_up_after_the_earlier_entries():
    def vgg(compression):
        torch.manual_seed(0)
        return build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16",
                             backbone_kwargs={"width": 1 / 4}, head="dense", head_kwargs={"hidden": [512, 512]},
                             compression=compression)

    net = vgg([{"method": "jsvd", "targets": ["backbone.*"], "budget": 10},
               {"method": "tt", "targets": ["head.*"], "budget": 10, "budget_of": "model"}])
    counts = parameter_counts(net)
    assert 10 <= counts.nonzero_compression < 11, counts
    with pytest.raises(ValueError, match=r"whole-model budget 100x is unreachable: the layers outside \['head.\*'\]"):
        vgg([{"method": "tt", "targets": ["head.*"], "budget": 100, "budget_of": "model"}])
    from sepnet.compress.hooks import compression_epoch_

    for method in ("magnitude", "hydra", "deadwood"):  # pruning keeps biases: the weights carry the budget
        net = vgg([{"method": method, "budget": 30, "budget_of": "model"}])
        compression_epoch_(net, 6)  # the dual pruning's exact mask comes after its penalty epochs
        for m in net.modules():  # the norm shifts start at zero and are trained: the budget counts them
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.bias, 0.1)
        counts = parameter_counts(net)
        assert 29.7 <= counts.nonzero_compression <= 30.3, (method, counts)
    with pytest.raises(ValueError, match="expected 'targets' or 'model'"):
        CompressionSpec(method="tt", budget=2, budget_of="everything")


def test_topk_masks_keeps_the_largest_scores_across_tensors():
    """The one top-k rule of HYDRA's forward, the dual pruning's final mask and the sparsity
    target: `keep` largest scores over all tensors together, shapes kept."""
    from sepnet.masks import topk_masks

    first, second = torch.tensor([[3.0, 1.0], [2.0, 0.0]]), torch.tensor([5.0, -1.0])
    masks = topk_masks([first, second], 3)
    assert [m.shape for m in masks] == [first.shape, second.shape]
    assert masks[0].tolist() == [[True, False], [True, False]] and masks[1].tolist() == [True, False]
    assert topk_masks([first], 1)[0].sum() == 1 and topk_masks([first], 1)[0][0, 0]


def test_channel_pruning_leaves_a_smaller_dense_network_at_the_budget(tmp_path):
    """torch-pruning's dependency graph removes whole channels: no mask, no factorized layer,
    every layer that reads a pruned channel shrunk with it, the classifier's outputs kept, the
    whole-model budget met; the same dense start rebuilds the same architecture (checkpoints load)."""
    from sepnet.factorized import factorized_layers

    torch.manual_seed(0)
    dense = _vgg4([])
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    entry = {"method": "channel", "targets": ["*"], "budget": 10, "budget_of": "model"}
    net = build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 1 / 4},
                        head="dense", head_kwargs={"hidden": [512, 512], "dropout": 0.5},
                        init_from=str(tmp_path / "dense.pt"), compression=[entry])
    counts, before = parameter_counts(net), parameter_counts(dense)
    assert 9.5 <= before.dense / counts.stored <= 10.5 and counts.dense == counts.stored  # a smaller dense network
    assert not masked_layers(net) and not list(factorized_layers(net))
    assert net.head.layers[-1].out_features == 10 and net(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    again = build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 1 / 4},
                          head="dense", head_kwargs={"hidden": [512, 512], "dropout": 0.5},
                          init_from=str(tmp_path / "dense.pt"), compression=[entry])
    again.load_state_dict(net.state_dict())  # the same shapes from the same weights
    with pytest.raises(ValueError, match="compression channel: budget 1000x is unreachable"):
        build_network(**{**dict(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16",
                                backbone_kwargs={"width": 1 / 4}, head="dense")},
                      compression=[{"method": "channel", "targets": ["*"], "budget": 1000, "budget_of": "model"}])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_compression_leaves_every_module_in_the_mode_it_had(mode):
    """torch-pruning traces the network in eval mode and left it there: the channel-pruned
    converged cells then fine-tuned with BatchNorm frozen at the dense network's running
    statistics, their signal died within a few layers and they trained at chance (0.10) for 15
    epochs. Every compressor now hands the network back in the mode it got it."""
    net = build_network(num_classes=10, image_shape=(3, 32, 32), backbone="vgg16", backbone_kwargs={"width": 1 / 4},
                        head="dense", head_kwargs={"hidden": [64, 64], "dropout": 0.5})
    getattr(net, mode)()
    compress_(net, [{"method": "channel", "targets": ["*"], "budget": 3, "budget_of": "model"}])
    assert {m.training for m in net.modules()} == {mode == "train"}
