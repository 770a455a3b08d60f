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
 *   d  = sqrt(s + eps_in) + eps_out                    (eps inside or outside the root)
 *   u  = g / d
 *   b  = mu * b + k_buf * u;  p -= k_par * (nesterov ? k_buf * u + mu * b : b)   (momentum)
 *   p -= lr * u                                        (no momentum)
 * k_buf, k_par are (lr, 1) with lr_in_momentum and (1, lr) without. Switches that are off become
 * exact identities (x * 1, x + 0), so only centered, the momentum kind and coupled weight decay
 * change the loop's shape; those are compile-time constants of 12 specialised loops.
 */
#include <math.h>
#include <pthread.h>
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

/* Scalars of one call, in the math type. */
typedef struct {
    double inv_scale, sign, wd, decay, alpha, one_minus_alpha, eps_in, eps_out, lr, mu, k_buf, k_par;
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
                                const int coupled) {                                              \
        const M inv_scale = (M)c->inv_scale, sign = (M)c->sign, wd = (M)c->wd;                   \
        const M decay = (M)c->decay, alpha = (M)c->alpha, oma = (M)c->one_minus_alpha;            \
        const M eps_in = (M)c->eps_in, eps_out = (M)c->eps_out, lr = (M)c->lr, mu = (M)c->mu;     \
        const M k_buf = (M)c->k_buf, k_par = (M)c->k_par;                                        \
        if (write_back) { /* AMP: unscale the gradient in place, as GradScaler.unscale_ would */ \
            for (int64_t i = 0; i < n; i++) g_[i] = STORE(LOAD(g_[i]) * inv_scale);              \
        }                                                                                         \
        const M gscale = write_back ? sign : inv_scale * sign;                                    \
        for (int64_t i = 0; i < n; i++) {                                                         \
            M g = LOAD(g_[i]) * gscale;                                                           \
            M p = LOAD(p_[i]);                                                                    \
            if (coupled) g = g + wd * p;                                                          \
            p = p * decay;                                                                        \
            M v = alpha * LOAD(v_[i]) + oma * g * g;                                              \
            M s = v * inv_corr;                                                                   \
            if (centered) {                                                                       \
                M m = LOAD(m_[i]);                                                                \
                m = m + oma * (g - m);                                                            \
                M mh = m * inv_corr;                                                              \
                s = s - mh * mh;                                                                  \
                s = s < (M)0 ? (M)0 : s; /* clamp rounding error; NaN passes through */          \
                m_[i] = STORE(m);                                                                 \
            }                                                                                     \
            M u = g / (SQRT(s + eps_in) + eps_out);                                               \
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
        switch (variant) {                                                                        \
        case 0: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 0, 0); break;                 \
        case 1: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 0, 1); break;                 \
        case 2: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 1, 0); break;                 \
        case 3: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 1, 1); break;                 \
        case 4: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 2, 0); break;                 \
        case 5: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 0, 2, 1); break;                 \
        case 6: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 0, 0); break;                 \
        case 7: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 0, 1); break;                 \
        case 8: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 1, 0); break;                 \
        case 9: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 1, 1); break;                 \
        case 10: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 2, 0); break;                \
        default: NAME##_body(p, g, v, m, b, n, c, ic, write_back, 1, 2, 1); break;                \
        }                                                                                         \
    }

#define ID(x) (x)
#define F16_LOAD(x) ((float)(x))
#define F16_STORE(x) ((_Float16)(x))
DEFINE_LOOP(loop_f32, float, float, sqrtf, ID, ID)
DEFINE_LOOP(loop_f64, double, double, sqrt, ID, ID)
DEFINE_LOOP(loop_bf16, uint16_t, float, sqrtf, bf16_load, bf16_store)
DEFINE_LOOP(loop_f16, _Float16, float, sqrtf, F16_LOAD, F16_STORE)

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
typedef struct {
    const rms_tensor *tensors;
    const double *inv_corr;
    const rms_scalars *scalars;
    int64_t n_tensors, begin, end; /* a range of the group's concatenated elements */
    int variant, write_back; /* variant -1: the streaming bound (fp32 only) */
} rms_job;

static size_t elem_size(int64_t code) { return (code & 0xff) == RMS_F64 ? 8 : (code & 0xff) == RMS_F32 ? 4 : 2; }

#define AT(base, off, sz) ((void *)((char *)(intptr_t)(base) + (off) * (sz)))

static void *run_job(void *arg) {
    const rms_job *job = (const rms_job *)arg;
    int64_t offset = 0; /* first element of tensor t in the concatenation */
    for (int64_t t = 0; t < job->n_tensors && offset < job->end; t++) {
        const rms_tensor *x = &job->tensors[t];
        int64_t lo = job->begin > offset ? job->begin - offset : 0;
        int64_t hi = job->end - offset < x->numel ? job->end - offset : x->numel;
        offset += x->numel;
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

/* Below this many elements per thread, starting a thread costs more than it saves. */
#define RMS_MIN_PER_THREAD 32768
/* Thread boundaries fall on multiples of this many elements: whole 64-byte lines at any dtype. */
#define RMS_ALIGN 64

int rmsprop_abi_version(void) { return RMS_ABI_VERSION; }

/* Split [0, total) into one contiguous range per thread (at least RMS_MIN_PER_THREAD elements
 * each, boundaries on RMS_ALIGN) and run them; the calling thread takes the first range. */
static void run_parallel(const rms_tensor *tensors, int64_t n_tensors, int64_t total, const double *inv_corr,
                         const rms_scalars *c, int variant, int write_back, int num_threads) {
    int threads = num_threads > 64 ? 64 : num_threads;
    if ((int64_t)threads > total / RMS_MIN_PER_THREAD) threads = (int)(total / RMS_MIN_PER_THREAD);
    if (threads < 1) threads = 1;
    rms_job jobs[64];
    pthread_t handles[64];
    int64_t per = (total + threads - 1) / threads;
    per = (per + RMS_ALIGN - 1) / RMS_ALIGN * RMS_ALIGN;
    for (int k = 0; k < threads; k++) {
        int64_t begin = (int64_t)k * per, end = begin + per;
        jobs[k] = (rms_job){tensors, inv_corr, c, n_tensors, begin < total ? begin : total,
                            end < total ? end : total, variant, write_back};
    }
    int started = 0;
    for (int k = 1; k < threads; k++) {
        if (pthread_create(&handles[k], NULL, run_job, &jobs[k]) != 0) break;
        started = k;
    }
    run_job(&jobs[0]);
    for (int k = started + 1; k < threads; k++) run_job(&jobs[k]); /* threads that failed to start */
    for (int k = 1; k <= started; k++) pthread_join(handles[k], NULL);
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
        .eps_in = rule->eps_in_sqrt ? rule->eps : 0.0,
        .eps_out = rule->eps_in_sqrt ? 0.0 : rule->eps,
        .lr = rule->lr,
        .mu = rule->momentum,
        .k_buf = lr_in ? rule->lr : 1.0,
        .k_par = lr_in ? 1.0 : rule->lr,
    };
    int coupled = !rule->decoupled_weight_decay && rule->weight_decay != 0;
    int mom_kind = rule->has_momentum ? (rule->nesterov ? 2 : 1) : 0;
    int variant = (rule->centered ? 6 : 0) + mom_kind * 2 + coupled;

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
