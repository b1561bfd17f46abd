"""The GPU script's every path, on the CPU (`--tiny`), so it cannot rot before a GPU is lent."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_script_tiny_runs_every_section(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
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
