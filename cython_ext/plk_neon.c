/* AArch64 NEON variants (phones, Raspberry Pi 4/5, Graviton, Apple M under Linux). Compiles to nothing off aarch64.
 *
 * Three variants of the row kernels (plk_neon_rows.h, compiled three times inside `#pragma GCC target`
 * regions, i.e. per-function target attributes; the rest of the build, the portable C included, stays at the
 * baseline armv8-a, so GCC cannot auto-vectorise the reference kernels into instructions a CPU may lack):
 *   neon     plain ASIMD (vmull_s8 + vpadalq_s16)        every AArch64 CPU (Cortex-A53/A72: Pi 3/4)
 *   dotprod  + sdot (vdotq_s32)                          HWCAP_ASIMDDP (Cortex-A55/A76: Pi 5, Graviton 2)
 *   i8mm     + smmla (vmmlaq_s32) for token pairs        HWCAP2_I8MM  (Graviton 3/4, Cortex-A710/X2+)
 * chosen at run time from getauxval (plk_detect_isa, plk_common.c). All three give the portable C kernels' bits
 * (see plk_neon_rows.h for why); the activation quantizers (bit-exact with formats.quantize_act /
 * quantize_act_k), the gated activation and the read probe are plain NEON, shared by the three.
 * Speed on real ARM hardware has not been measured (the tests run under qemu-user). */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "plk.h"

#define AI static inline __attribute__((always_inline))

/* ---- q8 activations: the steps of quantize_act_q8_generic (and formats.quantize_act), 4 lanes at a time ---- */
void quantize_act_q8_neon(const float *x, int T, int K, int ldx, int Kp, int8_t *qs, float *dx, float *s, int32_t *isum)
{
    const int nb = Kp / 32;
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * ldx;
        for (int b = 0; b < nb; b++) {
            float tmp[32];
            const float *v = xr + (size_t)b * 32;
            if (b * 32 + 32 > K) {                      /* the zero-padded tail block */
                for (int i = 0; i < 32; i++) tmp[i] = b * 32 + i < K ? xr[b * 32 + i] : 0.0f;
                v = tmp;
            }
            float32x4_t f[8], m = vdupq_n_f32(0.0f);
            for (int i = 0; i < 8; i++) {
                f[i] = vld1q_f32(v + 4 * i);
                m = vmaxnmq_f32(m, vabsq_f32(f[i]));    /* maxnm: a NaN is passed over, as the generic's compare */
            }
            const float amax = vmaxnmvq_f32(m);
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            int32x4_t sum4 = vdupq_n_s32(0);
            int32x4_t qi[8];
            for (int i = 0; i < 8; i++) {
                const float32x4_t p = vmulq_n_f32(f[i], id);
                const float32x4_t r = vrndmq_f32(vaddq_f32(vabsq_f32(p), vdupq_n_f32(0.5f)));   /* floor(|p| + 0.5) */
                const int32x4_t ri = vcvtq_s32_f32(r);
                qi[i] = vbslq_s32(vcltq_f32(p, vdupq_n_f32(0.0f)), vnegq_s32(ri), ri);
                sum4 = vaddq_s32(sum4, qi[i]);
            }
            int8_t *q = qs + (size_t)t * Kp + (size_t)b * 32;
            for (int i = 0; i < 8; i += 2) {
                const int16x8_t h = vcombine_s16(vmovn_s32(qi[i]), vmovn_s32(qi[i + 1]));
                vst1_s8(q + 4 * i, vmovn_s16(h));
            }
            const int sum = vaddvq_s32(sum4);
            dx[(size_t)t * nb + b] = plk_h2f(plk_f2h(d));
            s[(size_t)t * nb + b] = plk_h2f(plk_f2h(d * (float)sum));
            isum[(size_t)t * nb + b] = sum;
        }
    }
}

/* ---- Q8_K activations: quantize_act_q8k_generic's steps (round half to even, clamp at 127) ---- */
void quantize_act_q8k_neon(const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs)
{
    const int S = K / 256;
    for (int t = 0; t < T; t++)
        for (int b = 0; b < S; b++) {
            const float *v = x + (size_t)t * ldx + (size_t)b * 256;
            int8_t *q = qs + (size_t)t * K + (size_t)b * 256;
            int16_t *sm = bs + (size_t)t * (K / 16) + (size_t)b * 16;
            float32x4_t m = vdupq_n_f32(0.0f);
            for (int i = 0; i < 256; i += 4) m = vmaxnmq_f32(m, vabsq_f32(vld1q_f32(v + i)));   /* NaN passed over */
            const float amax = vmaxnmvq_f32(m);
            if (amax == 0.0f) {
                memset(q, 0, 256);
                memset(sm, 0, 32);
                d[(size_t)t * S + b] = 0.0f;
                continue;
            }
            int i0 = 0;                                  /* the first element of largest |x| gives the sign */
            while (i0 < 255 && fabsf(v[i0]) != amax) i0++;
            const float is = -127.0f / v[i0];
            for (int j = 0; j < 16; j++) {
                int32x4_t qi[4];
                for (int k = 0; k < 4; k++)
                    qi[k] = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(v + 16 * j + 4 * k), is)), vdupq_n_s32(127));
                const int16x8_t h0 = vcombine_s16(vmovn_s32(qi[0]), vmovn_s32(qi[1]));
                const int16x8_t h1 = vcombine_s16(vmovn_s32(qi[2]), vmovn_s32(qi[3]));
                vst1q_s8(q + 16 * j, vcombine_s8(vmovn_s16(h0), vmovn_s16(h1)));
                sm[j] = (int16_t)vaddvq_s32(vaddq_s32(vaddq_s32(qi[0], qi[1]), vaddq_s32(qi[2], qi[3])));
            }
            d[(size_t)t * S + b] = 1.0f / is;
        }
}

/* ---- gated activation g = act(g) * u ----
 * relu: exact (the generic's select, then the product). silu / gelu_tanh: g / (1 + e^y) with e^y from a
 * vector exp (2^n * degree-6 Taylor of e^r, |r| <= ln2/2, the same construction as plk_exp.h's AVX2 exp8):
 * an ulp or two from libm's expf, so these differ from gated_generic by a few ulps (the harness checks
 * relative 1e-6 against it). */
AI float32x4_t exp4(float32x4_t x)
{
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
    const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.0f / 720);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

void gated_neon(float *g, const float *u, size_t n, int act)
{
    size_t i = 0;
    const float32x4_t one = vdupq_n_f32(1.0f), zero = vdupq_n_f32(0.0f);
    for (; i + 4 <= n; i += 4) {
        const float32x4_t gv = vld1q_f32(g + i);
        float32x4_t a;
        if (act == PLK_ACT_SILU)
            a = vdivq_f32(gv, vaddq_f32(one, exp4(vnegq_f32(gv))));
        else if (act == PLK_ACT_GELU_TANH) {
            const float32x4_t g3 = vmulq_f32(vmulq_f32(gv, gv), gv);
            const float32x4_t yv = vmulq_n_f32(vfmaq_n_f32(gv, g3, PLK_GELU_A), -2.0f * PLK_GELU_C);
            a = vdivq_f32(gv, vaddq_f32(one, exp4(yv)));
        } else
            a = vbslq_f32(vcgtq_f32(gv, zero), gv, zero);
        vst1q_f32(g + i, vmulq_f32(a, vld1q_f32(u + i)));
    }
    for (; i < n; i++) g[i] = plk_act_scalar(g[i], act) * u[i];
}

/* ---- plain read of buf (bandwidth probe): the sum of its 64-bit words, as read_probe_generic ---- */
double read_probe_neon(const uint8_t *buf, size_t n)
{
    uint64x2_t s0 = vdupq_n_u64(0), s1 = s0, s2 = s0, s3 = s0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        s0 = vaddq_u64(s0, vreinterpretq_u64_u8(vld1q_u8(buf + i)));
        s1 = vaddq_u64(s1, vreinterpretq_u64_u8(vld1q_u8(buf + i + 16)));
        s2 = vaddq_u64(s2, vreinterpretq_u64_u8(vld1q_u8(buf + i + 32)));
        s3 = vaddq_u64(s3, vreinterpretq_u64_u8(vld1q_u8(buf + i + 48)));
    }
    for (; i + 32 <= n; i += 32) {
        s0 = vaddq_u64(s0, vreinterpretq_u64_u8(vld1q_u8(buf + i)));
        s1 = vaddq_u64(s1, vreinterpretq_u64_u8(vld1q_u8(buf + i + 16)));
    }
    const uint64x2_t s = vaddq_u64(vaddq_u64(s0, s1), vaddq_u64(s2, s3));
    return (double)(vgetq_lane_u64(s, 0) + vgetq_lane_u64(s, 1));
}

/* ---- the row kernels, three times ---- */
#define SUFFIX neon
#define PLK_NEON_MODE 0
#include "plk_neon_rows.h"
#undef SUFFIX
#undef PLK_NEON_MODE

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")   /* every dotprod CPU is armv8.2-a or later */
#define SUFFIX dotprod
#define PLK_NEON_MODE 1
#include "plk_neon_rows.h"
#undef SUFFIX
#undef PLK_NEON_MODE
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod+i8mm")   /* i8mm CPUs (armv8.6-a) have dotprod */
#define SUFFIX i8mm
#define PLK_NEON_MODE 2
#include "plk_neon_rows.h"
#undef SUFFIX
#undef PLK_NEON_MODE
#pragma GCC pop_options

#endif /* __aarch64__ */
