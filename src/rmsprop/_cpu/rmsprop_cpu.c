/*
 * Fused RMSProp for CPU tensors: one pass over memory per element, all of a group's tensors in
 * one call, split across threads.
 *
 * Plain C ABI (loaded with ctypes; no Python or torch headers), so the package builds with any C
 * compiler and starts instantly. The caller passes a table of tensors (data pointers, element
 * count, dtype code) and the rule; see rmsprop/backends/fused_cpu.py for the Python side.
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
 * Threads: each of T threads takes a 1/T slice of every tensor. The threads are torch's own
 * OpenMP pool when the caller hands us its GOMP_parallel entry point (rmsprop_use_openmp): its
 * workers are already running and warm, and no second pool competes with torch's for the cores.
 * Otherwise plain pthreads are started per call (correct, but slower to wake in some VMs).
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RMS_ABI_VERSION 1

enum { RMS_F32 = 0, RMS_F64 = 1, RMS_BF16 = 2, RMS_F16 = 3 };
enum { RMS_OK = 0, RMS_BAD_DTYPE = -1, RMS_NO_MEMORY = -2, RMS_BAD_THREADS = -3 };

/* One tensor of the group: addresses (0 when the state is unused), element count, and
 * dtype code: low byte = element dtype, second byte = step counter dtype (0 f32, 1 f64). */
typedef struct {
    int64_t param, grad, square_avg, grad_avg, momentum_buffer, step, numel, dtype;
} rms_tensor;

typedef struct {
    double lr, alpha, eps, weight_decay, momentum;
    int32_t centered, maximize, eps_in_sqrt, nesterov;
    int32_t decoupled_weight_decay, lr_in_momentum, bias_correction, has_momentum;
    /* NULL, or a float32 scalar: grads are multiplied by its reciprocal and written back. */
    const float *grad_scale;
    /* NULL, or a float32 scalar: when nonzero the step is skipped and nothing is written. */
    const float *found_inf;
} rms_rule;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
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
RMS_INLINE uint16_t bf16_store(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)(nan ? ((u >> 16) | 0x40u) : rounded);
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

/* Test hooks: the conversions above, over arrays. */
void rmsprop_f16_to_f32(const uint16_t *in, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_load(in[i]);
}
void rmsprop_f32_to_f16(const float *in, uint16_t *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f16_store(in[i]);
}

/* Scalars of one call, in the math type. */
typedef struct {
    double inv_scale, sign, wd, decay, alpha, one_minus_alpha, eps, lr, mu, k_buf, k_par;
} rms_scalars;

/* ------------------------------------------------------------------ the element loop
 * DEFINE_LOOP(NAME, S, M, SQRT, LOAD, STORE): S is the storage type, M the math type, SQRT its
 * square root (sqrtf for float: plain sqrt would widen every element to double). The loop body is
 * one always-inline function whose last three arguments are compile-time constants at each of
 * the 12 call sites in the dispatcher below, so GCC emits 12 straight-line vectorised loops. */
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
        for (int64_t i = 0; i < n; i++) {                                                         \
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
    const rms_tensor *tensors;
    const double *inv_corr;
    const rms_scalars *scalars;
    int64_t n_tensors, part, parts; /* this thread takes slice `part` of `parts` of every tensor */
    int variant, write_back; /* variant -1: the streaming bound (fp32 only) */
} rms_job;

static size_t elem_size(int64_t code) { return (code & 0xff) == RMS_F64 ? 8 : (code & 0xff) == RMS_F32 ? 4 : 2; }

#define AT(base, off, sz) ((void *)((char *)(intptr_t)(base) + (off) * (sz)))

static void *run_job(void *arg) {
    const rms_job *job = (const rms_job *)arg;
    for (int64_t t = 0; t < job->n_tensors; t++) {
        const rms_tensor *x = &job->tensors[t];
        /* this thread's share of tensor t: slice `part` of `parts`, on RMS_ALIGN boundaries */
        int64_t per = (x->numel + job->parts - 1) / job->parts;
        per = (per + RMS_ALIGN - 1) / RMS_ALIGN * RMS_ALIGN;
        int64_t lo = job->part * per, hi = lo + per;
        if (hi > x->numel) hi = x->numel;
        if (hi <= lo) continue;
        size_t sz = elem_size(x->dtype);
        void *p = AT(x->param, lo, sz), *g = AT(x->grad, lo, sz), *v = AT(x->square_avg, lo, sz);
        void *m = x->grad_avg ? AT(x->grad_avg, lo, sz) : NULL;
        void *b = x->momentum_buffer ? AT(x->momentum_buffer, lo, sz) : NULL;
        int64_t n = hi - lo;
        if (job->variant < 0) {
            stream_f32(p, g, v, n);
            continue;
        }
        switch (x->dtype & 0xff) {
        case RMS_F32: loop_f32(p, g, v, m, b, n, job->scalars, job->inv_corr[t], job->write_back, job->variant); break;
        case RMS_F64: loop_f64(p, g, v, m, b, n, job->scalars, job->inv_corr[t], job->write_back, job->variant); break;
        case RMS_BF16: loop_bf16(p, g, v, m, b, n, job->scalars, job->inv_corr[t], job->write_back, job->variant); break;
        default: loop_f16(p, g, v, m, b, n, job->scalars, job->inv_corr[t], job->write_back, job->variant); break;
        }
    }
    return NULL;
}


int rmsprop_abi_version(void) { return RMS_ABI_VERSION; }

/* GOMP_parallel(fn, data, num_threads, flags): the entry point GCC emits for `omp parallel`;
 * LLVM's and Intel's OpenMP runtimes provide it too. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static _Atomic(gomp_parallel_fn) g_gomp_parallel = NULL;

/* Use the OpenMP runtime whose GOMP_parallel this is (NULL: back to pthreads). */
void rmsprop_use_openmp(void *gomp_parallel) { atomic_store(&g_gomp_parallel, (gomp_parallel_fn)gomp_parallel); }
int rmsprop_uses_openmp(void) { return atomic_load(&g_gomp_parallel) != NULL; }

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

/* Run one slice of every tensor per thread; the calling thread works too. */
static void run_parallel(const rms_tensor *tensors, int64_t n_tensors, int64_t total, const double *inv_corr,
                         const rms_scalars *c, int variant, int write_back, int num_threads) {
    int threads = num_threads > 64 ? 64 : num_threads;
    if ((int64_t)threads > total / RMS_MIN_PER_THREAD) threads = (int)(total / RMS_MIN_PER_THREAD);
    if (threads < 1) threads = 1;
    rms_job jobs[64];
    for (int k = 0; k < threads; k++) jobs[k] = (rms_job){tensors, inv_corr, c, n_tensors, k, threads, variant, write_back};
    rms_team team = {jobs, threads, 0};
    gomp_parallel_fn gomp = atomic_load(&g_gomp_parallel);
    if (threads == 1) {
        team_worker(&team);
    } else if (gomp) {
        gomp(team_worker_omp, &team, (unsigned)threads, 0);
    } else {
        pthread_t handles[64];
        int started = 0;
        for (int k = 1; k < threads && pthread_create(&handles[started], NULL, team_worker, &team) == 0; k++) started++;
        team_worker(&team);
        for (int k = 0; k < started; k++) pthread_join(handles[k], NULL);
    }
}

/* Apply one step to every tensor of the table. Returns RMS_OK or a negative error code; on an
 * error nothing has been written. */
int rmsprop_step(const rms_tensor *tensors, int64_t n_tensors, const rms_rule *rule, int num_threads) {
    if (num_threads < 1) return RMS_BAD_THREADS;
    int64_t total = 0;
    for (int64_t t = 0; t < n_tensors; t++) {
        int64_t code = tensors[t].dtype;
        if ((code & 0xff) > RMS_F16 || ((code >> 8) & 0xff) > 1) return RMS_BAD_DTYPE;
        total += tensors[t].numel;
    }
    if (rule->found_inf && *rule->found_inf != 0.0f) return RMS_OK; /* AMP overflow: skip */

    double *inv_corr = (double *)malloc(sizeof(double) * (size_t)(n_tensors > 0 ? n_tensors : 1));
    if (!inv_corr) return RMS_NO_MEMORY;
    for (int64_t t = 0; t < n_tensors; t++) { /* step += 1, then 1 / (1 - alpha^step) */
        double step;
        if ((tensors[t].dtype >> 8) & 0xff) {
            double *s = (double *)(intptr_t)tensors[t].step;
            step = *s += 1.0;
        } else {
            float *s = (float *)(intptr_t)tensors[t].step;
            step = *s += 1.0f;
        }
        inv_corr[t] = rule->bias_correction ? 1.0 / (1.0 - pow(rule->alpha, step)) : 1.0;
    }

    const int lr_in = rule->lr_in_momentum;
    rms_scalars c = {
        .inv_scale = rule->grad_scale ? (double)(1.0f / *rule->grad_scale) : 1.0,
        .sign = rule->maximize ? -1.0 : 1.0,
        .wd = rule->weight_decay,
        .decay = (rule->decoupled_weight_decay && rule->weight_decay != 0) ? 1.0 - rule->lr * rule->weight_decay : 1.0,
        .alpha = rule->alpha,
        .one_minus_alpha = 1.0 - rule->alpha,
        .eps = rule->eps,
        .lr = rule->lr,
        .mu = rule->momentum,
        .k_buf = lr_in ? rule->lr : 1.0,
        .k_par = lr_in ? 1.0 : rule->lr,
    };
    int coupled = !rule->decoupled_weight_decay && rule->weight_decay != 0;
    int mom_kind = rule->has_momentum ? (rule->nesterov ? 2 : 1) : 0;
    /* plain: no gradient scaling or sign flip, no decoupled decay, no bias correction, so the
     * loop can skip those multiplications (each would be an exact x * 1 otherwise) */
    int plain = !rule->grad_scale && !rule->maximize && c.decay == 1.0 && !rule->bias_correction;
    int variant = plain | (rule->eps_in_sqrt ? 2 : 0) | (coupled ? 4 : 0) | ((rule->centered * 3 + mom_kind) << 3);

    run_parallel(tensors, n_tensors, total, inv_corr, &c, variant, rule->grad_scale != NULL, num_threads);
    free(inv_corr);
    return RMS_OK;
}

/* Benchmark only: stream the bytes of a plain fp32 step over the same tensors and threads. */
int rmsprop_stream_bound(const rms_tensor *tensors, int64_t n_tensors, int num_threads) {
    if (num_threads < 1) return RMS_BAD_THREADS;
    int64_t total = 0;
    for (int64_t t = 0; t < n_tensors; t++) {
        if ((tensors[t].dtype & 0xff) != RMS_F32) return RMS_BAD_DTYPE;
        total += tensors[t].numel;
    }
    run_parallel(tensors, n_tensors, total, NULL, NULL, -1, 0, num_threads);
    return RMS_OK;
}
