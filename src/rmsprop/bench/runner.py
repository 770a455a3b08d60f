"""Benchmark harness behind `rmsprop bench`.

For each configuration every implementation steps the same shapes with its own fresh tensors,
all in this process and interleaved round-robin (see _measure_side_by_side), and reports its
median step time. Throughput is reported three ways:
steps/s, G elements/s, and GB/s of the memory traffic a step must cause (per element: p read and
written, g read, v read and written, and m / b read and written when centered / with momentum),
so an implementation that moves extra bytes shows a lower effective GB/s.

The bound is the native streaming kernel (`rmsprop_stream_bound`): the bytes of a plain fp32 step
over the same tensors, with the same thread split and arithmetic too cheap to matter, and no
Python work per call (memory time only). For a
configuration that moves other bytes (bf16, momentum, centered), the bound's time is those bytes
at the measured streaming bandwidth. The bound validates every tensor on every call, as a step
does; its row also reports that validation alone (``validation_ms``, the kernel's check mode over
the same fp32 tensors): with thousands of small tensors, touching each one's metadata is a
visible part of the bound's time, and it is not memory traffic. Beside it, ``grad_reads_ms``:
reading every parameter's ``.grad`` through torch's getter, which any optimizer on torch's API
does first on every step (the fused path too), after a stream as a step finds the objects.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backends import fused_cpu
from ..optimizer import _GRAD, RMSprop  # (_GRAD: how the optimizer reads .grad, mapped over a C getter)
from . import state, sweeps
from .bound import stream_bound
from .models import MODELS


@dataclass(frozen=True)
class Config:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    compile_torch: bool = True  # torch.compile over thousands of tensors takes many minutes

    @property
    def elements(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def bytes_per_element(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        streams = 5 + 2 * bool(self.options.get("momentum")) + 2 * bool(self.options.get("centered"))
        return streams * size


MOMENTUM_CENTERED = {"momentum": 0.9, "centered": True}
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        Config("10x1M fp32 plain", ((1_000_000,),) * 10),
        Config("10x1M fp32 momentum+centered", ((1_000_000,),) * 10, options=MOMENTUM_CENTERED),
        Config("2000x5k fp32 plain", ((5_000,),) * 2000, compile_torch=False),
        Config("1x10M fp32 plain", ((10_000_000,),)),  # the element count of 2000x5k, in one tensor
        Config("1x16M fp32 plain", ((16_000_000,),)),
        Config("10x1M bf16 plain", ((1_000_000,),) * 10, dtype=torch.bfloat16),
        Config(
            "10x1M bf16 momentum+centered",
            ((1_000_000,),) * 10,
            dtype=torch.bfloat16,
            options=MOMENTUM_CENTERED,
        ),
        Config("10x1M fp16 plain", ((1_000_000,),) * 10, dtype=torch.float16),
        *(Config(f"{name} fp32", make()) for name, make in MODELS.items()),
    ]
}
QUICK_CONFIGS: dict[str, Config] = {
    name: CONFIGS[name]
    for name in ("10x1M fp32 plain", "10x1M fp32 momentum+centered", "2000x5k fp32 plain", "10x1M bf16 plain")
}

THREAD_SWEEP_CONFIG = CONFIGS["10x1M fp32 plain"]
# the state-format rows may name these besides CONFIGS (heavy-ball momentum alone: a second
# quantized buffer without the centered mean)
STATE_ONLY_CONFIGS: dict[str, Config] = {
    "10x1M fp32 momentum": Config("10x1M fp32 momentum", ((1_000_000,),) * 10, options={"momentum": 0.9}),
}

Factory = Callable[[list[torch.Tensor], dict], torch.optim.Optimizer]
IMPLEMENTATIONS: dict[str, Factory] = {
    "rmsprop fused": lambda ps, o: RMSprop(ps, fused=True, **o),
    "rmsprop default": lambda ps, o: RMSprop(ps, **o),  # what a user gets: fp16 routes to foreach
    "rmsprop foreach": lambda ps, o: RMSprop(ps, foreach=True, fused=False, **o),
    "torch foreach": lambda ps, o: torch.optim.RMSprop(ps, foreach=True, **o),
    "torch per-tensor": lambda ps, o: torch.optim.RMSprop(ps, foreach=False, **o),
}
BASELINE = "torch foreach"
COMPILED = "torch.compile(torch)"
BOUND = "bandwidth bound"


def _tensors(config: Config, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in config.shapes:
        p = torch.randn(shape, generator=gen).to(config.dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(config.dtype)
        params.append(p)
    return params


def _prepare(config: Config, name: str) -> tuple[Callable[[], object], dict]:
    """The zero-argument step of one implementation on fresh tensors, and what was measured
    while preparing it (torch.compile's time)."""
    params = _tensors(config)
    extra: dict = {}
    if name == BOUND:
        fp32 = [p.detach().float() for p in params]
        grads = [p.grad.float() for p in params]
        avgs = [torch.ones_like(p) for p in fp32]
        extra["_after_stream"] = {
            "validation_ms": stream_bound(fp32, grads, avgs, check_only=True),
            # what any optimizer on torch's API reads first: every parameter's gradient
            "grad_reads_ms": lambda: list(map(_GRAD, params)),
        }
        return stream_bound(fp32, grads, avgs), extra
    if name == COMPILED:
        _cold_compile_caches()
        opt = torch.optim.RMSprop(params, foreach=True, **config.options)
        step = torch.compile(opt.step)
        start = time.perf_counter()
        step()
        extra["compile_s"] = time.perf_counter() - start
        return step, extra
    factory = IMPLEMENTATIONS.get(name) or state.STATE_IMPLEMENTATIONS[name]
    return factory(params, dict(config.options)).step, extra


def _measure_side_by_side(config: Config, names: list[str], quick: bool) -> dict[str, dict]:
    """Median seconds per step of every implementation, measured round-robin: each repeat times
    every implementation once, in turn, so a machine whose speed drifts (a shared VM) slows them
    all alike instead of whichever happened to run during the slow minute."""
    warmup, repeats, per = (2, 3, 3) if quick else (3, 9, 5)
    if config.elements > 50_000_000:  # GPT-2 sized: torch's per-tensor step alone takes ~1 s
        warmup, repeats, per = 1, (3 if quick else 5), 1
    steps, extras = {}, {}
    for name in names:
        steps[name], extras[name] = _prepare(config, name)
        for _ in range(warmup):
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    # the bound's per-tensor probes (its own validation of every tensor, and the reads of every
    # parameter's .grad), each timed alone right after a stream has pushed the tensors' metadata
    # out of the cache, as a step finds it (see bound.py)
    probes = {name: extras[name].pop("_after_stream") for name in names if "_after_stream" in extras[name]}
    probe_times: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in fns} for name, fns in probes.items()
    }
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            for _ in range(per):
                steps[name]()
            samples[name].append((time.perf_counter() - start) / per)
            for key, probe in probes.get(name, {}).items():
                seconds = 0.0
                for _ in range(per):
                    steps[name]()
                    start = time.perf_counter()
                    probe()
                    seconds += time.perf_counter() - start
                probe_times[name][key].append(seconds / per)
    for name, times in probe_times.items():
        for key, values in times.items():
            extras[name][key] = statistics.median(values) * 1e3
    out = {}
    for name in names:
        seconds = statistics.median(samples[name])
        if name == BOUND:  # stream GB/s, then the time this config's bytes take at that speed
            extras[name]["stream_gb_per_s"] = 20 * config.elements / seconds / 1e9
            seconds = config.bytes_per_element * config.elements / (extras[name]["stream_gb_per_s"] * 1e9)
        out[name] = {
            **extras[name],
            "step_ms": seconds * 1e3,
            "steps_per_s": 1 / seconds,
            "gelem_per_s": config.elements / seconds / 1e9,
            "gb_per_s": config.bytes_per_element * config.elements / seconds / 1e9,
        }
    return out


def _cold_compile_caches() -> None:
    """Make the next torch.compile start cold: no in-memory graphs, no on-disk kernels from an
    earlier run (Inductor's cache would otherwise turn a ~10 s compile into ~1 s)."""
    import tempfile

    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rmsprop-bench-inductor-")
    inductor_config.fx_graph_cache = False


def first_step_costs(repeats: int = 3) -> dict:
    """Seconds of the first step in a fresh process (10 x 1M fp32), fused vs foreach; medians."""
    script = (
        "import time, torch, rmsprop\n"
        "ps=[torch.randn(1_000_000, requires_grad=True) for _ in range(10)]\n"
        "for p in ps: p.grad=torch.randn_like(p)\n"
        "opt=rmsprop.RMSprop(ps, **{kw})\n"
        "t=time.perf_counter(); opt.step(); first=time.perf_counter()-t\n"
        "t=time.perf_counter(); opt.step(); second=time.perf_counter()-t\n"
        "print(first, second)\n"
    )
    out = {}
    for label, kw in (("fused", "dict(fused=True)"), ("foreach", "dict(foreach=True, fused=False)")):
        firsts, seconds = [], []
        for _ in range(repeats):
            text = subprocess.run(
                [sys.executable, "-c", script.replace("{kw}", kw)], capture_output=True, text=True, check=True
            ).stdout.split()
            firsts.append(float(text[0]))
            seconds.append(float(text[1]))
        out[label] = {"first_step_s": statistics.median(firsts), "second_step_s": statistics.median(seconds)}
    out["fused_first_minus_foreach_first_s"] = out["fused"]["first_step_s"] - out["foreach"]["first_step_s"]
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    kernel = fused_cpu.is_available()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # how the fused kernel runs here (both chosen for the CPU at load time)
        "kernel_isa": fused_cpu.native.isa() if kernel else None,
        "kernel_prefetch": fused_cpu.native.prefetches() if kernel else None,
    }


def _state_formats(quick: bool, log: Callable[[str], None]) -> list[dict]:
    return state.state_formats(_measure_side_by_side, {**CONFIGS, **STATE_ONLY_CONFIGS}, quick, log)


def run_bench(
    *,
    quick: bool = False,
    configs: list[str] | None = None,
    compile_torch: bool = True,
    first_step: bool = True,
    sweep: bool = True,
    state_formats: bool = False,
    state_only: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark and return every number (see the module docstring): the configurations,
    then (``sweep``) the size and thread sweeps and the optimizer's share of a training step, and
    (``state_formats``, on in the CLI) fp32 / bf16 / int8 state side by side (see bench.state).
    ``state_only``: only the latter."""
    if not fused_cpu.is_available():
        raise RuntimeError(f"the fused kernel is unavailable: {fused_cpu.load_error()}")
    if state_only:
        return {"machine": machine(), "quick": quick, "configs": [],
                "state_formats": _state_formats(quick, log)}  # fmt: skip
    chosen = QUICK_CONFIGS if quick and not configs else CONFIGS
    names = configs or list(chosen)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")

    results = {"machine": machine(), "quick": quick, "configs": []}
    for name in names:
        config = CONFIGS[name]
        impls = [*IMPLEMENTATIONS]
        if compile_torch and config.compile_torch and not quick:
            impls.append(COMPILED)
        impls.append(BOUND)
        row = {
            "name": name,
            "elements": config.elements,
            "bytes_per_element": config.bytes_per_element,
        }
        log(f"  {name}: {', '.join(impls)} ...")
        row["results"] = _measure_side_by_side(config, impls, quick)
        base = row["results"][BASELINE]["step_ms"]
        for r in row["results"].values():
            r["speedup_vs_torch_foreach"] = base / r["step_ms"]
        fused = row["results"]["rmsprop fused"]
        row["fused_fraction_of_bound"] = row["results"][BOUND]["step_ms"] / fused["step_ms"]
        results["configs"].append(row)
        log(format_row(row))
    if sweep:
        results["sizes"] = sweeps.size_sweep(_measure_side_by_side, Config, quick, log)
        results["threads"] = sweeps.thread_sweep(_measure_side_by_side, THREAD_SWEEP_CONFIG, quick, log)
        results["training_share"] = sweeps.training_share(quick, log)
    if state_formats:
        results["state_formats"] = _state_formats(quick, log)
    if first_step:
        log("  first step in a fresh process ...")
        results["first_step"] = first_step_costs(repeats=1 if quick else 3)
    return results


def format_row(row: dict) -> str:
    lines = [
        f"\n{row['name']}  ({row['elements'] / 1e6:.1f}M elements, {row['bytes_per_element']} B/element)"
    ]
    lines.append(
        f"  {'implementation':<24}{'ms/step':>9}{'steps/s':>9}{'Gelem/s':>9}{'GB/s':>8}{'vs torch foreach':>18}"
    )
    for impl, r in row["results"].items():
        extra = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        if "validation_ms" in r:  # (an older bench.json has no grad_reads_ms)
            probes = [f"its validation of the fp32 tensors {r['validation_ms']:.2f} ms"]
            probes += [f"reading every p.grad {r['grad_reads_ms']:.2f} ms"] if "grad_reads_ms" in r else []
            extra = f"  (alone, after a stream: {', '.join(probes)})"
        lines.append(
            f"  {impl:<24}{r['step_ms']:>9.2f}{r['steps_per_s']:>9.1f}{r['gelem_per_s']:>9.2f}"
            f"{r['gb_per_s']:>8.1f}{r['speedup_vs_torch_foreach']:>17.2f}x{extra}"
        )
    lines.append(f"  fused reaches {100 * row['fused_fraction_of_bound']:.0f}% of the bandwidth bound")
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    """The README's table: one row per configuration, speedups against torch foreach."""
    impls = [
        i for i in [*IMPLEMENTATIONS, COMPILED, BOUND] if any(i in c["results"] for c in results["configs"])
    ]
    head = "| configuration | " + " | ".join(impls) + " | fused / bound | bound's validation | p.grad reads |"
    sep = "|---" * (len(impls) + 4) + "|"
    rows = [head, sep]
    for c in results["configs"]:
        cells = []
        for i in impls:
            r = c["results"].get(i)
            cells.append(
                "—" if r is None else f"{r['step_ms']:.1f} ms ({r['speedup_vs_torch_foreach']:.2f}x)"
            )
        bound = c["results"].get(BOUND, {})
        probes = ["—" if bound.get(key) is None else f"{bound[key]:.2f} ms" for key in ("validation_ms", "grad_reads_ms")]
        rows.append(
            f"| {c['name']} | " + " | ".join(cells) + f" | {100 * c['fused_fraction_of_bound']:.0f}% | "
            + " | ".join(probes) + " |"
        )
    return "\n".join(rows)


def sweep_tables(results: dict) -> str:
    """The sweeps as markdown: ms per step and the fraction of the bound, per size and threads."""
    lines = []
    for key, label, fmt in (("sizes", "sizes", "{:,}"), ("threads", "threads", "{}")):
        rows = results.get(key)
        if not rows:
            continue
        impls = list(rows[0]["results"])
        lines += ["", f"| {label} | " + " | ".join(impls) + " | fused / bound | fused vs torch foreach |"]
        lines.append("|---" * (len(impls) + 3) + "|")
        for row in rows:
            r = row["results"]
            cells = [f"{r[i]['step_ms']:.3f} ms" for i in impls]
            frac = r[BOUND]["step_ms"] / r["rmsprop fused"]["step_ms"]
            speed = r[BASELINE]["step_ms"] / r["rmsprop fused"]["step_ms"]
            lines.append(
                f"| {fmt.format(row[label])} | "
                + " | ".join(cells)
                + f" | {100 * frac:.0f}% | {speed:.2f}x |"
            )
    share = results.get("training_share")
    if share:
        lines += [
            "",
            f"Optimizer share of a training step ({share['model']}, {share['parameters']:,} parameters):",
            "",
        ]
        lines += ["| optimizer | forward+backward | step | step share |", "|---|---|---|---|"]
        for name, r in share.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {name} | {r['forward_backward_ms']:.2f} ms | {r['step_ms']:.2f} ms | {100 * r['share']:.0f}% |"
                )
    return "\n".join(lines)


def plotting_unavailable() -> str | None:
    """Why ``save(..., plot=True)`` would fail (matplotlib missing), or None: ask before the run."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'rmsprop[report]'"
    return None


def _write_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``: an
    interrupted save leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save(results: dict, out: Path, plot: bool) -> list[Path]:
    """Write bench.json, bench.md (and bench.png) into ``out``, each file whole or not at all."""
    if plot and (why := plotting_unavailable()):
        raise RuntimeError(why)
    out.mkdir(parents=True, exist_ok=True)
    written = [
        _write_whole(out / "bench.json", lambda p: p.write_text(json.dumps(results, indent=2))),
        _write_whole(
            out / "bench.md",
            lambda p: p.write_text(
                markdown_table(results) + "\n" + sweep_tables(results) + "\n" + state.state_table(results) + "\n"
            ),
        ),
    ]
    if plot:
        written.append(_write_whole(out / "bench.png", lambda p: _plot(results, p)))
    return written


def _plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    impls = [i for i in [*IMPLEMENTATIONS, COMPILED, BOUND] if any(i in c["results"] for c in configs)]
    has_sweeps = bool(results.get("sizes") or results.get("threads"))
    fig, axes = plt.subplots(
        1, 3 if has_sweeps else 1, figsize=(18 if has_sweeps else 11, 5.6),
        gridspec_kw={"width_ratios": [2.2, 1, 1]} if has_sweeps else None, squeeze=False,
    )  # fmt: skip
    ax = axes[0][0]
    height = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        ys = [j + (k - (len(impls) - 1) / 2) * height for j in range(len(configs))]
        xs = [c["results"].get(impl, {}).get("speedup_vs_torch_foreach", 0.0) for c in configs]
        ax.barh(ys, xs, height, label=impl)
    ax.set_yticks(range(len(configs)), [c["name"] for c in configs], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over torch's foreach step (log; higher is better)")
    ax.legend(fontsize=7, loc="lower right")
    m = results["machine"]
    ax.set_title(f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}", fontsize=9)
    for col, (key, label) in enumerate(
        (("sizes", "elements (one fp32 tensor)"), ("threads", "torch threads")), 1
    ):
        rows = results.get(key)
        if not has_sweeps:
            break
        ax = axes[0][col]
        for impl in rows[0]["results"] if rows else []:
            ax.plot(
                [r[key] for r in rows], [r["results"][impl]["gb_per_s"] for r in rows], marker="o", label=impl
            )
        if key == "sizes":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("effective GB/s of a step's traffic")
        ax.set_title(f"{'size' if key == 'sizes' else 'thread'} sweep" + ("" if key == "sizes" else " (10 x 1M fp32)"),
                     fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


__all__ = [
    "CONFIGS", "IMPLEMENTATIONS", "run_bench", "save", "markdown_table", "first_step_costs", "plotting_unavailable"
]
