/* The NEON row kernels, written once and compiled three times by plk_neon.c inside `#pragma GCC target`
 * regions (per-function target attributes, no -march flag):
 *
 *   SUFFIX neon    MODE 0  plain ASIMD: byte dots by vmull_s8 + vpadalq_s16 (every AArch64 CPU)
 *   SUFFIX dotprod MODE 1  +dotprod: byte dots by vdotq_s32 (sdot; Cortex-A55/A76+, Graviton 2+, Apple M)
 *   SUFFIX i8mm    MODE 2  +dotprod+i8mm: 2 rows x 2 tokens by vmmlaq_s32 (smmla) where T >= 2 (Graviton 3+,
 *                          Cortex-A510/A710/X2+, Apple M2+); single tokens (decode, an odd last token) as MODE 1
 *
 * Numerics: every variant computes the same integers (a block's dot is exact whatever instruction forms it)
 * and then exactly the float operations of the portable C kernels (plk_generic.c, plk_kq_generic.c), in
 * their order, each (row, token) in its own vector lane: the q8-activation formats
 *     sum = sum + (dw * dx_b) * (float)idot_b   (block by block),  bsum = bsum + bw * bx_g   (group by group),
 *     y = ((accumulate ? y : 0) + sum) + bsum
 * with separate multiplies and adds (the extension is built with -ffp-contract=off on aarch64, so neither this
 * file nor the portable C gets fused multiply-adds it did not ask for), and the K-quants
 *     y = fma((float)isum, d * dx, y) [; y = fma((float)imin, -(dmin * dx), y)]   (super-block by super-block)
 * as vfmaq_f32 = fmaf. So a NEON variant's output is bit-identical to the generic variant's (and, for the
 * K-quants, to formats.matmul_ref), and a token's output does not depend on the batch it is in.
 *
 * Loop shape: 4 rows in the 4 lanes of a float32x4 (the last tile of r1 - r0 % 4 rows repeats its last
 * row in the unused lanes and stores only the valid ones) against a tile of up to 4 tokens; a 32-block of
 * codes is unpacked once per tile into 32 bytes in element order (two int8x16) and dotted with each
 * token's activations; the 4 rows' int32 partial sums are folded by two vpaddq into one vector of
 * [row 0, 1, 2, 3] block dots. */

#define CAT3_(a, b, c) a##b##c
#define CAT3(a, b, c) CAT3_(a, b, c)
#define NAME(f) CAT3(f, _, SUFFIX)
#define NAMEI(f) CAT3(f, _i_, SUFFIX)

/* ---- byte dots ---- */

/* int32x4 partial sums (lane sums = the dot) of 32 codes (lo: elements 0..15, hi: 16..31) with 32
 * activations; plain NEON takes every int8 x int8 product exactly in int16 (|p| <= 16384) */
AI int32x4_t NAMEI(dot32)(const int M, int8x16_t c0, int8x16_t c1, int8x16_t x0, int8x16_t x1)
{
#if PLK_NEON_MODE >= 1
    if (M >= 1) return vdotq_s32(vdotq_s32(vdupq_n_s32(0), c0, x0), c1, x1);
#endif
    int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(c0), vget_low_s8(x0)));
    s = vpadalq_s16(s, vmull_high_s8(c0, x0));
    s = vpadalq_s16(s, vmull_s8(vget_low_s8(c1), vget_low_s8(x1)));
    return vpadalq_s16(s, vmull_high_s8(c1, x1));
}

/* one 16-byte half: the same, 16 elements */
AI int32x4_t NAMEI(dot16)(const int M, int8x16_t c, int8x16_t x)
{
#if PLK_NEON_MODE >= 1
    if (M >= 1) return vdotq_s32(vdupq_n_s32(0), c, x);
#endif
    int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(c), vget_low_s8(x)));
    return vpadalq_s16(s, vmull_high_s8(c, x));
}

/* [lane sums of a, b, c, d] */
AI int32x4_t NAMEI(fold4)(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d)
{
    return vpaddq_s32(vpaddq_s32(a, b), vpaddq_s32(c, d));
}

#if PLK_NEON_MODE >= 2
/* 2 rows (a, b) x 2 tokens (u, v) over 16 elements: [a.u, a.v, b.u, b.v] added into acc. smmla takes
 * two 2x8 int8 matrices (rows = the 8-byte halves of a register): the row pair and the token pair are
 * interleaved 8 elements at a time by zip1/zip2 on 64-bit lanes. */
AI int32x4_t NAMEI(mm16)(int32x4_t acc, int8x16_t a, int8x16_t b, int8x16_t u, int8x16_t v)
{
    const int64x2_t A = vreinterpretq_s64_s8(a), B = vreinterpretq_s64_s8(b);
    const int64x2_t U = vreinterpretq_s64_s8(u), V = vreinterpretq_s64_s8(v);
    acc = vmmlaq_s32(acc, vreinterpretq_s8_s64(vzip1q_s64(A, B)), vreinterpretq_s8_s64(vzip1q_s64(U, V)));
    return vmmlaq_s32(acc, vreinterpretq_s8_s64(vzip2q_s64(A, B)), vreinterpretq_s8_s64(vzip2q_s64(U, V)));
}
#endif

/* ---- the q8-activation formats (q8, q4_0, q4_1, q2, tern, q1, q5_0, q5_1) ---- */

/* 32 codes of block j (0/1) of group g of a row (rowq: the row's code plane, or its first raw block) in
 * element order, the bit orders of formats.py: the unpack32 / q5_codes of the portable C */
AI void NAMEI(codes32)(const int FMT, const uint8_t *rowq, int g, int j, int8x16_t *c0, int8x16_t *c1)
{
    if (FMT == PLK_Q8) {
        *c0 = vld1q_s8((const int8_t *)rowq + (size_t)g * 32);
        *c1 = vld1q_s8((const int8_t *)rowq + (size_t)g * 32 + 16);
    } else if (FMT == PLK_Q4_0 || FMT == PLK_Q4_1) {
        const uint8x16_t v = vld1q_u8(rowq + (size_t)g * 16);
        *c0 = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(15)));
        *c1 = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    } else if (FMT == PLK_Q2 || FMT == PLK_TERN) {      /* element i: bits 4j..4j+1, i + 16: bits 4j+2..4j+3 */
        const uint8x16_t v = vshlq_u8(vld1q_u8(rowq + (size_t)g * 16), vdupq_n_s8((int8_t)(-4 * j)));
        *c0 = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(3)));
        *c1 = vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(v, 2), vdupq_n_u8(3)));
    } else if (FMT == PLK_Q1) {                          /* element 8s + i: bit 4j + s of byte i */
        const uint8x8_t b = vld1_u8(rowq + (size_t)g * 8);
        const uint8x16_t v = vcombine_u8(b, b);
        const int8x16_t s01 = vcombine_s8(vdup_n_s8((int8_t)(-4 * j)), vdup_n_s8((int8_t)(-4 * j - 1)));
        const int8x16_t s23 = vcombine_s8(vdup_n_s8((int8_t)(-4 * j - 2)), vdup_n_s8((int8_t)(-4 * j - 3)));
        *c0 = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(v, s01), vdupq_n_u8(1)));
        *c1 = vreinterpretq_s8_u8(vandq_u8(vshlq_u8(v, s23), vdupq_n_u8(1)));
    } else {                                             /* q5_0 / q5_1 raw block g: d [m] qh(4) ql(16) */
        const int off = FMT == PLK_Q5_1 ? 4 : 2;
        const uint8_t *blk = rowq + (size_t)g * plk_qbytes[FMT];
        uint32_t qh;
        memcpy(&qh, blk + off, 4);
        const uint8x16_t ql = vld1q_u8(blk + off + 4);
        const uint8x16_t bits = vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull));
        /* bit i of qh -> 0x10 in byte i: qh byte k broadcast over bytes 8k..8k+7, tested against 1 << (i % 8) */
        const uint8x16_t h0 = vcombine_u8(vdup_n_u8((uint8_t)qh), vdup_n_u8((uint8_t)(qh >> 8)));
        const uint8x16_t h1 = vcombine_u8(vdup_n_u8((uint8_t)(qh >> 16)), vdup_n_u8((uint8_t)(qh >> 24)));
        const uint8x16_t x10 = vdupq_n_u8(0x10);
        *c0 = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(ql, vdupq_n_u8(15)), vandq_u8(vtstq_u8(h0, bits), x10)));
        *c1 = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(ql, 4), vandq_u8(vtstq_u8(h1, bits), x10)));
    }
}

/* fp16 -> float of 4 values by FCVTL: exact, the same numbers as plk_h2f (a signalling-NaN scale would come out
 * quiet; no real weights have one) */
AI float32x4_t NAMEI(h2f4)(const uint16_t *h) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))); }

/* dw = A * d and the offset weight bw (plk.h) of group g of the 4 lane rows, the portable C's values: A * d is d
 * (A = 1) or 2d, and the -8d / -16d / -d offsets are exact scalings as there */
AI void NAMEI(gscale4)(const int FMT, const plk_w *w, const size_t *rr, const uint8_t *const *q, int ng, int g,
                        float32x4_t *dw, float32x4_t *bw)
{
    uint16_t hd[4], hm[4] = { 0, 0, 0, 0 };
    for (int i = 0; i < 4; i++) {
        if (FMT == PLK_Q5_0 || FMT == PLK_Q5_1) {
            const uint8_t *blk = q[i] + (size_t)g * plk_qbytes[FMT];
            memcpy(&hd[i], blk, 2);
            if (FMT == PLK_Q5_1) memcpy(&hm[i], blk + 2, 2);
        } else {
            hd[i] = w->d[rr[i] * (size_t)ng + g];
            if (plk_has_min[FMT]) hm[i] = w->m[rr[i] * (size_t)ng + g];
        }
    }
    const float32x4_t d = NAMEI(h2f4)(hd);
    *dw = FMT == PLK_Q1 ? vmulq_n_f32(d, 2.0f) : d;
    if (FMT == PLK_Q5_1 || FMT == PLK_Q4_1 || FMT == PLK_Q2) *bw = NAMEI(h2f4)(hm);
    else if (FMT == PLK_Q5_0) *bw = vmulq_n_f32(d, -16.0f);
    else if (FMT == PLK_Q4_0) *bw = vmulq_n_f32(d, -8.0f);
    else if (FMT == PLK_TERN || FMT == PLK_Q1) *bw = vnegq_f32(d);
    else *bw = vdupq_n_f32(0.0f);
}

/* y rows rr[0..3] (nr valid), tokens t0..t0+NT-1: the portable C's float steps per lane. MM: the token
 * pairs by smmla (MODE 2; NT even) */
AI void NAMEI(q8a_tile)(const int FMT, const int M, const int MM, const int NT, const plk_w *w, const size_t *rr,
                         int nr, const plk_act *a, int t0, float *y, int ldy, int accumulate)
{
    const int per = plk_group[FMT] / 32, ng = a->ng, nb = a->nb;
    const size_t rowq = (size_t)ng * plk_qbytes[FMT];
    const uint8_t *q[4];
    for (int i = 0; i < 4; i++) q[i] = w->qs + rr[i] * rowq;
    const int8_t *xp[4];
    const float *dxp[4], *bxp[4];
    float32x4_t sum[4], bsum[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xp[t] = a->qs + (size_t)(t0 + t) * a->Kp;
        dxp[t] = a->dx + (size_t)(t0 + t) * nb;
        bxp[t] = FMT == PLK_Q8 ? NULL : a->bx + (size_t)(t0 + t) * ng;
        sum[t] = vdupq_n_f32(0.0f);
        bsum[t] = vdupq_n_f32(0.0f);
    }
    for (int g = 0; g < ng; g++) {
        float32x4_t dwv, bwv;
        NAMEI(gscale4)(FMT, w, rr, q, ng, g, &dwv, &bwv);
        __builtin_prefetch(q[0] + (size_t)g * plk_qbytes[FMT] + 512);
        __builtin_prefetch(q[3] + (size_t)g * plk_qbytes[FMT] + 512);
        for (int j = 0; j < per; j++) {
            const int b = g * per + j;
            int8x16_t c[4][2];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) NAMEI(codes32)(FMT, q[i], g, j, &c[i][0], &c[i][1]);
#if PLK_NEON_MODE >= 2
            if (MM) {
#pragma GCC unroll 2
                for (int t = 0; t < NT; t += 2) {
                    const int8_t *xu = xp[t] + (size_t)b * 32, *xv = xp[t + 1] + (size_t)b * 32;
                    const int8x16_t u0 = vld1q_s8(xu), u1 = vld1q_s8(xu + 16);
                    const int8x16_t v0 = vld1q_s8(xv), v1 = vld1q_s8(xv + 16);
                    int32x4_t p01 = vdupq_n_s32(0), p23 = vdupq_n_s32(0);
                    p01 = NAMEI(mm16)(p01, c[0][0], c[1][0], u0, v0);
                    p01 = NAMEI(mm16)(p01, c[0][1], c[1][1], u1, v1);
                    p23 = NAMEI(mm16)(p23, c[2][0], c[3][0], u0, v0);
                    p23 = NAMEI(mm16)(p23, c[2][1], c[3][1], u1, v1);
                    /* p01 = [r0.u, r0.v, r1.u, r1.v], p23 the same for rows 2, 3 */
                    const int32x4_t du = vuzp1q_s32(p01, p23), dv = vuzp2q_s32(p01, p23);
                    sum[t] = vaddq_f32(sum[t], vmulq_f32(vmulq_n_f32(dwv, dxp[t][b]), vcvtq_f32_s32(du)));
                    sum[t + 1] = vaddq_f32(sum[t + 1], vmulq_f32(vmulq_n_f32(dwv, dxp[t + 1][b]), vcvtq_f32_s32(dv)));
                }
                continue;
            }
#endif
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const int8_t *x = xp[t] + (size_t)b * 32;
                const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
                const int32x4_t id = NAMEI(fold4)(NAMEI(dot32)(M, c[0][0], c[0][1], x0, x1), NAMEI(dot32)(M, c[1][0], c[1][1], x0, x1),
                                                  NAMEI(dot32)(M, c[2][0], c[2][1], x0, x1), NAMEI(dot32)(M, c[3][0], c[3][1], x0, x1));
                sum[t] = vaddq_f32(sum[t], vmulq_f32(vmulq_n_f32(dwv, dxp[t][b]), vcvtq_f32_s32(id)));
            }
        }
        if (FMT != PLK_Q8) {
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) bsum[t] = vaddq_f32(bsum[t], vmulq_n_f32(bwv, bxp[t][g]));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        float *o = y + (size_t)(t0 + t) * ldy;
        if (nr == 4) {
            const float32x4_t base = accumulate ? vld1q_f32(o + rr[0]) : vdupq_n_f32(0.0f);
            vst1q_f32(o + rr[0], vaddq_f32(vaddq_f32(base, sum[t]), bsum[t]));
        } else {
            float s[4], bs[4];
            vst1q_f32(s, sum[t]);
            vst1q_f32(bs, bsum[t]);
            for (int i = 0; i < nr; i++) o[rr[i]] = ((accumulate ? o[rr[i]] : 0.0f) + s[i]) + bs[i];
        }
    }
}

/* ---- K-quants against Q8_K activations ---- */

/* 32-element chunk k (elements 32k..32k+31) of a super-block: codes (two int8x16) and the scales of its two
 * 16-element halves (q4_k / q5_k: the chunk is sub-block k, one scale; q6_k: sub-blocks 2k and 2k+1) */
AI void NAMEI(kq_chunk)(const int FMT, const uint8_t *blk, int k, const int *sc, int8x16_t *c0, int8x16_t *c1,
                         int *s0, int *s1)
{
    if (FMT == PLK_Q6_K) {
        /* element e = 128h + 32kk + l: low 4 bits from ql[64h + 32(kk&1) + l] >> 4(kk>>1), high 2 from qh[32h + l] >> 2kk */
        const int h = k >> 2, kk = k & 3;
        const uint8_t *ql = blk + 64 * h + 32 * (kk & 1), *qh = blk + 128 + 32 * h;
        uint8x16_t l0 = vld1q_u8(ql), l1 = vld1q_u8(ql + 16);
        if (kk >> 1) { l0 = vshrq_n_u8(l0, 4); l1 = vshrq_n_u8(l1, 4); }
        else { l0 = vandq_u8(l0, vdupq_n_u8(15)); l1 = vandq_u8(l1, vdupq_n_u8(15)); }
        const int8x16_t sh = vdupq_n_s8((int8_t)(4 - 2 * kk));    /* bits 2kk, 2kk+1 -> bits 4, 5 */
        const uint8x16_t h0 = vandq_u8(vshlq_u8(vld1q_u8(qh), sh), vdupq_n_u8(0x30));
        const uint8x16_t h1 = vandq_u8(vshlq_u8(vld1q_u8(qh + 16), sh), vdupq_n_u8(0x30));
        *c0 = vreinterpretq_s8_u8(vorrq_u8(l0, h0));
        *c1 = vreinterpretq_s8_u8(vorrq_u8(l1, h1));
        *s0 = sc[2 * k];
        *s1 = sc[2 * k + 1];
        return;
    }
    const uint8_t *qs = (FMT == PLK_Q4_K ? blk + 16 : blk + 48) + 32 * (k >> 1);
    uint8x16_t v0 = vld1q_u8(qs), v1 = vld1q_u8(qs + 16);
    if (k & 1) { v0 = vshrq_n_u8(v0, 4); v1 = vshrq_n_u8(v1, 4); }
    else { v0 = vandq_u8(v0, vdupq_n_u8(15)); v1 = vandq_u8(v1, vdupq_n_u8(15)); }
    if (FMT == PLK_Q5_K) {                               /* bit k of qh byte l -> bit 4 of code l */
        const int8x16_t sh = vdupq_n_s8((int8_t)(4 - k));
        v0 = vorrq_u8(v0, vandq_u8(vshlq_u8(vld1q_u8(blk + 16), sh), vdupq_n_u8(0x10)));
        v1 = vorrq_u8(v1, vandq_u8(vshlq_u8(vld1q_u8(blk + 32), sh), vdupq_n_u8(0x10)));
    }
    *c0 = vreinterpretq_s8_u8(v0);
    *c1 = vreinterpretq_s8_u8(v1);
    *s0 = *s1 = sc[k];
}

/* a super-block's scales: q4_k / q5_k the 8 6-bit scales and mins (k_scale_min), q6_k the 16 int8 scales;
 * *hd, *hm the fp16 d and dmin (0 for q6_k) */
AI void NAMEI(kq_scales)(const int FMT, const uint8_t *blk, int *sc, int16x8_t *mn, uint16_t *hd, uint16_t *hm)
{
    if (FMT == PLK_Q6_K) {
        const int8_t *s = (const int8_t *)(blk + 192);
        for (int j = 0; j < 16; j++) sc[j] = s[j];
        memcpy(hd, blk + 208, 2);
        *hm = 0;
        *mn = vdupq_n_s16(0);
        return;
    }
    const uint8_t *s = blk + 4;
    int16_t m[8];
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 15) | ((s[j] >> 6) << 4);
        m[j + 4] = (int16_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
    *mn = vld1q_s16(m);
    memcpy(hd, blk, 2);
    memcpy(hm, blk + 2, 2);
}

/* sum of the lane products of two int16 x 16 (a0|a1 . b0|b1) as int32 */
AI int NAMEI(dot_s16x16)(int16x8_t a0, int16x8_t a1, int16x8_t b0, int16x8_t b1)
{
    int32x4_t s = vmull_s16(vget_low_s16(a0), vget_low_s16(b0));
    s = vmlal_high_s16(s, a0, b0);
    s = vmlal_s16(s, vget_low_s16(a1), vget_low_s16(b1));
    s = vmlal_high_s16(s, a1, b1);
    return vaddvq_s32(s);
}

/* rows rr[0..3] (nr valid) x tokens t0..t0+NT-1 of a K-quant matrix: per super-block, the integers isum (and
 * imin) of every (row, token) exactly, then the float steps of kq_block (plk_kq_generic.c) per lane */
AI void NAMEI(kq_tile)(const int FMT, const int M, const int MM, const int NT, const plk_w *w, const size_t *rr,
                        int nr, const plk_act *a, int t0, float *y, int ldy, int accumulate)
{
    const int S = a->ng, QB = plk_qbytes[FMT];
    const uint8_t *rowp[4];
    for (int i = 0; i < 4; i++) rowp[i] = w->qs + rr[i] * (size_t)S * QB;
    float32x4_t acc[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) acc[t] = vdupq_n_f32(0.0f);
    for (int b = 0; b < S; b++) {
        int32_t isum[4][4], imin[4][4];                 /* [token][row] */
        uint16_t hda[4], hma[4];
        int sc[4][16];
        int16x8_t mn[4];
        const uint8_t *blk[4];
        for (int i = 0; i < 4; i++) {
            blk[i] = rowp[i] + (size_t)b * QB;
            __builtin_prefetch(blk[i] + 2 * QB);
            __builtin_prefetch(blk[i] + 2 * QB + 64);
            __builtin_prefetch(blk[i] + 2 * QB + 128);
            NAMEI(kq_scales)(FMT, blk[i], sc[i], &mn[i], &hda[i], &hma[i]);
        }
        /* the offset terms, from the activations' 16-sums: imin (q4_k/q5_k) or q6_k's 32 * sum sc_j bs_j */
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const int16_t *bs = a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16;
            const int16x8_t b0 = vld1q_s16(bs), b1 = vld1q_s16(bs + 8);
            for (int i = 0; i < 4; i++) {
                if (FMT == PLK_Q6_K) {
                    int16_t s16[16];
                    for (int j = 0; j < 16; j++) s16[j] = (int16_t)sc[i][j];
                    isum[t][i] = -32 * NAMEI(dot_s16x16)(vld1q_s16(s16), vld1q_s16(s16 + 8), b0, b1);
                    imin[t][i] = 0;
                } else {
                    /* mins pair with the sums of the 32-element sub-blocks: bs[2j] + bs[2j+1] (|.| <= 4096) */
                    const int16x8_t p = vpaddq_s16(b0, b1);
                    int32x4_t s = vmull_s16(vget_low_s16(mn[i]), vget_low_s16(p));
                    s = vmlal_high_s16(s, mn[i], p);
                    imin[t][i] = vaddvq_s32(s);
                    isum[t][i] = 0;
                }
            }
        }
#if PLK_NEON_MODE >= 2
        if (MM) {
            for (int ip = 0; ip < 4; ip += 2)
#pragma GCC unroll 2
                for (int t = 0; t < NT; t += 2) {
                    const int8_t *xu = a->qs + (size_t)(t0 + t) * a->Kp + (size_t)b * 256;
                    const int8_t *xv = xu + a->Kp;
                    int32x4_t s4 = vdupq_n_s32(0);     /* [ra.u, ra.v, rb.u, rb.v] sum sc * dot */
                    for (int k = 0; k < 8; k++) {
                        int8x16_t ca0, ca1, cb0, cb1;
                        int sa0, sa1, sb0, sb1;
                        NAMEI(kq_chunk)(FMT, blk[ip], k, sc[ip], &ca0, &ca1, &sa0, &sa1);
                        NAMEI(kq_chunk)(FMT, blk[ip + 1], k, sc[ip + 1], &cb0, &cb1, &sb0, &sb1);
                        const int8x16_t u0 = vld1q_s8(xu + 32 * k), u1 = vld1q_s8(xu + 32 * k + 16);
                        const int8x16_t v0 = vld1q_s8(xv + 32 * k), v1 = vld1q_s8(xv + 32 * k + 16);
                        const int32x4_t p0 = NAMEI(mm16)(vdupq_n_s32(0), ca0, cb0, u0, v0);
                        const int32x4_t p1 = NAMEI(mm16)(vdupq_n_s32(0), ca1, cb1, u1, v1);
                        const int32_t w0[4] = { sa0, sa0, sb0, sb0 }, w1[4] = { sa1, sa1, sb1, sb1 };
                        s4 = vmlaq_s32(s4, p0, vld1q_s32(w0));
                        s4 = vmlaq_s32(s4, p1, vld1q_s32(w1));
                    }
                    isum[t][ip] += vgetq_lane_s32(s4, 0);
                    isum[t + 1][ip] += vgetq_lane_s32(s4, 1);
                    isum[t][ip + 1] += vgetq_lane_s32(s4, 2);
                    isum[t + 1][ip + 1] += vgetq_lane_s32(s4, 3);
                }
        } else
#endif
        for (int i = 0; i < 4; i++) {
            int32x4_t s4[4];
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) s4[t] = vdupq_n_s32(0);
            for (int k = 0; k < 8; k++) {
                int8x16_t c0, c1;
                int s0, s1;
                NAMEI(kq_chunk)(FMT, blk[i], k, sc[i], &c0, &c1, &s0, &s1);
#pragma GCC unroll 4
                for (int t = 0; t < NT; t++) {
                    const int8_t *x = a->qs + (size_t)(t0 + t) * a->Kp + (size_t)b * 256 + 32 * k;
                    if (FMT == PLK_Q6_K) {
                        s4[t] = vmlaq_n_s32(s4[t], NAMEI(dot16)(M, c0, vld1q_s8(x)), s0);
                        s4[t] = vmlaq_n_s32(s4[t], NAMEI(dot16)(M, c1, vld1q_s8(x + 16)), s1);
                    } else {
                        s4[t] = vmlaq_n_s32(s4[t], NAMEI(dot32)(M, c0, c1, vld1q_s8(x), vld1q_s8(x + 16)), s0);
                    }
                }
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) isum[t][i] += vaddvq_s32(s4[t]);
        }
        const float32x4_t dv = NAMEI(h2f4)(hda), dmv = NAMEI(h2f4)(hma);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const float dx = a->dx[(size_t)(t0 + t) * S + b];
            acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(vld1q_s32(isum[t])), vmulq_n_f32(dv, dx));
            if (FMT != PLK_Q6_K)
                acc[t] = vfmaq_f32(acc[t], vcvtq_f32_s32(vld1q_s32(imin[t])), vnegq_f32(vmulq_n_f32(dmv, dx)));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        float *o = y + (size_t)(t0 + t) * ldy;
        float v[4];
        vst1q_f32(v, acc[t]);
        for (int i = 0; i < nr; i++) o[rr[i]] = accumulate ? o[rr[i]] + v[i] : v[i];
    }
}

/* ---- drivers: row tiles of 4, token tiles of up to 4 (MODE 2: pairs by smmla, a last odd token by sdot) ---- */
#define TILE_DISPATCH(TILE, FMT)                                                                               \
    for (int r = r0; r < r1; r += 4) {                                                                         \
        const int nr = r1 - r < 4 ? r1 - r : 4;                                                                \
        size_t rr[4];                                                                                          \
        for (int i = 0; i < 4; i++) rr[i] = (size_t)(r + (i < nr ? i : nr - 1));                               \
        int t = 0;                                                                                             \
        if (PLK_NEON_MODE >= 2)                                                                                \
            for (; t + 2 <= a->T; ) {                                                                          \
                if (a->T - t >= 4) { TILE(FMT, PLK_NEON_MODE, 1, 4, w, rr, nr, a, t, y, ldy, acc); t += 4; }   \
                else { TILE(FMT, PLK_NEON_MODE, 1, 2, w, rr, nr, a, t, y, ldy, acc); t += 2; }                 \
            }                                                                                                  \
        for (; t < a->T; ) {                                                                                   \
            const int M1 = PLK_NEON_MODE >= 1 ? 1 : 0;                                                         \
            switch (a->T - t) {                                                                                \
            case 1: TILE(FMT, M1, 0, 1, w, rr, nr, a, t, y, ldy, acc); t += 1; break;                          \
            case 2: TILE(FMT, M1, 0, 2, w, rr, nr, a, t, y, ldy, acc); t += 2; break;                          \
            case 3: TILE(FMT, M1, 0, 3, w, rr, nr, a, t, y, ldy, acc); t += 3; break;                          \
            default: TILE(FMT, M1, 0, 4, w, rr, nr, a, t, y, ldy, acc); t += 4; break;                         \
            }                                                                                                  \
        }                                                                                                      \
    }

#define ROWS_Q8A(F, ID)                                                                                        \
void NAME(rows_##F##_q8)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)          \
{ TILE_DISPATCH(NAMEI(q8a_tile), ID) }
#define ROWS_KQ(F, ID)                                                                                         \
void NAME(rows_##F##_q8k)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)         \
{ TILE_DISPATCH(NAMEI(kq_tile), ID) }

ROWS_Q8A(q8, PLK_Q8)
ROWS_Q8A(q4_0, PLK_Q4_0)
ROWS_Q8A(q4_1, PLK_Q4_1)
ROWS_Q8A(q2, PLK_Q2)
ROWS_Q8A(tern, PLK_TERN)
ROWS_Q8A(q1, PLK_Q1)
ROWS_Q8A(q5_0, PLK_Q5_0)
ROWS_Q8A(q5_1, PLK_Q5_1)
ROWS_KQ(q4_k, PLK_Q4_K)
ROWS_KQ(q5_k, PLK_Q5_K)
ROWS_KQ(q6_k, PLK_Q6_K)

#undef TILE_DISPATCH
#undef ROWS_Q8A
#undef ROWS_KQ
#undef NAME
#undef NAMEI
