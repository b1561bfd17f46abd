"""The GPU script's every path, on the CPU (`--tiny`), so it cannot rot before a GPU is lent."""

from pathlib import Path

import pytest

import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_tiny_runs_every_section(tmp_path, monkeypatch):
    from benchmarks import gpu

    monkeypatch.chdir(tmp_path)
    result = gpu.main(["--tiny", "--out", str(tmp_path / "tiny.json"), "--work", str(tmp_path / "work")])
    assert result["errors"] == {}, result["errors"]
    assert gpu.max_time(1.5) == "00:00:01:30" and gpu.max_time(90) == "00:01:30:00"
    assert (tmp_path / "tiny.json").is_file() and result["environment"]["device"] == "cpu"
    assert {(r["batch"], r["precision"]) for r in result["layer"]} == {(4, "fp32"), (4, "bf16"), (8, "fp32"), (8, "bf16")}
    assert all(r["dense_ms"] > 0 and r["separable_ms"] > 0 for r in result["layer"])
    steps = {(r["head"], r["step"], r["precision"]) for r in result["training"]}
    assert len(steps) == 12 and all(r["images_per_s"] > 0 for r in result["training"])
    assert result["lightning"]["ratio_to_bare_loop"] > 0
    run = result["run"]
    assert run["epochs"] == 1 and "robust_acc/worst" in run["final_validation"]
    assert run["test"]["test/robust_acc/worst"] <= run["test"]["test/robust_acc/pgd_linf"]
    attacks = result["attacks"]
    assert attacks["max_acc_difference"] <= 0.1 and attacks["sepnet_seconds"] > 0
    assert result["sync"] == {case: "ok" for case in ("fgsm", "pgd", "trades", "nfgsm", "proximal", "rank2",
                                                       "hydra", "deadwood")}


def test_gpu_hours_section_times_the_cells_through_the_cli(tmp_path, monkeypatch):
    """The GPU cells' hour estimate, on the CPU at 1/16 width: each cell is built from its config
    by the application's CLI (a pruning cell without its dense start) and its figure is its
    epochs x (steps per epoch x measured step + validation pass)."""
    from benchmarks import gpu

    monkeypatch.chdir(tmp_path)
    result = gpu.main(["--tiny", "--sections", "hours", "--out", str(tmp_path / "h.json"), "--work", str(tmp_path)])
    hours = result["hours"]
    assert result["errors"] == {} and hours["errors"] == {} and hours["not_measured"] == []
    rows = {r["cell"]: r for r in hours["rows"]}
    assert set(rows) == {"cifar10_vgg16_dense", "cifar10_vgg16_fc226_separable", "cifar10_vgg16_model10_hydra"}
    for row in rows.values():
        assert row["step_s"] > 0 and row["val_s"] > 0 and row["steps_per_epoch"] == 352
        assert abs(row["hours"] - row["epochs"] * (352 * row["step_s"] + row["val_s"]) / 3600) < 1e-9
    dense, hydra = rows["cifar10_vgg16_dense"], rows["cifar10_vgg16_model10_hydra"]
    assert (dense["epochs"], hydra["epochs"], hydra["from_dense"], dense["from_dense"]) == (100, 50, True, False)
    assert abs(hydra["with_dense_start"] - (hydra["hours"] + dense["hours"] / 2)) < 1e-9
    assert "with_dense_start" not in rows["cifar10_vgg16_fc226_separable"]
    # the cell's own compression was applied: 10x fewer non-zeros than the dense model
    assert hydra["params_nonzero"] * 9 < dense["params_nonzero"] == hydra["params_stored"]
    assert rows["cifar10_vgg16_fc226_separable"]["params_stored"] < dense["params_stored"]
    late = gpu.hours_section(torch.device("cpu"), True, tmp_path, tmp_path, limit_s=-1)
    assert late["rows"] == [] and len(late["not_measured"]) == 3


@pytest.mark.slow
def test_the_deployed_cost_benchmark_records_a_cell_and_reports_its_front(tmp_path, monkeypatch):
    """benchmarks.deploy on one cell (the 30x low-rank VGG-16/4 as its factors, 1 run a figure):
    exported twice (for batch 1 and 64), every figure recorded, a rerun skips it, and the
    report's table row and the accuracy-against-cost figure."""
    import json

    from benchmarks import deploy

    results = tmp_path / "deployed.jsonl"
    args = ["--cells", "--model", "vgg", "--budget", "model30", "--method", "lowrank", "--repeats", "1",
            "--rounds", "1", "--fold", "never", "--results", str(results), "--work", str(tmp_path / "work")]
    deploy.main(args)
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["macs_per_image"] < 2.5e6 and 25 < row["nonzero_compression"] < 35  # the factors: 9x fewer than dense
    assert set(row["latency_ms_per_image"]) == {f"{e}_b{b}_t{t}" for e in ("ort", "torch") for b in (1, 64)
                                                for t in (1, 2)}
    assert row["onnx_gzip_bytes"] < row["onnx_bytes"] and row["peak_rss_bytes_batch64"] > 0
    deploy.main(args)
    assert len(results.read_text().splitlines()) == 1
    monkeypatch.setattr(deploy, "FIGURES", tmp_path)
    deploy.report(results, tmp_path)
    assert (tmp_path / "deployed.png").is_file()


def test_the_certified_cost_report_averages_the_6_epoch_rows_and_plots_the_sweep_apart(tmp_path, capsys):
    """deploy --certified --report: certified accuracy from the plain 6-epoch rows only (a lever's
    row or an 18-epoch one is another recipe), seeds averaged, the 1x1 sweep in its own panels."""
    import json

    from benchmarks import deploy

    def cost(budget, method, ms):
        return {"budget": budget, "method": method, "params_stored": 1000, "macs_per_image": 2e6, "onnx_bytes": 4e3,
                "folds": {"1": [], "64": []}, "factorized_layers": 0,
                "latency_ms_per_image": {"ort_b1_t1": ms, "ort_b64_t1": ms / 4, "torch_b1_t1": 2 * ms}}

    def cert(budget, model, acc, epochs=6, **extra):
        return {"budget": budget, "model": model, "epochs": epochs, "certified": {"36/255": acc}, **extra}

    results, certified = tmp_path / "cost.jsonl", tmp_path / "certified.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in (
        cost("0.1M", "lipconvnet_dense", 1.0), cost("1x1", "k1_dense_w8", 0.5), cost("1x1", "k1_kron_w8", 0.4),
        cost("1x1", "k1_dense_w16", 0.9), cost("1x1", "k1_kron_w16", 0.6))))
    certified.write_text("".join(json.dumps(r) + "\n" for r in (
        cert("0.1M", "lipconvnet_dense", 0.30), cert("0.1M", "lipconvnet_dense", 0.40, epochs=18),
        cert("0.1M", "lipconvnet_dense", 0.50, recipe={"lr": 0.01}), cert("1x1", "k1_dense_w8", 0.2),
        cert("1x1", "k1_dense_w8", 0.3), cert("1x1", "k1_kron_w8", 0.25), cert("1x1", "k1_dense_w16", 0.35))))
    deploy.certified_report(results, tmp_path, certified)
    table = {line.split("|")[2].strip(): line.split("|")[-2].strip() for line in capsys.readouterr().out.splitlines()
             if line.startswith("| 0.1M") or line.startswith("| 1x1")}
    assert table == {"lipconvnet_dense": "0.300 (1)", "k1_dense_w8": "0.250 (2)", "k1_kron_w8": "0.250 (1)",
                     "k1_dense_w16": "0.350 (1)", "k1_kron_w16": "--"}
    assert (tmp_path / "certified_cost.png").is_file()
    assert [deploy.kronecker_model(m) for m in ("k1_kron_w8", "lipconvnet_separable_c10", "lipmlp", "k1_dense_w8")] \
        == [True, True, True, False]


def test_the_deployment_front_keeps_only_the_points_nothing_beats():
    from benchmarks.deploy import pareto

    points = [(3.0, 0.25, "d"), (1.0, 0.2, "a"), (2.0, 0.1, "b"), (3.0, 0.3, "c"), (0.5, 0.2, "e")]
    assert [name for _, _, name in pareto(points)] == ["e", "c"]  # a ties e's accuracy at a higher cost
