/* Dispatch, fp16 conversion, activation preparation, the OpenMP drivers (matmul, ffn_bundles). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "plk.h"

float plk_h2f(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else {                       /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

uint16_t plk_f2h(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);          /* rounds to >= 65520: inf */
    if (ax < 0x38800000u) {                                           /* subnormal half (or zero) */
        if (ax < 0x33000000u) return (uint16_t)sign;                   /* < 2^-25: rounds to 0 */
        uint32_t e = ax >> 23, man = (ax & 0x7fffff) | 0x800000;
        int shift = 126 - (int)e;                                      /* 14 + (113 - e) ... */
        /* value = man * 2^(e-150); half subnormal unit = 2^-24 -> q = man >> (126 - e) */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1);                       /* round to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

int plk_detect_isa(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        return PLK_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PLK_AVX2;   /* F16C: every AVX2 CPU has it (Haswell+, Zen) */
    return PLK_GENERIC;
}

#define TABLE(isa) { rows_q8_q8_##isa, rows_q4_0_q8_##isa, rows_q4_1_q8_##isa, \
                     rows_q2_q8_##isa, rows_tern_q8_##isa, rows_q1_q8_##isa }
static const plk_rows_fn ma_table[PLK_NISA][PLK_NFMT] = { TABLE(generic), TABLE(avx2), TABLE(avx512) };
static const plk_rows_fn tl_table[PLK_NFMT] = { 0, 0, 0, rowstl_q2_q8_generic, rowstl_tern_q8_generic, rowstl_q1_q8_generic };

plk_rows_fn plk_rows(int isa, int fmt, int tl)
{
    if (isa < 0 || isa >= PLK_NISA || fmt < 0 || fmt >= PLK_NFMT) return 0;
    return tl ? tl_table[fmt] : ma_table[isa][fmt];
}

void plk_quantize_act(int isa, const float *x, int T, int K, int ldx, int Kp,
                      int8_t *qs, float *dx, float *s, int32_t *isum)
{
    if (isa == PLK_GENERIC) quantize_act_q8_generic(x, T, K, ldx, Kp, qs, dx, s, isum);
    else if (isa == PLK_AVX2) quantize_act_q8_avx2(x, T, K, ldx, Kp, qs, dx, s, isum);
    else quantize_act_q8_avx512(x, T, K, ldx, Kp, qs, dx, s, isum);
}

void plk_act_bx(int fmt, int T, int nb, const float *dx, const float *s, const int32_t *isum, float *bx)
{
    int per = plk_group[fmt] / 32, ng = nb / per;
    for (int t = 0; t < T; t++)
        for (int g = 0; g < ng; g++) {
            float v = 0.0f;
            for (int j = 0; j < per; j++) {
                size_t b = (size_t)t * nb + g * per + j;
                v += plk_has_min[fmt] ? s[b] : dx[b] * (float)isum[b];
            }
            bx[(size_t)t * ng + g] = v;
        }
}

/* rows are split in contiguous ranges, one per thread, multiples of 8 rows */
void plk_matmul(int isa, int fmt, int tl, const plk_w *w, int N, const plk_act *a, float *y, int ldy,
                int accumulate, int nthreads)
{
    plk_rows_fn fn = plk_rows(isa, fmt, tl);
    if (!fn) fn = plk_rows(isa, fmt, 0);
    long work = (long)N * a->Kp * (a->T < 8 ? a->T : 8);
    int nth = nthreads;
    if (work < 65536 * 4) nth = 1;            /* too small to pay a fork/join */
    if (nth > (N + 7) / 8) nth = (N + 7) / 8;
    if (nth <= 1) { fn(w, 0, N, a, y, ldy, accumulate); return; }
    #pragma omp parallel num_threads(nth)
    {
        int id = omp_get_thread_num(), n = omp_get_num_threads();
        int per = ((N + n - 1) / n + 7) & ~7;
        int r0 = id * per, r1 = r0 + per < N ? r0 + per : N;
        if (r0 < r1) fn(w, r0, r1, a, y, ldy, accumulate);
    }
}

typedef struct {                   /* activations in the layout plk_act points into */
    int8_t *qs; float *dx, *s, *bx; int32_t *isum;
} act_buf;

static int act_alloc(act_buf *b, int T, int Kp, int ng)
{
    int nb = Kp / 32;
    b->qs = (int8_t *)malloc((size_t)T * Kp + 64);
    b->dx = (float *)malloc(sizeof(float) * ((size_t)T * nb * 2 + (size_t)T * ng + 16));
    b->isum = (int32_t *)malloc(sizeof(int32_t) * ((size_t)T * nb + 16));
    if (!b->qs || !b->dx || !b->isum) { free(b->qs); free(b->dx); free(b->isum); return -1; }
    b->s = b->dx + (size_t)T * nb;
    b->bx = b->s + (size_t)T * nb;
    return 0;
}

static void act_free(act_buf *b) { free(b->qs); free(b->dx); free(b->isum); }

static void act_prepare(int isa, int fmt, const float *x, int T, int K, int ldx, int Kp, act_buf *b, plk_act *a)
{
    int nb = Kp / 32;
    plk_quantize_act(isa, x, T, K, ldx, Kp, b->qs, b->dx, b->s, b->isum);
    plk_act_bx(fmt, T, nb, b->dx, b->s, b->isum, b->bx);
    a->T = T; a->Kp = Kp; a->nb = nb; a->ng = Kp / plk_group[fmt];
    a->qs = b->qs; a->dx = b->dx; a->bx = b->bx;
}

static inline float silu(float g) { return g / (1.0f + expf(-g)); }

/* out (T, K) += sum over bundles of down @ (act(gate h) * up h).  Bundles are split over threads;
 * each thread sums into its own (T, K) buffer, reduced at the end (no atomics in the hot loop). */
int plk_ffn_bundles(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int C, int K,
                    const int64_t *offs, const float *h, int T, int act, float *out, int nthreads)
{
    const int Kp = (K + plk_group[fmt] - 1) / plk_group[fmt] * plk_group[fmt];
    const int Cp = (C + plk_group[down_fmt] - 1) / plk_group[down_fmt] * plk_group[down_fmt];
    act_buf hb;
    plk_act ha;
    if (act_alloc(&hb, T, Kp, Kp / plk_group[fmt])) return -1;
    act_prepare(isa, fmt, h, T, K, K, Kp, &hb, &ha);
    plk_rows_fn fgu = plk_rows(isa, fmt, tl), fd = plk_rows(isa, down_fmt, tl);
    if (!fgu) fgu = plk_rows(isa, fmt, 0);
    if (!fd) fd = plk_rows(isa, down_fmt, 0);
    int nth = nthreads < n ? nthreads : n;
    if (nth < 1) nth = 1;
    float *priv = nth > 1 ? (float *)calloc((size_t)(nth - 1) * T * K, sizeof(float)) : NULL;
    int err = 0;
    if (nth > 1 && !priv) { act_free(&hb); return -1; }
    #pragma omp parallel num_threads(nth) if (nth > 1)
    {
        int id = omp_get_thread_num();
        float *dst = id == 0 ? out : priv + (size_t)(id - 1) * T * K;
        float *gu = (float *)malloc(sizeof(float) * (size_t)T * C * 2);
        act_buf ab;
        int ok = gu && !act_alloc(&ab, T, Cp, Cp / plk_group[down_fmt]);
        if (!ok) {
            #pragma omp atomic write
            err = -1;
        } else {
            /* static: each thread sums a fixed, contiguous run of bundles, so the float sums (and the
             * tokens) are the same from run to run at a given thread count; dynamic was not */
            #pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                const uint8_t *base = (const uint8_t *)(uintptr_t)ptrs[i];
                plk_w wg = { base + offs[0], (const uint16_t *)(base + offs[1]), offs[2] >= 0 ? (const uint16_t *)(base + offs[2]) : 0 };
                plk_w wu = { base + offs[3], (const uint16_t *)(base + offs[4]), offs[5] >= 0 ? (const uint16_t *)(base + offs[5]) : 0 };
                plk_w wd = { base + offs[6], (const uint16_t *)(base + offs[7]), offs[8] >= 0 ? (const uint16_t *)(base + offs[8]) : 0 };
                float *g = gu, *u = gu + (size_t)T * C;
                fgu(&wg, 0, C, &ha, g, C, 0);
                fgu(&wu, 0, C, &ha, u, C, 0);
                for (size_t j = 0; j < (size_t)T * C; j++)
                    g[j] = (act == PLK_ACT_SILU ? silu(g[j]) : (g[j] > 0.0f ? g[j] : 0.0f)) * u[j];
                plk_act aa;
                act_prepare(isa, down_fmt, g, T, C, C, Cp, &ab, &aa);
                fd(&wd, 0, K, &aa, dst, K, 1);
            }
            act_free(&ab);
        }
        free(gu);
    }
    if (priv) {
        for (int p = 0; p < nth - 1; p++) {
            const float *src = priv + (size_t)p * T * K;
            for (size_t j = 0; j < (size_t)T * K; j++) out[j] += src[j];
        }
        free(priv);
    }
    act_free(&hb);
    return err;
}

double plk_read_probe(int isa, const uint8_t *buf, size_t n, int nthreads)
{
    double total = 0.0;
    size_t chunk = ((n / (size_t)nthreads) + 4095) & ~(size_t)4095;
    #pragma omp parallel num_threads(nthreads) reduction(+:total)
    {
        size_t i0 = (size_t)omp_get_thread_num() * chunk;
        size_t i1 = i0 + chunk < n ? i0 + chunk : n;
        if (i0 < i1) {
            size_t len = (i1 - i0) & ~(size_t)127;
            if (isa == PLK_AVX512) total += read_probe_avx512(buf + i0, len);
            else if (isa == PLK_AVX2) total += read_probe_avx2(buf + i0, len);
            else total += read_probe_generic(buf + i0, len);
        }
    }
    return total;
}

/* y (T, N) = x (T, K) @ W^T: quantizes x, then the row kernels */
int plk_matmul_f32(int isa, int fmt, int tl, const plk_w *w, int N, int K, const float *x, int T,
                   float *y, int nthreads)
{
    const int Kp = (K + plk_group[fmt] - 1) / plk_group[fmt] * plk_group[fmt];
    act_buf b;
    plk_act a;
    if (act_alloc(&b, T, Kp, Kp / plk_group[fmt])) return -1;
    act_prepare(isa, fmt, x, T, K, K, Kp, &b, &a);
    plk_matmul(isa, fmt, tl, w, N, &a, y, N, 0, nthreads);
    act_free(&b);
    return 0;
}

/* One layer's attention block, the unfused engine sequence in one call (same kernels, same order):
 *   h = rmsnorm(x, attn_norm); qkv = wqkv h (+ bqkv); RoPE on q and k (tables rcos/rsin (T, hd/2));
 *   k, v -> fp16 cache rows start..start+T-1 (kc, vc (nkv, maxP, hd)); a = attention(q, cache);
 *   x += wo a (product first, then the add, as `x += matmul(wo, a)`); h = rmsnorm(x, ffn_norm).
 * scratch: T * ((nh + 2 nkv) hd + nh hd + K) floats. */
int plk_attn_block(int isa, const plk_attn_w *lw, float eps, float *x, float *h, int T, int K,
                   uint16_t *kc, uint16_t *vc, int maxP, int start, int nh, int nkv, int hd,
                   const float *rcos, const float *rsin, float *scratch, int nthreads)
{
    const int qd = nh * hd, kd = nkv * hd, nq = qd + 2 * kd;
    float *qkv = scratch, *att = qkv + (size_t)T * nq, *y = att + (size_t)T * qd;
    plk_rmsnorm(x, lw->attn_norm, eps, h, T, K);
    if (plk_matmul_f32(isa, lw->fmt_qkv, lw->tl_qkv, &lw->wqkv, nq, K, h, T, qkv, nthreads)) return -1;
    for (int t = 0; t < T; t++) {
        float *r = qkv + (size_t)t * nq;
        if (lw->bqkv)
            for (int j = 0; j < nq; j++) r[j] += lw->bqkv[j];
        for (int g = 0; g < nkv; g++) {
            size_t c = ((size_t)g * maxP + start + t) * hd;
            plk_rope_apply(r + qd + (size_t)g * hd, 1, 1, hd, hd, rcos + (size_t)t * (hd / 2), rsin + (size_t)t * (hd / 2));
            plk_store_f16(r + qd + (size_t)g * hd, kc + c, hd);
            plk_store_f16(r + qd + kd + (size_t)g * hd, vc + c, hd);
        }
    }
    plk_rope_apply(qkv, T, nh, hd, nq, rcos, rsin);
    plk_attention_f16_ld(qkv, nq, kc, vc, T, nh, nkv, hd, maxP, start, att, nthreads);
    if (plk_matmul_f32(isa, lw->fmt_o, lw->tl_o, &lw->wo, K, qd, att, T, y, nthreads)) return -1;
    for (size_t j = 0; j < (size_t)T * K; j++) x[j] += y[j];
    plk_rmsnorm(x, lw->ffn_norm, eps, h, T, K);
    return 0;
}
