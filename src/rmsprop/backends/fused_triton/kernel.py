"""The Triton kernel: one launch steps every tensor of a (group, device, dtype) table.

Not imported as a normal module: ``loader.py`` executes this file once per mode, compiled (CUDA
tensors) or under Triton's interpreter (CPU tensors, the tests), because ``triton.jit`` picks the
mode when it decorates. Keep it free of anything but Triton and the constants below.

One program steps one chunk (``CHUNK`` elements) of one tensor. The host builds, per launch:

- ``table``  (int64): the addresses of each tensor's parameter, square_avg, grad_avg,
  momentum_buffer and step counter, one row of ``T`` per list (0 where a list is absent), then
  each tensor's element count (complex tensors count their real and imaginary parts);
- ``grads``  (int64, ``T``): the gradients' addresses (rewritten when the gradients move);
- ``blocks`` (int32, ``2 x B``): each program's tensor, then its chunk within that tensor;
- ``chunks`` (int32, ``T``): each tensor's number of chunks (at least 1: an empty tensor still
  counts a step);
- ``counters`` (int32, ``T``): zero between launches; the programs of a tensor count themselves
  in, and the last one in writes the step counter (see below).

Per element, in float32 (storage rounded once per stored value, round-to-nearest-even), the
formula of the fused CPU kernel, operation for operation and unfused (``enable_fp_fusion=False``
at launch, IEEE division and square root), so both kernels round alike::

    g  = grad * inv_scale, stored back rounded   (GradScaler: the unscaled gradient, as unscale_)
    g  = -g                                      (maximize)
    g  = g + wd * p                              (coupled weight decay)
    p  = p * (1 - lr * wd)                       (decoupled; the factor in float64, then rounded)
    v  = alpha * v + (1 - alpha) * g * g
    s  = v * c, c = 1 / (1 - alpha^t)            (bias correction; c computed in float64)
    m  = m + (1 - alpha) * (g - m);  s = max(s - (m * c)^2, 0)        (centered; NaN passes)
    d  = sqrt(s + eps) or sqrt(s) + eps
    u  = g / d
    b  = mu * b + k_buf * u;  p = p - k_par * (nesterov ? k_buf * u + mu * b : b)   (momentum)
    p  = p - lr * u                              (no momentum)

with (k_buf, k_par) = (lr, 1) with lr_in_momentum, else (1, lr).

Step counters on the parameters' device (``STEP`` 1: float32, 2: float64) are read by every
program of a tensor (t = step + 1) and written once: each program, after reading, adds itself to
the tensor's counter with acquire-release semantics, and the one that brings it to the tensor's
chunk count — so every other program has read the old value — stores t and resets the counter to
0 for the next launch. A step therefore needs no host synchronisation and no second launch, and
replays in a CUDA graph. With ``STEP`` 0 the host keeps the counters (on the CPU, as torch does
without ``capturable``) and passes the bias corrections in ``corrections``.

``found_inf`` (GradScaler) is read on the device: when nonzero every program returns before
writing anything, counters included.

Storage formats (``P`` for parameter and gradient, ``S`` for the three state tensors, with
``P_TYPE`` / ``S_TYPE`` the element type of their pointers): 0 float32, 1 bfloat16 (held as 16-bit
integers: the conversions are integer code, so the interpreter, which truncates when it narrows
to bfloat16, rounds exactly as the GPU does), 2 float16. Every load decodes and every store
encodes through ``_decode`` / ``_encode`` (or the plain conversion they reduce to): a new state
format (the low-bit state of the roadmap) is a new code there — and, if it needs more than one
tensor per state (block scales), more rows in ``table``. The loads and stores are written out in
``_update`` rather than called through small helpers because each call of a jitted function costs
the interpreter milliseconds.
"""

import triton
import triton.language as tl

F32 = tl.constexpr(0)
BF16 = tl.constexpr(1)
F16 = tl.constexpr(2)


@triton.jit
def _decode(raw, KIND: tl.constexpr):
    """Stored values to float32, exactly."""
    if KIND == BF16:
        x = (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = raw.to(tl.float32)
    return x


@triton.jit
def _encode(x, KIND: tl.constexpr, TYPE: tl.constexpr):
    """float32 to the stored format, rounding to nearest even; bfloat16 as the fused CPU kernel
    and torch do it (a NaN becomes torch's 0x7FC0)."""
    if KIND == BF16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        raw = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded).to(tl.uint16)
    else:
        raw = x.to(TYPE)
    return raw


@triton.jit
def _update(
    p_ptr, g_ptr, v_ptr, m_ptr, b_ptr, offs, mask,
    alpha, oma, eps, wd, decay, lr, mu, k_buf, k_par, inv_corr, inv_scale,
    P: tl.constexpr, P_TYPE: tl.constexpr, S: tl.constexpr, S_TYPE: tl.constexpr,
    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, EPS_IN_SQRT: tl.constexpr, COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr, BIAS: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_SCALE: tl.constexpr,
):  # fmt: skip
    """One BLOCK of elements (the formula is in the module docstring). ``mask`` is all true for
    a full block (a constant the compiler sees through, so the accesses vectorise)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0)
    g = _decode(g, P) if P == BF16 else g.to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0)
    p = _decode(p, P) if P == BF16 else p.to(tl.float32)
    if HAS_SCALE:
        # GradScaler.unscale_'s result, stored; the update reads the stored (rounded) value
        g = g * inv_scale
        stored = _encode(g, P, P_TYPE) if P == BF16 else g.to(P_TYPE)
        tl.store(g_ptr + offs, stored, mask=mask)
        g = _decode(stored, P) if P == BF16 else stored.to(tl.float32)
    if MAXIMIZE:
        g = -g
    if COUPLED:
        g = g + wd * p
    if DECOUPLED:
        p = p * decay
    v = tl.load(v_ptr + offs, mask=mask, other=0)
    v = _decode(v, S) if S == BF16 else v.to(tl.float32)
    v = alpha * v + oma * g * g
    s = v
    if BIAS:
        s = v * inv_corr
    if CENTERED:
        m = tl.load(m_ptr + offs, mask=mask, other=0)
        m = _decode(m, S) if S == BF16 else m.to(tl.float32)
        m = m + oma * (g - m)
        mh = m
        if BIAS:
            mh = m * inv_corr
        s = s - mh * mh
        s = tl.where(s < 0.0, 0.0, s)  # rounding can make v - m^2 negative; NaN passes through
        tl.store(m_ptr + offs, _encode(m, S, S_TYPE) if S == BF16 else m.to(S_TYPE), mask=mask)
    if EPS_IN_SQRT:
        u = tl.div_rn(g, tl.sqrt_rn(s + eps))
    else:
        u = tl.div_rn(g, tl.sqrt_rn(s) + eps)
    if MOMENTUM == 0:
        p = p - lr * u
    else:
        b = tl.load(b_ptr + offs, mask=mask, other=0)
        b = _decode(b, S) if S == BF16 else b.to(tl.float32)
        b = mu * b + k_buf * u
        if MOMENTUM == 2:  # Nesterov
            applied = k_buf * u + mu * b
        else:
            applied = b
        p = p - k_par * applied
        tl.store(b_ptr + offs, _encode(b, S, S_TYPE) if S == BF16 else b.to(S_TYPE), mask=mask)
    tl.store(v_ptr + offs, _encode(v, S, S_TYPE) if S == BF16 else v.to(S_TYPE), mask=mask)
    tl.store(p_ptr + offs, _encode(p, P, P_TYPE) if P == BF16 else p.to(P_TYPE), mask=mask)


@triton.jit(do_not_specialize=["alpha_bits", "wd_bits"])
def rmsprop_kernel(
    table, grads, blocks, chunks, counters, corrections, lr_ptr, grad_scale_ptr, found_inf_ptr,
    T, B,
    lr: tl.float32, alpha: tl.float32, oma: tl.float32, eps: tl.float32, wd: tl.float32, decay: tl.float32,
    mu: tl.float32, alpha_bits, wd_bits,
    P: tl.constexpr, P_TYPE: tl.constexpr, S: tl.constexpr, S_TYPE: tl.constexpr, STEP: tl.constexpr,
    CENTERED: tl.constexpr, MOMENTUM: tl.constexpr, EPS_IN_SQRT: tl.constexpr, COUPLED: tl.constexpr,
    DECOUPLED: tl.constexpr, BIAS: tl.constexpr, MAXIMIZE: tl.constexpr, LR_IN_MOMENTUM: tl.constexpr,
    LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """One RMSProp step over every tensor of the launch's table (see the module docstring)."""
    pid = tl.program_id(0)
    go = True
    if HAS_INF:
        go = tl.load(found_inf_ptr) == 0
    if go:
        tid = tl.load(blocks + pid)
        chunk = tl.load(blocks + B + pid)
        n = tl.load(table + 5 * T + tid)
        start = chunk.to(tl.int64) * CHUNK
        end = tl.minimum(start + CHUNK, n)

        # float32 scalars as the host rounded them (cast: the interpreter passes Python floats);
        # alpha and weight_decay also exactly, as float64 bit patterns, for the float64 math here
        alpha32 = tl.cast(alpha, tl.float32)
        oma32 = tl.cast(oma, tl.float32)
        eps32 = tl.cast(eps, tl.float32)
        wd32 = tl.cast(wd, tl.float32)
        mu32 = tl.cast(mu, tl.float32)
        lr32 = tl.cast(lr, tl.float32)
        decay32 = tl.cast(decay, tl.float32)
        if LR_TENSOR:
            lr64 = tl.load(lr_ptr).to(tl.float64)
            lr32 = lr64.to(tl.float32)
            if DECOUPLED:
                wd64 = tl.cast(wd_bits, tl.int64).to(tl.float64, bitcast=True)
                decay32 = (1.0 - lr64 * wd64).to(tl.float32)
        one32 = tl.full((), 1.0, tl.float32)
        k_buf = one32
        k_par = lr32
        if LR_IN_MOMENTUM:
            k_buf = lr32
            k_par = one32
        inv_scale = one32
        if HAS_SCALE:
            inv_scale = tl.div_rn(one32, tl.load(grad_scale_ptr).to(tl.float32))

        if STEP != 0:
            step_address = tl.load(table + 4 * T + tid)
            if STEP == 1:
                step_ptr = step_address.to(tl.pointer_type(tl.float32))
            else:
                step_ptr = step_address.to(tl.pointer_type(tl.float64))
            t = tl.load(step_ptr) + 1.0
        inv_corr = one32
        if BIAS:
            if STEP == 0:
                inv_corr = tl.load(corrections + tid)
            else:
                # alpha^t by squaring, in float64: at most 2 log2(t) roundings of 2^-53
                power = tl.full((), 1.0, tl.float64)
                base = tl.cast(alpha_bits, tl.int64).to(tl.float64, bitcast=True)
                e = t.to(tl.float64).to(tl.int64)
                while e > 0:
                    power = tl.where((e & 1) != 0, power * base, power)
                    base = base * base
                    e = e >> 1
                inv_corr = (1.0 / (1.0 - power)).to(tl.float32)

        p_ptr = tl.load(table + tid).to(tl.pointer_type(P_TYPE))
        g_ptr = tl.load(grads + tid).to(tl.pointer_type(P_TYPE))
        v_ptr = tl.load(table + T + tid).to(tl.pointer_type(S_TYPE))
        m_ptr = v_ptr
        b_ptr = v_ptr
        if CENTERED:
            m_ptr = tl.load(table + 2 * T + tid).to(tl.pointer_type(S_TYPE))
        if MOMENTUM != 0:
            b_ptr = tl.load(table + 3 * T + tid).to(tl.pointer_type(S_TYPE))
        if ALIGNED:  # the host checked every address of this launch: multiples of 16 bytes
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
            m_ptr = tl.multiple_of(m_ptr, 16)
            b_ptr = tl.multiple_of(b_ptr, 16)

        full_end = start + ((end - start) // BLOCK) * BLOCK
        everything = tl.full([BLOCK], 1, tl.int1)
        for off in range(start, full_end, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            _update(
                p_ptr, g_ptr, v_ptr, m_ptr, b_ptr, offs, everything,
                alpha32, oma32, eps32, wd32, decay32, lr32, mu32, k_buf, k_par, inv_corr, inv_scale,
                P, P_TYPE, S, S_TYPE, CENTERED, MOMENTUM, EPS_IN_SQRT, COUPLED, DECOUPLED, BIAS, MAXIMIZE,
                HAS_SCALE,
            )  # fmt: skip
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK)
            _update(
                p_ptr, g_ptr, v_ptr, m_ptr, b_ptr, offs, offs < end,
                alpha32, oma32, eps32, wd32, decay32, lr32, mu32, k_buf, k_par, inv_corr, inv_scale,
                P, P_TYPE, S, S_TYPE, CENTERED, MOMENTUM, EPS_IN_SQRT, COUPLED, DECOUPLED, BIAS, MAXIMIZE,
                HAS_SCALE,
            )  # fmt: skip

        if STEP != 0:
            # the last program of this tensor to arrive (every other one has read the counter) writes it
            arrived = tl.atomic_add(counters + tid, 1, sem="acq_rel")
            if arrived == tl.load(chunks + tid) - 1:
                tl.store(step_ptr, t)
                tl.atomic_xchg(counters + tid, 0, sem="acq_rel")
