r"""Low-bit optimizer state: the formats, their code maps, stochastic rounding, and conversion.

``state_dtype`` (an option of :class:`rmsprop.RMSprop`) chooses how ``square_avg``, ``grad_avg``
and ``momentum_buffer`` are stored. The math is always float32 (float64 for float64
parameters); only the storage differs. Each parameter's state has one *format*:

``"same"``
    state in the parameter's dtype, torch's algorithm and rounding (``state_dtype=None``; also
    ``torch.float32`` for float32 parameters). Stepped by the paths that are bit-identical to
    torch.
``"float"``
    float state of another dtype than the parameter's (float32 state for bfloat16 / float16
    parameters), rounded to nearest, torch's algorithm.
``"bf16"``
    bfloat16 state rounded *stochastically*: the stored value is one of the two neighbouring
    bfloat16 values, the upper one with probability equal to the distance from the lower one in
    ulps, so its expectation is the float32 value. At ``alpha = 0.999`` each increment of the
    average is below bfloat16's half ulp: nearest rounding would never move it, stochastic
    rounding moves it by the right amount on average.
``"int8"``
    blockwise 8-bit codes: the tensor, in row-major order, is cut into blocks of
    :data:`BLOCK` = 256 elements; each block stores one float32 ``scale`` and one byte per
    element, ``value = q[code] * scale``, with ``scale = max|value| / q_max`` over the block's
    finite values. Codes are rounded stochastically in value space (linearly between the two
    neighbouring code values, so the expectation is the value). Tensors with fewer than
    ``int8_min_numel`` elements keep ``"same"`` / ``"float"`` float32 state (float64 for float64).

The two code maps are small floating-point formats with subnormals (an exponent is a
logarithm, so codes are nearly log-spaced: constant relative precision over a wide range, which
an elementwise-adaptive method needs), chosen so that quantizing and dequantizing are integer
bit operations that vectorize (the fused kernel does them in its one pass over memory):

- **unsigned**, for ``square_avg`` :math:`v` (and the centered variance): 5 exponent bits, 3
  mantissa bits. Normal codes :math:`2^{E-31}(1 + M/8)` for :math:`E = 1..31`, subnormal codes
  :math:`M \cdot 2^{-33}`; code 0 is exact zero, code 255 is NaN, the largest value (code 254) is
  1.75. Relative spacing 6.25-12.5% over 30 binades (about 9 decades of :math:`v` inside one
  block), then subnormals down to :math:`2^{-33}`. **A positive value never rounds to 0**:
  below the smallest code it rounds *up* to it. That handles the zero-point hazard (a small
  :math:`v` stored as 0 would turn :math:`g/(\sqrt v + \epsilon)` into :math:`g/\epsilon`) by
  construction: a value can only be stored too large, which can only shrink a later step. (A
  log map is scale-free, so storing :math:`\sqrt v` on a map with twice the codes per octave
  would hold the same information; storing :math:`v` keeps ``square_avg``'s meaning and makes
  the rounding unbiased in :math:`v`, which is what the average accumulates.)
- **signed**, for ``grad_avg`` and ``momentum_buffer``: a sign bit, 3 exponent bits, 4 mantissa
  bits. Normal magnitudes :math:`2^{E-7}(1 + M/16)`, subnormal :math:`M \cdot 2^{-10}`; code 0 is
  zero, code 128 (negative zero) is NaN, the largest magnitude is 1.9375. Relative spacing
  3.1-6.25% over 7 binades, then linear steps down to 0 (a small value rounds to 0 or to the
  smallest code, unbiased).

A non-finite value stores as the NaN code of its element (the block's scale is computed from
its finite values), as float32 state would keep a NaN to that element. A block whose largest
magnitude is below :data:`TINY` is scaled as if it were :data:`TINY` (its scale stays a normal
float; its values are then below the map's range and, for the unsigned map, round up).

**Centered with bf16 or int8 state** keeps the variance itself instead of
:math:`E[g^2]`: :math:`v - m^2` would cancel (with gradients whose mean is four times their
spread, :math:`v - m^2` is a few percent of :math:`v`, and independent 8-bit errors in :math:`v`
and :math:`m` drive it negative; the clamp then gives :math:`g/\epsilon`). With :math:`C_t = 1
- \alpha^t` (bias correction) or 1, the state ``grad_var`` is :math:`V = v - m^2/C_t`, updated by
the exact identity

.. math::
    V_t = \alpha V_{t-1} + \alpha(1-\alpha)\frac{C_{t-1}}{C_t}\bigl(g_t - m_{t-1}/C_{t-1}\bigr)^2,
    \qquad m_t = \alpha m_{t-1} + (1-\alpha) g_t

(every term is non-negative: no cancellation, never negative; at :math:`t=1`,
:math:`C_0 = 0` and the second term vanishes), and the denominator's variance is
:math:`s = V_t / C_t`. Checkpoints convert at the boundary: loaded into float state,
``square_avg`` :math:`= V + m^2/C_t`; from float state, :math:`V = \max(v - m^2/C_t, 0)`.

**Randomness** is a counter-based hash (no generator state): the rounding of element ``i`` of
the tensor at position ``k`` of the group at step ``t`` uses :func:`mix32` of ``(i, t, k,
stream)`` (stream 0 for ``square_avg`` / ``grad_var`` and ``grad_avg``, which take the upper and
lower 16 bits of one hash, stream 1 for ``momentum_buffer``). It does not depend on threads or
on how the tensor is split, and a resumed run draws the same numbers: resume is bit-identical.

The update uses the float32 value it computes in the step, before the state is rounded again:
:math:`v_t = \alpha \hat v_{t-1} + (1-\alpha) g_t^2 \ge (1-\alpha) g_t^2` whatever the stored
:math:`\hat v_{t-1}`, so :math:`|g_t|/\sqrt{v_t} \le 1/\sqrt{1-\alpha}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .backends.inplace import lacks_version_counter

__all__ = [
    "BLOCK",
    "TINY",
    "U8_MAX",
    "S8_MAX",
    "U8_NAN",
    "S8_NAN",
    "code_values",
    "mix32",
    "stream_key",
    "random_bits",
    "quantize",
    "dequantize",
    "round_bf16",
    "n_blocks",
    "target",
    "buffer_keys",
    "entry_format",
    "new_entry",
    "to_float",
    "from_float",
    "dequantized",
]

BLOCK = 256
TINY = 2.0**-100
U8_MAX, S8_MAX = 1.75, 1.9375
U8_NAN, S8_NAN = 0xFF, 0x80
_M32 = 0xFFFFFFFF
# The maps as float bit patterns: a code's value is the float32 whose bits are
# (code + OFFSET) << SHIFT for normal codes; below NORMAL_MIN it is code * SUB_STEP.
_U8 = {"shift": 20, "offset": 768, "first_normal": 8, "normal_min": 2.0**-30, "sub_step": 2.0**-33}
_S8 = {"shift": 19, "offset": 1920, "first_normal": 16, "normal_min": 2.0**-6, "sub_step": 2.0**-10}
# Chunks of the torch-op paths (whole blocks): bounds their temporaries (a few int64 / float
# buffers of this many elements) whatever the tensor's size.
CHUNK = BLOCK * 4096


def n_blocks(numel: int) -> int:
    """Blocks (scales) of an int8 buffer of ``numel`` elements."""
    return (numel + BLOCK - 1) // BLOCK


def code_values(signed: bool) -> Tensor:
    """The 256 values of a map (float64; NaN at its NaN code), built from the definition above
    (exponent and mantissa fields), independently of the bit tricks the quantizers use."""
    out = []
    for code in range(256):
        if signed:
            sign, e, m = (-1.0 if code & 0x80 else 1.0), (code >> 4) & 7, code & 15
            mag = m * 2.0**-10 if e == 0 else 2.0 ** (e - 7) * (1 + m / 16)
            out.append(math.nan if code == S8_NAN else sign * mag)
        else:
            e, m = code >> 3, code & 7
            out.append(math.nan if code == U8_NAN else (m * 2.0**-33 if e == 0 else 2.0 ** (e - 31) * (1 + m / 8)))
    return torch.tensor(out, dtype=torch.float64)


# ----------------------------------------------------------------------------- randomness
def mix32(x):
    """A 32-bit integer hash (two multiply-xorshift rounds; constants below 2^31 so that every
    product of a 32-bit value fits an int64 without overflow). Python ints or int64 tensors
    holding values in [0, 2^32); the C kernel computes the same function in uint32."""
    if isinstance(x, Tensor):
        x = x ^ (x >> 16)
        x = (x * 0x21F0AAAD) & _M32
        x = x ^ (x >> 15)
        x = (x * 0x735A2D97) & _M32
        return x ^ (x >> 15)
    x &= _M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def stream_key(step, position: int, stream: int):
    """The key of one tensor's random stream at one step: ``step`` the counter after this
    step's increment (an int, or an int64 tensor where the step must stay on the device)."""
    key = mix32(step & _M32 if isinstance(step, Tensor) else int(step) & _M32)
    key = mix32(key ^ (position & _M32))
    return mix32(key ^ stream)


def random_bits(start: int, n: int, key, device) -> Tensor:
    """32 random bits (int64 values in [0, 2^32)) for the elements ``start .. start + n - 1``:
    ``mix32(index_lo ^ mix32(key ^ mix32(index_hi)))``."""
    index = torch.arange(start, start + n, dtype=torch.int64, device=device)
    if start + n <= 2**32:
        element_key = mix32(key)  # mix32(0) == 0: the high half of the index is 0 here
    else:
        element_key = mix32(key ^ mix32(index >> 32))
    return mix32((index & _M32) ^ element_key)


# ----------------------------------------------------------------------------- the maps
def _as_bits(x: Tensor) -> Tensor:
    return x.view(torch.int32).to(torch.int64)


def _from_bits(bits: Tensor) -> Tensor:
    return bits.to(torch.int32).view(torch.float32)


def block_scales(absmax: Tensor, q_max: float) -> tuple[Tensor, Tensor]:
    """Each block's scale ``absmax / q_max`` and the multiplier ``q_max / absmax`` its codes
    use, each one correctly rounded float32 division, as the kernel's ``block_scale``."""
    # two tensors divided: torch computes `q_max / absmax` as absmax.reciprocal() * q_max (two
    # roundings: one ulp off in about a quarter of blocks, so a stochastically rounded code
    # now and then differed from the kernel's), and on CUDA a scalar divisor as a multiply
    q = torch.full_like(absmax, q_max)
    return absmax / q, q / absmax


def quantize(values: Tensor, signed: bool, r: Tensor | None) -> tuple[Tensor, Tensor]:
    """Codes (uint8, one per value) and scales (float32, one per block of :data:`BLOCK`) of a
    1-D float32 tensor. ``r``: int64 random integers in [0, 2^16) per value, or None for
    rounding to nearest (ties away from zero). Signed: the signed map, else the unsigned one
    (negative values then count as 0)."""
    spec, q_max = (_S8, S8_MAX) if signed else (_U8, U8_MAX)
    n = values.numel()
    pad = (-n) % BLOCK
    x = values if pad == 0 else torch.nn.functional.pad(values, (0, pad))
    x = x.view(-1, BLOCK)
    finite = torch.isfinite(x)
    # the unsigned map holds values >= 0: anything else (only a NaN or a corrupted state can
    # be negative here) counts as 0
    magnitude = torch.where(finite, x.abs(), 0.0) if signed else torch.where(finite & (x > 0), x, 0.0)
    absmax = magnitude.amax(dim=1).clamp_min(TINY)
    scales, inv = block_scales(absmax, q_max)
    a = magnitude * inv[:, None]
    shift, offset, first = spec["shift"], spec["offset"], spec["first_normal"]
    sub = a < spec["normal_min"]
    # below the normal range the codes are linear: x + normal_min is a normal float whose
    # mantissa holds x in steps of the subnormal codes, so one formula rounds both ranges
    z = torch.where(sub, a + spec["normal_min"], a)
    half = 1 << (shift - 1)
    if r is None:
        rounding = half
    else:
        rounding = (r if pad == 0 else torch.nn.functional.pad(r, (0, pad))).view(-1, BLOCK) << (shift - 16)
    code = ((_as_bits(z) + rounding) >> shift) - offset
    code = torch.where(sub, code - first, code)
    top = 0x7F if signed else U8_NAN - 1
    code = code.clamp(0, top)
    if signed:
        code = torch.where((x < 0) & (code > 0), code | 0x80, code)
        code = torch.where(finite, code, S8_NAN)
    else:
        # a positive value never rounds to 0 (not even when x / scale underflows)
        code = torch.where((magnitude > 0) & (code == 0), 1, code)
        code = torch.where(finite, code, U8_NAN)
    return code.to(torch.uint8).view(-1)[:n], scales


def dequantize(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The float32 values of 1-D codes and their per-block scales (see :func:`quantize`)."""
    spec = _S8 if signed else _U8
    n = codes.numel()
    c = codes.to(torch.int64)
    mag = c & 0x7F if signed else c
    normal = _from_bits((mag + spec["offset"]) << spec["shift"])
    value = torch.where(mag >= spec["first_normal"], normal, mag.to(torch.float32) * spec["sub_step"])
    if signed:
        value = torch.where(c >= 0x80, -value, value)
        value = torch.where(c == S8_NAN, math.nan, value)
    else:
        value = torch.where(c == U8_NAN, math.nan, value)
    pad = (-n) % BLOCK
    if pad:
        value = torch.nn.functional.pad(value, (0, pad))
    return (value.view(-1, BLOCK) * scales[:, None]).view(-1)[:n]


def round_bf16(x: Tensor, r: Tensor | None) -> Tensor:
    """float32 -> bfloat16: stochastically with ``r`` (int64 in [0, 2^16) per value: adding it
    below the kept bits and truncating rounds up with probability equal to the dropped
    fraction), or to nearest even when ``r`` is None. NaN becomes torch's 0x7fc0."""
    if r is None:
        return x.to(torch.bfloat16)
    bits = (_as_bits(x) & _M32) + r
    top = torch.where(torch.isnan(x), 0x7FC0, bits >> 16)
    return torch.where(top >= 0x8000, top - 0x10000, top).to(torch.int16).view(torch.bfloat16)


# ----------------------------------------------------------------------------- formats
def target(state_dtype: Any, int8_min_numel: int, param: Tensor) -> tuple[str, torch.dtype]:
    """The format and storage dtype of a parameter's state under a group's options."""
    if state_dtype is None:
        return "same", param.dtype
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(
            f"state_dtype={state_dtype!r} needs real floating-point parameters; this one is {param.dtype} "
            "(use state_dtype=None for it, in a param group of its own)"
        )
    if state_dtype == "int8":
        if param.numel() >= int8_min_numel:
            return "int8", torch.uint8
        dtype = torch.promote_types(param.dtype, torch.float32)
    elif state_dtype == torch.bfloat16:
        return "bf16", torch.bfloat16
    else:
        dtype = state_dtype
    return ("same" if dtype == param.dtype else "float"), dtype


def variance_form(fmt: str, centered: bool) -> bool:
    """Whether a centered state holds the variance V (``grad_var``) instead of E[g^2]."""
    return centered and fmt in ("bf16", "int8")


def buffer_keys(fmt: str, centered: bool, momentum: bool) -> list[str]:
    """The state keys of the buffers (second moment first, then grad_avg, momentum_buffer);
    int8 buffers each have a ``<key>_scale`` next to them."""
    keys = ["grad_var" if variance_form(fmt, centered) else "square_avg"]
    if centered:
        keys.append("grad_avg")
    if momentum:
        keys.append("momentum_buffer")
    return keys


def entry_format(entry: Mapping[str, Any]) -> str | None:
    """The format an existing state entry is in, from its keys and dtypes: "int8" (codes),
    "variance" (a float ``grad_var``), "float" (float buffers in torch's meaning), or None when
    it has no buffer."""
    second = entry.get("grad_var", entry.get("square_avg"))
    if not isinstance(second, Tensor):
        return None
    if second.dtype == torch.uint8:
        return "int8"
    return "variance" if "grad_var" in entry else "float"


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t


def is_dtensor(t: Any) -> bool:
    """A torch.distributed DTensor (checked by name: no import of torch.distributed here)."""
    return type(t).__name__ == "DTensor" and hasattr(t, "to_local")


_is_dtensor = is_dtensor


def _expected_float_dtype(state_dtype: Any, param: Tensor) -> torch.dtype:
    if state_dtype == "int8":
        return torch.promote_types(param.dtype, torch.float32)
    return state_dtype


def check_record(param: Tensor, buffers: list[tuple[Any, Any, str]], rule: Any) -> str:
    """The format of one record's state under ``rule.state_dtype``, from its tensors (``buffers``:
    (tensor, scales or None, name) for each buffer the rule needs, the second moment first), or
    ValueError saying what is wrong. Checks everything the low-bit paths rely on: dtypes, shapes,
    devices, contiguous codes, the scale count, inference tensors."""
    sd = rule.state_dtype
    if param.is_complex() or not param.is_floating_point():
        raise ValueError(f"state_dtype={sd!r} needs real floating-point parameters")
    inference_ok = torch.is_inference_mode_enabled()
    first = buffers[0][0]
    if not isinstance(first, Tensor):
        raise ValueError(f"its {buffers[0][2]} is a {type(first).__name__}, not a tensor")
    int8 = first.dtype == torch.uint8
    if int8 and sd != "int8":
        raise ValueError(f"its state is int8 codes, but state_dtype={sd!r}")
    expected = torch.uint8 if int8 else _expected_float_dtype(sd, param)
    blocks = n_blocks(param.numel())
    for t, scales, name in buffers:
        if not isinstance(t, Tensor):
            raise ValueError(f"its {name} is a {type(t).__name__}, not a tensor")
        if t.dtype != expected:
            raise ValueError(f"its {name} has dtype {t.dtype}; state_dtype={sd!r} keeps it as {expected} here")
        if t.shape != param.shape or t.device != param.device:
            raise ValueError(
                f"its {name} has shape {tuple(t.shape)} on {t.device}, the parameter {tuple(param.shape)} on {param.device}"
            )
        if not inference_ok and (t.is_inference() or lacks_version_counter(t)):
            raise ValueError(f"its {name} is an inference tensor (in-place updates of it are refused outside InferenceMode)")
        if not int8:
            if scales is not None:
                raise ValueError(f"its {name} is a float tensor but has int8 scales")
            continue
        if not t.is_contiguous():
            raise ValueError(f"its {name} codes are not contiguous (int8 blocks follow the row-major order)")
        if (not isinstance(scales, Tensor) or scales.dtype != torch.float32 or scales.dim() != 1
                or not scales.is_contiguous() or scales.numel() != blocks or scales.device != param.device):  # fmt: skip
            got = (f"{scales.dtype} of shape {tuple(scales.shape)} on {scales.device}"
                   if isinstance(scales, Tensor) else type(scales).__name__)  # fmt: skip
            raise ValueError(
                f"its {name}_scale must be a contiguous 1-D float32 tensor of {blocks} elements (one per block "
                f"of {BLOCK}) on {param.device}, got {got}"
            )
        if not inference_ok and (scales.is_inference() or lacks_version_counter(scales)):
            raise ValueError(f"its {name}_scale is an inference tensor")
    if int8:
        return "int8"
    if sd == torch.bfloat16:
        return "bf16"
    return "same" if expected == param.dtype else "float"


def _shard_spec(param: Tensor) -> tuple[Any, tuple, int, int]:
    """For a DTensor parameter: its mesh, the placements of its int8 scales, the shard count
    and the padded per-shard block count. The blocks are cut from each rank's local shard, so
    each rank holds one row of a (shards, blocks) scales tensor: only Shard(0) (FSDP2) and
    Replicate placements are supported."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = param.device_mesh, param.placements
    scale_placements, shards, rows = [], 1, param.shape[0] if param.dim() else 1
    for dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            scale_placements.append(Replicate())
        elif isinstance(placement, Shard) and placement.dim == 0 and shards == 1:
            scale_placements.append(Shard(0))
            shards = mesh.size(dim)
            rows = -(-rows // shards)
        else:
            raise ValueError(
                f'state_dtype="int8" on a DTensor supports Shard(0) (FSDP2) and Replicate placements, '
                f"not {placements}: use state_dtype=torch.bfloat16 or torch.float32 for this parameter"
            )
    row_numel = param.numel() // param.shape[0] if param.dim() and param.shape[0] else 1
    return mesh, tuple(scale_placements), shards, n_blocks(rows * row_numel)


def new_scales(param: Tensor, fill: float = 0.0) -> Tensor:
    """The scales tensor of an int8 buffer for ``param``: 1-D float32 of n_blocks(numel), or
    for a DTensor parameter a (shards, blocks) DTensor whose row r holds rank r's scales."""
    if not _is_dtensor(param):
        return torch.full((n_blocks(param.numel()),), fill, dtype=torch.float32, device=param.device)
    from torch.distributed.tensor import DTensor

    mesh, placements, shards, blocks = _shard_spec(param)
    local = torch.full((1, blocks), fill, dtype=torch.float32, device=param.to_local().device)
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=(shards, blocks), stride=(blocks, 1))


def local_scales(scales: Tensor, param_local_numel: int) -> Tensor:
    """The 1-D scales of this rank's blocks (a view): a DTensor's local row, cut to the local
    shard's block count."""
    if _is_dtensor(scales):
        return scales.to_local().view(-1)[: n_blocks(param_local_numel)]
    return scales


def _codes_like(param: Tensor) -> Tensor:
    # row-major and contiguous (blocks follow the logical order); a DTensor keeps its placements
    return torch.zeros_like(param, dtype=torch.uint8, memory_format=torch.contiguous_format)


def new_entry(group: Mapping[str, Any], param: Tensor, entry: Mapping[str, Any]) -> dict[str, Any]:
    """``entry`` completed with the buffers a group's options need in the parameter's format
    (a buffer an option switched on later starts at zero; square_avg / grad_var start at
    ``initial_square_avg``)."""
    fmt, dtype = target(group["state_dtype"], group["int8_min_numel"], param)
    out = dict(entry)
    v0 = float(group["initial_square_avg"])
    for i, key in enumerate(buffer_keys(fmt, group["centered"], group["momentum"] > 0)):
        if key in out:
            continue
        fill = v0 if i == 0 else 0.0
        if fmt == "int8":
            codes = _codes_like(param)
            scales = new_scales(param, fill / U8_MAX if fill else 0.0)
            if fill:
                codes.fill_(U8_NAN - 1)  # every element at the block maximum: exactly v0
            out[key], out[key + "_scale"] = codes, scales
        else:
            buf = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
            if fill:
                buf.fill_(fill)
            out[key] = buf
    return out


# ----------------------------------------------------------------------------- conversion
def _correction(alpha: float, step: float, bias_correction: bool) -> float:
    return 1.0 - alpha**step if bias_correction else 1.0


def _step_value(entry: Mapping[str, Any]) -> float:
    step = entry.get("step", 0)
    return float(step.item()) if isinstance(step, Tensor) else float(step)


def _decode(t: Tensor, scale: Tensor | None, signed: bool, param: Tensor) -> Tensor:
    """A buffer as a float64 tensor of the parameter's shape (local tensors)."""
    local = _local(t).detach()
    if t.dtype != torch.uint8:
        return local.to(torch.float64)
    values = dequantize(local.reshape(-1), local_scales(scale, local.numel()), signed)
    return values.to(torch.float64).view(local.shape)


def to_float(entry: Mapping[str, Any], param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
    """An entry's buffers in torch's meaning, as float64 tensors (local shards for DTensors):
    ``square_avg`` (E[g^2]), ``grad_avg``, ``momentum_buffer`` — whatever format it is in."""
    fmt = entry_format(entry)
    out: dict[str, Tensor] = {}
    for key in ("grad_avg", "momentum_buffer"):
        if key in entry:
            out[key] = _decode(entry[key], entry.get(key + "_scale"), True, param)
    if fmt == "variance" or (fmt == "int8" and "grad_var" in entry):
        var = _decode(entry["grad_var"], entry.get("grad_var_scale"), False, param)
        c = _correction(group["alpha"], _step_value(entry), group["bias_correction"])
        m = out.get("grad_avg", torch.zeros_like(var))
        out["square_avg"] = var + (m * m / c if c > 0 else 0.0)
    elif fmt is not None:
        out["square_avg"] = _decode(entry["square_avg"], entry.get("square_avg_scale"), False, param)
    return out


def from_float(
    floats: Mapping[str, Tensor], param: Tensor, group: Mapping[str, Any], entry: Mapping[str, Any]
) -> dict[str, Any]:
    """The buffers of ``floats`` (torch's meaning, see :func:`to_float`) in the format the group
    gives ``param``, rounded to nearest (a one-time conversion: no drift to avoid), merged into
    ``entry`` without its old buffers."""
    fmt, dtype = target(group["state_dtype"], group["int8_min_numel"], param)
    out = {k: v for k, v in entry.items() if k in ("step",) or k not in _BUFFER_KEYS}
    centered, momentum = group["centered"], group["momentum"] > 0
    values = dict(floats)
    if variance_form(fmt, centered):
        c = _correction(group["alpha"], _step_value(entry), group["bias_correction"])
        m = values.get("grad_avg")
        v = values["square_avg"]
        values["grad_var"] = (v - (m * m / c if (m is not None and c > 0) else 0.0)).clamp_min(0.0)
    local_param = _local(param)
    for key in buffer_keys(fmt, centered, momentum):
        if key not in values:
            continue  # new_entry creates it at the step
        value = values[key]
        if fmt == "int8":
            codes, scales = quantize(value.reshape(-1).to(torch.float32), key in _SIGNED, None)
            out[key + "_scale"] = _place_scales(scales, param)
            out[key] = _place_like(codes.view(local_param.shape), param, torch.contiguous_format)
        else:
            out[key] = _place_like(value.to(dtype).view(local_param.shape), param, torch.preserve_format)
    return out


_BUFFER_KEYS = frozenset(
    k + s for k in ("square_avg", "grad_var", "grad_avg", "momentum_buffer") for s in ("", "_scale")
)
_SIGNED = frozenset(("grad_avg", "momentum_buffer"))


def _place_like(local: Tensor, param: Tensor, memory_format) -> Tensor:
    """A local tensor as state of ``param``: on its device, in its layout (a DTensor parameter
    gets a DTensor with its placements)."""
    if _is_dtensor(param):
        from torch.distributed.tensor import DTensor

        target_local = param.to_local()
        local = local.to(target_local.device).contiguous()
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())  # fmt: skip
    out = torch.empty_like(param, dtype=local.dtype, memory_format=memory_format)
    return out.copy_(local)


def _place_scales(scales: Tensor, param: Tensor) -> Tensor:
    if not _is_dtensor(param):
        return scales.to(param.device)
    out = new_scales(param)
    row = out.to_local().view(-1)
    row[: scales.numel()].copy_(scales)
    return out


def dequantized(entry: Mapping[str, Any], param: Tensor, group: Mapping[str, Any]) -> dict[str, Tensor]:
    """A parameter's state in torch's meaning as tensors of the parameter's dtype, whatever
    format it is stored in: ``square_avg`` (E[g^2]), and ``grad_avg`` / ``momentum_buffer``
    where the options keep them. For inspection (effective learning rates, plots)."""
    dtype = param.dtype if param.is_floating_point() else torch.float32
    return {k: v.to(dtype) for k, v in to_float(entry, param, group).items()}
