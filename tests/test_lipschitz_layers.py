"""The certifiable convnet's layers: the DFT norm of a convolution against its explicit matrix,
the orthogonal convolution, the separable 1x1 map, the Bjorck classifier, and `lipconvnet`
end to end (its bound composed, every layer checked, an empirical lower bound below it)."""

import pytest
import torch
from torch import nn

from sepnet.certificate import empirical_lipschitz, layer_norm_check
from sepnet.lipschitz import lipschitz_bound
from sepnet.lipschitz_layers import BjorckOrthonormal, OrthoConv2d, SeparablePointwise, circular_conv_norm
from sepnet.network import build_network


def _matrix(fn, shape, dtype=torch.float64):
    """The explicit matrix of a linear map on tensors of `shape` (columns: images of the basis)."""
    n = torch.tensor(shape).prod().item()
    basis = torch.eye(n, dtype=dtype).reshape(n, *shape)
    return fn(basis).reshape(n, -1).t()


@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_the_dft_norm_of_a_convolution_against_its_explicit_matrix(padding_mode):
    torch.manual_seed(0)
    kernel = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    conv = lambda x: nn.functional.conv2d(  # noqa: E731
        nn.functional.pad(x, (1, 1, 1, 1), mode="circular" if padding_mode == "circular" else "constant"), kernel)
    exact = torch.linalg.matrix_norm(_matrix(conv, (2, 5, 6)), ord=2).item()
    if padding_mode == "circular":  # exact on the map's own grid
        assert circular_conv_norm(kernel, (5, 6)) == pytest.approx(exact, rel=1e-9)
    else:  # an upper bound from the padded grid, and not a loose one
        bound = circular_conv_norm(kernel, (7, 8))
        assert exact <= bound * (1 + 1e-9) and bound < 1.3 * exact
    with pytest.raises(ValueError, match="kernel 3x3 larger than the 2x2 map"):
        circular_conv_norm(kernel, (2, 2))


def test_the_orthogonal_convolution_is_an_isometry_with_circular_padding():
    torch.manual_seed(0)
    conv = OrthoConv2d(4, 4, 3, (6, 6))  # orthogonium computes in float32
    with torch.no_grad():
        matrix = _matrix(lambda x: conv(x) - conv(torch.zeros_like(x)), (4, 6, 6), torch.float32).double()
    torch.testing.assert_close(matrix.t() @ matrix, torch.eye(144, dtype=torch.float64), atol=1e-5, rtol=0)
    assert conv.lipschitz_constant() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="kernel_size 2: expected an odd size"):
        OrthoConv2d(4, 4, 2, (6, 6))


def test_the_separable_pointwise_map_is_a_1x1_convolution_by_the_kronecker_product():
    torch.manual_seed(0)
    layer = SeparablePointwise((2, 4), (4, 2))
    x = torch.randn(3, 8, 5, 5)
    weight = layer.layer.implied_weight().detach()  # (8, 8), out x in: the Kronecker product of the factors
    expected = nn.functional.conv2d(x, weight[:, :, None, None], layer.layer.bias.reshape(-1))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert layer.layer.lipschitz_constant() == pytest.approx(1.0, abs=1e-5)


def test_bjorck_gives_a_norm_at_most_one_and_a_gradient():
    torch.manual_seed(0)
    for shape in ((10, 300), (300, 10), (7, 7)):
        weight = torch.randn(shape, requires_grad=True)
        ortho = BjorckOrthonormal()(weight)
        singular = torch.linalg.svdvals(ortho.double())
        assert singular.max() <= 1 + 1e-6 and singular.min() > 0.999, shape
        ortho.sum().backward()
        assert weight.grad is not None and weight.grad.abs().sum() > 0
    badly = torch.diag(torch.tensor([1.0, 1e-3]))  # ill-conditioned: not converged, still <= 1
    assert torch.linalg.svdvals(BjorckOrthonormal(5)(badly)).max() <= 1 + 1e-6


@pytest.mark.parametrize("pointwise", ["dense", "separable"])
def test_lipconvnet_carries_a_bound_every_layer_checked(pointwise):
    torch.manual_seed(0)
    net = build_network(10, (3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5), backbone="lipconvnet",
                        backbone_kwargs={"widths": [4, 8, 16], "depth": 2, "pointwise": pointwise}, head=pointwise)
    bound = lipschitz_bound(net)
    assert bound.value == pytest.approx(4.0, rel=1e-4) and bound.fixed  # 1 / min(std), every layer 1
    rules = bound.describe()
    assert "orthogonal conv, DFT norm (exact)" in rules
    assert ("orthogonal separable pointwise" in rules) == (pointwise == "separable")
    x = torch.rand(16, 3, 16, 16)
    rows = layer_norm_check(net, x)
    kinds = [type(m).__name__ for m in net.modules()]
    assert len(rows) == kinds.count("OrthoConv2d") + kinds.count("SeparablePointwise") + 1  # + the classifier
    assert all(r["spectral_norm"] <= 1 + 1e-4 for r in rows)
    assert net(x).shape == (16, 10)
    assert empirical_lipschitz(net, x, steps=30) <= bound.value
    centred = build_network(10, (3, 16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 0.5), backbone="lipconvnet",
                            backbone_kwargs={"widths": [4, 8, 16], "pointwise": pointwise}, head=pointwise,
                            scale_inputs=False)  # the mean only: the bound is the layers' own
    assert lipschitz_bound(centred).value == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(centred.normalize(x), x - 0.5)


@pytest.mark.parametrize("rank", [1, 2])
def test_a_kronecker_1x1_map_works_on_the_nchw_map_as_it_lies(rank):
    """SeparablePointwise is the 1x1 convolution with its implied weight on both paths and as
    its fold, and its factor path exports without a transpose (two MatMuls on reshaped views)."""
    import collections

    import onnx

    from sepnet.deploy import _export_bytes, inference_copy
    from sepnet.factorized import implied_path

    torch.manual_seed(0)
    layer = SeparablePointwise((4, 8), (4, 4), rank=rank)
    with torch.no_grad():
        layer.layer.bias.normal_()
    x = torch.randn(3, 32, 5, 6)
    reference = nn.functional.conv2d(x, layer.layer.implied_weight().detach()[:, :, None, None],
                                     layer.layer.bias.detach().flatten())
    for path in ("never", "always"):
        with implied_path(layer, path):
            torch.testing.assert_close(layer(x), reference)
    torch.testing.assert_close(layer.layer.folded()(x.reshape(3, 4, 8, 30)).reshape(3, 16, 5, 6), reference)
    net = inference_copy(nn.Sequential(layer))
    net[0].layer.implied_path = "never"
    ops = collections.Counter(n.op_type for n in onnx.load_from_string(_export_bytes(net, x)).graph.node)
    assert ops["Transpose"] == 0 and ops["MatMul"] == 2 * rank, ops


def test_lipconvnet_with_1x1_stages_puts_its_kronecker_maps_everywhere_but_the_stem():
    """kernel_size 1 with a 3x3 stem: separable pointwise makes every 1x1 map Kronecker-orthogonal
    (the stage maps too), still 1-Lipschitz by its measured layers and by attack."""
    torch.manual_seed(0)
    common = {"widths": [4, 8, 16], "depth": 2, "kernel_size": 1, "stem_kernel_size": 3}
    dense = build_network(10, (3, 16, 16), backbone="lipconvnet", head="dense", scale_inputs=False,
                          backbone_kwargs={**common, "pointwise": "dense"})
    kron = build_network(10, (3, 16, 16), backbone="lipconvnet", head="dense", scale_inputs=False,
                         backbone_kwargs={**common, "pointwise": "separable"})
    convs = [m for m in kron.modules() if isinstance(m, OrthoConv2d)]
    assert [m.conv.kernel_size for m in convs] == [(3, 3)]  # the stem only
    assert sum(isinstance(m, SeparablePointwise) for m in kron.modules()) == 7  # 2 between stages, 5 in them
    assert [m.conv.kernel_size for m in dense.modules() if isinstance(m, OrthoConv2d)] == [(3, 3)] + [(1, 1)] * 7
    assert sum(p.numel() for p in kron.parameters()) < sum(p.numel() for p in dense.parameters())
    x = torch.rand(16, 3, 16, 16)
    assert lipschitz_bound(kron).value == pytest.approx(1.0, abs=1e-4)
    assert all(r["spectral_norm"] <= 1 + 1e-4 for r in layer_norm_check(kron, x))
    assert empirical_lipschitz(kron, x, steps=30) <= 1.0


def test_lipconvnet_bad_options_say_what_was_expected():
    with pytest.raises(ValueError, match=r"widths \[4, 7\] and depth 1: expected even widths"):
        build_network(10, (3, 16, 16), backbone="lipconvnet", backbone_kwargs={"widths": [4, 7]})
    with pytest.raises(ValueError, match="pointwise 'conv': expected 'dense' or 'separable'"):
        build_network(10, (3, 16, 16), backbone="lipconvnet", backbone_kwargs={"pointwise": "conv"})
    with pytest.raises(ValueError, match="cannot take images of shape"):
        build_network(10, (3, 6, 6), backbone="lipconvnet", backbone_kwargs={"widths": [4, 8, 16]})


def test_the_certified_benchmark_records_a_line_per_run_and_skips_it_after(tmp_path, monkeypatch):
    """benchmarks/certified.py's bookkeeping, with training and the data replaced by stand-ins:
    one JSON line per run (the certificate's figures, the soundness checks' verdict), skipped on
    a rerun, and the report's table and plot."""
    import json

    from benchmarks import certified as bench
    small = {"lipconvnet_dense": {"backbone": "lipconvnet", "head": "dense",
                                  "backbone_kwargs": {"widths": [4, 8, 8], "depth": 1}}}
    small["lipconvnet_dense_lln"] = {**small["lipconvnet_dense"], "head_kwargs": {"normalize_last": True}}
    monkeypatch.setitem(bench.BUDGETS, "0.1M", small)
    monkeypatch.setattr(bench, "train", lambda module, epochs, batch, data: (1.5, None))
    from types import SimpleNamespace  # the training set as the recipe asks for it, without the images
    monkeypatch.setattr(bench, "datamodule", lambda batch, data, workers=2, crop=True, flip=True: SimpleNamespace(
        batch_size=batch, root=data, crop=crop, flip=flip))
    torch.manual_seed(0)
    monkeypatch.setattr(bench, "test_images", lambda: (torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))))
    results = tmp_path / "certified.jsonl"
    args = ["--model", "lipconvnet_dense", "--epochs", "1", "--check-images", "16", "--results", str(results)]
    bench.main(args)
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["soundness"]["passed"] and row["lipschitz_bound"] == pytest.approx(1.0, abs=1e-4)
    assert set(row["certified"]) == {"36/255", "72/255", "108/255"} and row["certified_curve"]["0/255"] >= row["certified"]["36/255"]
    bench.main(args)  # done: skipped
    assert len(results.read_text().splitlines()) == 1
    bench.main([*args[:1], "lipconvnet_dense_lln", *args[2:]])  # last-layer normalization: certified pairwise too
    lln = json.loads(results.read_text().splitlines()[1])
    assert lln["soundness"]["passed"] and lln["lipschitz_bound"] > 1
    assert all(lln["certified_pairwise"][k] >= lln["certified"][k] for k in lln["certified"])
    seen = {}  # a lever: the recipe changed for one run, recorded in its row, skipped on a rerun of it only
    monkeypatch.setattr(bench, "soundness_record", lambda *args: {"passed": True})  # checked above
    monkeypatch.setattr(bench, "train", lambda module, epochs, batch, data: seen.update(
        batch=batch, temperature=module.adversarial.margin_temperature, loader_batch=data.batch_size,
        schedule=module.optimization.scheduler, crop=data.crop, flip=data.flip, root=data.root) or (1.5, None))
    bench.main([*args, "--recipe", "temperature=0.5", "batch=128"])
    lever = json.loads(results.read_text().splitlines()[2])
    assert lever["recipe"] == {"temperature": 0.5, "batch": 128}
    assert seen == {"batch": 128, "temperature": 0.5, "loader_batch": 128, "schedule": "cosine", "crop": True,
                    "flip": True, "root": "20k"}
    bench.main([*args, "--recipe", "augment=flip", "data=40k", "schedule=onecycle"])  # the string levers reach the run
    assert seen["root"] == "40k" and not seen["crop"] and seen["flip"] and seen["schedule"] == "onecycle"
    assert json.loads(results.read_text().splitlines()[3])["recipe"] == {"augment": "flip", "data": "40k", "schedule": "onecycle"}
    for bad, expected in (("temp=0.5", "expected one of"), ("augment=cutout", "expected augment one of"),
                          ("batch=0", "expected a positive value")):
        with pytest.raises(SystemExit, match=f"--recipe '{bad}': {expected}"):
            bench.main([*args, "--recipe", bad])
    bench.main(["--report", "--results", str(results), "--figure", str(tmp_path / "certified.png")])
    assert (tmp_path / "certified.png").is_file()


@pytest.mark.slow
def test_the_certified_benchmark_models_match_their_recorded_rows_and_carry_a_bound_of_one():
    """Every model of benchmarks/certified.py's smaller budget builds and is 1-Lipschitz by its
    composed bound (the 0.3M models are the same layers, wider: building them took 60-150 s of CI),
    and the network a recorded row names is the one the table would build today (a drifted config
    would silently relabel the recorded figures)."""
    import json
    from pathlib import Path

    from benchmarks import certified as bench
    from sepnet.lipschitz import pairwise_bound

    for name, network in bench.BUDGETS["0.1M"].items():
        net = bench.classifier(network).net.eval()
        if name.endswith("_lln"):  # unit rows, not orthonormal: 1-Lipschitz up to its classifier
            assert pairwise_bound(net).feature == pytest.approx(1.0, abs=1e-4), name
            continue
        assert lipschitz_bound(net).value == pytest.approx(1.0, abs=1e-4), name
    assert set(bench.BUDGETS["0.3M"]) == set(bench.BUDGETS["0.1M"])  # the same kinds, wider
    rows = [json.loads(line) for line in bench.RESULTS.read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        assert row["network"] == bench.BUDGETS[row["budget"]][row["model"]], (row["budget"], row["model"])
    assert bench.BUDGETS["0.1M"]["lipconvnet_dense_c10"]["backbone_kwargs"]["pointwise"] == "dense"
    import yaml  # the CPU recipe is the measured model it names (its comment quotes that row's figures)
    config = yaml.safe_load((Path(bench.__file__).parents[1] / "conf" / "experiments" / "cifar10_jpeg_lipconvnet.yaml").read_text())
    recipe = config["model"]["network"]
    assert {**recipe, "scale_inputs": None} == {**bench.BUDGETS["0.1M"]["lipconvnet_dense_lln"], "scale_inputs": None}
    # ... trained as the best of its 18-epoch lever rows on the 20k images
    lln = [r for r in rows if (r["budget"], r["model"], r["epochs"]) == ("0.1M", "lipconvnet_dense_lln", 18)
           and "data" not in r.get("recipe", {})]
    best = {**bench.RECIPE, **max(lln, key=lambda r: r["certified_pairwise"]["36/255"]).get("recipe", {})}
    model, data = config["model"], config["data"]["init_args"]
    assert model["adversarial"]["margin_temperature"] == best["temperature"]
    assert model["adversarial"]["margin_eps"] == pytest.approx(best["margin"] / 255)
    assert (model["optimization"]["lr"], model["optimization"]["scheduler"], data["batch_size"]) == (
        best["lr"], best["schedule"], best["batch"])
    assert (data["crop"], data["flip"]) == (best["augment"] == "crop_flip", best["augment"] != "none")


def test_the_separable_classifier_shape_is_chosen_and_checked():
    torch.manual_seed(0)
    net = build_network(10, (3, 16, 16), backbone="lipconvnet", backbone_kwargs={"widths": [4, 8, 16], "pointwise": "separable"},
                        head="separable", head_kwargs={"classifier_shape": [10, 1, 1]}, scale_inputs=False)
    classifier = net.head.layers[0]
    assert classifier.out_shape == (10, 1, 1) and [tuple(f.shape) for f in classifier.factors[0]] == [(10, 16), (1, 4), (1, 4)]
    assert lipschitz_bound(net).value == pytest.approx(1.0, abs=1e-4) and net(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    same = build_network(10, (3, 16, 16), backbone="lipconvnet", backbone_kwargs={"widths": [4, 8, 16]},
                         head="separable", head_kwargs={"classifier_shape": [-1, 1, 1]})  # -1: the classes
    assert same.head.layers[0].out_shape == (10, 1, 1)
    with pytest.raises(ValueError, match=r"classifier_shape \[5, 2\]: expected 3 modes whose product is 10"):
        build_network(10, (3, 16, 16), backbone="lipconvnet", head="separable", head_kwargs={"classifier_shape": [5, 2]})


def test_the_long_certified_run_writes_its_curve_resumes_and_names_its_levers(tmp_path, monkeypatch, capsys):
    """benchmarks/certified_long.py on a tiny model and image folder: a curve line per epoch, the
    state it resumes from (a longer rerun goes on from it, not from scratch), the final line with
    the soundness checks, a finished run skipped, and a lever in the run's key and final line."""
    import json
    import shutil

    from benchmarks import certified as bench
    from benchmarks import certified_long as long
    from conftest import write_image_folder
    from sepnet.data import ImageFolderDataModule

    small = {"backbone": "lipconvnet", "head": "dense", "backbone_kwargs": {"widths": [4, 8, 8], "depth": 1}}
    monkeypatch.setitem(bench.BUDGETS, "0.1M", {"lipconvnet_dense": small})
    folder = write_image_folder(tmp_path / "images", classes=tuple(f"c{i}" for i in range(10)), per_class=2)
    seen = []

    def tiny(data, workers, recipe=None):
        seen.append(dict(recipe or {}))
        aug = (recipe or {}).get("augment", "crop_flip")
        return ImageFolderDataModule(root=str(folder), batch_size=8, num_workers=0, pin_memory=False,
                                     val_fraction=0.05, crop=aug == "crop_flip", flip=aug != "none")

    monkeypatch.setattr(long, "datamodule", tiny)
    torch.manual_seed(0)
    monkeypatch.setattr(long, "test_set", lambda data: (torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))))
    monkeypatch.setattr(long, "STATE", tmp_path / "state")
    results = tmp_path / "long.jsonl"
    common = ["--check-images", "8", "--results", str(results), "--workers", "0"]
    long.main(["--epochs", "1", *common])
    long.main(["--epochs", "1", *common])  # finished: skipped
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["epoch", "final"] and rows[1]["soundness"]["passed"]
    assert (tmp_path / "state" / "lipconvnet_dense_0.1M_40k_e1_s0" / "last.ckpt").is_file()
    # a run stopped after epoch 1 of 2 (its state at that boundary) goes on from it: one more epoch line
    shutil.copytree(tmp_path / "state" / "lipconvnet_dense_0.1M_40k_e1_s0", tmp_path / "state" / "lipconvnet_dense_0.1M_40k_e2_s0")
    long.main(["--epochs", "2", *common])
    resumed = [json.loads(line) for line in results.read_text().splitlines()[2:]]
    assert [(r["kind"], r.get("epoch")) for r in resumed] == [("epoch", 2), ("final", None)]
    long.main(["--epochs", "1", "--recipe", "augment=none", "temperature=0.5", *common])
    lever = json.loads(results.read_text().splitlines()[-1])
    assert lever["run"] == "lipconvnet_dense_0.1M_40k_e1_s0_augment-none_temperature-0.5"
    assert lever["recipe"] == {"augment": "none", "temperature": 0.5} and seen[-1] == {"augment": "none", "temperature": 0.5}
    with pytest.raises(SystemExit, match="expected the training set as --data"):
        long.main(["--recipe", "data=20k", *common])
    capsys.readouterr()
    long.main(["--report", "--results", str(results), "--figures", str(tmp_path / "figures")])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| lipconvnet_dense_0.1M_40k_e1_s0 |"))
    first = rows[0]
    assert row.split(" | ")[1:4] == ["1", f"{first['clean_acc']:.3f}", f"{first['certified']['36/255']:.3f}"]
    assert row.split(" | ")[6] == f"{first['certified_pairwise']['36/255']:.3f}"  # both certificates
    assert (tmp_path / "figures" / "certified_long.png").stat().st_size > 0
    assert long.best({"certified": {"36/255": 0.2}, "certified_pairwise": {"36/255": 0.3}}) == 0.3
