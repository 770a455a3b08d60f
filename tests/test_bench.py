"""The bench harness runs and reports what it promises. Never timings: those are for the script."""

from __future__ import annotations

import json

import torch

from rmsprop.bench import runner


def test_bench_reports_every_implementation_and_the_bound(tmp_path, monkeypatch):
    tiny = runner.Config("tiny fp32", ((1000,), (37,)), options={"momentum": 0.9, "centered": True})
    monkeypatch.setattr(runner, "CONFIGS", {tiny.name: tiny})
    results = runner.run_bench(
        configs=[tiny.name],
        compile_torch=False,
        first_step=False,
        sweep=False,
        quick=True,
        log=lambda s: None,
    )
    (row,) = results["configs"]
    assert set(row["results"]) == {*runner.IMPLEMENTATIONS, runner.BOUND}
    assert row["bytes_per_element"] == 36  # p, v r+w; g r; m, b r+w; fp32
    assert row["results"][runner.BASELINE]["speedup_vs_torch_foreach"] == 1.0
    for r in row["results"].values():
        assert r["step_ms"] > 0 and abs(r["gb_per_s"] - 36 * row["elements"] / r["step_ms"] / 1e6) < 1e-6
    bound = row["results"][runner.BOUND]
    assert bound["validation_ms"] > 0 and bound["grad_reads_ms"] > 0  # its per-tensor probes, timed alone
    paths = runner.save(results, tmp_path, plot=False)
    assert json.loads(paths[0].read_text())["machine"]["torch"] == torch.__version__
    table = paths[1].read_text()
    assert "| tiny fp32 |" in table and "| p.grad reads |" in table
    head, sep, tiny = [line for line in table.splitlines() if line.startswith("|")][:3]
    assert head.count("|") == sep.count("|") == tiny.count("|")  # every row has every column
    assert tiny.endswith(f"| {bound['validation_ms']:.2f} ms | {bound['grad_reads_ms']:.2f} ms |")


def test_the_bounds_grad_probe_reads_every_parameters_grad(monkeypatch):
    """The p.grad probe reads torch's getter on every parameter of the configuration."""
    config = runner.Config("three", ((4,), (5,), (6,)))
    made = runner._tensors(config)
    monkeypatch.setattr(runner, "_tensors", lambda config: made)
    read = []
    monkeypatch.setattr(runner, "_GRAD", lambda p: read.append(p) or p.grad)
    _, extra = runner._prepare(config, runner.BOUND)
    extra["_after_stream"]["grad_reads_ms"]()
    assert [id(p) for p in read] == [id(p) for p in made]
    monkeypatch.undo()
    assert all(runner._GRAD(p) is p.grad for p in made)


def test_stream_bound_moves_the_bytes_it_claims():
    """The bound's kernel really reads g and writes p and v (so it cannot be optimised away)."""
    from rmsprop.bench.bound import stream_bound

    p, g, v = torch.zeros(100_000), torch.ones(100_000), torch.zeros(100_000)
    stream = stream_bound([p], [g], [v])
    stream()
    stream()
    assert torch.equal(p, torch.full_like(p, -2.0)) and torch.equal(v, torch.full_like(v, 2.0))


def test_the_bounds_validation_alone_moves_nothing_and_still_refuses():
    """check_only validates the tensors as the stream does and writes nothing; a tensor whose
    storage shrank under it fails the kernel's check in both modes, with nothing written."""
    from rmsprop.bench.bound import stream_bound

    p, g, v = torch.zeros(100_000), torch.ones(100_000), torch.zeros(100_000)
    stream_bound([p], [g], [v], check_only=True)()
    assert not p.any() and not v.any()
    for check_only in (False, True):
        bad = torch.zeros(100_000)
        run = stream_bound([p], [g], [bad], check_only=check_only)
        bad.untyped_storage().resize_(4)
        try:
            run()
        except RuntimeError as e:
            assert "stream bound failed" in str(e)
        else:
            raise AssertionError("a tensor past its storage's end was accepted")
        assert not p.any()


def test_stream_bound_refuses_lists_of_different_lengths():
    """C reads one gradient and one square-average handle per parameter: shorter lists are refused
    in Python (before the check they were read past their end). In a subprocess: a crash fails."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from rmsprop.bench.bound import stream_bound\n"
        "ps = [torch.zeros(10) for _ in range(3)]\n"
        "try:\n"
        "    stream_bound(ps, ps[:1], [torch.zeros(10) for _ in range(3)])()\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "refused: stream_bound takes one gradient and one square average per parameter, got 3 / 1 / 3" in out.stdout


def test_sweeps_report_every_size_thread_count_and_the_training_share(tmp_path, monkeypatch):
    from rmsprop.bench import sweeps

    monkeypatch.setattr(sweeps, "QUICK_SIZES", (100, 1000))
    monkeypatch.setattr(runner, "THREAD_SWEEP_CONFIG", runner.Config("tiny", ((500,),) * 3))
    tiny = runner.Config("tiny fp32", ((1000,),))
    monkeypatch.setattr(runner, "CONFIGS", {tiny.name: tiny})
    results = runner.run_bench(
        configs=[tiny.name], compile_torch=False, first_step=False, quick=True, log=lambda s: None
    )
    assert [r["sizes"] for r in results["sizes"]] == [100, 1000]
    assert [r["threads"] for r in results["threads"]] == sorted(
        {1, *range(2, (__import__("os").cpu_count() or 1) + 1)}
    )
    for row in results["sizes"] + results["threads"]:
        assert set(row["results"]) == set(sweeps.SWEEP_IMPLEMENTATIONS)
    share = results["training_share"]
    for name in sweeps.TRAINING_OPTIMIZERS:
        assert 0 < share[name]["share"] < 1 and share[name]["step_ms"] > 0
    md = runner.save(results, tmp_path, plot=True)[1].read_text()
    assert "| 1,000 |" in md and "step share" in md
    assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_model_parameter_sets_have_their_published_sizes():
    import math

    from rmsprop.bench.models import MODELS

    counts = {name: (len(make()), sum(math.prod(s) for s in make())) for name, make in MODELS.items()}
    assert counts == {
        "ResNet-50": (161, 25_557_032),  # torchvision's resnet50
        "GPT-2 small": (148, 124_439_808),  # Hugging Face's gpt2
        "LSTM LM": (11, 19_780_400),  # Zaremba et al.'s medium model
    }


def test_bench_state_formats_rows(monkeypatch):
    """The state_dtype rows: every format side by side with its ratio to fp32 state, and bytes
    per parameter and buffer (int8: one byte and a float32 scale per 256, plus the pickle)."""
    from rmsprop.bench import state

    tiny = runner.Config("tiny", ((5000,),) * 2, options={"momentum": 0.9})
    monkeypatch.setattr(state, "STATE_CONFIGS", ("tiny",))
    monkeypatch.setattr(runner, "CONFIGS", {"tiny": tiny})
    results = runner.run_bench(quick=True, state_only=True, log=lambda s: None)
    (row,) = results["state_formats"]
    assert set(row["results"]) == set(state.STATE_IMPLEMENTATIONS)
    assert row["results"][state.FP32_STATE]["ratio_to_fp32_state"] == 1.0
    assert row["bytes"]["fp32"]["memory_bytes_per_param_per_buffer"] == 4.0
    assert row["bytes"]["bf16"]["memory_bytes_per_param_per_buffer"] == 2.0
    assert 1.0 < row["bytes"]["int8"]["memory_bytes_per_param_per_buffer"] <= 1 + 4 / 256 + 1e-3
    assert "int8 state, fused" in state.state_table(results)
