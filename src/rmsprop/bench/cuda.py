"""`rmsprop bench --device cuda`: the Triton kernel against torch on a GPU.

For each configuration every implementation steps the same shapes with its own tensors, measured
round-robin (each repeat times every implementation once, in turn) with CUDA events around a
loop of steps, so a step's time includes whatever gaps the host leaves between launches. The
implementations:

- ``rmsprop triton``: ``rmsprop.RMSprop(fused=True)`` (the Triton kernel, counters on the device);
- ``rmsprop triton, graph``: the same step captured once in a CUDA graph (``capturable=True``,
  a tensor lr on the device) and replayed: the kernel without the host's per-step checks;
- ``torch foreach``: ``torch.optim.RMSprop(foreach=True)``, the baseline;
- ``torch.compile(torch)``: torch's foreach step compiled by Inductor (not for 2000 tensors,
  whose compile takes minutes);
- ``copy bound``: a device-to-device copy of as many bytes as the step must read and write
  (a copy of N bytes reads N and writes N), the memory bound.

Each row reports ms per step, effective GB/s of the traffic a step must cause (per element: p
read and written, g read, v read and written, m and b read and written when centered / with
momentum), the speedup against torch foreach, and the kernel's fraction of the copy bound.

``--dry-run`` runs the same code on the CPU at tiny sizes, the kernel under Triton's interpreter
(CPU tensors routed to it as the tests route them): a check of this module without a GPU, not a
measurement.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..optimizer import RMSprop

__all__ = ["CUDA_CONFIGS", "run_cuda_bench", "format_cuda_row", "cuda_markdown_table", "save_cuda"]


@dataclass(frozen=True)
class CudaConfig:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype = torch.float32
    options: dict = field(default_factory=dict)
    compile_torch: bool = True

    @property
    def elements(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def bytes_per_element(self) -> int:
        size = torch.tensor([], dtype=self.dtype).element_size()
        streams = 5 + 2 * bool(self.options.get("momentum")) + 2 * bool(self.options.get("centered"))
        return streams * size


MC = {"momentum": 0.9, "centered": True}
# The two targets first (a run cut short keeps them); torch.compile where it compiles in
# well under a minute (one to ten tensors), not for 2000 tensors (minutes).
CUDA_CONFIGS: dict[str, CudaConfig] = {
    c.name: c
    for c in [
        CudaConfig("1x64M fp32 plain", ((64_000_000,),)),
        CudaConfig("10x1M fp32 momentum+centered", ((1_000_000,),) * 10, options=MC),
        CudaConfig("10x1M fp32 plain", ((1_000_000,),) * 10),
        CudaConfig("10x1M bf16 plain", ((1_000_000,),) * 10, dtype=torch.bfloat16, compile_torch=False),
        CudaConfig("2000x5k fp32 plain", ((5_000,),) * 2000, compile_torch=False),
        CudaConfig("2000x5k fp32 momentum+centered", ((5_000,),) * 2000, options=MC, compile_torch=False),
        CudaConfig("1x64M bf16 plain", ((64_000_000,),), dtype=torch.bfloat16, compile_torch=False),
        CudaConfig("1x64M fp32 momentum+centered", ((64_000_000,),), options=MC, compile_torch=False),
    ]
}
# --dry-run: the same configurations at sizes the interpreter gets through in seconds.
_TINY = {"10x1M": ((1_000,),) * 3, "2000x5k": ((50,),) * 20, "1x64M": ((4_000,),)}

TRITON, GRAPH, FOREACH, COMPILED, COPY = (
    "rmsprop triton",
    "rmsprop triton, graph",
    "torch foreach",
    "torch.compile(torch)",
    "copy bound",
)


def _tensors(config: CudaConfig, shapes, device, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device=device, dtype=config.dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=config.dtype)
        params.append(p)
    return params


def _graphed_step(params: list[torch.Tensor], options: dict, device: str) -> Callable[[], None]:
    """rmsprop's step with capturable=True, captured once in a CUDA graph; replaying it is the
    step (its gradients are the static .grad tensors)."""
    opt = RMSprop(params, lr=torch.tensor(0.01, device=device), capturable=True, **options)
    if device == "cpu":  # --dry-run: no graphs on the CPU; the capturable step itself
        return opt.step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up: state, tables and the kernel's compilation, outside the capture
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    step = graph.replay
    step.keep_alive = (opt, graph)  # type: ignore[attr-defined]
    return step


def _prepare(config: CudaConfig, shapes, name: str, device: str) -> tuple[Callable[[], object], dict]:
    params = _tensors(config, shapes, device)
    extra: dict = {}
    options = dict(config.options)
    if name == COPY:
        elements = sum(int(torch.Size(s).numel()) for s in shapes)
        nbytes = config.bytes_per_element * elements // 2  # a copy reads and writes it: the step's traffic
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), extra
    if name == TRITON:
        return RMSprop(params, fused=True, **options).step, extra
    if name == GRAPH:
        return _graphed_step(params, options, device), extra
    opt = torch.optim.RMSprop(params, foreach=True, **options)
    if name == COMPILED:
        from torch import _dynamo

        _dynamo.reset()
        step = torch.compile(opt.step)
        start = time.perf_counter()
        step()
        _sync(device)
        extra["compile_s"] = time.perf_counter() - start
        return step, extra
    return opt.step, extra


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _timed(step: Callable[[], object], per: int, device: str) -> float:
    """Seconds per step over ``per`` steps: CUDA events on a GPU, the wall clock on the CPU."""
    if device == "cpu":
        start = time.perf_counter()
        for _ in range(per):
            step()
        return (time.perf_counter() - start) / per
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(per):
        step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / per


def _measure(config: CudaConfig, shapes, names: list[str], device: str, quick: bool) -> dict[str, dict]:
    warmup, repeats, per = (1, 2, 2) if device == "cpu" else ((3, 5, 10) if quick else (5, 9, 20))
    steps, extras = {}, {}
    for name in names:
        steps[name], extras[name] = _prepare(config, shapes, name, device)
        for _ in range(warmup):
            steps[name]()
        _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            samples[name].append(_timed(steps[name], per, device))
    elements = sum(int(torch.Size(s).numel()) for s in shapes)
    traffic = config.bytes_per_element * elements
    out = {}
    for name in names:
        seconds = statistics.median(samples[name])
        out[name] = {**extras[name], "step_ms": seconds * 1e3, "gb_per_s": traffic / seconds / 1e9}
    return out


def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device != "cpu":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)  # fmt: skip
    return info


def run_cuda_bench(
    *,
    quick: bool = False,
    configs: list[str] | None = None,
    compile_torch: bool = True,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    checkpoint: Callable[[dict], object] | None = None,
) -> dict:
    """Run the CUDA benchmark and return every number (see the module docstring);
    ``checkpoint(results)`` is called after each configuration (the CLI saves there)."""
    from ..backends import fused_triton

    device = "cpu" if dry_run else "cuda"
    if dry_run:
        from ..backends.fused_triton import plan

        plan.DEVICE_TYPES.add("cpu")  # the kernel runs interpreted on CPU tensors
    elif not torch.cuda.is_available():
        raise RuntimeError("rmsprop bench --device cuda: torch sees no CUDA device")
    if not fused_triton.is_available():
        raise RuntimeError(f"the Triton kernel is unavailable: {fused_triton.load_error()}")
    names = configs or list(CUDA_CONFIGS)
    unknown = [n for n in names if n not in CUDA_CONFIGS]
    if unknown:
        raise ValueError(f"unknown configurations {unknown}; choose from {list(CUDA_CONFIGS)}")
    results = {"machine": machine(device), "quick": quick, "dry_run": dry_run, "configs": []}
    for name in names:
        config = CUDA_CONFIGS[name]
        shapes = _TINY[name.split()[0]] if dry_run else config.shapes
        impls = [TRITON, GRAPH, FOREACH]
        if compile_torch and config.compile_torch:
            impls.append(COMPILED)
        impls.append(COPY)
        log(f"  {name}: {', '.join(impls)} ...")
        row = {"name": name, "elements": sum(int(torch.Size(s).numel()) for s in shapes),
               "bytes_per_element": config.bytes_per_element}  # fmt: skip
        row["results"] = _measure(config, shapes, impls, device, quick)
        base = row["results"][FOREACH]["step_ms"]
        bound = row["results"][COPY]["step_ms"]
        for r in row["results"].values():
            r["speedup_vs_torch_foreach"] = base / r["step_ms"]
            r["fraction_of_copy_bound"] = bound / r["step_ms"]
        results["configs"].append(row)
        results["acceptance"] = _acceptance(results)
        log(format_cuda_row(row))
        if checkpoint is not None:
            checkpoint(results)
    results["acceptance"] = _acceptance(results)
    return results


def _acceptance(results: dict) -> dict:
    """The CUDA issue's targets, where their rows were run."""
    rows = {c["name"]: c["results"] for c in results["configs"]}
    out = {}
    if "1x64M fp32 plain" in rows:
        f = rows["1x64M fp32 plain"][TRITON]["fraction_of_copy_bound"]
        out["1x64M fp32: fraction of the copy bound (target >= 0.85)"] = round(f, 3)
    if "10x1M fp32 momentum+centered" in rows:
        s = rows["10x1M fp32 momentum+centered"][TRITON]["speedup_vs_torch_foreach"]
        out["10x1M momentum+centered: speedup vs torch foreach (target >= 3)"] = round(s, 2)
    return out


def format_cuda_row(row: dict) -> str:
    lines = [
        f"\n{row['name']}  ({row['elements'] / 1e6:.3f}M elements, {row['bytes_per_element']} B/element)"
    ]
    lines.append(f"  {'implementation':<24}{'ms/step':>10}{'GB/s':>9}{'vs foreach':>12}{'of copy':>9}")
    for impl, r in row["results"].items():
        extra = f"  (compile {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        lines.append(
            f"  {impl:<24}{r['step_ms']:>10.3f}{r['gb_per_s']:>9.0f}{r['speedup_vs_torch_foreach']:>11.2f}x"
            f"{100 * r['fraction_of_copy_bound']:>8.0f}%{extra}"
        )
    return "\n".join(lines)


def cuda_markdown_table(results: dict) -> str:
    """One row per configuration: ms per step (speedup against torch foreach)."""
    impls = [
        i
        for i in (TRITON, GRAPH, FOREACH, COMPILED, COPY)
        if any(i in c["results"] for c in results["configs"])
    ]
    rows = [
        "| configuration | " + " | ".join(impls) + " | triton / copy bound |",
        "|---" * (len(impls) + 2) + "|",
    ]
    for c in results["configs"]:
        cells = []
        for i in impls:
            r = c["results"].get(i)
            cells.append(
                "—" if r is None else f"{r['step_ms']:.3f} ms ({r['speedup_vs_torch_foreach']:.2f}x)"
            )
        fraction = c["results"][TRITON]["fraction_of_copy_bound"]
        rows.append(f"| {c['name']} | " + " | ".join(cells) + f" | {100 * fraction:.0f}% |")
    return "\n".join(rows)


def save_cuda(results: dict, out) -> list:
    """bench-cuda.json (every number) and bench-cuda.md (the table) in ``out``."""
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "bench-cuda.json", out / "bench-cuda.md"]
    written[0].write_text(json.dumps(results, indent=2))
    m = results["machine"]
    head = f"{m.get('gpu', 'CPU (dry run)')}, torch {m['torch']}, triton {m['triton']}\n\n"
    accept = "".join(f"- {k}: {v}\n" for k, v in results.get("acceptance", {}).items())
    written[1].write_text(head + cuda_markdown_table(results) + "\n\n" + accept)
    return written
