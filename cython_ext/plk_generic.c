#include <math.h>
/* Portable C variant (any x86-64): scalar code the compiler may auto-vectorise for SSE2.
 * Also the table-lookup (T-MAC style) kernels for q2, tern and q1. */
#include <stdlib.h>
#include <string.h>
#include "plk.h"

/* ---- activation quantization: the exact numerics of formats.quantize_act ---- */
void quantize_act_q8_generic(const float *x, int T, int K, int ldx, int Kp,
                             int8_t *qs, float *dx, float *s, int32_t *isum)
{
    int nb = Kp / 32;
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * ldx;
        for (int b = 0; b < nb; b++) {
            float v[32];
            for (int i = 0; i < 32; i++) {
                int k = b * 32 + i;
                v[i] = k < K ? xr[k] : 0.0f;
            }
            float amax = 0.0f;
            for (int i = 0; i < 32; i++) { float a = v[i] < 0 ? -v[i] : v[i]; amax = a > amax ? a : amax; }
            float d = amax / 127.0f;
            float id = d != 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            int8_t *q = qs + (size_t)t * Kp + b * 32;
            for (int i = 0; i < 32; i++) {
                float p = v[i] * id;
                float a = p < 0 ? -p : p;
                float r = __builtin_floorf(a + 0.5f);
                int qi = (int)(p < 0 ? -r : r);
                q[i] = (int8_t)qi;
                sum += qi;
            }
            dx[(size_t)t * nb + b] = plk_h2f(plk_f2h(d));
            s[(size_t)t * nb + b] = plk_h2f(plk_f2h(d * (float)sum));
            isum[(size_t)t * nb + b] = sum;
        }
    }
}

/* ---- multiply-add kernels ---- */

/* unsigned codes (signed for q8) of one 32-block: block j (0/1) of group g */
static inline void unpack32(int fmt, const uint8_t *qs, int g, int j, int8_t *c)
{
    switch (fmt) {
    case PLK_Q8: memcpy(c, qs + (size_t)g * 32, 32); break;
    case PLK_Q4_0: case PLK_Q4_1: {
        const uint8_t *p = qs + (size_t)g * 16;
        for (int i = 0; i < 16; i++) { c[i] = p[i] & 15; c[i + 16] = p[i] >> 4; }
        break; }
    case PLK_Q2: case PLK_TERN: {
        const uint8_t *p = qs + (size_t)g * 16;
        for (int i = 0; i < 16; i++) { c[i] = (p[i] >> (4 * j)) & 3; c[i + 16] = (p[i] >> (4 * j + 2)) & 3; }
        break; }
    case PLK_Q1: {
        const uint8_t *p = qs + (size_t)g * 8;
        for (int s2 = 0; s2 < 4; s2++)
            for (int i = 0; i < 8; i++) c[s2 * 8 + i] = (p[i] >> (4 * j + s2)) & 1;
        break; }
    }
}

static inline float amul(int fmt) { return fmt == PLK_Q1 ? 2.0f : 1.0f; }

/* offset weight Bw of group g (see plk.h) */
static inline float bweight(int fmt, const plk_w *w, size_t gi)
{
    switch (fmt) {
    case PLK_Q4_1: case PLK_Q2: return plk_h2f(w->m[gi]);
    case PLK_Q4_0: return -8.0f * plk_h2f(w->d[gi]);
    case PLK_TERN: case PLK_Q1: return -plk_h2f(w->d[gi]);
    default: return 0.0f;
    }
}

static inline void rows_generic(int fmt, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{
    const int per = plk_group[fmt] / 32, ng = a->ng, nb = a->nb;
    const size_t rowq = (size_t)ng * plk_qbytes[fmt];
    const float A = amul(fmt);
    for (int r = r0; r < r1; r++) {
        const uint8_t *qs = w->qs + (size_t)r * rowq;
        for (int t = 0; t < a->T; t++) {
            const int8_t *x = a->qs + (size_t)t * a->Kp;
            const float *dx = a->dx + (size_t)t * nb, *bx = a->bx + (size_t)t * ng;
            float sum = 0.0f, bsum = 0.0f;
            for (int g = 0; g < ng; g++) {
                float dw = A * plk_h2f(w->d[(size_t)r * ng + g]);
                for (int j = 0; j < per; j++) {
                    int8_t c[32];
                    int b = g * per + j, id = 0;
                    unpack32(fmt, qs, g, j, c);
                    if (fmt == PLK_Q8) for (int i = 0; i < 32; i++) id += (int)c[i] * x[b * 32 + i];
                    else for (int i = 0; i < 32; i++) id += (int)(uint8_t)c[i] * x[b * 32 + i];
                    sum += (dw * dx[b]) * (float)id;
                }
                if (fmt != PLK_Q8) bsum += bweight(fmt, w, (size_t)r * ng + g) * bx[g];
            }
            float *o = y + (size_t)t * ldy + r;
            *o = (acc ? *o : 0.0f) + sum + bsum;
        }
    }
}

#define ROWS(F, ID) \
void rows_##F##_q8_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc) \
{ rows_generic(ID, w, r0, r1, a, y, ldy, acc); }
ROWS(q8, PLK_Q8)
ROWS(q4_0, PLK_Q4_0)
ROWS(q4_1, PLK_Q4_1)
ROWS(q2, PLK_Q2)
ROWS(tern, PLK_TERN)
ROWS(q1, PLK_Q1)

/* ---- table-lookup kernels (T-MAC / bitnet "TL" idea, our own code) ----
 * Per token, for every 4 consecutive activations of a block (q1) or 2 (q2, tern: 2 bits each) a
 * 16-entry int16 table holds the dot of that activation slice with every possible code nibble; a
 * row then costs two table reads per code byte instead of 8 (q1) or 4 multiply-adds.
 * Our bit order packs element 8s+i (q1) / 16s+i (q2) into byte i, so a nibble of one byte does not
 * hold neighbouring elements: the table is indexed by the *byte position* i and nibble half h, and
 * spans the activations {i, i+8, i+16, i+24} (q1, h=0: bits 0..3 of byte i -> elements 8s+i, s=0..3)
 * or {16s+i : s in (2h, 2h+1)} (q2). Tables are built once per token and reused by every row.
 * The integer result is exact, so these kernels are drop-in replacements of the multiply-add ones. */
static inline void rowstl(int fmt, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{
    const int ng = a->ng, nb = a->nb, bpg = plk_qbytes[fmt];   /* bytes per group */
    const size_t rowq = (size_t)ng * bpg;
    const float A = amul(fmt);
    /* tables: per group, per byte i (bpg), per nibble half h (2): 16 int16 */
    int16_t *tab = (int16_t *)plk_scratch((size_t)ng * bpg * 2 * 16 * sizeof(int16_t), 0);
    if (!tab) { plk_oom_set(); return; }
    for (int t = 0; t < a->T; t++) {
        const int8_t *x = a->qs + (size_t)t * a->Kp;
        const float *dx = a->dx + (size_t)t * nb, *bx = a->bx + (size_t)t * ng;
        for (int g = 0; g < ng; g++) {
            const int8_t *xg = x + (size_t)g * 64;
            for (int i = 0; i < bpg; i++)
                for (int h = 0; h < 2; h++) {
                    int16_t *tb = tab + (((size_t)g * bpg + i) * 2 + h) * 16;
                    for (int v = 0; v < 16; v++) {
                        int s = 0;
                        if (fmt == PLK_Q1) {       /* bits 4h..4h+3 -> elements 8(4h+k)+i */
                            for (int k = 0; k < 4; k++) if (v >> k & 1) s += xg[8 * (4 * h + k) + i];
                        } else {                   /* 2-bit fields 2h, 2h+1 -> elements 16(2h+k)+i */
                            for (int k = 0; k < 2; k++) s += ((v >> (2 * k)) & 3) * xg[16 * (2 * h + k) + i];
                        }
                        tb[v] = (int16_t)s;
                    }
                }
        }
        for (int r = r0; r < r1; r++) {
            const uint8_t *qs = w->qs + (size_t)r * rowq;
            float sum = 0.0f, bsum = 0.0f;
            for (int g = 0; g < ng; g++) {
                /* the two 32-blocks of a group have their own activation scales: split the lookups */
                int id0 = 0, id1 = 0;
                const int16_t *tg = tab + (size_t)g * bpg * 32;
                const uint8_t *p = qs + (size_t)g * bpg;
                for (int i = 0; i < bpg; i++) {
                    id0 += tg[(i * 2 + 0) * 16 + (p[i] & 15)];
                    id1 += tg[(i * 2 + 1) * 16 + (p[i] >> 4)];
                }
                float dw = A * plk_h2f(w->d[(size_t)r * ng + g]);
                sum += (dw * dx[2 * g]) * (float)id0 + (dw * dx[2 * g + 1]) * (float)id1;
                bsum += bweight(fmt, w, (size_t)r * ng + g) * bx[g];
            }
            float *o = y + (size_t)t * ldy + r;
            *o = (acc ? *o : 0.0f) + sum + bsum;
        }
    }
    free(tab);
}

#define ROWSTL(F, ID) \
void rowstl_##F##_q8_generic(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc) \
{ rowstl(ID, w, r0, r1, a, y, ldy, acc); }
ROWSTL(q2, PLK_Q2)
ROWSTL(tern, PLK_TERN)
ROWSTL(q1, PLK_Q1)

double read_probe_generic(const uint8_t *buf, size_t n)
{
    const uint64_t *p = (const uint64_t *)buf;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t m = n / 32;
    for (size_t i = 0; i < m; i++) { s0 += p[4 * i]; s1 += p[4 * i + 1]; s2 += p[4 * i + 2]; s3 += p[4 * i + 3]; }
    return (double)(s0 + s1 + s2 + s3);
}

/* g[i] = act(g[i]) * u[i] */
void gated_generic(float *g, const float *u, size_t n, int act)
{
    for (size_t i = 0; i < n; i++) {
        g[i] = plk_act_scalar(g[i], act) * u[i];
    }
}
