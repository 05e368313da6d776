/* Portable C kernels of the raw GGML block formats (no intrinsics): q5_0 / q5_1 against the q8 activations,
 * q4_k / q5_k / q6_k against Q8_K activations, and the Q8_K activation quantizer. Block layouts and the
 * reference numerics: powerlow/formats.py (these loops are that text, in C). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "plk.h"

/* ---- Q8_K activations: formats.quantize_act_k ---- */
void quantize_act_q8k_generic(const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs)
{
    const int S = K / 256;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < S; b++) {
            const float *v = x + (size_t)t * ldx + (size_t)b * 256;
            int8_t *q = qs + (size_t)t * K + (size_t)b * 256;
            int16_t *s = bs + (size_t)t * (K / 16) + (size_t)b * 16;
            float amax = 0.0f, mx = 0.0f;
            for (int i = 0; i < 256; i++) {
                const float a = fabsf(v[i]);
                if (a > amax) { amax = a; mx = v[i]; }
            }
            if (amax == 0.0f) {
                memset(q, 0, 256);
                memset(s, 0, 32);
                d[(size_t)t * S + b] = 0.0f;
                continue;
            }
            const float is = -127.0f / mx;
            for (int j = 0; j < 16; j++) {
                int sum = 0;
                for (int i = 0; i < 16; i++) {
                    int qi = (int)rintf(is * v[16 * j + i]);
                    if (qi > 127) qi = 127;
                    q[16 * j + i] = (int8_t)qi;
                    sum += qi;
                }
                s[j] = (int16_t)sum;
            }
            d[(size_t)t * S + b] = 1.0f / is;
        }
}

/* ---- q5_0 / q5_1 (32-blocks, q8 activations): the rows_generic numerics of plk_generic.c ---- */
static inline void q5_codes(const uint8_t *blk, int off, uint8_t *c)
{
    uint32_t qh;
    memcpy(&qh, blk + off, 4);
    const uint8_t *ql = blk + off + 4;
    for (int i = 0; i < 16; i++) {
        c[i] = (uint8_t)((ql[i] & 15) | (((qh >> i) & 1) << 4));
        c[i + 16] = (uint8_t)((ql[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
    }
}

static void rows_q5_generic(int fmt, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{
    const int nb = a->nb, QB = plk_qbytes[fmt], off = fmt == PLK_Q5_1 ? 4 : 2;
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->qs + (size_t)r * nb * QB;
        for (int t = 0; t < a->T; t++) {
            const int8_t *x = a->qs + (size_t)t * a->Kp;
            const float *dx = a->dx + (size_t)t * nb, *bx = a->bx + (size_t)t * a->ng;
            float sum = 0.0f, bsum = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = row + (size_t)b * QB;
                uint16_t hd, hm;
                memcpy(&hd, blk, 2);
                uint8_t c[32];
                q5_codes(blk, off, c);
                int id = 0;
                for (int i = 0; i < 32; i++) id += (int)c[i] * x[b * 32 + i];
                const float dw = plk_h2f(hd);
                sum += (dw * dx[b]) * (float)id;
                float bw = -16.0f * dw;
                if (fmt == PLK_Q5_1) { memcpy(&hm, blk + 2, 2); bw = plk_h2f(hm); }
                bsum += bw * bx[b];
            }
            float *o = y + (size_t)t * ldy + r;
            *o = (acc ? *o : 0.0f) + sum + bsum;
        }
    }
}

void rows_q5_0_q8_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_q5_generic(PLK_Q5_0, w, r0, r1, a, y, ldy, acc); }
void rows_q5_1_q8_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_q5_generic(PLK_Q5_1, w, r0, r1, a, y, ldy, acc); }

/* ---- K-quants ---- */
static inline void k_scale_min(const uint8_t *s, int *sc, int *mn)
{
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
}

/* one super-block against one token: y <- the formats._matmul_ref_k steps */
static inline float kq_block(int fmt, const uint8_t *blk, const int8_t *x, const int16_t *bs, float dx, float y)
{
    if (fmt == PLK_Q6_K) {
        const uint8_t *ql = blk, *qh = blk + 128;
        const int8_t *sc = (const int8_t *)(blk + 192);
        uint16_t hd;
        memcpy(&hd, blk + 208, 2);
        int isum = 0;
        for (int j = 0; j < 16; j++) {
            int dot = 0;
            for (int i = 0; i < 16; i++) {
                const int e = 16 * j + i, h = e >> 7, k = (e >> 5) & 3, l = e & 31;
                const int lo = (ql[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
                const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
                dot += (lo | (hi << 4)) * x[e];
            }
            isum += sc[j] * (dot - 32 * bs[j]);
        }
        return fmaf((float)isum, plk_h2f(hd) * dx, y);
    }
    uint16_t hd, hm;
    memcpy(&hd, blk, 2);
    memcpy(&hm, blk + 2, 2);
    int sc[8], mn[8];
    k_scale_min(blk + 4, sc, mn);
    const uint8_t *qh = blk + 16, *qs = fmt == PLK_Q4_K ? blk + 16 : blk + 48;
    int isum = 0, imin = 0;
    for (int j = 0; j < 8; j++) {
        int dot = 0;
        for (int l = 0; l < 32; l++) {
            int c = (qs[32 * (j >> 1) + l] >> (4 * (j & 1))) & 15;
            if (fmt == PLK_Q5_K) c |= ((qh[l] >> j) & 1) << 4;
            dot += c * x[32 * j + l];
        }
        isum += sc[j] * dot;
        imin += mn[j] * (bs[2 * j] + bs[2 * j + 1]);
    }
    y = fmaf((float)isum, plk_h2f(hd) * dx, y);
    return fmaf((float)imin, -(plk_h2f(hm) * dx), y);
}

static void rows_kq_generic(int fmt, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{
    const int S = a->ng, QB = plk_qbytes[fmt];
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->qs + (size_t)r * S * QB;
        for (int t = 0; t < a->T; t++) {
            const int8_t *x = a->qs + (size_t)t * a->Kp;
            const int16_t *bs = a->bs + (size_t)t * (a->Kp / 16);
            const float *dx = a->dx + (size_t)t * S;
            float v = 0.0f;
            for (int b = 0; b < S; b++) v = kq_block(fmt, row + (size_t)b * QB, x + 256 * b, bs + 16 * b, dx[b], v);
            float *o = y + (size_t)t * ldy + r;
            *o = acc ? *o + v : v;
        }
    }
}

void rows_q4_k_q8k_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq_generic(PLK_Q4_K, w, r0, r1, a, y, ldy, acc); }
void rows_q5_k_q8k_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq_generic(PLK_Q5_K, w, r0, r1, a, y, ldy, acc); }
void rows_q6_k_q8k_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq_generic(PLK_Q6_K, w, r0, r1, a, y, ldy, acc); }
