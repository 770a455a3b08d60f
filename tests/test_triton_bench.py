"""`rmsprop bench --device cuda` and scripts/gpu_check.sh, checked without a GPU: the bench's code
on CPU tensors with the kernel interpreted (--dry-run), the script's syntax. Never timings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rmsprop.bench import cuda
from rmsprop.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_routing(monkeypatch):
    from rmsprop.backends.fused_triton import plan

    monkeypatch.setattr(plan, "DEVICE_TYPES", set(plan.DEVICE_TYPES))  # --dry-run adds "cpu"


def test_triton_cuda_bench_dry_run_reports_every_implementation(tmp_path, capsys):
    code = main(["bench", "--device", "cuda", "--dry-run", "--no-compile", "--out", str(tmp_path),
                 "--configs", "10x1M fp32 momentum+centered", "2000x5k fp32 plain"])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "bench-cuda.json").read_text())
    assert results["dry_run"] and [c["name"] for c in results["configs"]] == [
        "10x1M fp32 momentum+centered",
        "2000x5k fp32 plain",
    ]
    for row in results["configs"]:
        assert set(row["results"]) == {cuda.TRITON, cuda.GRAPH, cuda.FOREACH, cuda.COPY}
        assert row["results"][cuda.FOREACH]["speedup_vs_torch_foreach"] == 1.0
        assert row["results"][cuda.COPY]["fraction_of_copy_bound"] == 1.0
        for r in row["results"].values():
            assert r["step_ms"] > 0
            assert abs(r["gb_per_s"] - row["bytes_per_element"] * row["elements"] / r["step_ms"] / 1e6) < 1e-6
    assert results["configs"][0]["bytes_per_element"] == 36
    assert "speedup vs torch foreach (target >= 3)" in "".join(results["acceptance"])
    table = (tmp_path / "bench-cuda.md").read_text()
    assert "| 2000x5k fp32 plain |" in table and "CPU (dry run)" in table
    assert "copy bound" in capsys.readouterr().out


def test_triton_cuda_bench_refuses_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # CI's has none
    with pytest.raises(RuntimeError, match="no CUDA device"):
        cuda.run_cuda_bench(configs=["10x1M fp32 plain"], log=lambda s: None)


def test_triton_gpu_check_script_is_valid_bash():
    script = ROOT / "scripts" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)
