/* Float helpers for the engine's hot path: rmsnorm, RoPE (rotate_half form), gated activations,
 * causal grouped-query attention over a float32 KV cache.  Plain C compiled twice by GCC
 * target_clones (x86-64-v3 = AVX2+FMA, and baseline), resolved once at load time. Float sums use
 * `omp simd reduction` so they vectorise (summation order differs from a scalar loop). */
#include <math.h>
#include <float.h>
#include <stdlib.h>
#include <omp.h>
#include <string.h>
#include "plk.h"
#if defined(__x86_64__) || defined(__i386__)
#define PLK_OPS_X86 1
#include <immintrin.h>
#define CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else                      /* aarch64: the plain C below (NEON is baseline there; no clones) */
#define PLK_OPS_X86 0
#define CLONES
#endif

CLONES void plk_rmsnorm(const float *x, const float *w, float eps, float *out, int T, int K)
{
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * K;
        float *o = out + (size_t)t * K;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int k = 0; k < K; k++) ss += xr[k] * xr[k];
        float sc = 1.0f / sqrtf(ss / (float)K + eps);
        for (int k = 0; k < K; k++) o[k] = xr[k] * sc * w[k];
    }
}

/* RoPE tables cos, sin (T, hd/2) for positions pos: angle of pair i at position p is
 * (p / scale) * theta^(-2i/hd), in double as the numpy reference builds them (scale: linear RoPE
 * scaling, 1 = none); pairs are (i, i + hd/2) (HF rotate_half) */
void plk_rope_tables(const int64_t *pos, int T, int hd, double theta, double scale, float *c, float *s)
{
    int half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < half; i++) {
            double inv = 1.0 / pow(theta, (double)(2 * i) / (double)hd);
            double ang = ((double)pos[t] / scale) * inv;
            c[(size_t)t * half + i] = (float)cos(ang);
            s[(size_t)t * half + i] = (float)sin(ang);
        }
}

/* x: T rows of nh heads (row stride ldx floats), rotated in place with the tables of plk_rope_tables */
void plk_rope_apply(float *x, int T, int nh, int hd, size_t ldx, const float *c, const float *s)
{
    int half = hd / 2;
    for (int t = 0; t < T; t++) {
        const float *ct = c + (size_t)t * half, *st = s + (size_t)t * half;
        for (int h = 0; h < nh; h++) {
            float *v = x + (size_t)t * ldx + (size_t)h * hd;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * ct[i] - b * st[i];
                v[i + half] = b * ct[i] + a * st[i];
            }
        }
    }
}

/* x (T, nh, hd) in place (tables, then rotation) */
void plk_rope(float *x, int T, int nh, int hd, const int64_t *pos, double theta)
{
    int half = hd / 2;
    float c[512], s[512];
    for (int t = 0; t < T; t++) {
        plk_rope_tables(pos + t, 1, hd, theta, 1.0, c, s);
        plk_rope_apply(x + (size_t)t * nh * hd, 1, nh, hd, (size_t)nh * hd, c, s);
    }
    (void)half;
}

/* n floats -> fp16, round to nearest even (as numpy's astype(float16)): vcvtps2ph in the v3 clone */
CLONES void plk_store_f16(const float *src, uint16_t *dst, size_t n)
{
    _Float16 *d = (_Float16 *)dst;
    for (size_t i = 0; i < n; i++) d[i] = (_Float16)src[i];
}

CLONES void plk_silu_mul(const float *g, const float *u, float *out, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

CLONES void plk_relu_mul(const float *g, const float *u, float *out, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = (g[i] > 0.0f ? g[i] : 0.0f) * u[i];
}

CLONES void plk_gelu_tanh_mul(const float *g, const float *u, float *out, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = plk_act_scalar(g[i], PLK_ACT_GELU_TANH) * u[i];
}

/* one query row against keys 0..P-1 of one kv head; one body for both cache types (float32, and fp16 as
 * llama.cpp's default cache: _Float16 loads become vcvtph2ps in the x86-64-v3 clone, a library conversion in
 * the baseline one) */
#define ATTEND_ONE(NAME, ELEM)                                                                                \
CLONES static void NAME(const float *q, const ELEM *K, const ELEM *V, int P, int hd, float scale,             \
                        float *sc, float *o)                                                                \
{                                                                                                           \
    float mx = -FLT_MAX;                                                                                    \
    for (int p = 0; p < P; p++) {                                                                           \
        const ELEM *k = K + (size_t)p * hd;                                                                 \
        float d = 0.0f;                                                                                     \
        _Pragma("omp simd reduction(+:d)")                                                                  \
        for (int i = 0; i < hd; i++) d += q[i] * (float)k[i];                                               \
        sc[p] = d * scale;                                                                                  \
        if (sc[p] > mx) mx = sc[p];                                                                         \
    }                                                                                                       \
    float sum = 0.0f;                                                                                       \
    _Pragma("omp simd reduction(+:sum)")                                                                    \
    for (int p = 0; p < P; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }                                 \
    float inv = 1.0f / sum;                                                                                 \
    for (int i = 0; i < hd; i++) o[i] = 0.0f;                                                               \
    for (int p = 0; p < P; p++) {                                                                           \
        const ELEM *v = V + (size_t)p * hd;                                                                 \
        float wgt = sc[p] * inv;                                                                            \
        for (int i = 0; i < hd; i++) o[i] += wgt * (float)v[i];                                             \
    }                                                                                                       \
}
ATTEND_ONE(attend_one, float)
ATTEND_ONE(attend_one_f16, _Float16)

/* q (T, nh, hd) for positions start..start+T-1; kc, vc (nkv, maxP, hd); out (T, nh*hd) */
void plk_attention(const float *q, const float *kc, const float *vc, int T, int nh, int nkv, int hd,
                   int maxP, int start, float *out, int nthreads)
{
    const int grp = nh / nkv;
    const float scale = 1.0f / sqrtf((float)hd);
    const int jobs = T * nh;
    long work = (long)jobs * (start + T) * hd;
    int nth = work < 200000 ? 1 : nthreads;
    #pragma omp parallel num_threads(nth) if (nth > 1)
    {
        float *sc = (float *)plk_scratch(sizeof(float) * (size_t)(start + T), 0);
        if (!sc) plk_oom_set();
        #pragma omp for schedule(static)        /* every thread reaches the work-sharing loop */
        for (int j = 0; j < jobs; j++) {
            if (!sc) continue;
            int t = j / nh, h = j % nh, kv = h / grp;
            const float *K = kc + (size_t)kv * maxP * hd, *V = vc + (size_t)kv * maxP * hd;
            attend_one(q + ((size_t)t * nh + h) * hd, K, V, start + t + 1, hd, scale, sc,
                       out + (size_t)t * nh * hd + (size_t)h * hd);
        }
        free(sc);
    }
}

/* AVX2 + F16C form of attend_one_f16 for head_dim a multiple of 8, up to 256 (gemma3) (measured: the target_clones
 * form above ran 98 us for 9 heads x 101 positions, i.e. the fp16 loads were not vectorised): scores
 * of 8 positions at a time (8 dot products reduced together), exp in scalar expf, V rows accumulated
 * 8 lanes at a time. Every query row goes through the same operations, whatever T. head_dim 256 (gemma3),
 * 8 heads x 1024 positions, one token: 5.2 ms in the target_clones form, 0.19-0.39 ms here (load 2.6). */
#if PLK_OPS_X86
__attribute__((target("avx2,fma,f16c")))
static void attend_one_f16_avx2(const float *q, const uint16_t *K, const uint16_t *V, int P, int hd, float scale,
                                float *sc, float *o)
{
    const int nc = hd / 8;
    __m256 qv[32];
    for (int c = 0; c < nc; c++) qv[c] = _mm256_loadu_ps(q + 8 * c);
    float mx = -FLT_MAX;
    int p = 0;
    for (; p + 8 <= P; p += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) {
            const uint16_t *k = K + (size_t)(p + j) * hd;
            __m256 acc = _mm256_mul_ps(qv[0], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)k)));
            for (int c = 1; c < nc; c++)
                acc = _mm256_fmadd_ps(qv[c], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 8 * c))), acc);
            a[j] = acc;
        }
        __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
        __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
        __m256 h0 = _mm256_hadd_ps(h01, h23), h1 = _mm256_hadd_ps(h45, h67);
        __m256 d = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
        _mm256_storeu_ps(sc + p, _mm256_mul_ps(d, _mm256_set1_ps(scale)));
    }
    for (; p < P; p++) {
        const uint16_t *k = K + (size_t)p * hd;
        __m256 acc = _mm256_mul_ps(qv[0], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)k)));
        for (int c = 1; c < nc; c++)
            acc = _mm256_fmadd_ps(qv[c], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + 8 * c))), acc);
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4 = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        sc[p] = _mm_cvtss_f32(s4) * scale;
    }
    for (p = 0; p < P; p++) if (sc[p] > mx) mx = sc[p];
    float sum = 0.0f;
    for (p = 0; p < P; p++) { sc[p] = expf(sc[p] - mx); sum += sc[p]; }
    const float inv = 1.0f / sum;
    __m256 ov[32];
    for (int c = 0; c < nc; c++) ov[c] = _mm256_setzero_ps();
    for (p = 0; p < P; p++) {
        const uint16_t *v = V + (size_t)p * hd;
        const __m256 wv = _mm256_set1_ps(sc[p] * inv);
        for (int c = 0; c < nc; c++)
            ov[c] = _mm256_fmadd_ps(wv, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 8 * c))), ov[c]);
    }
    for (int c = 0; c < nc; c++) _mm256_storeu_ps(o + 8 * c, ov[c]);
}
#endif

/* q rows of T tokens with row stride ldq floats (the q part of a fused qkv row); jobs (token, head)
 * in contiguous items run by the kernels' pool */
typedef struct { const float *q; size_t ldq; const uint16_t *kc, *vc; int T, nh, grp, hd, maxP, start, per; float scale; float *out; int simd, window; } att_job;
static void att_item(void *c, int it)
{
    const att_job *j = (const att_job *)c;
    int j0 = it * j->per, j1 = j0 + j->per < j->T * j->nh ? j0 + j->per : j->T * j->nh;
    float *sc = (float *)plk_scratch(sizeof(float) * ((size_t)(j->start + j->T) + 8), 0);
    if (!sc) { plk_oom_set(); return; }
    for (int jj = j0; jj < j1; jj++) {
        int t = jj / j->nh, h = jj % j->nh, kv = h / j->grp;
        const _Float16 *K = (const _Float16 *)j->kc + (size_t)kv * j->maxP * j->hd;
        const _Float16 *V = (const _Float16 *)j->vc + (size_t)kv * j->maxP * j->hd;
        const float *qr = j->q + (size_t)t * j->ldq + (size_t)h * j->hd;
        float *orow = j->out + (size_t)t * j->nh * j->hd + (size_t)h * j->hd;
        int P = j->start + t + 1, p0 = 0;          /* keys p0..P-1: all before, or the window's (P - window, P - 1] */
        if (j->window > 0 && P > j->window) p0 = P - j->window;
        K += (size_t)p0 * j->hd;
        V += (size_t)p0 * j->hd;
#if PLK_OPS_X86
        if (j->simd)
            attend_one_f16_avx2(qr, (const uint16_t *)K, (const uint16_t *)V, P - p0, j->hd, j->scale, sc, orow);
        else
#endif
            attend_one_f16(qr, K, V, P - p0, j->hd, j->scale, sc, orow);
    }
    free(sc);
}

void plk_attention_f16_ex(const float *q, size_t ldq, const uint16_t *kc, const uint16_t *vc, int T, int nh, int nkv,
                          int hd, int maxP, int start, int window, float scale, float *out, int nthreads)
{
    const int jobs = T * nh;
    long work = (long)jobs * (start + T) * hd;
    /* the pool costs ~1-2 us a call: worth it from a few hundred positions x heads (decode at 100
     * positions with 9 heads is ~25 us of serial work otherwise) */
    int nth = work < 16384 ? 1 : nthreads;
    int nit = nth == 1 ? 1 : 4 * nth;
    if (nit > jobs) nit = jobs;
    static int avx2 = -1;
    if (avx2 < 0) avx2 = PLK_OPS_X86 && (plk_detect_isa() == PLK_AVX2 || plk_detect_isa() == PLK_AVX512);
    if (!(scale > 0.0f)) scale = 1.0f / sqrtf((float)hd);
    att_job j = { q, ldq, kc, vc, T, nh, nh / nkv, hd, maxP, start, (jobs + nit - 1) / nit, scale, out,
                  avx2 && hd % 8 == 0 && hd <= 256, window };
    plk_pool_run(att_item, &j, (jobs + j.per - 1) / j.per, nth);
}
