"""The state formats of `rmsprop bench`: fp32, bf16 and int8 ``state_dtype`` side by side on the
same parameters (10 x 1M fp32), step time and bytes per parameter.

Step times come from runner._measure_side_by_side (interleaved round-robin), so the ratios to
the fp32-state fused step hold on a machine whose speed drifts. Bytes are counted two ways, per
parameter and per buffer (square_avg / grad_var, grad_avg, momentum_buffer): the state tensors'
own bytes (what the process holds, codes and scales included), and the bytes of
``torch.save(optimizer.state_dict())`` (what a checkpoint holds, pickling included).
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch

from ..optimizer import RMSprop

__all__ = ["STATE_IMPLEMENTATIONS", "STATE_CONFIGS", "state_formats", "state_table", "state_bytes"]

FP32_STATE = "fp32 state, fused"
STATE_IMPLEMENTATIONS: dict[str, Callable] = {
    FP32_STATE: lambda ps, o: RMSprop(ps, fused=True, **o),
    "bf16 state, fused": lambda ps, o: RMSprop(ps, fused=True, state_dtype=torch.bfloat16, **o),
    "int8 state, fused": lambda ps, o: RMSprop(ps, fused=True, state_dtype="int8", **o),
    # the torch-op path: what any other device gets (here on the CPU, for the ratio)
    "int8 state, torch ops": lambda ps, o: RMSprop(ps, foreach=True, state_dtype="int8", **o),
    "torch foreach (fp32 state)": lambda ps, o: torch.optim.RMSprop(ps, foreach=True, **o),
}
STATE_CONFIGS = ("10x1M fp32 plain", "10x1M fp32 momentum", "10x1M fp32 momentum+centered")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": "int8"}


def state_bytes(shapes, options: dict, state_dtype) -> dict:
    """Bytes per parameter and buffer of one optimizer's state after a step: in memory (the
    state tensors, step counters excluded) and saved (torch.save of the state dict)."""
    params = [torch.zeros(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.ones_like(p)
    opt = RMSprop(params, state_dtype=state_dtype, **options)
    opt.step()
    numel = sum(p.numel() for p in params)
    buffers = 1 + bool(options.get("momentum")) + bool(options.get("centered"))
    held = sum(
        t.untyped_storage().nbytes()
        for s in opt.state.values()
        for k, t in s.items()
        if k != "step" and isinstance(t, torch.Tensor)
    )
    out = io.BytesIO()
    torch.save(opt.state_dict(), out)
    return {
        "buffers": buffers,
        "memory_bytes_per_param_per_buffer": held / numel / buffers,
        "saved_bytes_per_param_per_buffer": out.tell() / numel / buffers,
    }


def state_formats(measure: Callable, configs: dict, quick: bool, log: Callable[[str], None]) -> list[dict]:
    """For each configuration of STATE_CONFIGS: every STATE_IMPLEMENTATIONS step side by side,
    its ratio to the fp32-state fused step, and the bytes of each format."""
    rows = []
    for name in STATE_CONFIGS:
        config = configs[name]
        log(f"  state formats: {name} ...")
        results = measure(config, list(STATE_IMPLEMENTATIONS), quick)
        base = results[FP32_STATE]["step_ms"]
        for r in results.values():
            r["ratio_to_fp32_state"] = r["step_ms"] / base
        memory = {fmt: state_bytes(config.shapes, config.options, dtype) for fmt, dtype in _DTYPES.items()}
        rows.append({"name": name, "results": results, "bytes": memory})
        log(
            "    "
            + ", ".join(f"{impl}: {r['step_ms']:.2f} ms ({r['ratio_to_fp32_state']:.2f}x)" for impl, r in results.items())
        )
        log(
            "    bytes/param/buffer (memory, saved): "
            + ", ".join(
                f"{fmt} {b['memory_bytes_per_param_per_buffer']:.3f} / {b['saved_bytes_per_param_per_buffer']:.3f}"
                for fmt, b in memory.items()
            )
        )
    return rows


def state_table(results: dict) -> str:
    """The state formats as markdown: step time and its ratio to fp32 state, then the bytes."""
    rows = results.get("state_formats")
    if not rows:
        return ""
    impls = list(rows[0]["results"])
    lines = ["", "| state formats | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for row in rows:
        cells = [f"{row['results'][i]['step_ms']:.2f} ms ({row['results'][i]['ratio_to_fp32_state']:.2f}x)" for i in impls]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    fmts = list(rows[0]["bytes"])
    lines += ["", "| bytes / parameter / buffer (memory, saved) | " + " | ".join(fmts) + " |"]
    lines.append("|---" * (len(fmts) + 1) + "|")
    for row in rows:
        cells = [
            f"{b['memory_bytes_per_param_per_buffer']:.3f}, {b['saved_bytes_per_param_per_buffer']:.3f}"
            for b in row["bytes"].values()
        ]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
