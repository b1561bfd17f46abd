import time

import lightning as L
import pytest
import torch
from torch import nn

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
    paths = export_checkpoint(str(tmp_path / "m.ckpt"), str(tmp_path / "out"), fold="never")["files"]
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
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "a_file").write_text("x")
    for args, message in (([str(tmp_path / "garbage.ckpt"), str(tmp_path / "o3")], "garbage.ckpt is unreadable"),
                          ([str(tmp_path / "m.ckpt"), str(tmp_path / "a_file" / "sub")], "a_file is a file")):
        with pytest.raises(SystemExit) as err:
            main(args)
        lines = capsys.readouterr().err.strip().splitlines()
        assert err.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_the_export_command_prints_one_line_and_no_warning(tmp_path, capsys):
    import warnings

    model = _model()
    trainer = L.Trainer(logger=False, accelerator="cpu")
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main([str(tmp_path / "m.ckpt"), str(tmp_path / "out"), "--fold", "never"])
    printed = capsys.readouterr()
    assert len(printed.out.strip().splitlines()) == 1 and "MACs/image" in printed.out
    ours = [w for w in caught if "sepnet" in str(w.filename) or "jit" in str(w.message) or "Tracer" in str(w.category)]
    assert not ours, [str(w.message) for w in ours]


# --------------------------------------------------------------------------- ONNX on onnxruntime
SMALL_VGG = {"backbone": "vgg16", "backbone_kwargs": {"width": 1 / 16}, "head": "dense", "head_kwargs": {"hidden": [64]}}
ONNX_CASES = {  # each backbone, and each compressor family on the VGG
    "mlp-separable": {"backbone": "mlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]]}},
    "vgg-dense": SMALL_VGG,
    "vgg-tt-head": {**SMALL_VGG, "compression": [{"method": "tt", "targets": ["head.*"], "budget": 4}]},
    "vgg-tt_conv": {**SMALL_VGG, "compression": [{"method": "tt_conv", "targets": ["backbone.*"],
                                                  "exclude": ["backbone.0"], "budget": 3}]},
    "vgg-jsvd": {**SMALL_VGG, "compression": [{"method": "jsvd", "targets": ["backbone.*"], "budget": 3}]},
    "vgg-lowrank": {**SMALL_VGG, "compression": [{"method": "lowrank", "targets": ["*"], "exclude": ["backbone.0"],
                                                  "budget": 3}]},
    "vgg-magnitude": {**SMALL_VGG, "compression": [{"method": "magnitude", "targets": ["*"], "budget": 10,
                                                    "options": {"scope": "global"}}]},
    "vgg-hydra": {**SMALL_VGG, "compression": [{"method": "hydra", "targets": ["*"], "budget": 10}]},
    "vit": {"backbone": "vit", "backbone_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
            "head": "dense", "head_kwargs": {"hidden": []}},
    "lipconvnet": {"backbone": "lipconvnet", "backbone_kwargs": {"widths": [8, 16], "pointwise": "separable"},
                   "head": "separable", "head_kwargs": {"rank": 2}, "scale_inputs": False},  # R > 1: normalized
    "lipmlp": {"backbone": "lipmlp", "backbone_kwargs": {"hidden_shapes": [[4, 8, 8]]}, "scale_inputs": False},
}


def _images(n: int = 1000) -> torch.Tensor:
    """1,000 real CIFAR-10 test images where the shared copy is here, else uniform noise."""
    from pathlib import Path

    from sepnet.data import ImageFolderDataModule

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg"
    if not (root / "test").is_dir():
        return torch.rand(n, 3, 32, 32)
    data = ImageFolderDataModule(root=str(root), batch_size=n, num_workers=0)
    data.setup()
    return next(iter(data.test_dataloader()))[0]


@pytest.fixture(scope="module")
def images():
    return _images()


@pytest.mark.parametrize("name", ONNX_CASES)
def test_the_onnx_export_gives_torchs_logits_on_onnxruntime_and_its_adversarial_labels(name, images, tmp_path):
    """Every backbone and compressor family: the ONNX file onnxruntime runs gives torch's logits
    (1e-4) on 1,000 test images at any batch size, with each factorized layer exported as its
    factor operations (fold never) or folded (always); PGD examples crafted on the torch model
    get the same labels from the ONNX model wherever torch's top two logits are not tied."""
    from sepnet.attacks import Attacker, AttackSpec
    from sepnet.deploy import onnx_logits
    from sepnet.export import export_network
    from sepnet.factorized import factorized_layers
    from sepnet.network import build_network

    torch.manual_seed(0)
    net = build_network(10, (3, 32, 32), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), **ONNX_CASES[name]).eval()
    with torch.no_grad():
        expected = net(images)
    factorized = any(True for _ in factorized_layers(net))
    for fold in ("never", "always") if factorized else ("never",):  # folding: for the factorized families
        report = export_network(net, (3, 32, 32), tmp_path / fold, batch=8, fold=fold, check_images=images)
        onnx_file = report["files"]["onnx"]
        assert report["max_logit_difference"] <= 1e-4 * (1 + expected.abs().max()) and report["checked_images"] == 1000
        torch.testing.assert_close(onnx_logits(onnx_file, images[:1]), expected[:1], rtol=1e-4, atol=1e-4)  # batch 1
        assert all(c["folded"] == (fold == "always") for c in report["folds"])
    assert report["macs_per_image"] > 0 and report["bytes"]["onnx"] > 0
    adversarial = Attacker(net, (3, 32, 32), 10).generate(images[:64], expected[:64].argmax(-1),
                                                           AttackSpec(name="pgd", eps=8 / 255, steps=5))
    with torch.no_grad():
        torch_logits = net(adversarial)
    top2 = torch_logits.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4
    assert clear.float().mean() > 0.9
    onnx_labels = onnx_logits(onnx_file, adversarial).argmax(-1)
    assert torch.equal(onnx_labels[clear], torch_logits.argmax(-1)[clear])


def test_a_pruned_network_is_stored_sparse_and_computed_dense(tmp_path):
    """Global magnitude at 10x: the ONNX file stores the pruned weights as sparse initializers
    (much smaller than the dense file) and says onnxruntime computes them dense."""
    from sepnet.export import export_network
    from sepnet.network import build_network

    torch.manual_seed(0)
    sizes = {}
    for name in ("vgg-dense", "vgg-magnitude"):
        net = build_network(10, (3, 32, 32), **ONNX_CASES[name])
        report = export_network(net, (3, 32, 32), tmp_path / name, batch=8, fold="never")
        sizes[name] = report["bytes"]["onnx"]
    assert report["onnx"]["sparse_initializers"] and "densifies" in report["onnx"]["computes"]
    assert sizes["vgg-magnitude"] < 0.5 * sizes["vgg-dense"]  # 10% kept: COO costs 12 bytes a non-zero
    assert report["macs_per_image"] == export_network(build_network(10, (3, 32, 32), **ONNX_CASES["vgg-dense"]),
                                                      (3, 32, 32), tmp_path / "d2", fold="never")["macs_per_image"]


def test_auto_folding_is_decided_by_measurement_and_reported(tmp_path):
    from sepnet.export import export_network, summary
    from sepnet.network import build_network

    torch.manual_seed(0)
    net = build_network(10, (3, 32, 32), **ONNX_CASES["vgg-tt-head"])
    report = export_network(net, (3, 32, 32), tmp_path, batch=16, fold="auto")
    assert report["folds"] and all(c["factors_ms"] > 0 and c["folded_ms"] > 0 for c in report["folds"])
    assert all(c["folded"] == (c["folded_ms"] < c["factors_ms"]) for c in report["folds"])
    line = summary(report)
    assert "MACs/image" in line and "ms/image at batch 1" in line and "\n" not in line


def test_auto_folding_times_the_factor_operations_not_the_layers_own_rule(monkeypatch):
    """A TT-conv layer whose own per-call rule (implied_path "auto") picks its built kernel at the
    export batch: "auto" folding must time its factor operations (a convolution and matrix products)
    against the folded layer (one convolution), else it compares the dense kernel with itself and folds by coin flip."""
    import onnx

    from sepnet import deploy
    from sepnet.compress.tt_conv import TTConv2d

    torch.manual_seed(0)
    layer = TTConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), in_modes=(4, 4), out_modes=(4, 4), rank=4)
    net = nn.Sequential(layer).eval()
    timed = []

    def fake(models, x, threads=1, repeats=20, clock=None):
        timed.append([sum(n.op_type in ("Conv", "MatMul") for n in onnx.load_from_string(m).graph.node) for m in models])
        return [2.0, 1.0]

    monkeypatch.setattr(deploy, "ort_latencies", fake)
    (choice,) = deploy.choose_folds(net, (16, 8, 8), batch=64, fold="auto")
    (convs,) = timed
    assert convs[0] > 1 and convs[1] == 1 and choice.folded  # factors: Conv + MatMuls; folded: one Conv
    assert layer.implied_path == "auto"  # the layer's own switch is left as it was while timing


def test_fold_timing_counts_the_work_not_the_time_the_thread_was_preempted(monkeypatch):
    """On a busy machine the wall clock charges a model for the time its thread waited: a model
    that computes 5 ms but is preempted for 30 ms looks slower than one that computes 15 ms. The
    fold decision (1 thread) times CPU work: the first model is the faster one."""
    from sepnet import deploy

    class Busy:  # a session whose run computes `work` seconds after waiting `wait` (preempted)
        def __init__(self, work, wait):
            self.work, self.wait = work, wait

        def get_inputs(self):
            return [type("Input", (), {"name": "pixels"})()]

        def run(self, outputs, feed):
            time.sleep(self.wait)
            end = time.thread_time() + self.work
            while time.thread_time() < end:
                pass

    sessions = {b"preempted": Busy(0.005, 0.03), b"quiet": Busy(0.015, 0.0)}
    monkeypatch.setattr(deploy, "_session", lambda model, threads: sessions[model])
    x = torch.rand(1, 3)
    wall = deploy.ort_latencies([b"preempted", b"quiet"], x, repeats=3)
    work = deploy.ort_latencies([b"preempted", b"quiet"], x, repeats=3, clock=time.thread_time)
    assert wall[0] > wall[1] and work[0] < work[1]
    seen = []
    monkeypatch.setattr(deploy, "ort_latencies", lambda models, x, threads, repeats, clock: seen.append(clock) or [1.0, 2.0])
    from sepnet.compress.tt_conv import TTConv2d
    net = nn.Sequential(TTConv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), in_modes=(4, 4), out_modes=(4, 4), rank=4))
    deploy.choose_folds(net.eval(), (16, 8, 8), batch=4, fold="auto")
    assert seen == [time.thread_time]


@pytest.mark.slow
def test_the_resnet34_exports_to_onnx(tmp_path):
    """The full-width ResNet-34 (21M parameters): exported as the others, checked on 16 images
    (16x16 ones: the export's batch-64 timing of 32x32 images took half a minute of CI)."""
    from sepnet.export import export_network
    from sepnet.network import build_network

    torch.manual_seed(0)
    net = build_network(10, (3, 16, 16), backbone="resnet34", backbone_kwargs={"stem": "cifar"}, head="dense")
    report = export_network(net, (3, 16, 16), tmp_path, batch=2, fold="never", check_images=torch.rand(16, 3, 16, 16))
    assert report["checked_images"] == 16 and report["macs_per_image"] > 1e8  # 16x16 images: a quarter of CIFAR's cost


def test_session_memory_is_the_childs_own_not_the_parents_peak(tmp_path):
    """The peak memory of a session is measured in a fresh process; a parent that once held far
    more (here 1.5 GB, touched) must not leak its peak into the figure (Linux's ru_maxrss does)."""
    from sepnet.deploy import session_memory, to_onnx

    path = tmp_path / "tiny.onnx"
    to_onnx(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval(), (3, 2, 2), path)
    big = torch.ones(1500 * 2**20 // 4)  # 1.5 GB resident in this process
    small = session_memory(path, (3, 2, 2), 4)
    del big
    assert 10e6 < small < 800e6, small  # python + numpy + onnxruntime: ~100 MB, far below the parent's peak


def test_the_export_check_compares_against_the_network_not_its_inference_copy(tmp_path, monkeypatch):
    """An inference copy that computes something else (here: a weight changed) must fail the
    export's check: the check runs the network the user trained, not the copy it exports."""
    from sepnet import export as export_module
    from sepnet.deploy import inference_copy

    def wrong_copy(net):
        copy = inference_copy(net)
        with torch.no_grad():
            copy.head.layers[-1].weight.mul_(1.5)
        return copy

    from sepnet.network import build_network

    torch.manual_seed(0)
    net = build_network(10, (3, 8, 8), backbone="mlp", backbone_kwargs={"hidden_shapes": [[4, 4, 4]], "dense": True},
                        head="dense").eval()
    monkeypatch.setattr(export_module, "inference_copy", wrong_copy)
    with pytest.raises(ValueError, match="onnxruntime's logits differ from torch's"):
        export_module.export_network(net, (3, 8, 8), tmp_path / "out", batch=4, fold="never")
