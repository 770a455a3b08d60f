/*
 * Fused RMSProp for CPU tensors: one pass over memory per element, all of a group's tensors in
 * one call, split across threads — behind a boundary that trusts nothing it is handed.
 *
 * Plain C ABI (loaded with ctypes; no Python or torch headers at build time), so the package
 * builds with any C compiler and starts instantly. The caller passes, per tensor, the address of
 * its TensorImpl (Tensor._cdata); everything about the tensor — data pointer, element count,
 * dtype, device, layout, sizes, strides — is read here, at call time, through torch's stable C
 * shim (the torch_* / aoti_torch_* functions AOTInductor artefacts use; the loader resolves them
 * in libtorch and hands them over in rmsprop_init). Nothing Python says about a tensor's memory
 * can therefore be stale: a tensor resized, re-dtyped or given new storage since the last step is
 * seen as it is now. An AtenTensorHandle is an at::Tensor*, and an at::Tensor is one pointer to
 * its TensorImpl, so the address of a slot holding a TensorImpl* is a valid handle; the loader
 * checks that on a probe tensor before enabling the kernel. Four functions of torch's own, outside
 * the shim, are used where the loader finds them and its probes accept them (else Python does
 * their work, as before): at::native::is_neg / is_conj, so validation refuses a lazily negated or
 * conjugated view on every step, and torch::autograd::impl::version_counter / bump_version, so a
 * step bumps the version counter of each tensor it writes between its validation and its first
 * write. Each takes a const at::Tensor&, which is such a slot too. The list reader (rmsprop_py_*,
 * below) reads Python's lists of tensors, with the GIL held, at offsets the loader proved.
 *
 * Per element, with M the math type (float for fp32/bf16/fp16 storage, double for fp64):
 *   g  = grad * inv_grad_scale * sign                  (sign = -1 when maximize)
 *   g += wd * p                                        (coupled weight decay)
 *   p *= 1 - lr * wd                                   (decoupled weight decay; factor 1 when off)
 *   v  = alpha * v + (1 - alpha) * g * g
 *   m  = m + (1 - alpha) * (g - m)                     (centered; torch's lerp form)
 *   s  = max(v * inv_c - (m * inv_c)^2, 0) or v * inv_c   (inv_c = 1 / (1 - alpha^t), or 1)
 *   d  = sqrt(s + eps) or sqrt(s) + eps                (eps inside or outside the root)
 *   u  = g / d
 *   b  = mu * b + k_buf * u;  p -= k_par * (nesterov ? k_buf * u + mu * b : b)   (momentum)
 *   p -= lr * u                                        (no momentum)
 * k_buf, k_par are (lr, 1) with lr_in_momentum and (1, lr) without. Centered, the momentum kind,
 * coupled weight decay, eps placement and "plain" (no gradient scaling or sign flip, decoupled
 * decay or bias correction, whose factors are then skipped) are compile-time constants: 48
 * specialised loops per dtype. lr_in_momentum only changes k_buf / k_par, exact either way.
 *
 * Fail closed: every tensor of every record is validated (present, CPU, strided, dense, the
 * parameter's dtype, sizes and strides; the step counter a one-element f32/f64 CPU tensor) and no
 * memory written by the step may overlap any other memory the step touches — all before the
 * first write. The `restrict` promises of the element loops rest on that overlap check. On any
 * failure nothing is written, the per-record status says why, and an error code is returned.
 *
 * Threads: the elements of the valid records, laid end to end, are cut into T runs, one a thread
 * (see run_job); validation and the per-record bookkeeping are split by runs of whole records
 * (see run_records). The threads are torch's own
 * OpenMP pool when the caller hands us its GOMP_parallel entry point (rmsprop_use_openmp): its
 * workers are already running and warm, and no second pool competes with torch's for the cores.
 * Otherwise plain pthreads are started per call (correct, but slower to wake in some VMs).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RMS_ABI_VERSION 7

/* Element kinds of a record (storage dtype); complex tensors are (re, im) pairs of f32 / f64. */
enum { RMS_F32 = 0, RMS_F64 = 1, RMS_BF16 = 2, RMS_F16 = 3, RMS_C64 = 4, RMS_C128 = 5, RMS_KINDS = 6 };

/* Return codes of rmsprop_step (>= 0: nothing went wrong). */
enum {
    RMS_OK = 0,           /* stepped */
    RMS_SKIPPED = 1,      /* found_inf was nonzero: nothing written */
    RMS_CHANGED = 2,      /* RMS_REQUIRE_UNCHANGED and a persistent tensor moved: nothing written */
    RMS_BAD_ARGUMENT = -1,
    RMS_NO_MEMORY = -2,
    RMS_NOT_INITIALISED = -3,
    RMS_INVALID = -4,     /* some record failed validation: see the status array; nothing written */
    RMS_BAD_SCALAR = -5,  /* grad_scale / found_inf is not a one-element f32 CPU tensor */
};

/* Per-record status: reason in the low 4 bits, which tensor in the next 3. */
enum {
    RMS_ST_MISSING = 1,      /* a tensor the rule needs is absent */
    RMS_ST_TORCH = 2,        /* torch's shim refused to describe it (e.g. no storage) */
    RMS_ST_DEVICE = 3,       /* not a CPU tensor */
    RMS_ST_LAYOUT = 4,       /* not strided (sparse, mkldnn, ...) */
    RMS_ST_DTYPE = 5,        /* a dtype the kernel does not take, or another than the parameter's */
    RMS_ST_NOT_DENSE = 6,    /* the parameter's memory has gaps or self-overlaps */
    RMS_ST_SHAPE = 7,        /* sizes or strides differ from the parameter's */
    RMS_ST_STEP = 8,         /* the step counter is not a one-element f32/f64 tensor */
    RMS_ST_OVERLAP = 9,      /* shares memory with another tensor this step touches */
    RMS_ST_NOT_CHOSEN = 10,  /* supported, but excluded by the caller's dtype mask */
    RMS_ST_DIMS = 11,        /* more than RMS_MAX_DIMS dimensions */
    RMS_ST_STORAGE = 12,     /* its elements reach past the end of its storage (a resized storage) */
    /* 13: Python's own (a tensor subclass) */
    RMS_ST_BITS = 14,        /* its conjugate or negative bit is set (read where torch's functions are installed;
                              * Python reads them otherwise) */
    RMS_ST_SCALES = 15,      /* int8 state: its scales are missing, of another dtype or count, or not contiguous */
    RMS_ST_FORMAT = 16,      /* a state format the kernel does not take for this parameter (e.g. float64 with bf16
                              * state, int8 state of a non-contiguous parameter): the torch path steps it */
};
enum { RMS_T_PARAM = 0, RMS_T_GRAD = 1, RMS_T_SQUARE_AVG = 2, RMS_T_GRAD_AVG = 3, RMS_T_MOMENTUM = 4, RMS_T_STEP = 5 };
/* a status byte: the reason in the low 5 bits, the tensor (RMS_T_*) in the high 3 */
#define RMS_STATUS(reason, which) ((uint8_t)((reason) | ((which) << 5)))
#define RMS_MAX_DIMS 64

/* Modes of rmsprop_step. */
enum {
    RMS_MODE_CHECK = 0,           /* validate and report per record; write nothing */
    RMS_MODE_RUN = 1,             /* validate, then step */
    RMS_MODE_STREAM = 2,          /* benchmark: the memory traffic of a plain fp32 step */
};
#define RMS_REQUIRE_UNCHANGED 0x100 /* with RUN: refuse (RMS_CHANGED) if a persistent tensor moved */

/* ------------------------------------------------------------------ torch's stable C shim */
typedef int32_t (*rms_ptr_fn)(void *tensor, void **out);
typedef int32_t (*rms_i64_fn)(void *tensor, int64_t *out);
typedef int32_t (*rms_i32_fn)(void *tensor, int32_t *out);
typedef int32_t (*rms_arr_fn)(void *tensor, int64_t **out);
/* Two functions of torch's autograd (not the shim; exported C++ functions found by their
 * mangled names, optional: without them Python bumps the version counters). Each takes a
 * `const at::Tensor &`, whose object is one TensorImpl pointer: a handle's slot in a column is
 * exactly that. version_counter returns the TensorImpl's VariableVersion, one pointer (NULL: an
 * inference tensor, which has no counter); bump_version adds 1 to the counter, and raises a C++
 * exception for a tensor without one outside inference mode, which C cannot catch: it is only
 * ever called on a tensor whose counter was just seen. */
typedef const void *const *(*rms_version_fn)(const int64_t *tensor);
typedef void (*rms_bump_fn)(const int64_t *tensor);
/* at::native::is_neg / is_conj (const at::Tensor&): the negative and conjugate bits of the
 * TensorImpl's dispatch keys, which the shim does not expose; optional likewise. */
typedef _Bool (*rms_bit_fn)(const int64_t *tensor);

typedef struct {
    int64_t struct_size;              /* sizeof(rms_torch_api), checked in rmsprop_init */
    rms_ptr_fn mutable_data_ptr;      /* torch_get_mutable_data_ptr (materialises copy-on-write) */
    rms_ptr_fn const_data_ptr;        /* torch_get_const_data_ptr */
    rms_i64_fn numel, dim;            /* aoti_torch_get_numel, aoti_torch_get_dim */
    rms_i32_fn dtype, device_type, layout;
    rms_arr_fn sizes, strides;
    rms_i64_fn storage_size, storage_offset; /* bytes of the storage; offset in elements */
    int32_t dtype_code[RMS_KINDS];    /* torch's ScalarType codes for f32, f64, bf16, f16, c64, c128 */
    int32_t dtype_uint8;              /* ... and for uint8 (int8 state codes) */
    int32_t device_cpu, layout_strided;
    rms_version_fn version_counter; /* torch::autograd::impl::version_counter, or NULL */
    rms_bump_fn bump_version;       /* torch::autograd::impl::bump_version, or NULL */
    rms_bit_fn is_neg, is_conj;     /* at::native::is_neg / is_conj, or NULL */
} rms_torch_api;

static rms_torch_api g_api;
static atomic_int g_api_ready = 0;

/* ------------------------------------------------------------------ the caller's structs */
/* One column per list: n TensorImpl addresses (NULL column: the list is absent). */
typedef struct {
    const int64_t *param, *grad, *square_avg, *grad_avg, *momentum_buffer, *step;
    /* int8 state: the per-block float32 scales of each buffer (a 0 handle where a record's
     * state is not int8) */
    const int64_t *square_avg_scale, *grad_avg_scale, *momentum_buffer_scale;
} rms_lists;

/* The rule, field for field the Python option table's Rule (hyperparameters as double, switches
 * as int32, in the table's order); the loader compares this layout with its ctypes twin. */
typedef struct {
    double lr;
    double alpha, eps, weight_decay, momentum;
    int32_t centered, maximize, eps_in_sqrt, nesterov, decoupled_weight_decay, lr_in_momentum,
        bias_correction;
    int32_t state_dtype; /* RMS_SD_*: the option table's state_dtype (None, float32, bfloat16, "int8") */
    int32_t mode;        /* RMS_MODE_* | RMS_REQUIRE_UNCHANGED */
    int32_t dtype_mask;  /* bit k: element kind k may be stepped */
    int32_t write_back;  /* with grad_scale: store the unscaled gradient, as GradScaler.unscale_ */
    const int64_t *grad_scale; /* NULL or one TensorImpl address: a one-element f32 CPU tensor */
    const int64_t *found_inf;  /* NULL or the same: when nonzero the step is skipped */
    int32_t bump_versions;     /* bump the version counter of every tensor a step writes */
} rms_call;

/* state_dtype codes (rms_call) and the record formats they give (see rmsprop/lowbit.py):
 * SAME: state in the parameter's dtype (the plain loops); F32: float32 state of a bf16 / fp16
 * parameter, nearest rounding; BF16SR: bf16 state, stochastic rounding; INT8: 256-element
 * blocks of 8-bit codes with a float32 scale each. Centered with BF16SR / INT8 keeps the
 * variance V (grad_var) instead of E[g^2]. */
enum { RMS_SD_NONE = 0, RMS_SD_F32 = 1, RMS_SD_BF16 = 2, RMS_SD_INT8 = 3 };
enum { RMS_FMT_SAME = 0, RMS_FMT_F32 = 1, RMS_FMT_BF16SR = 2, RMS_FMT_INT8 = 3 };
#define RMS_BLOCK 256

/* What one record's step needs besides the call's scalars (see the low-bit section). */
typedef struct {
    double inv_corr, inv_prev, k_var; /* 1/C_t, 1/C_{t-1} (0 when C_{t-1} = 0), alpha(1-alpha)C_{t-1}/C_t */
    uint32_t key0, key1;              /* random streams: 0 for v (upper 16 bits) and m (lower), 1 for b */
} rms_rec_scalars;

/* A validated record: resolved addresses, element count (complex: float pairs), kinds. Also the
 * memory of the previous step for RMS_REQUIRE_UNCHANGED. */
typedef struct {
    void *p, *g, *v, *m, *b, *step;
    void *vs, *ms, *bs; /* int8 state: the buffers' scales (NULL otherwise) */
    int64_t numel;
    int32_t kind, step_kind; /* step_kind: 0 f32, 1 f64 */
    int32_t fmt, state_size; /* RMS_FMT_*, bytes of one stored state element (codes: 1) */
    int64_t valid;
} rms_record;

/* ------------------------------------------------------------------ layout export (ABI check) */
typedef struct {
    const char *name;
    int64_t offset, size;
} rms_field;
#define RMS_FIELD(S, f) {#f, (int64_t)offsetof(S, f), (int64_t)sizeof(((S *)0)->f)}
static const rms_field call_fields[] = {
    RMS_FIELD(rms_call, lr),          RMS_FIELD(rms_call, alpha),
    RMS_FIELD(rms_call, eps),         RMS_FIELD(rms_call, weight_decay),
    RMS_FIELD(rms_call, momentum),    RMS_FIELD(rms_call, centered),
    RMS_FIELD(rms_call, maximize),    RMS_FIELD(rms_call, eps_in_sqrt),
    RMS_FIELD(rms_call, nesterov),    RMS_FIELD(rms_call, decoupled_weight_decay),
    RMS_FIELD(rms_call, lr_in_momentum), RMS_FIELD(rms_call, bias_correction),
    RMS_FIELD(rms_call, state_dtype),
    RMS_FIELD(rms_call, mode),        RMS_FIELD(rms_call, dtype_mask),
    RMS_FIELD(rms_call, write_back),  RMS_FIELD(rms_call, grad_scale),
    RMS_FIELD(rms_call, found_inf),   RMS_FIELD(rms_call, bump_versions),
};
static const rms_field lists_fields[] = {
    RMS_FIELD(rms_lists, param),      RMS_FIELD(rms_lists, grad),
    RMS_FIELD(rms_lists, square_avg), RMS_FIELD(rms_lists, grad_avg),
    RMS_FIELD(rms_lists, momentum_buffer), RMS_FIELD(rms_lists, step),
    RMS_FIELD(rms_lists, square_avg_scale), RMS_FIELD(rms_lists, grad_avg_scale),
    RMS_FIELD(rms_lists, momentum_buffer_scale),
};
static const rms_field api_fields[] = {
    RMS_FIELD(rms_torch_api, struct_size),      RMS_FIELD(rms_torch_api, mutable_data_ptr),
    RMS_FIELD(rms_torch_api, const_data_ptr),   RMS_FIELD(rms_torch_api, numel),
    RMS_FIELD(rms_torch_api, dim),              RMS_FIELD(rms_torch_api, dtype),
    RMS_FIELD(rms_torch_api, device_type),      RMS_FIELD(rms_torch_api, layout),
    RMS_FIELD(rms_torch_api, sizes),            RMS_FIELD(rms_torch_api, strides),
    RMS_FIELD(rms_torch_api, storage_size),     RMS_FIELD(rms_torch_api, storage_offset),
    RMS_FIELD(rms_torch_api, dtype_code),       RMS_FIELD(rms_torch_api, dtype_uint8),
    RMS_FIELD(rms_torch_api, device_cpu),
    RMS_FIELD(rms_torch_api, layout_strided),
    RMS_FIELD(rms_torch_api, version_counter), RMS_FIELD(rms_torch_api, bump_version),
    RMS_FIELD(rms_torch_api, is_neg),           RMS_FIELD(rms_torch_api, is_conj),
};

int32_t rmsprop_abi_version(void) { return RMS_ABI_VERSION; }

/* which: 0 rms_call, 1 rms_lists, 2 rms_torch_api. Returns the field table and its length;
 * *struct_size gets sizeof the struct. */
const rms_field *rmsprop_layout(int32_t which, int64_t *count, int64_t *struct_size) {
    switch (which) {
    case 0: *count = sizeof call_fields / sizeof *call_fields; *struct_size = sizeof(rms_call); return call_fields;
    case 1: *count = sizeof lists_fields / sizeof *lists_fields; *struct_size = sizeof(rms_lists); return lists_fields;
    case 2: *count = sizeof api_fields / sizeof *api_fields; *struct_size = sizeof(rms_torch_api); return api_fields;
    default: *count = 0; *struct_size = 0; return NULL;
    }
}
/* Forward declarations for the memo's layout (defined with the overlap check below). */
typedef struct rms_span_s rms_span;
static int64_t memo_bytes(int64_t n);
/* Bytes of the caller's memo for n records (see rmsprop_step). */
int64_t rmsprop_memo_size(int64_t n) { return n < 0 ? -1 : memo_bytes(n); }

int32_t rmsprop_set_isa(int32_t isa);
int32_t rmsprop_set_prefetch(int32_t on);

/* Install torch's shim functions (and choose the conversions and prefetch this CPU runs best). Returns 0, or -1 when the struct does not match or a function
 * is missing (the kernel then stays unavailable). */
int32_t rmsprop_init(const rms_torch_api *api) {
    if (!api || api->struct_size != (int64_t)sizeof(rms_torch_api)) return -1;
    if (!api->mutable_data_ptr || !api->const_data_ptr || !api->numel || !api->dim || !api->dtype ||
        !api->device_type || !api->layout || !api->sizes || !api->strides || !api->storage_size ||
        !api->storage_offset || !api->version_counter != !api->bump_version || !api->is_neg != !api->is_conj)
        return -1;
    g_api = *api;
    rmsprop_set_isa(-1);
    rmsprop_set_prefetch(-1);
    atomic_store(&g_api_ready, 1);
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(RMS_SANITIZE)
#define RMS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RMS_CLONES
#endif
#define RMS_INLINE static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ storage conversions */
RMS_INLINE float bf16_load(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
RMS_INLINE uint16_t bf16_store(float f) { /* round to nearest even; NaN becomes torch's 0x7fc0 */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(nan ? 0x7fc0u : rounded);
}

/* IEEE binary16 <-> binary32 with integer operations only, so the loops vectorise (GCC 12 turns
 * _Float16 conversions into a library call per element). */
RMS_INLINE float f16_load(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7fffu;
    /* normal halves: rebias the exponent 15 -> 127, an integer operation */
    uint32_t normal = (em + (112u << 10)) << 13;
    /* subnormal halves (and zero) are em * 2^-24: an exact int -> float conversion and a
     * multiplication whose operands and result are normal floats. (Scaling the shifted bits by
     * 2^112 instead would put subnormal floats through the FPU, which x86 runs in microcode.) */
    float sub = (float)(int32_t)em * 0x1p-24f;
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    uint32_t u = em < 0x400u ? sub_bits : normal;
    u = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : u; /* inf and NaN keep their payload */
    u |= sign;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
RMS_INLINE uint16_t f16_store(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    /* normal: drop 13 mantissa bits with round-half-even, rebias 127 -> 15 (a carry into the
     * exponent is the correct result, up to infinity) */
    uint32_t normal = ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
    /* below 2^-14 the half is subnormal, in units of 2^-24: adding 0.5f (whose ulp is 2^-24)
     * makes the FPU round |f| to a multiple of 2^-24, left in the sum's low mantissa bits */
    float fa;
    memcpy(&fa, &a, sizeof fa);
    float sum = fa + 0.5f;
    uint32_t sum_bits;
    memcpy(&sum_bits, &sum, sizeof sum_bits);
    uint32_t subnormal = sum_bits - 0x3f000000u;
    uint32_t h = a < 0x38800000u ? subnormal : normal;
    h = a >= 0x477ff000u ? 0x7c00u : h;                   /* rounds past 65504: infinity */
    h = a > 0x7f800000u ? (0x7e00u | ((a >> 13) & 0x3ffu)) : h; /* NaN stays NaN (quiet) */
    return (uint16_t)(h | sign);
}

/* ------------------------------------------------------------------ tensor validation */
typedef struct {
    void *ptr;
    int64_t numel, dim;
    const int64_t *sizes, *strides;
    int32_t kind; /* RMS_F32.. or -1 for a dtype the kernel does not take */
    int32_t is_u8; /* uint8 (int8 state codes) */
    int32_t contiguous_order; /* 1 when strides are the row-major contiguous ones */
} rms_view;

static int32_t kind_of(int32_t torch_dtype) {
    for (int32_t k = 0; k < RMS_KINDS; k++)
        if (g_api.dtype_code[k] == torch_dtype) return k;
    return -1;
}
static size_t kind_size(int32_t kind) {
    switch (kind) {
    case RMS_F32: return 4;
    case RMS_F64: return 8;
    case RMS_BF16: case RMS_F16: return 2;
    case RMS_C64: return 8;
    default: return 16;
    }
}

/* Bytes of one stored value of a record (complex records count (re, im) values). */
static size_t storage_size(int32_t kind) {
    return kind == RMS_F64 || kind == RMS_C128 ? 8 : kind == RMS_F32 || kind == RMS_C64 ? 4 : 2;
}

/* Describe one tensor; 0 or the status reason. */
static int describe(const int64_t *slot, int writable, rms_view *out) {
    if (!slot || !*slot) return RMS_ST_MISSING;
    void *h = (void *)slot; /* the address of a TensorImpl* is an at::Tensor* */
    int32_t device, layout, dtype;
    if (g_api.device_type(h, &device) || g_api.layout(h, &layout) || g_api.dtype(h, &dtype)) return RMS_ST_TORCH;
    if (device != g_api.device_cpu) return RMS_ST_DEVICE;
    if (layout != g_api.layout_strided) return RMS_ST_LAYOUT;
    /* a lazily negated or conjugated view: its memory holds the values before the negation */
    if (g_api.is_neg && (g_api.is_neg(slot) || g_api.is_conj(slot))) return RMS_ST_BITS;
    if (g_api.numel(h, &out->numel) || g_api.dim(h, &out->dim)) return RMS_ST_TORCH;
    if (out->numel < 0 || out->dim < 0) return RMS_ST_TORCH;
    if (out->dim > RMS_MAX_DIMS) return RMS_ST_DIMS;
    int64_t *sizes = NULL, *strides = NULL;
    if (g_api.sizes(h, &sizes) || g_api.strides(h, &strides)) return RMS_ST_TORCH;
    if (out->dim > 0 && (!sizes || !strides)) return RMS_ST_TORCH;
    out->sizes = sizes;
    out->strides = strides;
    out->kind = kind_of(dtype);
    out->is_u8 = dtype == g_api.dtype_uint8;
    out->ptr = NULL;
    if (out->numel > 0) {
        void *ptr = NULL;
        if (writable ? g_api.mutable_data_ptr(h, &ptr) : g_api.const_data_ptr(h, &ptr)) return RMS_ST_TORCH;
        if (!ptr) return RMS_ST_TORCH;
        out->ptr = ptr;
    }
    out->contiguous_order = 1;
    if (out->numel == 0) return 0; /* nothing is read or written */
    /* contiguity, and the furthest element from the start (every stride is >= 0 in torch) */
    int64_t expected = 1, furthest = 0;
    for (int64_t d = out->dim - 1; d >= 0; d--) {
        if (sizes[d] <= 0 || strides[d] < 0) return RMS_ST_TORCH;
        if (sizes[d] != 1 && strides[d] != expected) out->contiguous_order = 0;
        int64_t reach;
        if (__builtin_mul_overflow(sizes[d] - 1, strides[d], &reach) || __builtin_add_overflow(furthest, reach, &furthest) ||
            __builtin_mul_overflow(expected, sizes[d], &expected))
            return RMS_ST_STORAGE;
    }
    /* every element must lie inside the storage: a storage resized under its tensor (or a
     * view made with as_strided) would otherwise be read and written past its end */
    if (out->kind >= 0 || out->is_u8) { /* (int8 state codes: one byte an element) */
        int64_t offset, nbytes, end;
        const int64_t elem = out->is_u8 ? 1 : (int64_t)kind_size(out->kind);
        if (g_api.storage_offset(h, &offset) || g_api.storage_size(h, &nbytes)) return RMS_ST_TORCH;
        if (offset < 0 || __builtin_add_overflow(offset, furthest, &end) || __builtin_add_overflow(end, 1, &end) ||
            __builtin_mul_overflow(end, elem, &end) || end > nbytes)
            return RMS_ST_STORAGE;
    }
    return 0;
}

/* True when the tensor's elements tile exactly numel consecutive elements: a permutation of the
 * contiguous layout (channels-last, a transposed weight, ...). Such a tensor's memory is
 * [ptr, ptr + numel * size): the kernel walks memory, not indices. */
static int dense(const rms_view *t) {
    if (t->contiguous_order || t->numel == 0) return 1;
    int64_t order[RMS_MAX_DIMS];
    int64_t n = 0;
    for (int64_t d = 0; d < t->dim; d++)
        if (t->sizes[d] != 1) order[n++] = d;
    for (int64_t i = 1; i < n; i++) { /* insertion sort of the dimensions by stride */
        int64_t x = order[i], j = i - 1;
        while (j >= 0 && t->strides[order[j]] > t->strides[x]) { order[j + 1] = order[j]; j--; }
        order[j + 1] = x;
    }
    int64_t expected = 1;
    for (int64_t i = 0; i < n; i++) {
        if (t->strides[order[i]] != expected) return 0;
        if (__builtin_mul_overflow(expected, t->sizes[order[i]], &expected)) return 0;
    }
    return 1;
}

/* Same sizes, and the same strides wherever a size is not 1 (only those place elements); an
 * empty tensor places none, so any strides match (torch gives empty tensors arbitrary ones). */
static int same_shape(const rms_view *a, const rms_view *b) {
    if (a->dim != b->dim || a->numel != b->numel) return 0;
    for (int64_t d = 0; d < a->dim; d++) {
        if (a->sizes[d] != b->sizes[d]) return 0;
        if (a->numel > 0 && a->sizes[d] != 1 && a->strides[d] != b->strides[d]) return 0;
    }
    return 1;
}

static int64_t blocks_of(int64_t numel) { return (numel + RMS_BLOCK - 1) / RMS_BLOCK; }

/* Validate record t and fill rec; returns 0 or a status. With a state_dtype the record's format
 * follows from it and the first state tensor (uint8 codes: int8; otherwise the float dtype the
 * state_dtype keeps), and every state tensor must be in that one format. */
static uint8_t validate_record(const rms_lists *L, int64_t t, const rms_call *call, rms_record *rec) {
    rms_view p, other, sc;
    int r = describe(L->param ? &L->param[t] : NULL, 1, &p);
    if (r) return RMS_STATUS(r, RMS_T_PARAM);
    if (p.kind < 0) return RMS_STATUS(RMS_ST_DTYPE, RMS_T_PARAM);
    if (!dense(&p)) return RMS_STATUS(RMS_ST_NOT_DENSE, RMS_T_PARAM);
    rec->p = p.ptr;
    rec->kind = p.kind;
    rec->numel = p.numel * ((p.kind == RMS_C64 || p.kind == RMS_C128) ? 2 : 1);
    rec->vs = rec->ms = rec->bs = NULL;

    int32_t fmt = RMS_FMT_SAME, want = p.kind; /* the state's element kind (codes: -1) */
    const int sd = call->state_dtype;
    if (sd != RMS_SD_NONE) {
        if (p.kind == RMS_C64 || p.kind == RMS_C128) return RMS_STATUS(RMS_ST_DTYPE, RMS_T_PARAM);
        r = describe(L->square_avg ? &L->square_avg[t] : NULL, 1, &other);
        if (r) return RMS_STATUS(r, RMS_T_SQUARE_AVG);
        const int lowp = p.kind == RMS_F32 || p.kind == RMS_BF16 || p.kind == RMS_F16;
        if (other.is_u8) {
            if (sd != RMS_SD_INT8) return RMS_STATUS(RMS_ST_DTYPE, RMS_T_SQUARE_AVG);
            /* blocks follow the row-major order: a permuted layout goes to the torch path */
            if (!lowp || !p.contiguous_order) return RMS_STATUS(RMS_ST_FORMAT, RMS_T_PARAM);
            fmt = RMS_FMT_INT8;
            want = -1;
        } else {
            want = sd == RMS_SD_F32 ? RMS_F32 : sd == RMS_SD_BF16 ? RMS_BF16 : (p.kind == RMS_F64 ? RMS_F64 : RMS_F32);
            if (other.kind != want) return RMS_STATUS(RMS_ST_DTYPE, RMS_T_SQUARE_AVG);
            fmt = sd == RMS_SD_BF16 ? RMS_FMT_BF16SR : (want == p.kind ? RMS_FMT_SAME : RMS_FMT_F32);
            if (fmt != RMS_FMT_SAME && !lowp) return RMS_STATUS(RMS_ST_FORMAT, RMS_T_PARAM);
            /* stochastic rounding draws its bits by (step, tensor, element) with elements in
             * row-major order, as the torch paths number them; the kernel walks memory, so a
             * permuted layout (a transposed weight, channels-last) goes to the torch path */
            if (fmt == RMS_FMT_BF16SR && !p.contiguous_order) return RMS_STATUS(RMS_ST_FORMAT, RMS_T_PARAM);
        }
    }
    rec->fmt = fmt;
    rec->state_size = fmt == RMS_FMT_INT8 ? 1 : fmt == RMS_FMT_BF16SR ? 2 : fmt == RMS_FMT_F32 ? 4 : (int32_t)storage_size(p.kind);

    const int64_t *const *cols[4] = {&L->grad, &L->square_avg, &L->grad_avg, &L->momentum_buffer};
    const int64_t *const *scols[4] = {NULL, &L->square_avg_scale, &L->grad_avg_scale, &L->momentum_buffer_scale};
    const int needed[4] = {1, 1, call->centered != 0, call->momentum > 0};
    void **dest[4] = {&rec->g, &rec->v, &rec->m, &rec->b};
    void **sdest[4] = {NULL, &rec->vs, &rec->ms, &rec->bs};
    for (int k = 0; k < 4; k++) {
        const int which = RMS_T_GRAD + k;
        *dest[k] = NULL;
        if (!needed[k]) continue;
        const int64_t *col = *cols[k];
        /* the gradient is only read, unless it is unscaled in place */
        int writable = k > 0 || (call->write_back && call->grad_scale);
        r = describe(col ? &col[t] : NULL, writable, &other);
        if (r) return RMS_STATUS(r, which);
        const int64_t *scol = k > 0 ? *scols[k] : NULL;
        const int has_scale = scol && scol[t];
        if (k > 0 && fmt == RMS_FMT_INT8) {
            if (!other.is_u8) return RMS_STATUS(RMS_ST_DTYPE, which);
            if (!same_shape(&other, &p)) return RMS_STATUS(RMS_ST_SHAPE, which);
            if (!has_scale) return RMS_STATUS(RMS_ST_SCALES, which);
            r = describe(&scol[t], 1, &sc);
            if (r) return RMS_STATUS(r == RMS_ST_MISSING ? RMS_ST_SCALES : r, which);
            if (sc.kind != RMS_F32 || sc.dim != 1 || !sc.contiguous_order || sc.numel != blocks_of(p.numel))
                return RMS_STATUS(RMS_ST_SCALES, which);
            *sdest[k] = sc.ptr;
        } else {
            /* the gradient has the parameter's dtype, the state the format's */
            if (other.is_u8 || other.kind != (k == 0 ? p.kind : want)) return RMS_STATUS(RMS_ST_DTYPE, which);
            if (!same_shape(&other, &p)) return RMS_STATUS(RMS_ST_SHAPE, which);
            if (has_scale) return RMS_STATUS(RMS_ST_SCALES, which);
        }
        *dest[k] = other.ptr;
    }

    r = describe(L->step ? &L->step[t] : NULL, 1, &other);
    if (r) return RMS_STATUS(r, RMS_T_STEP);
    if (other.numel != 1 || (other.kind != RMS_F32 && other.kind != RMS_F64)) return RMS_STATUS(RMS_ST_STEP, RMS_T_STEP);
    rec->step = other.ptr;
    rec->step_kind = other.kind == RMS_F64;
    /* the mask chooses which dtypes take the plain loops; low-bit formats are always fused */
    if (fmt == RMS_FMT_SAME && !((call->dtype_mask >> p.kind) & 1)) return RMS_STATUS(RMS_ST_NOT_CHOSEN, RMS_T_PARAM);
    rec->valid = 1;
    return 0;
}

/* Warming the TensorImpls ahead of validation. Describing a tensor reads a few fields of its
 * TensorImpl through the shim. With thousands of small tensors each TensorImpl lies on a page
 * of its own, and after a step has streamed the tensors' data through the cache every one of
 * those reads misses the cache and the TLB, one after the other (2000 records of 5k floats on a
 * 2-core Zen 3 VM: 4.1 ms of the step's 14 ms went to the validation). Records are warmed in
 * batches some records ahead, so that the misses overlap: first the TensorImpl's first byte is
 * read (a load: it fills the TLB, where a software prefetch that misses the TLB may be dropped),
 * and a batch later its next lines are prefetched. The only byte loaded is the first of the
 * object a handle points to, inside it whatever its layout; the lines after it are only
 * prefetched, which cannot fault, so nothing past the object is ever loaded. */
#define RMS_WARM_BATCH 16
#define RMS_WARM_LINES 4 /* (torch 2.13's shim reads TensorImpl fields within its first 256 bytes) */
static void warm_records(const rms_lists *L, int64_t lo, int64_t hi, int64_t n, int load) {
    const int64_t *const cols[6] = {L->param, L->grad, L->square_avg, L->grad_avg, L->momentum_buffer, L->step};
    if (hi > n) hi = n;
    for (int64_t t = lo; t < hi; t++)
        for (int k = 0; k < 6; k++) {
            if (!cols[k] || !cols[k][t]) continue;
            const char *impl = (const char *)(uintptr_t)cols[k][t];
            if (load) {
                (void)*(volatile const char *)impl;
            } else {
                for (int line = 1; line < RMS_WARM_LINES; line++) __builtin_prefetch(impl + 64 * line, 0, 3);
            }
        }
}
/* Called at record t of the run [lo, hi) one thread validates, every batch from lo: loads batch
 * t+2, prefetches batch t+1 (loaded a batch ago), while batch t is validated. */
static void warm_ahead(const rms_lists *L, int64_t t, int64_t lo, int64_t hi) {
    const int64_t b = RMS_WARM_BATCH;
    if (t == lo) {
        warm_records(L, lo, lo + 2 * b, hi, 1);
        warm_records(L, lo, lo + b, hi, 0);
    }
    warm_records(L, t + 2 * b, t + 3 * b, hi, 1);
    warm_records(L, t + b, t + 2 * b, hi, 0);
}

/* ------------------------------------------------------------------ overlap check */
struct rms_span_s {
    uintptr_t start, end;
    int64_t record;
    int32_t written, which;
};

/* The caller's memo: the previous step's records, and the sorted spans of the tensors that
 * persist between steps (parameters and state), which a steady loop checks new gradients
 * against without sorting again. */
typedef struct {
    int64_t n, n_spans, spans_valid;
    int64_t last_total; /* the elements the previous validated call stepped or streamed */
} rms_memo_header;
#define RMS_PERSISTED_PER_RECORD 8 /* p, v, m, b, step, and the three int8 scales */
/* Then the scratch of one call, so a step allocates nothing: this step's records, the per-record
 * scalars (bias corrections, low-bit weights and keys), the statuses. */
static int64_t memo_bytes(int64_t n) {
    return (int64_t)(sizeof(rms_memo_header) + (size_t)n * sizeof(rms_record) +
                     (size_t)n * RMS_PERSISTED_PER_RECORD * sizeof(rms_span) + (size_t)n * sizeof(rms_record) +
                     (size_t)n * sizeof(rms_rec_scalars) + (size_t)n);
}
static rms_record *memo_records(void *memo) { return (rms_record *)((rms_memo_header *)memo + 1); }
static rms_span *memo_spans(void *memo, int64_t n) { return (rms_span *)(memo_records(memo) + n); }
static rms_record *scratch_records(void *memo, int64_t n) {
    return (rms_record *)(memo_spans(memo, n) + (size_t)n * RMS_PERSISTED_PER_RECORD);
}
static rms_rec_scalars *scratch_scalars(void *memo, int64_t n) {
    return (rms_rec_scalars *)(scratch_records(memo, n) + n);
}
static uint8_t *scratch_status(void *memo, int64_t n) { return (uint8_t *)(scratch_scalars(memo, n) + n); }

/* LSD radix sort of spans by start address, 8 bits a pass; passes whose byte is the same for
 * every key are skipped (user-space addresses share their top bytes). */
static int sort_spans(rms_span *a, int64_t n) {
    if (n < 2) return 0;
    rms_span *tmp = (rms_span *)malloc(sizeof(rms_span) * (size_t)n);
    if (!tmp) return -1;
    rms_span *src = a, *dst = tmp;
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t i = 0; i < n; i++) count[((src[i].start >> shift) & 0xff) + 1]++;
        int skip = 0;
        for (int b = 1; b <= 256; b++)
            if (count[b] == n) skip = 1;
        if (skip) continue;
        for (int b = 1; b <= 256; b++) count[b] += count[b - 1];
        for (int64_t i = 0; i < n; i++) dst[count[(src[i].start >> shift) & 0xff]++] = src[i];
        rms_span *s = src; src = dst; dst = s;
    }
    if (src != a) memcpy(a, src, sizeof(rms_span) * (size_t)n);
    free(tmp);
    return 0;
}

static void mark(uint8_t *status, int64_t record, int32_t which, int64_t *marked) {
    if (status[record] == 0) {
        status[record] = RMS_STATUS(RMS_ST_OVERLAP, which);
        (*marked)++;
    }
}

/* Mark every record whose memory a written tensor shares with another tensor of the step (a
 * gradient aliasing its parameter, two parameters viewing one buffer, a state tensor shared by
 * two parameters...). With `save` (room for 5n spans), the persistent tensors' spans are kept
 * there in address order when nothing overlaps. Returns the number of records marked, or -1
 * when out of memory. */
static int64_t mark_overlaps(const rms_record *recs, int64_t n, const rms_call *call, uint8_t *status,
                             rms_span *save, int64_t *saved) {
    int64_t cap = (RMS_PERSISTED_PER_RECORD + 1) * n, k = 0, marked = 0;
    if (saved) *saved = 0;
    if (cap == 0) return 0;
    rms_span *spans = (rms_span *)malloc(sizeof(rms_span) * (size_t)cap);
    if (!spans) return -1;
    int grad_written = call->write_back && call->grad_scale;
    for (int64_t t = 0; t < n; t++) {
        const rms_record *r = &recs[t];
        if (!r->valid) continue;
        size_t bytes = (size_t)r->numel * storage_size(r->kind);
        size_t state_bytes = (size_t)r->numel * (size_t)r->state_size;
        size_t scale_bytes = (size_t)blocks_of(r->numel) * sizeof(float);
        void *const ptrs[8] = {r->p, r->g, r->v, r->m, r->b, r->vs, r->ms, r->bs};
        for (int j = 0; j < 8; j++) {
            size_t size = j < 2 ? bytes : j < 5 ? state_bytes : scale_bytes;
            if (!ptrs[j] || size == 0) continue;
            uintptr_t s = (uintptr_t)ptrs[j];
            /* a scale is reported as its buffer's (2, 3, 4) */
            spans[k++] = (rms_span){s, s + size, t, j != 1 || grad_written, j < 5 ? j : j - 3};
        }
        uintptr_t s = (uintptr_t)r->step;
        spans[k++] = (rms_span){s, s + (r->step_kind ? 8u : 4u), t, 1, RMS_T_STEP};
    }
    if (sort_spans(spans, k)) {
        free(spans);
        return -1;
    }
    uintptr_t max_any = 0, max_written = 0;
    int64_t rec_any = -1, rec_written = -1;
    int32_t which_any = 0, which_written = 0;
    for (int64_t i = 0; i < k; i++) {
        const rms_span *x = &spans[i];
        int64_t partner = -1;
        int32_t partner_which = 0;
        if (x->written && x->start < max_any) { partner = rec_any; partner_which = which_any; }
        else if (!x->written && x->start < max_written) { partner = rec_written; partner_which = which_written; }
        if (partner >= 0) {
            mark(status, x->record, x->which, &marked);
            mark(status, partner, partner_which, &marked);
        }
        if (x->end > max_any) { max_any = x->end; rec_any = x->record; which_any = x->which; }
        if (x->written && x->end > max_written) { max_written = x->end; rec_written = x->record; which_written = x->which; }
    }
    if (save && marked == 0) { /* disjoint: the persistent spans, in order, for the next steps */
        int64_t m = 0;
        for (int64_t i = 0; i < k; i++)
            if (spans[i].which != RMS_T_GRAD) save[m++] = spans[i];
        *saved = m;
    }
    free(spans);
    return marked;
}

/* The same check when only the gradients are new: each (read-only) gradient against the
 * persistent spans of the previous step, which are disjoint and sorted, so their ends increase
 * too and one binary search finds the only candidate. */
static int64_t mark_grad_overlaps(const rms_record *recs, int64_t n, const rms_span *spans, int64_t k,
                                  uint8_t *status) {
    int64_t marked = 0;
    for (int64_t t = 0; t < n; t++) {
        const rms_record *r = &recs[t];
        if (!r->valid || !r->g || r->numel == 0) continue;
        uintptr_t gs = (uintptr_t)r->g, ge = gs + (size_t)r->numel * storage_size(r->kind);
        int64_t lo = 0, hi = k; /* first span whose end is past the gradient's start */
        while (lo < hi) {
            int64_t mid = lo + (hi - lo) / 2;
            if (spans[mid].end > gs) hi = mid;
            else lo = mid + 1;
        }
        if (lo < k && spans[lo].start < ge) {
            mark(status, t, RMS_T_GRAD, &marked);
            mark(status, spans[lo].record, spans[lo].which, &marked);
        }
    }
    return marked;
}

/* Scalars of one call, in the math type. */
typedef struct {
    double inv_scale, sign, wd, decay, alpha, one_minus_alpha, eps, lr, mu, k_buf, k_par;
} rms_scalars;

/* Software prefetch RMS_AHEAD bytes ahead of each stream the element loops read, where it helps.
 * On Intel the loops' arithmetic (an IEEE division and square root per element) keeps too few
 * loads in flight for the hardware prefetcher to hide memory; measured on a 2-vCPU Xeon
 * (AVX-512), 10 x 1M, two threads, interleaved processes: bf16 5.0 -> 2.6 ms, fp16 3.3 -> 2.4,
 * bf16 momentum+centered 5.7 -> 4.1, fp32 4.6 -> 4.2 (the figures of README and CHANGELOG). On
 * AMD it costs: on a 2-vCPU Zen 4 EPYC, off and on interleaved in one process, fp32 10 x 1M
 * 4.6 -> 5.9 ms, 1 x 10M 4.6 -> 5.6, momentum+centered 7.8 -> 10.9, 2000 x 5k 7.8 -> 8.9, bf16
 * and fp16 3% slower (its own prefetchers keep the lines coming; nearer, farther and L2-only
 * prefetches were no better in separate builds), so it is on for Intel CPUs only
 * (rmsprop_set_prefetch). A prefetch never faults, and the address is computed as an integer, so
 * reaching past a tensor's end reads nothing and is no pointer arithmetic out of bounds. */
#define RMS_AHEAD 2048
static atomic_int g_prefetch = 0;
/* -1: this CPU's default (on for Intel); 0 or 1: off or on, for tests and benchmarks. Returns
 * whether the loops prefetch now. */
int32_t rmsprop_set_prefetch(int32_t on) {
    int chosen = on > 0;
    if (on < 0) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
        __builtin_cpu_init();
        chosen = __builtin_cpu_is("intel");
#else
        chosen = 0;
#endif
    }
    atomic_store(&g_prefetch, chosen);
    return chosen;
}
int32_t rmsprop_prefetches(void) { return atomic_load(&g_prefetch); }
#define RMS_PREFETCH(ptr) __builtin_prefetch((const void *)((uintptr_t)(ptr) + RMS_AHEAD), 0, 3)

/* ------------------------------------------------------------------ the element loop
 * DEFINE_LOOP(NAME, S, M, SQRT, LOAD, STORE): S is the storage type, M the math type, SQRT its
 * square root (sqrtf for float: plain sqrt would widen every element to double). The loop body is
 * one always-inline function whose last five arguments are compile-time constants at each of
 * the 48 call sites in the dispatcher below, so GCC emits straight-line vectorised loops. The
 * restrict promises hold because mark_overlaps refused every record whose memory overlaps. */
#define RMS_CHUNK 256
#define DEFINE_LOOP(NAME, S, M, SQRT, LOAD, STORE)                                                    \
    RMS_INLINE void NAME##_body(S *restrict p_, S *restrict g_, S *restrict v_, S *restrict m_,   \
                                S *restrict b_, int64_t n, const rms_scalars *c, M inv_corr,      \
                                int write_back, const int centered, const int mom_kind,           \
                                const int coupled, const int eps_inside, const int plain) {       \
        const M inv_scale = (M)c->inv_scale, sign = (M)c->sign, wd = (M)c->wd;                   \
        const M decay = (M)c->decay, alpha = (M)c->alpha, oma = (M)c->one_minus_alpha;            \
        const M eps = (M)c->eps, lr = (M)c->lr, mu = (M)c->mu;                                    \
        const M k_buf = (M)c->k_buf, k_par = (M)c->k_par;                                        \
        if (write_back) { /* AMP: unscale the gradient in place, as GradScaler.unscale_ would */ \
            for (int64_t i = 0; i < n; i++) g_[i] = STORE(LOAD(g_[i]) * inv_scale);              \
        }                                                                                         \
        const M gscale = write_back ? sign : inv_scale * sign;                                    \
        /* in chunks of RMS_CHUNK elements, each first prefetching a line at a time ahead where \
         * this CPU gains from it (g_prefetch; inside the element loop a prefetch would keep    \
         * GCC from vectorising it) */                                                          \
        const int ahead = atomic_load_explicit(&g_prefetch, memory_order_relaxed);                \
        for (int64_t i0 = 0; i0 < n; i0 += RMS_CHUNK) {                                          \
          const int64_t end = n - i0 < RMS_CHUNK ? n : i0 + RMS_CHUNK;                             \
          for (int64_t k = i0; ahead && k < end; k += 64 / (int64_t)sizeof(S)) {                  \
            RMS_PREFETCH(g_ + k); RMS_PREFETCH(p_ + k); RMS_PREFETCH(v_ + k);                      \
            if (centered) RMS_PREFETCH(m_ + k);                                                    \
            if (mom_kind) RMS_PREFETCH(b_ + k);                                                    \
          }                                                                                        \
          for (int64_t i = i0; i < end; i++) {                                                     \
            M g = LOAD(g_[i]);                                                                    \
            M p = LOAD(p_[i]);                                                                    \
            if (!plain) g = g * gscale;                                                           \
            if (coupled) g = g + wd * p;                                                          \
            if (!plain) p = p * decay;                                                            \
            M v = alpha * LOAD(v_[i]) + oma * g * g;                                              \
            M s = plain ? v : v * inv_corr;                                                       \
            if (centered) {                                                                       \
                M m = LOAD(m_[i]);                                                                \
                m = m + oma * (g - m);                                                            \
                M mh = plain ? m : m * inv_corr;                                                  \
                s = s - mh * mh;                                                                  \
                s = s < (M)0 ? (M)0 : s; /* clamp rounding error; NaN passes through */          \
                m_[i] = STORE(m);                                                                 \
            }                                                                                     \
            M u = eps_inside ? g / SQRT(s + eps) : g / (SQRT(s) + eps);                           \
            if (mom_kind == 0) {                                                                  \
                p = p - lr * u;                                                                   \
            } else {                                                                              \
                M b = mu * LOAD(b_[i]) + k_buf * u;                                               \
                M applied = mom_kind == 2 ? k_buf * u + mu * b : b;                               \
                p = p - k_par * applied;                                                          \
                b_[i] = STORE(b);                                                                 \
            }                                                                                     \
            v_[i] = STORE(v);                                                                     \
            p_[i] = STORE(p);                                                                     \
          }                                                                                        \
        }                                                                                         \
    }                                                                                             \
    RMS_CLONES static void NAME(S *p, S *g, S *v, S *m, S *b, int64_t n, const rms_scalars *c,    \
                                double inv_corr, int write_back, int variant) {                   \
        M ic = (M)inv_corr;                                                                       \
        const int plain = variant & 1, eps_inside = (variant >> 1) & 1, coupled = (variant >> 2) & 1; \
        const int kind = (variant >> 3) % 3, centered = (variant >> 3) / 3;                      \
        /* every (centered, kind, coupled, eps_inside, plain) is a constant at its call site */  \
        RMS_EXPAND(NAME##_body, centered, kind, coupled, eps_inside, plain)                        \
    }

/* Calls BODY with all five flags as literal constants, selected by the runtime values. */
#define RMS_ARGS p, g, v, m, b, n, c, ic, write_back
#define RMS_PL(BODY, C0, K, CP, E, pl) \
    if (pl) BODY(RMS_ARGS, C0, K, CP, E, 1); else BODY(RMS_ARGS, C0, K, CP, E, 0);
#define RMS_E(BODY, C0, K, CP, e, pl) \
    if (e) { RMS_PL(BODY, C0, K, CP, 1, pl) } else { RMS_PL(BODY, C0, K, CP, 0, pl) }
#define RMS_CP(BODY, C0, K, cp, e, pl) \
    if (cp) { RMS_E(BODY, C0, K, 1, e, pl) } else { RMS_E(BODY, C0, K, 0, e, pl) }
#define RMS_K(BODY, C0, k, cp, e, pl)                                                          \
    if (k == 0) { RMS_CP(BODY, C0, 0, cp, e, pl) } else if (k == 1) { RMS_CP(BODY, C0, 1, cp, e, pl) } \
    else { RMS_CP(BODY, C0, 2, cp, e, pl) }
#define RMS_EXPAND(BODY, c0, k, cp, e, pl) \
    if (c0) { RMS_K(BODY, 1, k, cp, e, pl) } else { RMS_K(BODY, 0, k, cp, e, pl) }

#define ID(x) (x)
DEFINE_LOOP(loop_f32, float, float, sqrtf, ID, ID)
DEFINE_LOOP(loop_f64, double, double, sqrt, ID, ID)
DEFINE_LOOP(loop_bf16, uint16_t, float, sqrtf, bf16_load, bf16_store)
DEFINE_LOOP(loop_f16, uint16_t, float, sqrtf, f16_load, f16_store)

/* ------------------------------------------------------------------ array conversions
 * bf16 / fp16 <-> fp32 over arrays, chosen at run time: AVX2 (bf16, integer rounding) and F16C
 * (fp16, the hardware's round-to-nearest-even) where the CPU has them, else the portable scalar
 * code above, which compilers vectorise only partly. Every variant rounds identically (the
 * exhaustive tests check each one against torch on every half value and rounding boundary). */
typedef void (*rms_to_f32_fn)(const uint16_t *in, float *out, int64_t n);
typedef void (*rms_from_f32_fn)(const float *in, uint16_t *out, int64_t n);

static void bf16_to_f32_portable(const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_load(in[i]);
}
static void f32_to_bf16_portable(const float *in, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = bf16_store(in[i]);
}
static void f16_to_f32_portable(const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_load(in[i]);
}
static void f32_to_f16_portable(const float *in, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_store(in[i]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define RMS_HAVE_X86_SIMD 1
__attribute__((target("avx2"))) static void bf16_to_f32_avx2(const uint16_t *in, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(in + i)));
        _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
    }
    for (; i < n; i++) out[i] = bf16_load(in[i]);
}
__attribute__((target("avx2,f16c"))) static void vstore_bf16_array(const float *in, uint16_t *out, int64_t n);
static void f32_to_bf16_avx2(const float *in, uint16_t *out, int64_t n) { vstore_bf16_array(in, out, n); }
__attribute__((target("avx2,f16c"))) static void f16_to_f32_f16c(const uint16_t *in, float *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
    for (; i < n; i++) out[i] = f16_load(in[i]);
}
__attribute__((target("avx2,f16c"))) static void f32_to_f16_f16c(const float *in, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) out[i] = f16_store(in[i]);
}
#endif

typedef struct {
    rms_to_f32_fn bf16_in, f16_in;
    rms_from_f32_fn bf16_out, f16_out;
} rms_converters;
static const rms_converters portable_converters = {bf16_to_f32_portable, f16_to_f32_portable, f32_to_bf16_portable,
                                                   f32_to_f16_portable};
static rms_converters g_cvt = {bf16_to_f32_portable, f16_to_f32_portable, f32_to_bf16_portable, f32_to_f16_portable};
static atomic_int g_isa = 0; /* 0 portable, 1 AVX2 (+F16C for fp16: 2), 3 AVX-512 */
#ifdef RMS_HAVE_X86_SIMD
static void bf16_to_f32_avx512(const uint16_t *in, float *out, int64_t n);
static void f32_to_bf16_avx512(const float *in, uint16_t *out, int64_t n);
static void f16_to_f32_avx512(const uint16_t *in, float *out, int64_t n);
static void f32_to_f16_avx512(const float *in, uint16_t *out, int64_t n);
#endif
static void select_lowbit_loop(int32_t level, int avx512_lowbit);

/* The best conversions and loops this CPU runs (isa = -1), or the best up to a level (0: the
 * portable ones, 2: AVX2 + F16C at most) — for tests, which check each, and benchmarks, which
 * compare them. Returns the level in use. */
int32_t rmsprop_set_isa(int32_t isa) {
    rms_converters chosen = portable_converters;
    int32_t got = 0;
    int avx512_lowbit = 0;
    const int32_t cap = isa < 0 ? 3 : isa;
#ifdef RMS_HAVE_X86_SIMD
    if (cap >= 1) {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) {
            chosen.bf16_in = bf16_to_f32_avx2;
            chosen.bf16_out = f32_to_bf16_avx2;
            got = 1;
            if (cap >= 2 && __builtin_cpu_supports("f16c")) {
                chosen.f16_in = f16_to_f32_f16c;
                chosen.f16_out = f32_to_f16_f16c;
                got = 2;
                /* libgcc's check includes the OS's support for the 512-bit registers (XCR0) */
                if (cap >= 3 && __builtin_cpu_supports("avx512f")) {
                    chosen = (rms_converters){bf16_to_f32_avx512, f16_to_f32_avx512, f32_to_bf16_avx512,
                                              f32_to_f16_avx512};
                    got = 3;
                    avx512_lowbit = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                                    __builtin_cpu_supports("avx512vl");
                }
            }
        }
    }
#else
    (void)cap;
#endif
    g_cvt = chosen;
    select_lowbit_loop(got, avx512_lowbit);
    atomic_store(&g_isa, got);
    return got;
}
int32_t rmsprop_isa(void) { return atomic_load(&g_isa); }

/* ------------------------------------------------------------------ bf16 / fp16, fused in registers
 * With AVX2 (and F16C for fp16) the low-precision loops convert and compute eight values at a
 * time in registers: one pass over memory, as for fp32. The operations are the scalar loop's, in
 * its order, each correctly rounded (IEEE add, mul, div, sqrt; no contraction into FMA), so the
 * results are the scalar loop's bit for bit. The last n % 8 values go through the same vector
 * code on an 8-value copy. Without AVX2 the scalar loops above run (DEFINE_LOOP). */
#ifdef RMS_HAVE_X86_SIMD
#define RMS_AVX2 __attribute__((target("avx2,f16c")))
RMS_AVX2 static inline __m256 vload_bf16(const uint16_t *x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)x)), 16));
}
/* bf16_store, eight at a time: u + 0x7fff + (the kept lowest bit) rounds half to even in the
 * top 16 bits, a NaN becomes torch's 0x7fc0, and one byte shuffle gathers the top halves. */
RMS_AVX2 static inline void vstore_bf16(uint16_t *x, __m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    t = _mm256_blendv_epi8(t, _mm256_set1_epi32(0x7fc00000), _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
    const __m256i top = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                         2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    t = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, top), 0x08); /* qwords 0 and 2 -> low half */
    _mm_storeu_si128((__m128i *)x, _mm256_castsi256_si128(t));
}
RMS_AVX2 static inline __m256 vload_f16(const uint16_t *x) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)x)); }
RMS_AVX2 static inline void vstore_f16(uint16_t *x, __m256 f) {
    _mm_storeu_si128((__m128i *)x, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT));
}

/* One vector (W bits: 256 or 512) of the scalar loop's body (DEFINE_LOOP), in the same order of
 * operations. The intrinsics are named by width (_mm256_mul_ps, _mm512_mul_ps), so one body
 * serves both widths; max keeps its NaN rule at both (a NaN second operand passes through). */
#define VOP(W, op) _mm##W##_##op##_ps
#define RMS_VBODY(W, VLOAD, VSTORE, P, G, V, M, B)                                                   \
    do {                                                                                            \
        __m##W g = VLOAD(G), p = VLOAD(P);                                                          \
        if (!plain) g = VOP(W, mul)(g, gscale);                                                     \
        if (coupled) g = VOP(W, add)(g, VOP(W, mul)(wd, p));                                        \
        if (!plain) p = VOP(W, mul)(p, decay);                                                      \
        __m##W v = VOP(W, add)(VOP(W, mul)(alpha, VLOAD(V)), VOP(W, mul)(VOP(W, mul)(oma, g), g));  \
        __m##W s = plain ? v : VOP(W, mul)(v, ic);                                                  \
        if (centered) {                                                                             \
            __m##W m = VLOAD(M);                                                                    \
            m = VOP(W, add)(m, VOP(W, mul)(oma, VOP(W, sub)(g, m)));                                \
            __m##W mh = plain ? m : VOP(W, mul)(m, ic);                                             \
            s = VOP(W, sub)(s, VOP(W, mul)(mh, mh));                                                \
            s = VOP(W, max)(zero, s); /* s < 0 -> 0; NaN (second operand) passes through */        \
            VSTORE(M, m);                                                                           \
        }                                                                                           \
        __m##W u = eps_inside ? VOP(W, div)(g, VOP(W, sqrt)(VOP(W, add)(s, eps)))                   \
                              : VOP(W, div)(g, VOP(W, add)(VOP(W, sqrt)(s), eps));                  \
        if (mom_kind == 0) {                                                                        \
            p = VOP(W, sub)(p, VOP(W, mul)(lr, u));                                                 \
        } else {                                                                                    \
            __m##W b = VOP(W, add)(VOP(W, mul)(mu, VLOAD(B)), VOP(W, mul)(k_buf, u));               \
            __m##W applied = mom_kind == 2 ? VOP(W, add)(VOP(W, mul)(k_buf, u), VOP(W, mul)(mu, b)) : b; \
            p = VOP(W, sub)(p, VOP(W, mul)(k_par, applied));                                        \
            VSTORE(B, b);                                                                           \
        }                                                                                           \
        VSTORE(V, v);                                                                               \
        VSTORE(P, p);                                                                               \
    } while (0)

/* The loop over one slice at vector width W (LANES values a vector), compiled for TARGET. */
#define DEFINE_VLOOP(NAME, TARGET, W, LANES, VLOAD, VSTORE)                                         \
    TARGET static inline __attribute__((always_inline)) void NAME##_body(                            \
        uint16_t *restrict p_, uint16_t *restrict g_, uint16_t *restrict v_, uint16_t *restrict m_,  \
        uint16_t *restrict b_, int64_t n, const rms_scalars *c, float inv_corr, int write_back,      \
        const int centered, const int mom_kind, const int coupled, const int eps_inside, const int plain) { \
        const __m##W inv_scale = VOP(W, set1)((float)c->inv_scale), wd = VOP(W, set1)((float)c->wd); \
        const __m##W decay = VOP(W, set1)((float)c->decay), alpha = VOP(W, set1)((float)c->alpha);  \
        const __m##W oma = VOP(W, set1)((float)c->one_minus_alpha), eps = VOP(W, set1)((float)c->eps); \
        const __m##W lr = VOP(W, set1)((float)c->lr), mu = VOP(W, set1)((float)c->mu);              \
        const __m##W k_buf = VOP(W, set1)((float)c->k_buf), k_par = VOP(W, set1)((float)c->k_par);  \
        const __m##W ic = VOP(W, set1)(inv_corr), zero = VOP(W, setzero)();                         \
        const float gs = write_back ? (float)c->sign : (float)c->inv_scale * (float)c->sign;       \
        const __m##W gscale = VOP(W, set1)(gs);                                                     \
        const int64_t whole = n - n % LANES;                                                        \
        if (write_back) { /* AMP: unscale the gradient in place, as GradScaler.unscale_ would */   \
            for (int64_t i = 0; i < whole; i += LANES) VSTORE(g_ + i, VOP(W, mul)(VLOAD(g_ + i), inv_scale)); \
        }                                                                                           \
        const int ahead = atomic_load_explicit(&g_prefetch, memory_order_relaxed);                  \
        for (int64_t i = 0; i < whole; i += LANES) {                                                \
            if (ahead && (i & 31) == 0) { /* a line of each stream ahead, every 64 bytes */        \
                RMS_PREFETCH(g_ + i); RMS_PREFETCH(p_ + i); RMS_PREFETCH(v_ + i);                   \
                if (centered) RMS_PREFETCH(m_ + i);                                                 \
                if (mom_kind) RMS_PREFETCH(b_ + i);                                                 \
            }                                                                                       \
            RMS_VBODY(W, VLOAD, VSTORE, p_ + i, g_ + i, v_ + i, m_ + i, b_ + i);                    \
        }                                                                                           \
        if (whole < n) { /* the tail, on one-vector copies (the extra lanes are never stored) */   \
            const int64_t k = n - whole;                                                            \
            uint16_t P[LANES] = {0}, G[LANES] = {0}, V[LANES] = {0}, M[LANES] = {0}, B[LANES] = {0}; \
            memcpy(P, p_ + whole, (size_t)k * 2); memcpy(G, g_ + whole, (size_t)k * 2);             \
            memcpy(V, v_ + whole, (size_t)k * 2);                                                   \
            if (centered) memcpy(M, m_ + whole, (size_t)k * 2);                                     \
            if (mom_kind) memcpy(B, b_ + whole, (size_t)k * 2);                                     \
            if (write_back) VSTORE(G, VOP(W, mul)(VLOAD(G), inv_scale));                            \
            RMS_VBODY(W, VLOAD, VSTORE, P, G, V, M, B);                                             \
            memcpy(p_ + whole, P, (size_t)k * 2); memcpy(v_ + whole, V, (size_t)k * 2);             \
            if (write_back) memcpy(g_ + whole, G, (size_t)k * 2);                                   \
            if (centered) memcpy(m_ + whole, M, (size_t)k * 2);                                     \
            if (mom_kind) memcpy(b_ + whole, B, (size_t)k * 2);                                     \
        }                                                                                           \
    }                                                                                               \
    TARGET static void NAME(uint16_t *p, uint16_t *g, uint16_t *v, uint16_t *m, uint16_t *b, int64_t n, \
                            const rms_scalars *c, double inv_corr, int write_back, int variant) {   \
        float ic = (float)inv_corr;                                                                 \
        const int plain = variant & 1, eps_inside = (variant >> 1) & 1, coupled = (variant >> 2) & 1; \
        const int kind = (variant >> 3) % 3, centered = (variant >> 3) / 3;                        \
        RMS_EXPAND(NAME##_body, centered, kind, coupled, eps_inside, plain)                          \
    }
RMS_AVX2 static void vstore_bf16_array(const float *in, uint16_t *out, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) vstore_bf16(out + i, _mm256_loadu_ps(in + i));
    for (; i < n; i++) out[i] = bf16_store(in[i]);
}
DEFINE_VLOOP(vloop_bf16, RMS_AVX2, 256, 8, vload_bf16, vstore_bf16)
DEFINE_VLOOP(vloop_f16, RMS_AVX2, 256, 8, vload_f16, vstore_f16)

/* AVX-512: sixteen values a vector, twice the arithmetic per instruction: the low-precision
 * steps are bound by arithmetic (sqrt, div), not memory, so this is where they gain. The same
 * roundings as the AVX2 code (bf16: the integer round-half-even, NaN -> 0x7fc0; fp16: the
 * hardware's round-to-nearest-even), checked exhaustively like the others. */
#define RMS_AVX512 __attribute__((target("avx512f,avx2,f16c")))
/* the low-bit block loops use byte and word lanes and masks: AVX-512 BW, DQ and VL besides F */
#define RMS_AVX512_LOWBIT __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,f16c")))
RMS_AVX512 static inline __m512 vload_bf16_512(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}
RMS_AVX512 static inline void vstore_bf16_512(uint16_t *x, __m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i t = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    t = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), t, _mm512_set1_epi32(0x7fc00000));
    _mm256_storeu_si256((__m256i *)x, _mm512_cvtepi32_epi16(_mm512_srli_epi32(t, 16)));
}
RMS_AVX512 static inline __m512 vload_f16_512(const uint16_t *x) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)x));
}
RMS_AVX512 static inline void vstore_f16_512(uint16_t *x, __m512 f) {
    _mm256_storeu_si256((__m256i *)x, _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#define RMS_ARRAY_CVT(NAME, IN_T, OUT_T, LOAD, STORE, SCALAR)                                        \
    RMS_AVX512 static void NAME(const IN_T *in, OUT_T *out, int64_t n) {                           \
        int64_t i = 0;                                                                              \
        for (; i + 16 <= n; i += 16) STORE(out + i, LOAD(in + i));                                  \
        for (; i < n; i++) out[i] = SCALAR(in[i]);                                                  \
    }
#define RMS_LOAD_F32_512(x) _mm512_loadu_ps(x)
#define RMS_STORE_F32_512(x, v) _mm512_storeu_ps(x, v)
RMS_ARRAY_CVT(bf16_to_f32_avx512, uint16_t, float, vload_bf16_512, RMS_STORE_F32_512, bf16_load)
RMS_ARRAY_CVT(f32_to_bf16_avx512, float, uint16_t, RMS_LOAD_F32_512, vstore_bf16_512, bf16_store)
RMS_ARRAY_CVT(f16_to_f32_avx512, uint16_t, float, vload_f16_512, RMS_STORE_F32_512, f16_load)
RMS_ARRAY_CVT(f32_to_f16_avx512, float, uint16_t, RMS_LOAD_F32_512, vstore_f16_512, f16_store)
DEFINE_VLOOP(vloop_bf16_512, RMS_AVX512, 512, 16, vload_bf16_512, vstore_bf16_512)
DEFINE_VLOOP(vloop_f16_512, RMS_AVX512, 512, 16, vload_f16_512, vstore_f16_512)
#endif

/* The low-precision loop this CPU runs best (the choice of rmsprop_set_isa). */
static void loop_lowp(int32_t kind, uint16_t *p, uint16_t *g, uint16_t *v, uint16_t *m, uint16_t *b, int64_t n,
                      const rms_scalars *c, double inv_corr, int write_back, int variant) {
#ifdef RMS_HAVE_X86_SIMD
    const int isa = atomic_load(&g_isa);
    if (kind == RMS_BF16 && isa >= 3) { vloop_bf16_512(p, g, v, m, b, n, c, inv_corr, write_back, variant); return; }
    if (kind == RMS_F16 && isa >= 3) { vloop_f16_512(p, g, v, m, b, n, c, inv_corr, write_back, variant); return; }
    if (kind == RMS_BF16 && isa >= 1) { vloop_bf16(p, g, v, m, b, n, c, inv_corr, write_back, variant); return; }
    if (kind == RMS_F16 && isa >= 2) { vloop_f16(p, g, v, m, b, n, c, inv_corr, write_back, variant); return; }
#endif
    if (kind == RMS_BF16) loop_bf16(p, g, v, m, b, n, c, inv_corr, write_back, variant);
    else loop_f16(p, g, v, m, b, n, c, inv_corr, write_back, variant);
}

#define AT(base, off, sz) ((void *)((char *)(base) + (off) * (sz)))

/* ------------------------------------------------------------------ low-bit state (rmsprop/lowbit.py)
 * Records in the F32 / BF16SR / INT8 formats are stepped a block of RMS_BLOCK elements at a time:
 * load the block's parameter, gradient and state into float buffers (codes dequantized with the
 * block's scale), update them in float32, store the parameter rounded to nearest and the state
 * in its format (int8: the block's absmax over its finite values gives the new scale, then the
 * codes). The buffers live in L1, so memory is still read and written once per element. Every
 * operation, its order and the random bits are those of the torch-op path
 * (backends/lowbit.py): on the CPU both give the same bits. */

RMS_INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x21f0aaadu;
    x ^= x >> 15;
    x *= 0x735a2d97u;
    x ^= x >> 15;
    return x;
}
static uint32_t stream_key(uint32_t step, uint32_t position, uint32_t stream) {
    uint32_t k = mix32(step);
    k = mix32(k ^ position);
    return mix32(k ^ stream);
}
RMS_INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, sizeof u); return u; }
RMS_INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }

/* The two maps, as float bit patterns: a normal code's value has the bits (code + OFFSET) << SHIFT;
 * below NORMAL_MIN a code is linear, code * SUB_STEP. Unsigned (v, V): E5M3, code 255 NaN, max
 * 1.75. Signed (m, b): sign + E3M4, code 128 NaN, max 1.9375. */
#define U8_SHIFT 20
#define U8_OFFSET 768
#define U8_FIRST 8
#define U8_NORMAL_MIN 0x1p-30f
#define U8_SUB_STEP 0x1p-33f
#define U8_QMAX 1.75f
#define S8_SHIFT 19
#define S8_OFFSET 1920
#define S8_FIRST 16
#define S8_NORMAL_MIN 0x1p-6f
#define S8_SUB_STEP 0x1p-10f
#define S8_QMAX 1.9375f
#define RMS_TINY 0x1p-100f /* a block's absmax below this is taken as this */

RMS_INLINE void dequant_u8(const uint8_t *restrict c, float scale, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t k = c[i];
        float normal = u2f((k + U8_OFFSET) << U8_SHIFT), sub = (float)(int32_t)k * U8_SUB_STEP;
        float v = k >= U8_FIRST ? normal : sub;
        v = k == 0xffu ? __builtin_nanf("") : v;
        out[i] = v * scale;
    }
}
RMS_INLINE void dequant_s8(const uint8_t *restrict c, float scale, float *restrict out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t k = c[i], a = k & 0x7fu;
        float normal = u2f((a + S8_OFFSET) << S8_SHIFT), sub = (float)(int32_t)a * S8_SUB_STEP;
        float v = a >= S8_FIRST ? normal : sub;
        v = k >= 0x80u ? -v : v;
        v = k == 0x80u ? __builtin_nanf("") : v;
        out[i] = v * scale;
    }
}
/* Quantize a block; returns its scale. q: 16 random bits per value (stochastic rounding).
 * Adding the random bits below the kept ones and truncating
 * rounds up with probability equal to the dropped fraction: linear between the neighbouring
 * codes. Written with integer masks, the float compares done on bit patterns (their order is the
 * values' for non-negative floats), so that GCC vectorizes both loops (it gives up on selects
 * that mix float and integer conditions, and on float max reductions without -ffast-math). */
#define RMS_MASK(cond) (-(uint32_t)(cond))
/* The 16 random bits of a block's element i: a half of the hash of its position (rms_rand). They
 * are computed where they are used, in the quantizing loop: no buffer of bits to write and read. */
typedef struct {
    uint32_t base; /* the low 32 bits of the block's first position */
    uint32_t key;  /* the step's key for this stream, mixed with the position's high 32 bits */
    int low;       /* 1: the hash's low 16 bits; 0: its high 16 */
} rms_rand;
RMS_INLINE uint32_t rand16(const rms_rand *q, uint32_t i) {
    const uint32_t h = mix32((q->base + i) ^ q->key);
    return q->low ? h & 0xffffu : h >> 16;
}
/* rms_rand's key for the block starting at i0: the step's stream key mixed with the high 32
 * bits of the positions (a block never straddles a multiple of 2^32 elements) */
RMS_INLINE uint32_t block_key(uint32_t stream_key, int64_t i0) {
    return mix32(stream_key ^ mix32((uint32_t)((uint64_t)i0 >> 32)));
}
/* A block's scale from its maximum's bits, and the multiplier qmax / absmax the codes use. */
RMS_INLINE float block_scale(uint32_t top, float qmax, float *scale) {
    float absmax = u2f(top);
    absmax = absmax < RMS_TINY ? RMS_TINY : absmax;
    *scale = absmax / qmax;
    return qmax / absmax;
}
RMS_INLINE float quant_u8(const float *restrict x, const rms_rand *q, uint8_t *restrict out, int64_t n) {
    uint32_t top = 0;
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        const uint32_t u = f2u(x[i]);
        const uint32_t m = u & RMS_MASK(u - 1u < 0x7f7fffffu); /* finite and > 0 (+0 wraps around) */
        top = top > m ? top : m;
    }
    float scale;
    const float inv = block_scale(top, U8_QMAX, &scale);
    const uint32_t normal_min = f2u(U8_NORMAL_MIN);
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        const uint32_t u = f2u(x[i]);
        const uint32_t pos = RMS_MASK(u - 1u < 0x7f7fffffu), fin = RMS_MASK((u & 0x7fffffffu) < 0x7f800000u);
        const float a = u2f(f2u(x[i] * inv) & pos); /* x / scale, or 0 for x <= 0 and non-finite x */
        const uint32_t au = f2u(a), sub = RMS_MASK(au < normal_min);
        /* below the normal range the codes are linear: a + NORMAL_MIN is a normal float whose
         * mantissa holds a in steps of the subnormal codes, so one formula rounds both ranges */
        const float z = a + u2f(normal_min & sub);
        int32_t code = (int32_t)((f2u(z) + (rand16(q, i) << (U8_SHIFT - 16))) >> U8_SHIFT) - U8_OFFSET -
                       (int32_t)(U8_FIRST & sub);
        code = code < 0 ? 0 : code;
        code = code > 0xfe ? 0xfe : code;
        /* a positive value never rounds to 0 (not even when x / scale underflows) */
        code += (int32_t)((code == 0) & (pos != 0));
        out[i] = (uint8_t)(((uint32_t)code & fin) | (0xffu & ~fin));
    }
    return scale;
}
RMS_INLINE float quant_s8(const float *restrict x, const rms_rand *q, uint8_t *restrict out, int64_t n) {
    uint32_t top = 0;
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        const uint32_t a = f2u(x[i]) & 0x7fffffffu;
        const uint32_t m = a & RMS_MASK(a < 0x7f800000u); /* |x| of a finite x */
        top = top > m ? top : m;
    }
    float scale;
    const float inv = block_scale(top, S8_QMAX, &scale);
    const uint32_t normal_min = f2u(S8_NORMAL_MIN);
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        const uint32_t u = f2u(x[i]);
        const uint32_t fin = RMS_MASK((u & 0x7fffffffu) < 0x7f800000u), neg = RMS_MASK(u >> 31);
        const float a = u2f(f2u(u2f(u & 0x7fffffffu) * inv) & fin);
        const uint32_t sub = RMS_MASK(f2u(a) < normal_min);
        const float z = a + u2f(normal_min & sub);
        int32_t code = (int32_t)((f2u(z) + (rand16(q, i) << (S8_SHIFT - 16))) >> S8_SHIFT) - S8_OFFSET -
                       (int32_t)(S8_FIRST & sub);
        code = code < 0 ? 0 : code;
        code = code > 0x7f ? 0x7f : code;
        /* the sign of a nonzero code (a zero stays +0: negative zero is the NaN code) */
        const uint32_t c = (uint32_t)code | (0x80u & neg & RMS_MASK(code > 0));
        out[i] = (uint8_t)((c & fin) | (0x80u & ~fin));
    }
    return scale;
}
RMS_INLINE void store_bf16_sr(const float *restrict x, const rms_rand *q, uint16_t *restrict out, int64_t n) {
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        uint32_t top = (f2u(x[i]) + rand16(q, i)) >> 16;
        out[i] = (uint16_t)(x[i] != x[i] ? 0x7fc0u : top);
    }
}

/* float buffers <-> storage of a parameter-like kind (f32, bf16, f16): the conversions in use */
static void load_kind(int32_t kind, const void *src, float *dst, int64_t n) {
    if (kind == RMS_F32) memcpy(dst, src, (size_t)n * sizeof(float));
    else if (kind == RMS_BF16) g_cvt.bf16_in((const uint16_t *)src, dst, n);
    else g_cvt.f16_in((const uint16_t *)src, dst, n);
}
static void store_kind(int32_t kind, const float *src, void *dst, int64_t n) {
    if (kind == RMS_F32) memcpy(dst, src, (size_t)n * sizeof(float));
    else if (kind == RMS_BF16) g_cvt.bf16_out(src, (uint16_t *)dst, n);
    else g_cvt.f16_out(src, (uint16_t *)dst, n);
}

/* One block's update in float32, the torch-op path's operations in its order. cform: 0 not
 * centered, 1 centered in torch's form (v - m^2, clamped), 2 centered keeping the variance V. */
RMS_INLINE void lowbit_math(float *restrict P, const float *restrict G, float *restrict V, float *restrict Mb,
                            float *restrict B, int64_t n, const rms_scalars *c, const rms_rec_scalars *rs,
                            int write_back, const int cform, const int mom_kind, const int coupled,
                            const int eps_inside) {
    const float gscale = write_back ? (float)c->sign : (float)c->inv_scale * (float)c->sign;
    const float wd = (float)c->wd, decay = (float)c->decay, alpha = (float)c->alpha, oma = (float)c->one_minus_alpha;
    const float eps = (float)c->eps, lr = (float)c->lr, mu = (float)c->mu, k_buf = (float)c->k_buf, k_par = (float)c->k_par;
    const float ic = (float)rs->inv_corr, ip = (float)rs->inv_prev, kv = (float)rs->k_var;
    for (int64_t i = 0; i < n; i++) {
        float g = G[i] * gscale, p = P[i];
        if (coupled) g = g + wd * p;
        p = p * decay;
        float v, s;
        if (cform == 2) {
            const float mo = Mb[i];
            const float dlt = g - mo * ip;
            v = alpha * V[i] + kv * dlt * dlt;
            Mb[i] = mo + oma * (g - mo);
            s = v * ic;
        } else {
            v = alpha * V[i] + oma * g * g;
            s = v * ic;
            if (cform == 1) {
                const float m = Mb[i] + oma * (g - Mb[i]);
                const float mh = m * ic;
                s = s - mh * mh;
                s = s < 0.0f ? 0.0f : s; /* NaN passes through */
                Mb[i] = m;
            }
        }
        V[i] = v;
        const float u = eps_inside ? g / sqrtf(s + eps) : g / (sqrtf(s) + eps);
        if (mom_kind == 0) {
            p = p - lr * u;
        } else {
            const float b = mu * B[i] + k_buf * u;
            const float applied = mom_kind == 2 ? k_buf * u + mu * b : b;
            p = p - k_par * applied;
            B[i] = b;
        }
        P[i] = p;
    }
}
#define RMS_LB_ARGS P, G, V, Mb, B, len, c, rs, write_back
#define RMS_LB_E(CF, K, CP, e) \
    if (e) lowbit_math(RMS_LB_ARGS, CF, K, CP, 1); else lowbit_math(RMS_LB_ARGS, CF, K, CP, 0);
#define RMS_LB_CP(CF, K, cp, e) \
    if (cp) { RMS_LB_E(CF, K, 1, e) } else { RMS_LB_E(CF, K, 0, e) }
#define RMS_LB_K(CF, k, cp, e) \
    if (k == 0) { RMS_LB_CP(CF, 0, cp, e) } else if (k == 1) { RMS_LB_CP(CF, 1, cp, e) } else { RMS_LB_CP(CF, 2, cp, e) }
#define RMS_LB_EXPAND(cf, k, cp, e) \
    if (cf == 0) { RMS_LB_K(0, k, cp, e) } else if (cf == 1) { RMS_LB_K(1, k, cp, e) } else { RMS_LB_K(2, k, cp, e) }

/* Load one state buffer's block (codes with the block's scale), store it back in its format. */
RMS_INLINE void load_state(const rms_record *x, const void *base, const float *scales, int signed_map, int64_t i0,
                       float *dst, int64_t n) {
    if (x->fmt == RMS_FMT_INT8) {
        const uint8_t *codes = (const uint8_t *)base + i0;
        float scale = scales[i0 / RMS_BLOCK];
        if (signed_map) dequant_s8(codes, scale, dst, n);
        else dequant_u8(codes, scale, dst, n);
    } else if (x->fmt == RMS_FMT_BF16SR) {
        g_cvt.bf16_in((const uint16_t *)base + i0, dst, n);
    } else {
        memcpy(dst, (const float *)base + i0, (size_t)n * sizeof(float));
    }
}
RMS_INLINE void store_state(const rms_record *x, void *base, float *scales, int signed_map, int64_t i0,
                        const float *src, const rms_rand *r, int64_t n) {
    if (x->fmt == RMS_FMT_INT8) {
        uint8_t *codes = (uint8_t *)base + i0;
        scales[i0 / RMS_BLOCK] = signed_map ? quant_s8(src, r, codes, n) : quant_u8(src, r, codes, n);
    } else if (x->fmt == RMS_FMT_BF16SR) {
        store_bf16_sr(src, r, (uint16_t *)base + i0, n);
    } else {
        memcpy((float *)base + i0, src, (size_t)n * sizeof(float));
    }
}

/* Elements [lo, hi) of a low-bit record (lo a multiple of RMS_BLOCK), block by block. A float32
 * parameter and gradient are used in place (P and G point into them): no copy. Compiled once per
 * instruction-set level below (its loops are vectorized by the compiler). */
RMS_INLINE void lowbit_blocks(const rms_record *x, int64_t lo, int64_t hi, const rms_scalars *c,
                              const rms_rec_scalars *rs, int write_back, int variant) {
    float Pbuf[RMS_BLOCK], Gbuf[RMS_BLOCK], V[RMS_BLOCK], Mb[RMS_BLOCK], B[RMS_BLOCK];
    const int in_place = x->kind == RMS_F32;
    const int eps_inside = variant & 1, coupled = (variant >> 1) & 1, kind = (variant >> 2) % 3;
    const int cform = (variant >> 2) / 3;
    const size_t psz = storage_size(x->kind);
    const float inv_scale = (float)c->inv_scale;
    for (int64_t i0 = lo; i0 < hi; i0 += RMS_BLOCK) {
        const int64_t len = hi - i0 < RMS_BLOCK ? hi - i0 : RMS_BLOCK;
        void *pp = AT(x->p, i0, psz), *gp = AT(x->g, i0, psz);
        float *P = in_place ? (float *)pp : Pbuf, *G = in_place ? (float *)gp : Gbuf;
        if (!in_place) {
            load_kind(x->kind, pp, P, len);
            load_kind(x->kind, gp, G, len);
        }
        if (write_back) { /* AMP: unscale the gradient in place (rounded to its dtype), as GradScaler does */
            for (int64_t i = 0; i < len; i++) G[i] = G[i] * inv_scale;
            if (!in_place) {
                store_kind(x->kind, G, gp, len);
                load_kind(x->kind, gp, G, len);
            }
        }
        load_state(x, x->v, (const float *)x->vs, 0, i0, V, len);
        if (x->m) load_state(x, x->m, (const float *)x->ms, 1, i0, Mb, len);
        if (x->b) load_state(x, x->b, (const float *)x->bs, 1, i0, B, len);
        RMS_LB_EXPAND(cform, kind, coupled, eps_inside)
        /* the random bits: v takes the high half of hash(position ^ key0), m its low half, the
         * momentum buffer the high half of hash(position ^ key1) */
        const uint32_t e0 = block_key(rs->key0, i0), e1 = block_key(rs->key1, i0);
        const rms_rand r_v = {(uint32_t)i0, e0, 0}, r_m = {(uint32_t)i0, e0, 1}, r_b = {(uint32_t)i0, e1, 0};
        store_state(x, x->v, (float *)x->vs, 0, i0, V, &r_v, len);
        if (x->m) store_state(x, x->m, (float *)x->ms, 1, i0, Mb, &r_m, len);
        if (x->b) store_state(x, x->b, (float *)x->bs, 1, i0, B, &r_b, len);
        if (!in_place) store_kind(x->kind, P, pp, len);
    }
}

/* lowbit_blocks at each level: the block loops are compute-bound (dequantize, hash, quantize), so
 * AVX-512 pays here where it does not on the memory-bound float loops: the int8 step took about
 * 0.6x the AVX2 code's time on the benchmark machine, and the hand-written AVX-512 loop below
 * (int8 state of float32 parameters) cuts it further. Picked by rmsprop_set_isa, like the
 * conversions, so the tests check that every level gives the same bits. */
typedef void (*rms_lowbit_fn)(const rms_record *, int64_t, int64_t, const rms_scalars *, const rms_rec_scalars *,
                              int, int);
#define DEFINE_LOWBIT(NAME, TARGET)                                                                  \
    TARGET static void NAME(const rms_record *x, int64_t lo, int64_t hi, const rms_scalars *c,      \
                            const rms_rec_scalars *rs, int write_back, int variant) {               \
        lowbit_blocks(x, lo, hi, c, rs, write_back, variant);                                       \
    }
DEFINE_LOWBIT(loop_lowbit_portable, )
#ifdef RMS_HAVE_X86_SIMD
DEFINE_LOWBIT(loop_lowbit_avx2, RMS_AVX2)

/* ------------------------------------------------------------------ int8 state, AVX-512 by hand
 * The commonest low-bit record (a float32 parameter with int8 state, centered or not, no AMP
 * unscale) stepped sixteen elements a vector with the operations of dequant_u8 / dequant_s8,
 * lowbit_math and quant_u8 / quant_s8 in their order, so the bits are those of lowbit_blocks
 * (the tests compare every level with the torch-op path). What it changes is the schedule: the
 * compiler's code ran the block's passes one after another, the update's division and square
 * root (a divider that takes 22 cycles per vector) and the quantizer's integer work (hash,
 * codes: about 30 vector operations per vector, on the two ports AVX-512 uses) never at once.
 * Here the update of block k is one loop with block k-1's quantization interleaved, so the
 * divider and the integer ports work together; the block's maximum is kept in registers as
 * its values are computed. */
RMS_AVX512_LOWBIT static inline __m512i mix32_512(__m512i x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int32_t)0x21f0aaadu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int32_t)0x735a2d97u));
    return _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
}
RMS_AVX512_LOWBIT static inline __mmask16 lanes_below(int64_t rem) {
    return rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1u);
}
/* Sixteen codes from memory, masked only for a block's last, partial vector: masked byte
 * loads where every lane is valid made this loop 1.5x (int8 state) to 1.6x (with momentum)
 * slower, one thread, on an AMD Zen 5 (measured on 10 x 1M; masked float loads and the masked
 * stores cost nothing there). */
RMS_AVX512_LOWBIT static inline __m128i load_u8x16(const uint8_t *c, __mmask16 valid) {
    return valid == 0xffff ? _mm_loadu_si128((const __m128i *)c) : _mm_maskz_loadu_epi8(valid, c);
}
/* The two maps on sixteen lanes (a map's SHIFT, OFFSET, FIRST, SUB_STEP, NORMAL_MIN; constants
 * at every call): the value of magnitude codes a, and the code of magnitudes a >= 0 (in units of
 * the block's scale) rounded with 16 random bits r, as dequant_u8 / quant_u8 compute them. */
RMS_AVX512_LOWBIT static inline __attribute__((always_inline)) __m512 map_value_512(__m512i a, int shift, int offset,
                                                                                 int first, float sub_step) {
    const __m512 normal = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(offset)), shift));
    const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_set1_ps(sub_step));
    return _mm512_mask_blend_ps(_mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(first)), sub, normal);
}
RMS_AVX512_LOWBIT static inline __attribute__((always_inline)) __m512i map_code_512(__m512 a, __m512i r, int shift,
                                                                                 int offset, int first, float normal_min) {
    const __mmask16 sub = _mm512_cmplt_epu32_mask(_mm512_castps_si512(a), _mm512_set1_epi32((int32_t)f2u(normal_min)));
    const __m512 z = _mm512_mask_add_ps(a, sub, a, _mm512_set1_ps(normal_min));
    __m512i code = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(z), _mm512_slli_epi32(r, shift - 16)), shift);
    code = _mm512_sub_epi32(code, _mm512_set1_epi32(offset));
    return _mm512_mask_sub_epi32(code, sub, code, _mm512_set1_epi32(first));
}
/* quant_s8's block maximum, sixteen values at a time: the largest |x| of the valid, finite lanes */
RMS_AVX512_LOWBIT static inline __m512i signed_top_512(__m512i top, __m512 x, __mmask16 valid) {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff));
    return _mm512_mask_max_epu32(top, valid & _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x7f800000)), top, a);
}
/* rand16 for positions idx: the hash whose high half v and the momentum buffer take, m its low half */
RMS_AVX512_LOWBIT static inline __m512i hash_512(__m512i idx, __m512i key) { return mix32_512(_mm512_xor_si512(idx, key)); }
#define HIGH16_512(h) _mm512_srli_epi32(h, 16)
#define LOW16_512(h) _mm512_and_si512(h, _mm512_set1_epi32(0xffff))
/* dequant_u8 on sixteen codes (lanes outside `valid` read as code 0) */
RMS_AVX512_LOWBIT static inline __m512 dequant_u8_512(const uint8_t *c, __mmask16 valid, __m512 scale) {
    const __m512i k = _mm512_cvtepu8_epi32(load_u8x16(c, valid));
    __m512 v = map_value_512(k, U8_SHIFT, U8_OFFSET, U8_FIRST, U8_SUB_STEP);
    v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(0xff)), v, _mm512_set1_ps(__builtin_nanf("")));
    return _mm512_mul_ps(v, scale);
}
RMS_AVX512_LOWBIT static inline __m512 dequant_s8_512(const uint8_t *c, __mmask16 valid, __m512 scale) {
    const __m512i k = _mm512_cvtepu8_epi32(load_u8x16(c, valid));
    __m512 v = map_value_512(_mm512_and_si512(k, _mm512_set1_epi32(0x7f)), S8_SHIFT, S8_OFFSET, S8_FIRST, S8_SUB_STEP);
    v = _mm512_mask_blend_ps(_mm512_cmpge_epu32_mask(k, _mm512_set1_epi32(0x80)), v, _mm512_xor_ps(v, _mm512_set1_ps(-0.0f)));
    v = _mm512_mask_blend_ps(_mm512_cmpeq_epi32_mask(k, _mm512_set1_epi32(0x80)), v, _mm512_set1_ps(__builtin_nanf("")));
    return _mm512_mul_ps(v, scale);
}
/* quant_u8's second loop on sixteen values; r: their 16 random bits (rand16) */
RMS_AVX512_LOWBIT static inline void quant_u8_512(const float *src, uint8_t *out, __mmask16 valid, __m512 inv,
                                                 __m512i r) {
    const __m512 x = _mm512_maskz_loadu_ps(valid, src);
    const __m512i u = _mm512_castps_si512(x), one = _mm512_set1_epi32(1);
    const __mmask16 pos = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(u, one), _mm512_set1_epi32(0x7f7fffff));
    const __mmask16 fin = _mm512_cmplt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    const __m512 a = _mm512_maskz_mul_ps(pos, x, inv);
    __m512i code = map_code_512(a, r, U8_SHIFT, U8_OFFSET, U8_FIRST, U8_NORMAL_MIN);
    /* quant_u8's clamps to [0, 254] never bind: z >= NORMAL_MIN gives code >= 0, and a <= 1.75 +
     * 1 ulp (x <= absmax) stays below code 255 with any random bits. max(code, 1) on the positive
     * lanes is its "a positive value never rounds to 0". */
    code = _mm512_mask_max_epi32(code, pos, code, one);
    code = _mm512_mask_blend_epi32(fin, _mm512_set1_epi32(0xff), code);
    _mm512_mask_cvtepi32_storeu_epi8(out, valid, code);
}
RMS_AVX512_LOWBIT static inline void quant_s8_512(const float *src, uint8_t *out, __mmask16 valid, __m512 inv,
                                                 __m512i r) {
    const __m512 x = _mm512_maskz_loadu_ps(valid, src);
    const __m512i u = _mm512_castps_si512(x), zero = _mm512_setzero_si512();
    const __m512i abs = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    const __mmask16 fin = _mm512_cmplt_epu32_mask(abs, _mm512_set1_epi32(0x7f800000));
    const __mmask16 neg = _mm512_movepi32_mask(u);
    const __m512 a = _mm512_maskz_mul_ps(fin, _mm512_castsi512_ps(abs), inv);
    __m512i code = map_code_512(a, r, S8_SHIFT, S8_OFFSET, S8_FIRST, S8_NORMAL_MIN);
    /* the clamps to [0, 127] never bind, as in quant_u8_512 (|a| <= 1.9375 + 1 ulp) */
    code = _mm512_mask_or_epi32(code, neg & _mm512_cmpgt_epi32_mask(code, zero), code, _mm512_set1_epi32(0x80));
    code = _mm512_mask_blend_epi32(fin, _mm512_set1_epi32(0x80), code);
    _mm512_mask_cvtepi32_storeu_epi8(out, valid, code);
}
/* One block's quantization pending: its values (in a buffer), positions, keys and 1 / scale. */
typedef struct {
    const float *v, *m, *b;
    uint8_t *cv, *cm, *cb;
    int64_t len;
    uint32_t base;
    __m512 inv_v, inv_m, inv_b;
    __m512i key_v, key_b;
} rms_pending512;
RMS_AVX512_LOWBIT static inline __attribute__((always_inline)) void pending_vector(const rms_pending512 *q, int64_t j,
                                                                                  int centered, int momentum) {
    const __mmask16 valid = lanes_below(q->len - 16 * j);
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(q->base + 16u * (uint32_t)j)),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i h = hash_512(idx, q->key_v); /* one hash for v and m (lowbit_blocks' r_v, r_m) */
    quant_u8_512(q->v + 16 * j, q->cv + 16 * j, valid, q->inv_v, HIGH16_512(h));
    if (centered) quant_s8_512(q->m + 16 * j, q->cm + 16 * j, valid, q->inv_m, LOW16_512(h));
    if (momentum) quant_s8_512(q->b + 16 * j, q->cb + 16 * j, valid, q->inv_b, HIGH16_512(hash_512(idx, q->key_b)));
}
RMS_AVX512_LOWBIT static inline __attribute__((always_inline)) void int8_f32_blocks_512(
    const rms_record *x, int64_t lo, int64_t hi, const rms_scalars *c, const rms_rec_scalars *rs,
    const int centered, const int mom_kind, const int coupled, const int eps_inside) {
    float *restrict P = (float *)x->p;
    const float *restrict G = (const float *)x->g;
    uint8_t *restrict cv = (uint8_t *)x->v, *restrict cm = (uint8_t *)x->m, *restrict cb = (uint8_t *)x->b;
    float *restrict sv = (float *)x->vs, *restrict sm = (float *)x->ms, *restrict sb = (float *)x->bs;
    const __m512 gscale = _mm512_set1_ps((float)c->inv_scale * (float)c->sign), wd = _mm512_set1_ps((float)c->wd);
    const __m512 decay = _mm512_set1_ps((float)c->decay), alpha = _mm512_set1_ps((float)c->alpha);
    const __m512 oma = _mm512_set1_ps((float)c->one_minus_alpha), eps = _mm512_set1_ps((float)c->eps);
    const __m512 lr = _mm512_set1_ps((float)c->lr), mu = _mm512_set1_ps((float)c->mu);
    const __m512 k_buf = _mm512_set1_ps((float)c->k_buf), k_par = _mm512_set1_ps((float)c->k_par);
    const __m512 ic = _mm512_set1_ps((float)rs->inv_corr), ip = _mm512_set1_ps((float)rs->inv_prev);
    const __m512 kv = _mm512_set1_ps((float)rs->k_var);
    const __m512i max_pos = _mm512_set1_epi32(0x7f7fffff), one = _mm512_set1_epi32(1);
    float Vbuf[2][RMS_BLOCK] __attribute__((aligned(64))), Bbuf[2][RMS_BLOCK] __attribute__((aligned(64)));
    float Mbuf[2][RMS_BLOCK] __attribute__((aligned(64)));
    rms_pending512 q = {0};
    int cur = 0;
    for (int64_t i0 = lo; i0 < hi; i0 += RMS_BLOCK, cur ^= 1) {
        const int64_t len = hi - i0 < RMS_BLOCK ? hi - i0 : RMS_BLOCK, blk = i0 / RMS_BLOCK;
        const int64_t nvec = (len + 15) / 16, pvec = (q.len + 15) / 16;
        const __m512 scale_v = _mm512_set1_ps(sv[blk]), scale_b = mom_kind ? _mm512_set1_ps(sb[blk]) : _mm512_setzero_ps();
        const __m512 scale_m = centered ? _mm512_set1_ps(sm[blk]) : _mm512_setzero_ps();
        float *restrict V = Vbuf[cur], *restrict M = Mbuf[cur], *restrict B = Bbuf[cur];
        __m512i top_v = _mm512_setzero_si512(), top_m = _mm512_setzero_si512(), top_b = _mm512_setzero_si512();
        for (int64_t j = 0; j < nvec; j++) {
            const int64_t i = i0 + 16 * j;
            const __mmask16 valid = lanes_below(len - 16 * j);
            /* two blocks ahead: this loop's arithmetic keeps too few loads in flight for the
             * hardware prefetcher to hide memory (measured: 0.86x the time without, one thread) */
            _mm_prefetch((const char *)(G + i + 2 * RMS_BLOCK), _MM_HINT_T0);
            _mm_prefetch((const char *)(P + i + 2 * RMS_BLOCK), _MM_HINT_T0);
            __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, G + i), gscale);
            __m512 p = _mm512_maskz_loadu_ps(valid, P + i);
            if (coupled) g = _mm512_add_ps(g, _mm512_mul_ps(wd, p));
            p = _mm512_mul_ps(p, decay);
            /* v = alpha * v + w * d * d: (1 - alpha) g^2, or centered (lowbit_math's cform 2: the
             * variance itself) k_var (g - m_prev / C_{t-1})^2, with the mean updated beside it */
            __m512 d = g, w = oma;
            if (centered) {
                const __m512 mo = dequant_s8_512(cm + i, valid, scale_m);
                d = _mm512_sub_ps(g, _mm512_mul_ps(mo, ip));
                w = kv;
                const __m512 m = _mm512_add_ps(mo, _mm512_mul_ps(oma, _mm512_sub_ps(g, mo)));
                _mm512_store_ps(M + 16 * j, m);
                top_m = signed_top_512(top_m, m, valid);
            }
            const __m512 v = _mm512_add_ps(_mm512_mul_ps(alpha, dequant_u8_512(cv + i, valid, scale_v)),
                                           _mm512_mul_ps(_mm512_mul_ps(w, d), d));
            const __m512 s = _mm512_mul_ps(v, ic);
            const __m512 u = eps_inside ? _mm512_div_ps(g, _mm512_sqrt_ps(_mm512_add_ps(s, eps)))
                                        : _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(s), eps));
            _mm512_store_ps(V + 16 * j, v);
            const __m512i vb = _mm512_castps_si512(v);
            top_v = _mm512_mask_max_epu32(top_v, valid & _mm512_cmplt_epu32_mask(_mm512_sub_epi32(vb, one), max_pos), top_v, vb);
            if (mom_kind == 0) {
                p = _mm512_sub_ps(p, _mm512_mul_ps(lr, u));
            } else {
                const __m512 b = _mm512_add_ps(_mm512_mul_ps(mu, dequant_s8_512(cb + i, valid, scale_b)), _mm512_mul_ps(k_buf, u));
                const __m512 applied = mom_kind == 2 ? _mm512_add_ps(_mm512_mul_ps(k_buf, u), _mm512_mul_ps(mu, b)) : b;
                p = _mm512_sub_ps(p, _mm512_mul_ps(k_par, applied));
                _mm512_store_ps(B + 16 * j, b);
                top_b = signed_top_512(top_b, b, valid);
            }
            _mm512_mask_storeu_ps(P + i, valid, p);
            if (j < pvec) pending_vector(&q, j, centered, mom_kind != 0); /* block k-1's codes, under this block's divisions */
        }
        for (int64_t j = nvec; j < pvec; j++) pending_vector(&q, j, centered, mom_kind != 0);
        /* this block's scales now, its codes during the next block (or after the loop) */
        float scale;
        q.v = V, q.m = M, q.b = B, q.len = len, q.base = (uint32_t)i0;
        q.cv = cv + i0, q.cm = cm ? cm + i0 : NULL, q.cb = cb ? cb + i0 : NULL;
        q.inv_v = _mm512_set1_ps(block_scale(_mm512_reduce_max_epu32(top_v), U8_QMAX, &scale));
        sv[blk] = scale;
        q.key_v = _mm512_set1_epi32((int32_t)block_key(rs->key0, i0));
        if (centered) {
            q.inv_m = _mm512_set1_ps(block_scale(_mm512_reduce_max_epu32(top_m), S8_QMAX, &scale));
            sm[blk] = scale;
        }
        if (mom_kind) {
            q.inv_b = _mm512_set1_ps(block_scale(_mm512_reduce_max_epu32(top_b), S8_QMAX, &scale));
            sb[blk] = scale;
            q.key_b = _mm512_set1_epi32((int32_t)block_key(rs->key1, i0));
        }
    }
    for (int64_t j = 0; j < (q.len + 15) / 16; j++) pending_vector(&q, j, centered, mom_kind != 0);
}
#define RMS_I8_E(C0, K, CP, e) \
    if (e) int8_f32_blocks_512(x, lo, hi, c, rs, C0, K, CP, 1); else int8_f32_blocks_512(x, lo, hi, c, rs, C0, K, CP, 0);
#define RMS_I8_CP(C0, K, cp, e) \
    if (cp) { RMS_I8_E(C0, K, 1, e) } else { RMS_I8_E(C0, K, 0, e) }
#define RMS_I8_K(C0, k, cp, e) \
    if (k == 0) { RMS_I8_CP(C0, 0, cp, e) } else if (k == 1) { RMS_I8_CP(C0, 1, cp, e) } else { RMS_I8_CP(C0, 2, cp, e) }
/* The AVX-512 level: the hand-written int8 loop where it applies (centered: int8 state keeps
 * the variance, cform 2), lowbit_blocks elsewhere. */
RMS_AVX512_LOWBIT static void loop_lowbit_avx512(const rms_record *x, int64_t lo, int64_t hi, const rms_scalars *c,
                                                 const rms_rec_scalars *rs, int write_back, int variant) {
    const int eps_inside = variant & 1, coupled = (variant >> 1) & 1, kind = (variant >> 2) % 3;
    const int cform = (variant >> 2) / 3;
    if (x->kind == RMS_F32 && x->fmt == RMS_FMT_INT8 && !write_back && cform != 1 && (cform == 2) == (x->m != NULL) &&
        (kind == 0) == (x->b == NULL)) {
        if (cform == 2) { RMS_I8_K(1, kind, coupled, eps_inside) }
        else { RMS_I8_K(0, kind, coupled, eps_inside) }
        return;
    }
    lowbit_blocks(x, lo, hi, c, rs, write_back, variant);
}
#endif
static _Atomic(rms_lowbit_fn) g_loop_lowbit = loop_lowbit_portable;
static void select_lowbit_loop(int32_t level, int avx512_lowbit) {
    rms_lowbit_fn chosen = loop_lowbit_portable;
#ifdef RMS_HAVE_X86_SIMD
    if (level >= 2) chosen = avx512_lowbit ? loop_lowbit_avx512 : loop_lowbit_avx2;
#else
    (void)level;
    (void)avx512_lowbit;
#endif
    atomic_store(&g_loop_lowbit, chosen);
}
static void loop_lowbit(const rms_record *x, int64_t lo, int64_t hi, const rms_scalars *c,
                        const rms_rec_scalars *rs, int write_back, int variant) {
    atomic_load_explicit(&g_loop_lowbit, memory_order_relaxed)(x, lo, hi, c, rs, write_back, variant);
}

/* The memory-traffic bound for benchmarks: the same bytes as a plain fp32 step (read p, g, v;
 * write p, v) with arithmetic too cheap to matter. */
RMS_CLONES static void stream_f32(float *restrict p, const float *restrict g, float *restrict v, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        v[i] = v[i] + gi;
        p[i] = p[i] - gi;
    }
}

/* ------------------------------------------------------------------ work split across threads */
/* Below this many elements per thread, starting a thread costs more than it saves. */
#define RMS_MIN_PER_THREAD 32768
/* Thread boundaries fall on multiples of this many elements: whole 64-byte lines at any dtype. */
#define RMS_ALIGN 64

typedef struct {
    const rms_record *records;
    const rms_rec_scalars *rec_scalars;
    const rms_scalars *scalars;
    int64_t n_records, part, parts; /* this thread takes slice `part` of `parts` of all the elements */
    int64_t total;                  /* the elements of the valid records, end to end */
    int variant, write_back, stream;
} rms_job;


static void *run_job(void *arg) {
    const rms_job *job = (const rms_job *)arg;
    /* The valid records' elements, laid end to end, are cut into `parts` equal runs and this
     * thread takes run `part`: many small tensors go whole to one thread each (each thread streams
     * through its own tensors, as through one large one), a large tensor is split. A cut inside a
     * record is rounded up to RMS_ALIGN elements from the record's start (whole 64-byte lines at
     * any dtype), or to whole blocks for low-bit records (an int8 block has one scale); the
     * neighbouring thread rounds the same cut the same way, so every element is stepped once. */
    const int64_t per = (job->total + job->parts - 1) / job->parts;
    const int64_t first = job->part * per, last = first + per > job->total ? job->total : first + per;
    int64_t start = 0; /* where record t begins in the end-to-end run */
    for (int64_t t = 0; t < job->n_records && start < last; t++) {
        const rms_record *x = &job->records[t];
        if (!x->valid) continue; /* kept from the kernel by the caller */
        const int64_t begin = start;
        start += x->numel;
        if (start <= first) continue;
        const int64_t align = x->fmt == RMS_FMT_SAME ? RMS_ALIGN : RMS_BLOCK;
        int64_t lo = first > begin ? first - begin : 0, hi = last - begin < x->numel ? last - begin : x->numel;
        lo = lo == 0 ? 0 : (lo + align - 1) / align * align;
        hi = hi == x->numel ? hi : (hi + align - 1) / align * align;
        if (lo > x->numel) lo = x->numel;
        if (hi > x->numel) hi = x->numel;
        if (hi <= lo) continue;
        if (x->fmt != RMS_FMT_SAME) {
            /* the low-bit variant: the call's flags, and this record's centered form */
            const int cform = job->variant >= 24 ? (x->fmt == RMS_FMT_F32 ? 1 : 2) : 0;
            const int lb = ((job->variant >> 1) & 1) | (((job->variant >> 2) & 1) << 1) |
                           ((((job->variant >> 3) % 3) + 3 * cform) << 2);
            loop_lowbit(x, lo, hi, job->scalars, &job->rec_scalars[t], job->write_back, lb);
            continue;
        }
        size_t sz = storage_size(x->kind);
        void *p = AT(x->p, lo, sz), *g = AT(x->g, lo, sz), *v = AT(x->v, lo, sz);
        void *m = x->m ? AT(x->m, lo, sz) : NULL;
        void *b = x->b ? AT(x->b, lo, sz) : NULL;
        int64_t n = hi - lo;
        if (job->stream) {
            stream_f32(p, g, v, n);
            continue;
        }
        double ic = job->rec_scalars[t].inv_corr;
        switch (x->kind) {
        case RMS_F32: case RMS_C64: loop_f32(p, g, v, m, b, n, job->scalars, ic, job->write_back, job->variant); break;
        case RMS_F64: case RMS_C128: loop_f64(p, g, v, m, b, n, job->scalars, ic, job->write_back, job->variant); break;
        default: loop_lowp(x->kind, p, g, v, m, b, n, job->scalars, ic, job->write_back, job->variant); break;
        }
    }
    return NULL;
}

/* GOMP_parallel(fn, data, num_threads, flags): the entry point GCC emits for `omp parallel`;
 * LLVM's and Intel's OpenMP runtimes provide it too. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static _Atomic(gomp_parallel_fn) g_gomp_parallel = NULL;

/* Use the OpenMP runtime whose GOMP_parallel this is (NULL: back to pthreads). */
void rmsprop_use_openmp(void *gomp_parallel) { atomic_store(&g_gomp_parallel, (gomp_parallel_fn)gomp_parallel); }
int32_t rmsprop_uses_openmp(void) { return atomic_load(&g_gomp_parallel) != NULL; }

typedef struct {
    rms_job *jobs;
    int n_jobs;
    atomic_int next; /* jobs are claimed, so any team size runs each job exactly once */
} rms_team;

static void *team_worker(void *arg) {
    rms_team *team = (rms_team *)arg;
    int k;
    while ((k = atomic_fetch_add(&team->next, 1)) < team->n_jobs) run_job(&team->jobs[k]);
    return NULL;
}
static void team_worker_omp(void *arg) { team_worker(arg); }

/* Run `worker` on `threads` threads, the calling thread one of them: torch's OpenMP pool where the
 * caller handed us its entry point, else pthreads (where one cannot be started, the threads that
 * run claim its share: a team's workers claim its parts until none is left). */
static void launch_team(void *(*worker)(void *), void (*omp_worker)(void *), void *team, int threads) {
    gomp_parallel_fn gomp = atomic_load(&g_gomp_parallel);
    if (gomp) {
        gomp(omp_worker, team, (unsigned)threads, 0);
        return;
    }
    pthread_t handles[64];
    int started = 0;
    for (int k = 1; k < threads && pthread_create(&handles[started], NULL, worker, team) == 0; k++) started++;
    worker(team);
    for (int k = 0; k < started; k++) pthread_join(handles[k], NULL);
}

/* Run one slice of every tensor per thread; the calling thread works too. */
static void run_parallel(const rms_record *records, int64_t n, int64_t total, const rms_rec_scalars *inv_corr,
                         const rms_scalars *c, int variant, int write_back, int stream, int num_threads) {
    int threads = num_threads > 64 ? 64 : num_threads;
    if ((int64_t)threads > total / RMS_MIN_PER_THREAD) threads = (int)(total / RMS_MIN_PER_THREAD);
    if (threads < 1) threads = 1;
    rms_job jobs[64];
    for (int k = 0; k < threads; k++)
        jobs[k] = (rms_job){records, inv_corr, c, n, k, threads, total, variant, write_back, stream};
    rms_team team = {jobs, threads, 0};
    if (threads == 1) team_worker(&team);
    else launch_team(team_worker, team_worker_omp, &team, threads);
}

/* Work split across threads by records, not elements: the validation, and the bookkeeping
 * between it and the first write (version bumps, step counters). Both are bound by latency, not
 * bandwidth: each record's TensorImpls, version counters and step counter lie apart in memory and
 * miss the cache once a step has streamed the data (2000 records of 5k floats: about 3 ms of
 * misses, one after another, on one thread), and threads overlap them. Each part is a run of
 * whole records, so records never share a thread's writes (the scratch entries of record t are
 * written by the thread that owns t). */
#define RMS_RECORDS_PER_THREAD 256
typedef void (*rms_records_fn)(void *ctx, int64_t lo, int64_t hi);
typedef struct {
    rms_records_fn fn;
    void *ctx;
    int64_t n;
    int parts;
    atomic_int next;
} rms_record_team;

static void *record_worker(void *arg) {
    rms_record_team *team = (rms_record_team *)arg;
    int k;
    while ((k = atomic_fetch_add(&team->next, 1)) < team->parts)
        team->fn(team->ctx, team->n * k / team->parts, team->n * (k + 1) / team->parts);
    return NULL;
}
static void record_worker_omp(void *arg) { record_worker(arg); }

static void run_records(rms_records_fn fn, void *ctx, int64_t n, int num_threads) {
    int threads = num_threads > 64 ? 64 : num_threads;
    if ((int64_t)threads > n / RMS_RECORDS_PER_THREAD) threads = (int)(n / RMS_RECORDS_PER_THREAD);
    if (threads <= 1) {
        fn(ctx, 0, n);
        return;
    }
    rms_record_team team = {fn, ctx, n, threads, 0};
    launch_team(record_worker, record_worker_omp, &team, threads);
}

/* A one-element float32 CPU tensor's value. */
static int read_scalar(const int64_t *slot, float *out) {
    rms_view s;
    if (describe(slot, 0, &s) || s.kind != RMS_F32 || s.numel != 1) return -1;
    memcpy(out, s.ptr, sizeof *out);
    return 0;
}

int32_t rmsprop_bumps_versions(void) { return atomic_load(&g_api_ready) && g_api.bump_version != NULL; }
int32_t rmsprop_reads_bits(void) { return atomic_load(&g_api_ready) && g_api.is_neg != NULL; }
/* Test hook and load-time probe: a tensor's bits as validation reads them (1 negative, 2
 * conjugate), or -1 without the functions. */
int32_t rmsprop_tensor_bits(const int64_t *handle) {
    if (!atomic_load(&g_api_ready) || !g_api.is_neg) return -1;
    if (!handle || !*handle) return -1;
    return (g_api.is_neg(handle) ? 1 : 0) | (g_api.is_conj(handle) ? 2 : 0);
}

/* One tensor's version counter + 1, as an in-place op does; an inference tensor has none and is
 * left alone, as torch.autograd.graph.increment_version leaves it. */
static void bump_slot(const int64_t *slot) {
    if (*g_api.version_counter(slot)) g_api.bump_version(slot);
}

/* The counters of every tensor record t's step writes, read from the columns the record was
 * validated from (what is written: see validate_record). Called between the validation and the
 * first write, while the TensorImpls are still in the cache. */
static void bump_record(const rms_lists *L, const rms_record *rec, int64_t t, int grad_written) {
    bump_slot(&L->param[t]);
    bump_slot(&L->square_avg[t]);
    bump_slot(&L->step[t]);
    if (rec->m) bump_slot(&L->grad_avg[t]);
    if (rec->b) bump_slot(&L->momentum_buffer[t]);
    if (rec->vs) bump_slot(&L->square_avg_scale[t]);
    if (rec->ms) bump_slot(&L->grad_avg_scale[t]);
    if (rec->bs) bump_slot(&L->momentum_buffer_scale[t]);
    if (grad_written) bump_slot(&L->grad[t]);
}

/* Test hook and load-time probe: bump the counters of n tensors as a step bumps them. */
int32_t rmsprop_bump_versions(const int64_t *handles, int64_t n) {
    if (!atomic_load(&g_api_ready) || !g_api.bump_version) return RMS_NOT_INITIALISED;
    if (n < 0 || (n > 0 && !handles)) return RMS_BAD_ARGUMENT;
    for (int64_t t = 0; t < n; t++) {
        rms_view v;
        int r = describe(&handles[t], 0, &v);
        if (r) return RMS_INVALID;
    }
    for (int64_t t = 0; t < n; t++) bump_slot(&handles[t]);
    return RMS_OK;
}

/* ----------------------------------------------------------------------- Python's lists
 * A step over thousands of tensors needs, from Python, each gradient's TensorImpl address and
 * proof that each cached persistent tensor is still the same object holding the same TensorImpl
 * (torch.utils.swap_tensors keeps the object and swaps what is inside it). Read attribute by
 * attribute in Python that is a call per tensor; the two functions below read the lists' memory
 * instead. They are called through ctypes.PyDLL, with the GIL held (nothing can mutate the lists
 * meanwhile), and they read CPython objects at offsets the loader handed over in
 * rmsprop_set_py_layout after checking each one against this interpreter with a probe (the
 * object's type, a list's size and items, a tensor's TensorImpl). Before that, and for anything
 * they do not recognise (a tuple, a list of another length, a tensor subclass), they answer "not
 * mine" and Python does the work as before: they never decide that something is valid that the
 * Python path would refuse. */
typedef struct {
    int64_t type, size, items, impl; /* offsets: ob_type, ob_size, ob_item, THPVariable's cdata */
    const void *list_type, *tensor_type, *parameter_type, *none;
} rms_py_layout;
static rms_py_layout g_py;
static atomic_int g_py_ready = 0;

static const void *py_word(const void *object, int64_t offset) {
    const void *word;
    memcpy(&word, (const char *)object + offset, sizeof word);
    return word;
}

static int py_is_list(const void *object) { return object && py_word(object, g_py.type) == g_py.list_type; }
static int64_t py_list_size(const void *list) { return (int64_t)(intptr_t)py_word(list, g_py.size); }
static const void *const *py_list_items(const void *list) { return (const void *const *)py_word(list, g_py.items); }

/* offsets of ob_type, ob_size, ob_item and THPVariable.cdata (bytes, each a word-aligned word
 * inside its object), then the type objects of list, torch.Tensor and nn.Parameter and None. */
int32_t rmsprop_set_py_layout(int64_t type, int64_t size, int64_t items, int64_t impl, const void *list_type,
                              const void *tensor_type, const void *parameter_type, const void *none) {
    const int64_t offsets[4] = {type, size, items, impl};
    atomic_store(&g_py_ready, 0);
    for (int k = 0; k < 4; k++)
        if (offsets[k] < 0 || offsets[k] > 256 || offsets[k] % (int64_t)sizeof(void *)) return RMS_BAD_ARGUMENT;
    if (!list_type || !tensor_type || !parameter_type || !none) return RMS_BAD_ARGUMENT;
    g_py = (rms_py_layout){type, size, items, impl, list_type, tensor_type, parameter_type, none};
    atomic_store(&g_py_ready, 1);
    return RMS_OK;
}

/* out[i] = the TensorImpl address of list[i]. 1 when `list` is a list of n > 0 items, each exactly
 * a torch.Tensor or nn.Parameter (out then holds all n); -1 when it is not (out may be partly
 * written) or before the layout is set: not answered. */
int32_t rmsprop_py_handles(const void *list, int64_t n, int64_t *out) {
    if (!atomic_load(&g_py_ready) || !out || n <= 0 || !py_is_list(list) || py_list_size(list) != n) return -1;
    const void *const *items = py_list_items(list);
    for (int64_t i = 0; i < n; i++) {
        const void *type = py_word(items[i], g_py.type);
        if (type != g_py.tensor_type && type != g_py.parameter_type) return -1;
        out[i] = (int64_t)(intptr_t)py_word(items[i], g_py.impl);
    }
    return 1;
}

/* 1 when `list` is a list of n > 0 items, each exactly a torch.Tensor or nn.Parameter with a
 * strided layout; 0 when such a list holds a tensor of another layout (a sparse gradient); -1
 * when it is not such a list, or torch's functions are not loaded: not answered. */
int32_t rmsprop_py_all_strided(const void *list, int64_t n) {
    if (!atomic_load(&g_py_ready) || !atomic_load(&g_api_ready) || n <= 0 || !py_is_list(list) ||
        py_list_size(list) != n)
        return -1;
    const void *const *items = py_list_items(list);
    int32_t answer = 1;
    for (int64_t i = 0; i < n; i++) {
        const void *type = py_word(items[i], g_py.type);
        if (type != g_py.tensor_type && type != g_py.parameter_type) return -1;
        int64_t impl = (int64_t)(intptr_t)py_word(items[i], g_py.impl);
        int32_t layout;
        if (g_api.layout(&impl, &layout)) return -1;
        if (layout != g_api.layout_strided) answer = 0;
    }
    return answer;
}

/* 1 when `list` holds n > 0 items and item i is the object objects[i] holding the TensorImpl
 * handles[i] (an item that is None: handles[i] is 0); 0 when it does not; -1 when `list` is not
 * a list or before the layout is set: not answered. objects[i] must be a tensor or None that the
 * caller keeps alive: only an item identical to it is read, so no other object is dereferenced. */
int32_t rmsprop_py_same(const void *list, int64_t n, const int64_t *objects, const int64_t *handles) {
    if (!atomic_load(&g_py_ready) || !objects || !handles || n <= 0 || !py_is_list(list)) return -1;
    if (py_list_size(list) != n) return 0;
    const void *const *items = py_list_items(list);
    for (int64_t i = 0; i < n; i++) {
        if ((int64_t)(intptr_t)items[i] != objects[i]) return 0;
        if (items[i] == g_py.none ? handles[i] != 0
                                  : (int64_t)(intptr_t)py_word(items[i], g_py.impl) != handles[i])
            return 0;
    }
    return 1;
}

/* The persistent tensors of record t (everything but the gradient) as in the previous step. */
static int unchanged(const rms_record *old, const rms_record *now) {
    return old->valid && old->p == now->p && old->v == now->v && old->m == now->m && old->b == now->b &&
           old->step == now->step && old->numel == now->numel && old->kind == now->kind &&
           old->step_kind == now->step_kind && old->vs == now->vs && old->ms == now->ms && old->bs == now->bs &&
           old->fmt == now->fmt && old->state_size == now->state_size;
}

/* The validation pass over records [lo, hi): a record whose status came in nonzero is kept from
 * the kernel (neither validated nor counted). */
typedef struct {
    const rms_lists *lists;
    const rms_call *call;
    rms_record *fresh;
    uint8_t *st;
    const uint8_t *kept; /* the caller's status on entry, or NULL */
    _Atomic int64_t failures, total;
} rms_validation;

static void validate_records(void *ctx, int64_t lo, int64_t hi) {
    rms_validation *v = (rms_validation *)ctx;
    int64_t failures = 0, total = 0;
    for (int64_t t = lo; t < hi; t++) {
        if ((t - lo) % RMS_WARM_BATCH == 0) warm_ahead(v->lists, t, lo, hi);
        if (v->kept && v->kept[t]) continue;
        v->st[t] = validate_record(v->lists, t, v->call, &v->fresh[t]);
        failures += v->st[t] != 0;
        if (!v->st[t]) total += v->fresh[t].numel;
    }
    atomic_fetch_add(&v->failures, failures);
    atomic_fetch_add(&v->total, total);
}

/* Between the validation and the first write of a step, per valid record of [lo, hi): the
 * version bumps of what it writes (while its TensorImpls are still in the cache), step += 1,
 * then 1 / (1 - alpha^step) and what a low-bit record needs besides: 1/C_{t-1} and the variance
 * weight (both as the torch-op path computes them, in double), the keys. */
typedef struct {
    const rms_lists *lists;
    const rms_call *call;
    const rms_record *fresh;
    rms_rec_scalars *inv_corr;
    int bump, grad_written;
} rms_bookkeeping;

static void keep_books(void *ctx, int64_t lo, int64_t hi) {
    const rms_bookkeeping *k = (const rms_bookkeeping *)ctx;
    const double a = k->call->alpha;
    for (int64_t t = lo; t < hi; t++) {
        const rms_record *rec = &k->fresh[t];
        if (!rec->valid) continue; /* kept from the kernel by the caller */
        if (k->bump) bump_record(k->lists, rec, t, k->grad_written);
        double step;
        if (rec->step_kind) step = *(double *)rec->step += 1.0;
        else step = *(float *)rec->step += 1.0f;
        rms_rec_scalars *rs = &k->inv_corr[t];
        if (k->call->bias_correction) {
            const double c_t = 1.0 - pow(a, step), c_prev = 1.0 - pow(a, step - 1.0);
            rs->inv_corr = 1.0 / c_t;
            rs->inv_prev = c_prev > 0.0 ? 1.0 / c_prev : 0.0;
            rs->k_var = a * (1.0 - a) * c_prev / c_t;
        } else {
            rs->inv_corr = 1.0;
            rs->inv_prev = 1.0;
            rs->k_var = a * (1.0 - a);
        }
        rs->key0 = stream_key((uint32_t)(int64_t)step, (uint32_t)t, 0);
        rs->key1 = stream_key((uint32_t)(int64_t)step, (uint32_t)t, 1);
    }
}

/*
 * Validate, then (mode RUN) apply one step to every record, or (mode STREAM) stream the bytes
 * of a plain fp32 step over them. `records` (rmsprop_memo_size(n) bytes, zeroed at first) is
 * the caller's memory of the previous step, read for RMS_REQUIRE_UNCHANGED and rewritten on a
 * step. `status`
 * (n bytes, or NULL) is in and out: on entry a nonzero byte keeps that record from the kernel
 * (the caller routes it elsewhere); on return every record's status. `bad` (or NULL) gets the
 * first record with a nonzero status. With RMS_REQUIRE_UNCHANGED, a record that fails or a
 * persistent tensor that moved since the previous step returns RMS_CHANGED. Nothing is written
 * to any tensor unless the return value is RMS_OK.
 */
int32_t rmsprop_step(const rms_lists *lists, int64_t n, const rms_call *call, int32_t num_threads,
                     void *records, uint8_t *status, int64_t *bad) {
    if (!atomic_load(&g_api_ready)) return RMS_NOT_INITIALISED;
    if (!lists || !call || n < 0 || num_threads < 1 || (n > 0 && !records)) return RMS_BAD_ARGUMENT;
    if (call->bump_versions && !g_api.bump_version) return RMS_BAD_ARGUMENT;
    const int mode = call->mode & 0xff;
    if (mode != RMS_MODE_CHECK && mode != RMS_MODE_RUN && mode != RMS_MODE_STREAM) return RMS_BAD_ARGUMENT;
    if (bad) *bad = -1;

    float grad_scale = 1.0f, found_inf = 0.0f;
    if ((call->grad_scale && read_scalar(call->grad_scale, &grad_scale)) ||
        (call->found_inf && read_scalar(call->found_inf, &found_inf)))
        return RMS_BAD_SCALAR;

    if (n == 0) return mode == RMS_MODE_RUN && found_inf != 0.0f ? RMS_SKIPPED : RMS_OK;
    rms_record *fresh = scratch_records(records, n);
    uint8_t *st = scratch_status(records, n);
    rms_rec_scalars *inv_corr = scratch_scalars(records, n);
    memset(fresh, 0, sizeof(rms_record) * (size_t)n);
    memset(st, 0, (size_t)n);
    rms_call checked = *call;
    if (mode == RMS_MODE_STREAM) { /* p, g, v only, float32 only */
        checked.centered = 0;
        checked.momentum = 0;
        checked.dtype_mask = 1 << RMS_F32;
        checked.state_dtype = RMS_SD_NONE;
    }
    /* status on entry: nonzero marks a record the caller keeps from the kernel (it is neither
     * validated nor stepped, and keeps its code) */
    if (status) memcpy(st, status, (size_t)n);
    /* records go to several threads only where the elements do (as in the last call: the
     * total is known only after validating): waking a thread for a step of tiny tensors costs
     * more than it saves, and much more when the cores are busy elsewhere */
    rms_memo_header *hdr = (rms_memo_header *)records;
    const int parallel = hdr->last_total >= 2 * RMS_MIN_PER_THREAD;
    rms_validation v = {lists, &checked, fresh, st, status, 0, 0};
    run_records(validate_records, &v, n, parallel ? num_threads : 1);
    const int64_t failures = atomic_load(&v.failures), total = atomic_load(&v.total);
    const int require_unchanged = (call->mode & RMS_REQUIRE_UNCHANGED) != 0;
    const int grad_written = call->write_back && call->grad_scale;
    rms_record *memo = n > 0 ? memo_records(records) : NULL;
    rms_span *spans = n > 0 ? memo_spans(records, n) : NULL;
    int32_t result = RMS_OK;
    int64_t overlapping = 0, saved = 0;
    if (failures > 0) {
        /* with RMS_REQUIRE_UNCHANGED the caller expected every other record to pass as before */
        result = require_unchanged ? RMS_CHANGED : RMS_INVALID;
    } else if (require_unchanged) {
        int same = n > 0 && hdr->n == n;
        for (int64_t t = 0; same && t < n; t++)
            if (fresh[t].valid && !unchanged(&memo[t], &fresh[t])) same = 0;
        if (!same) {
            result = RMS_CHANGED;
        } else if (hdr->spans_valid && !grad_written) {
            overlapping = mark_grad_overlaps(fresh, n, spans, hdr->n_spans, st);
        } else {
            overlapping = mark_overlaps(fresh, n, &checked, st, NULL, NULL);
        }
        if (result == RMS_OK && overlapping > 0) result = RMS_CHANGED;
    } else {
        overlapping = mark_overlaps(fresh, n, &checked, st, mode == RMS_MODE_RUN && n > 0 ? spans : NULL, &saved);
        if (overlapping > 0) result = RMS_INVALID;
    }
    if (overlapping < 0) result = RMS_NO_MEMORY;
    if (status) memcpy(status, st, (size_t)n);
    if (bad && result != RMS_OK)
        for (int64_t t = 0; t < n; t++)
            if (st[t]) { *bad = t; break; }
    if (result == RMS_OK) hdr->last_total = total; /* (the check before a step: its step splits too) */
    if (result != RMS_OK || mode == RMS_MODE_CHECK) goto done;

    if (mode == RMS_MODE_STREAM) {
        run_parallel(fresh, n, total, NULL, NULL, 0, 0, 1, num_threads);
        goto done;
    }
    if (found_inf != 0.0f) { result = RMS_SKIPPED; goto done; } /* AMP overflow: write nothing */
    rms_bookkeeping k = {lists, call, fresh, inv_corr, call->bump_versions != 0, grad_written};
    run_records(keep_books, &k, n, total >= 2 * RMS_MIN_PER_THREAD ? num_threads : 1);
    const int lr_in = call->lr_in_momentum;
    const int has_momentum = call->momentum > 0;
    rms_scalars c = {
        .inv_scale = call->grad_scale ? (double)(1.0f / grad_scale) : 1.0,
        .sign = call->maximize ? -1.0 : 1.0,
        .wd = call->weight_decay,
        .decay = (call->decoupled_weight_decay && call->weight_decay != 0) ? 1.0 - call->lr * call->weight_decay : 1.0,
        .alpha = call->alpha,
        .one_minus_alpha = 1.0 - call->alpha,
        .eps = call->eps,
        .lr = call->lr,
        .mu = call->momentum,
        .k_buf = lr_in ? call->lr : 1.0,
        .k_par = lr_in ? 1.0 : call->lr,
    };
    int coupled = !call->decoupled_weight_decay && call->weight_decay != 0;
    int mom_kind = has_momentum ? (call->nesterov ? 2 : 1) : 0;
    /* plain: no gradient scaling or sign flip, no decoupled decay, no bias correction, so the
     * loop can skip those multiplications (each would be an exact x * 1 otherwise) */
    int plain = !call->grad_scale && !call->maximize && c.decay == 1.0 && !call->bias_correction;
    int variant = plain | (call->eps_in_sqrt ? 2 : 0) | (coupled ? 4 : 0) | (((call->centered != 0) * 3 + mom_kind) << 3);
    int write_back = call->grad_scale != NULL && call->write_back;
    run_parallel(fresh, n, total, inv_corr, &c, variant, write_back, 0, num_threads);
    if (n > 0) { /* remember this step: its records, and (after a full check) its persistent spans */
        memcpy(memo, fresh, sizeof(rms_record) * (size_t)n);
        if (!require_unchanged) {
            hdr->n = n;
            hdr->n_spans = saved;
            hdr->spans_valid = 1;
        }
    }

done:
    return result;
}

/* Test hooks: the conversions in use (see rmsprop_set_isa), over whole float16 / bfloat16 /
 * float32 CPU tensors (validated like everything else: contiguous, the right dtypes, equal
 * element counts, no overlap). */
static int convert_views(const int64_t *in, const int64_t *out, int32_t in_kind, int32_t out_kind, rms_view *a, rms_view *b) {
    if (!atomic_load(&g_api_ready)) return RMS_NOT_INITIALISED;
    if (describe(in, 0, a) || describe(out, 1, b)) return RMS_BAD_ARGUMENT;
    if (a->kind != in_kind || b->kind != out_kind || a->numel != b->numel || !a->contiguous_order || !b->contiguous_order)
        return RMS_BAD_ARGUMENT;
    if (a->numel > 0 && (uintptr_t)a->ptr < (uintptr_t)b->ptr + b->numel * kind_size(out_kind) &&
        (uintptr_t)b->ptr < (uintptr_t)a->ptr + a->numel * kind_size(in_kind))
        return RMS_BAD_ARGUMENT;
    return 0;
}
#define RMS_CONVERT_HOOK(NAME, IN_KIND, OUT_KIND, IN_T, OUT_T, FIELD)            \
    int32_t NAME(const int64_t *in, const int64_t *out) {                        \
        rms_view a, b;                                                           \
        int r = convert_views(in, out, IN_KIND, OUT_KIND, &a, &b);               \
        if (r) return r;                                                         \
        if (a.numel > 0) g_cvt.FIELD((const IN_T *)a.ptr, (OUT_T *)b.ptr, a.numel); \
        return 0;                                                                \
    }
RMS_CONVERT_HOOK(rmsprop_f16_to_f32, RMS_F16, RMS_F32, uint16_t, float, f16_in)
RMS_CONVERT_HOOK(rmsprop_f32_to_f16, RMS_F32, RMS_F16, float, uint16_t, f16_out)
RMS_CONVERT_HOOK(rmsprop_bf16_to_f32, RMS_BF16, RMS_F32, uint16_t, float, bf16_in)
RMS_CONVERT_HOOK(rmsprop_f32_to_bf16, RMS_F32, RMS_BF16, float, uint16_t, bf16_out)
