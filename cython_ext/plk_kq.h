/* SIMD kernels of the raw GGML block formats, included after plk_simd.h by plk_avx2.c and plk_avx512.c
 * (same SUFFIX / PLK_VNNI / AI / NAME). PLK_VNNI (the AVX-512 variant) turns the int16 x int16 scale step into
 * vpdpwssd, the q5 bit expansion into a mask move, and runs the decode rows (kq_rows8_512) and the prefill
 * tiles (vpdpbusd) on 512-bit vectors; the AVX2 variant stays on 256 bits.
 * Paths: T >= KQ_GEMM_MINT tokens -> kl_gemm (AVX-512 VNNI: 32 rows in lanes x 4 tokens) and kq_gemm (2 rows x
 * 4 tokens tiles: AVX2, and the rows % 32 left); else 8 rows in lanes (kq_rows8); leftover rows (< 8, or the odd
 * row / T % 4 tokens of the tiles) -> kq_row. All give the same bits.
 *
 * K-quants (q4_k, q5_k, q6_k) against Q8_K activations. Per row, up to 4 tokens at a time; per
 * super-block the codes are unpacked once into 8 vectors of 32 unsigned codes (q4_k/q5_k: one 32-sub-block
 * each; q6_k: two 16-sub-blocks, one per 128-bit lane) and the sub-block scales into matching int16
 * vectors; per token, vpmaddubsw (u8 codes x s8 activations, pairs <= 2 x 63 x 127: no int16 overflow) then
 * vpmaddwd / vpdpwssd by the scales accumulate sum_j sc_j * dot_j in 8 int32 lanes (exact), the mins term
 * (q4_k/q5_k) is a vpmaddwd of the 8 mins with the per-32 sums of the Q8_K block sums, q6_k's -32 offset is
 * folded in as 32 * sc_j * bsum_j. The two integers are reduced to scalars and the float steps are those of
 * formats._matmul_ref_k, as scalar fmas in order over the super-blocks: the reference bits, and a token's
 * bits do not depend on the batch it is in. */

AI __m256i kq_madd(__m256i acc, __m256i s16, __m256i sc)
{
#if PLK_VNNI
    return _mm256_dpwssd_epi32(acc, s16, sc);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s16, sc));
#endif
}

/* the 8 6-bit scales and mins of a q4_k / q5_k super-block as int16 (8 lanes each) */
AI void kq_scale_min(const uint8_t *s, __m128i *sc, __m128i *mn)
{
    uint32_t u0, u1, u2;
    memcpy(&u0, s, 4);
    memcpy(&u1, s + 4, 4);
    memcpy(&u2, s + 8, 4);
    const uint32_t sc_lo = u0 & 0x3f3f3f3fu, mn_lo = u1 & 0x3f3f3f3fu;
    const uint32_t sc_hi = (u2 & 0x0f0f0f0fu) | ((u0 >> 2) & 0x30303030u);
    const uint32_t mn_hi = ((u2 >> 4) & 0x0f0f0f0fu) | ((u1 >> 2) & 0x30303030u);
    *sc = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)sc_hi, (int)sc_lo));
    *mn = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, (int)mn_hi, (int)mn_lo));
}

/* kq_scales_v2's byte shuffles and masks, per 128-bit lane (kq_scales_v4 takes them too) */
static const uint8_t kq_sc_tab[4][16] __attribute__((aligned(16))) = {
    {4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15},   /* P: the bytes holding each scale / min's low bits */
    {63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0},   /* their masks */
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15},           /* mins 4-7: the high nibbles */
    {255, 255, 255, 255, 4, 5, 6, 7, 255, 255, 255, 255, 8, 9, 10, 11} };   /* Q: the bytes of scales 4-7's top bits */
/* kq_scale_min for 2 super-blocks (q4_k / q5_k) at once, in SIMD: 128-bit lane i of the result = bytes 0..7 the 8
 * scales, 8..15 the 8 mins of blk[i] (read from its first 16 bytes: d, dmin, the first 12 scale bytes) */
AI __m256i kq_scales_v2(const uint8_t *const *blk)
{
    const __m256i X = _mm256_loadu2_m128i((const __m128i *)blk[1], (const __m128i *)blk[0]);
#define T_(k) _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)kq_sc_tab[k]))
    const __m256i P = _mm256_shuffle_epi8(X, T_(0));
    const __m256i lo = _mm256_and_si256(P, T_(1)), hi4 = _mm256_and_si256(_mm256_srli_epi16(P, 4), T_(2));
    const __m256i top = _mm256_and_si256(_mm256_srli_epi16(_mm256_shuffle_epi8(X, T_(3)), 2), _mm256_set1_epi8(0x30));
#undef T_
    return _mm256_or_si256(_mm256_or_si256(lo, hi4), top);
}

/* the dwords at p + i stride, i = 0..7, as lanes 0..7 (8 loads and an unpack tree: vpgatherdd costs far more on Zen 4) */
AI __m256i dword8(const uint8_t *p, size_t stride)
{
    __m128i v[8];
    for (int i = 0; i < 8; i++) {
        int u;
        memcpy(&u, p + (size_t)i * stride, 4);
        v[i] = _mm_cvtsi32_si128(u);
    }
    const __m128i a = _mm_unpacklo_epi64(_mm_unpacklo_epi32(v[0], v[1]), _mm_unpacklo_epi32(v[2], v[3]));
    const __m128i b = _mm_unpacklo_epi64(_mm_unpacklo_epi32(v[4], v[5]), _mm_unpacklo_epi32(v[6], v[7]));
    return _mm256_set_m128i(b, a);
}

/* floats of the low (hi = 0) or high (hi = 1) fp16 halves of the 8 dwords of v */
AI __m256 h2f8(__m256i v, int hi)
{
    v = hi ? _mm256_srli_epi32(v, 16) : _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
    return _mm256_cvtph_ps(_mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
}

/* the fp16 d of 8 q6_k super-blocks at blk0 + i rowb, as floats (read as the dword of bytes 206..209, inside the block) */
AI __m256 kq6_d8(const uint8_t *blk0, size_t rowb) { return h2f8(dword8(blk0 + 206, rowb), 1); }

/* bit 4 of code byte i = bit j of qh byte i (q5_k: qh bit j belongs to sub-block j) */
AI __m256i kq_hbit(__m256i qh, int j)
{
    const __m256i m = _mm256_set1_epi8(0x10);
    switch (j) {
    case 0: return _mm256_and_si256(_mm256_slli_epi16(qh, 4), m);
    case 1: return _mm256_and_si256(_mm256_slli_epi16(qh, 3), m);
    case 2: return _mm256_and_si256(_mm256_slli_epi16(qh, 2), m);
    case 3: return _mm256_and_si256(_mm256_slli_epi16(qh, 1), m);
    case 4: return _mm256_and_si256(qh, m);
    case 5: return _mm256_and_si256(_mm256_srli_epi16(qh, 1), m);
    case 6: return _mm256_and_si256(_mm256_srli_epi16(qh, 2), m);
    default: return _mm256_and_si256(_mm256_srli_epi16(qh, 3), m);
    }
}

/* the last step of a super-block for one token: vi = 8 int32 partials of isum, vm = 4 int32 partials of
 * imin (or zero), y <- fma(isum, dd, y) [, fma(imin, ndm, y)] */
AI __m128 kq_finish(__m256i vi, __m128i vm, int has_min, float dd, float ndm, __m128 y)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(vi), _mm256_extracti128_si256(vi, 1));
    s = _mm_hadd_epi32(s, vm);            /* [i0+i1, i2+i3, m0+m1, m2+m3] */
    s = _mm_hadd_epi32(s, s);             /* [I, M, I, M] */
    const __m128 f = _mm_cvtepi32_ps(s);
    y = _mm_fmadd_ss(f, _mm_set_ss(dd), y);
    if (has_min) y = _mm_fmadd_ss(_mm_movehdup_ps(f), _mm_set_ss(ndm), y);
    return y;
}

/* the 256 codes of a q4_k / q5_k / q6_k super-block, unsigned, in element order: c[k] = elements 32k .. 32k + 31 */
AI void kq_codes(const int FMT, const uint8_t *blk, __m256i c[8])
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
    if (FMT == PLK_Q6_K) {
        const uint8_t *ql = blk, *qh = blk + 128;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(ql + 64 * h + 32));
            const __m256i hh = _mm256_loadu_si256((const __m256i *)(qh + 32 * h));
            c[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 4), m30));
            c[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(hh, 2), m30));
            c[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(hh, m30));
            c[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hh, 2), m30));
        }
        return;
    }
    const uint8_t *qs = FMT == PLK_Q4_K ? blk + 16 : blk + 48;
    __m256i qh = _mm256_setzero_si256();
    if (FMT == PLK_Q5_K) qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * p));
        c[2 * p] = _mm256_and_si256(v, m4);
        c[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (FMT == PLK_Q5_K) {
            c[2 * p] = _mm256_or_si256(c[2 * p], kq_hbit(qh, 2 * p));
            c[2 * p + 1] = _mm256_or_si256(c[2 * p + 1], kq_hbit(qh, 2 * p + 1));
        }
    }
}

/* one q4_k / q5_k / q6_k super-block at blk, decoded for the 256-bit byte dots: c[j] the codes of elements
 * 32j..32j+31, sv[j] their scales as int16 (the pairs maddubs + madd take); q6_k: *sc16 its 16 int8 scales widened
 * (for the -32 offset); q4_k/q5_k: *mn the 8 mins as int16, *dmw the fp16 dmin. Returns the fp16 d. kq_row and
 * kq_rows8 both decode through it, so they take the same integers. */
AI float kq_block256(const int FMT, const uint8_t *blk, __m256i c[8], __m256i sv[8], __m256i *sc16, __m128i *mn,
                     float *dmw)
{
    *sc16 = _mm256_setzero_si256();
    kq_codes(FMT, blk, c);
    if (FMT == PLK_Q6_K) {
        /* vector g (elements 32g..32g+31) has sub-blocks 2g (low lane), 2g+1 (high lane) */
        *sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        const __m256i B0 = _mm256_permute2x128_si256(*sc16, *sc16, 0x00), B1 = _mm256_permute2x128_si256(*sc16, *sc16, 0x11);
#pragma GCC unroll 8
        for (int g = 0; g < 8; g++) {
            const int k = g & 3;
            const __m256i sel = _mm256_setr_epi8(4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                                                 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1, 4 * k, 4 * k + 1,
                                                 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3,
                                                 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3, 4 * k + 2, 4 * k + 3);
            sv[g] = _mm256_shuffle_epi8(g < 4 ? B0 : B1, sel);
        }
        *mn = _mm_setzero_si128();
        *dmw = 0.0f;
        uint16_t hd;
        memcpy(&hd, blk + 208, 2);
        return _cvtsh_ss(hd);
    }
    const uint8_t *b2[2] = {blk, blk};
    const __m128i R = _mm256_castsi256_si128(kq_scales_v2(b2));
    *mn = _mm_cvtepu8_epi16(_mm_unpackhi_epi64(R, R));
    const __m256i sb = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(R));
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++)
        sv[j] = _mm256_shuffle_epi8(sb, _mm256_set1_epi16((short)((2 * j) | ((2 * j + 1) << 8))));
    int dd;
    memcpy(&dd, blk, 4);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(dd));
    *dmw = _mm_cvtss_f32(_mm_movehdup_ps(f));
    return _mm_cvtss_f32(f);
}

/* the 8-rows-in-lanes kernels' prefetch, at row i of super-block b of the set of 8 rows at row0: into L2, the next
 * set's bytes in address order, QB of them per call (the 8 S calls of a set cover the next set, rows row0 + 8 rowb ..
 * + 16 rowb, one contiguous stream; 8 row streams are too many for the hardware prefetcher to start in time, and a set's
 * first blocks would wait for DRAM otherwise), and this row two blocks ahead from L2 into L1. The L2 prefetch went
 * to the next set's block b of row i before; in address order instead (8 Dec 2026, Zen 5 guest, 2 threads, a pure
 * read in this pattern against the plain read probe) the pattern reads at 0.86-0.96 of the probe, not 0.70-0.80;
 * in the kernels, GEMV 16384 x 8192 from DRAM, paired, builds alternated: AVX-512 q4_k 0.80-0.89 of the time,
 * q6_k 0.89-0.92, q5_k 0.87-0.98; AVX2 level (0.98-1.06); q5_0 / q5_1 (q5_rows8, 8 QB bytes a block) level. */
AI void kq_prefetch8(const uint8_t *row0, size_t rowb, int QB, int b, int i)
{
    const char *blk = (const char *)row0 + (size_t)i * rowb + (size_t)b * QB, *pn = blk + 2 * QB;
    const size_t j = ((size_t)b * 8 + (size_t)i) * (size_t)QB;   /* this call's QB bytes of the next set */
    const char *nx = (const char *)row0 + 8 * rowb;
    for (size_t o = (j + 63) & ~(size_t)63; o < j + (size_t)QB; o += 64) _mm_prefetch(nx + o, _MM_HINT_T1);   /* each line once */
    _mm_prefetch(pn, _MM_HINT_T0);
    _mm_prefetch(pn + 64, _MM_HINT_T0);
    _mm_prefetch(pn + 128, _MM_HINT_T0);
    if (QB > 192) _mm_prefetch(pn + 192, _MM_HINT_T0);
}

/* one row x NT tokens (1..4) */
AI void kq_row(const int FMT, const int NT, const uint8_t *row, int S, const plk_act *a, int t0, float *res)
{
    const int QB = plk_qbytes[FMT];
    const int8_t *xp[4];
    const int16_t *bp[4];
    const float *dp[4];
    __m128 y[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) {
        xp[t] = a->qs + (size_t)(t0 + t) * a->Kp;
        bp[t] = a->bs + (size_t)(t0 + t) * (a->Kp / 16);
        dp[t] = a->dx + (size_t)(t0 + t) * S;
        y[t] = _mm_setzero_ps();
    }
    for (int b = 0; b < S; b++) {
        const uint8_t *blk = row + (size_t)b * QB;
        const char *pf = (const char *)blk + PLK_PF;
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
        _mm_prefetch(pf + 128, _MM_HINT_T0);
        if (QB > 192) _mm_prefetch(pf + 192, _MM_HINT_T0);
        __m256i c[8], sv[8], sc16;
        __m128i mn;
        float dmw;
        const float dw = kq_block256(FMT, blk, c, sv, &sc16, &mn, &dmw);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const int8_t *x = xp[t] + (size_t)b * 256;
            const int16_t *bs = bp[t] + (size_t)b * 16;
            __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++)
                acc = kq_madd(acc, _mm256_maddubs_epi16(c[j], _mm256_loadu_si256((const __m256i *)(x + 32 * j))), sv[j]);
            const float dx = dp[t][b];
            if (FMT == PLK_Q6_K) {
                const __m256i m = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)bs));
                acc = _mm256_sub_epi32(acc, _mm256_slli_epi32(m, 5));
                y[t] = kq_finish(acc, _mm_setzero_si128(), 0, dw * dx, 0.0f, y[t]);
            } else {
                const __m128i b32 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs), _mm_loadu_si128((const __m128i *)(bs + 8)));
                const __m128i vm = _mm_madd_epi16(mn, b32);
                y[t] = kq_finish(acc, vm, 1, dw * dx, -(dmw * dx), y[t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) res[t] = _mm_cvtss_f32(y[t]);
}

/* 8 rows x NT tokens (NT = 1..4; decode): the rows' integer sums of a super-block go to one vector (lane i =
 * row r + i) by one transposing hadd tree, and the float steps run for the 8 rows at once (lanes), the same
 * operations per (row, token) as kq_row: the same bits. Saves the per-row horizontal sums and scalar tail. */
AI void kq_rows8(const int FMT, const int NT, const uint8_t *row0, size_t rowb, int S, const plk_act *a, int t0,
                 __m256 *yv)
{
    const __m256i unperm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 signm = _mm256_set1_ps(-0.0f);
    const int QB = plk_qbytes[FMT];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) yv[t] = _mm256_setzero_ps();
    for (int b = 0; b < S; b++) {
        __m256i iv[4][8];
        /* q4_k: the 8 rows' scales decoded 2 rows a vector: scm[i] = row i's 8 scales, then its 8 mins, as int16 (in
         * memory: 8 more live vectors would spill in the row loop); q5_k decodes per row (measured 22% slower this
         * way, its qh bits already keep more vectors live) into mnr / dws / dms. dwv / dmv: the rows' d / dmin */
        __m128i mnr[8];
        float dws[8], dms[8];
        int16_t scm[8][16] __attribute__((aligned(32)));
        __m256 dwv = _mm256_setzero_ps(), dmv = _mm256_setzero_ps();
        if (FMT == PLK_Q4_K) {
            for (int k = 0; k < 4; k++) {
                const uint8_t *b2[2] = {row0 + (size_t)(2 * k) * rowb + (size_t)b * QB, row0 + (size_t)(2 * k + 1) * rowb + (size_t)b * QB};
                const __m256i R = kq_scales_v2(b2);
                _mm256_store_si256((__m256i *)scm[2 * k], _mm256_cvtepu8_epi16(_mm256_castsi256_si128(R)));
                _mm256_store_si256((__m256i *)scm[2 * k + 1], _mm256_cvtepu8_epi16(_mm256_extracti128_si256(R, 1)));
            }
            const __m256i dm = dword8(row0 + (size_t)b * QB, rowb);   /* [d | dmin << 16] of each row */
            dwv = h2f8(dm, 0);
            dmv = h2f8(dm, 1);
        }
        for (int i = 0; i < 8; i++) {
            const uint8_t *blk = row0 + (size_t)i * rowb + (size_t)b * QB;
            kq_prefetch8(row0, rowb, QB, b, i);
            __m256i c[8], sv[8], sc16 = _mm256_setzero_si256();
            if (FMT != PLK_Q4_K) {
                dws[i] = kq_block256(FMT, blk, c, sv, &sc16, &mnr[i], &dms[i]);
            } else {
                kq_codes(FMT, blk, c);
                const __m256i sb = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)scm[i]));
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++)
                    sv[j] = _mm256_shuffle_epi8(sb, _mm256_set1_epi16((short)((2 * j) | ((2 * j + 1) << 8))));
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const int8_t *x = a->qs + (size_t)(t0 + t) * a->Kp + (size_t)b * 256;
                __m256i acc = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++)
                    acc = kq_madd(acc, _mm256_maddubs_epi16(c[j], _mm256_loadu_si256((const __m256i *)(x + 32 * j))), sv[j]);
                if (FMT == PLK_Q6_K) {
                    const int16_t *bs = a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16;
                    acc = _mm256_sub_epi32(acc, _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)bs)), 5));
                }
                iv[t][i] = acc;
            }
        }
        if (FMT == PLK_Q6_K) dwv = kq6_d8(row0 + (size_t)b * QB, rowb);
        if (FMT == PLK_Q5_K) {
            dwv = _mm256_loadu_ps(dws);
            dmv = _mm256_loadu_ps(dms);
        }
        __m256i mpair[4];   /* [mins of row 2k | of row 2k+1] */
        if (FMT == PLK_Q4_K)
            for (int k = 0; k < 4; k++) mpair[k] = _mm256_loadu2_m128i((const __m128i *)(scm[2 * k + 1] + 8), (const __m128i *)(scm[2 * k] + 8));
        else if (FMT == PLK_Q5_K)
            for (int k = 0; k < 4; k++) mpair[k] = _mm256_set_m128i(mnr[2 * k + 1], mnr[2 * k]);
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const float dx = a->dx[(size_t)(t0 + t) * S + b];
            const __m256 dxv = _mm256_set1_ps(dx);
            yv[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8i(iv[t])), _mm256_mul_ps(dwv, dxv), yv[t]);
            if (FMT != PLK_Q6_K) {
                const int16_t *bs = a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16;
                const __m128i b32 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs), _mm_loadu_si128((const __m128i *)(bs + 8)));
                const __m256i bb = _mm256_broadcastsi128_si256(b32);
                __m256i mv[4];
                for (int k = 0; k < 4; k++) mv[k] = _mm256_madd_epi16(mpair[k], bb);   /* [row 2k | row 2k+1] partials */
                const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(mv[0], mv[1]), _mm256_hadd_epi32(mv[2], mv[3]));
                const __m256i M = _mm256_permutevar8x32_epi32(h, unperm);
                yv[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(M), _mm256_xor_ps(_mm256_mul_ps(dmv, dxv), signm), yv[t]);
            }
        }
    }
}

#if PLK_VNNI
/* vpermw indices (kq_rows8_512): q6_k zmm q: 128-bit lane L = scale 4q + L; q4_k / q5_k below */
#define I8(v) v, v, v, v, v, v, v, v
#define I16(v) I8(v), I8(v)
/* words 8-15 and 24-31 (the two rows' mins of a W vector) into the low 256 bits */
static const short kq_idxmn[32] __attribute__((aligned(64))) = {
    8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 };
/* q4_k / q5_k read by whole 64-byte code loads (kq_rows8_512, against plk_act.xw): zmm p = [scale a x16 | scale b x16], (a, b) = (0, 2),
 * (1, 3), (4, 6), (5, 7) */
static const short kq_idx4w[4][32] __attribute__((aligned(64))) = {
    { I16(0), I16(2) }, { I16(1), I16(3) }, { I16(4), I16(6) }, { I16(5), I16(7) } };
/* kq_idx4w for the second row of a pair of rows' scales as int16 ([row a: sc 0-7, mn 0-7 | row b: ...], kq_rows8_512) */
static const short kq_idx4w1[4][32] __attribute__((aligned(64))) = {
    { I16(16), I16(18) }, { I16(17), I16(19) }, { I16(20), I16(22) }, { I16(21), I16(23) } };
static const short kq_idx6[4][32] __attribute__((aligned(64))) = {
    { I8(0), I8(1), I8(2), I8(3) }, { I8(4), I8(5), I8(6), I8(7) }, { I8(8), I8(9), I8(10), I8(11) },
    { I8(12), I8(13), I8(14), I8(15) } };
#undef I8
#undef I16
/* kq_scales_v2 for 4 super-blocks (lane i: blk[i]) on 512-bit vectors (measured 5% faster in the q4_k decode rows
 * than two kq_scales_v2 halves); *X_ = the 4 blocks' first 16 bytes, lane by lane (their d, dmin in dword 0) */
AI __m512i kq_scales_v4(const uint8_t *const *blk, __m512i *X_)
{
    __m512i X = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)blk[0]));
    X = _mm512_inserti32x4(X, _mm_loadu_si128((const __m128i *)blk[1]), 1);
    X = _mm512_inserti32x4(X, _mm_loadu_si128((const __m128i *)blk[2]), 2);
    X = _mm512_inserti32x4(X, _mm_loadu_si128((const __m128i *)blk[3]), 3);
    *X_ = X;
#define T_(k) _mm512_broadcast_i32x4(_mm_load_si128((const __m128i *)kq_sc_tab[k]))
    const __m512i P = _mm512_shuffle_epi8(X, T_(0));
    const __m512i lo = _mm512_and_si512(P, T_(1)), hi4 = _mm512_and_si512(_mm512_srli_epi16(P, 4), T_(2));
    const __m512i top = _mm512_and_si512(_mm512_srli_epi16(_mm512_shuffle_epi8(X, T_(3)), 2), _mm512_set1_epi8(0x30));
#undef T_
    return _mm512_ternarylogic_epi32(lo, hi4, top, 0xfe);   /* lo | hi4 | top */
}

/* one q6_k super-block for the 512-bit dots: c[q] the codes of elements 64q..64q+63 ([k=0 | k=1] of ql's half h =
 * q / 2, with qh's bits), sv[q] their scales as int16 (128-bit lane L = sub-block 4q + L); returns the 16 scales
 * widened (for the -32 offset) */
AI __m256i kq6_block512(const uint8_t *blk, __m512i c[4], __m512i sv[4])
{
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
    const __m512i s42 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i s02 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    const uint8_t *ql = blk, *qh = blk + 128;
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m512i l = ldw512(ql + 64 * h);          /* [l0 | l1] */
        const __m512i hh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)));
        /* elements 128h + 0..63: [k=0 | k=1]; 128h + 64..127: [k=2 | k=3] */
        c[2 * h] = _mm512_or_si512(_mm512_and_si512(l, m4), _mm512_and_si512(_mm512_sllv_epi16(hh, s42), m30));
        c[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), m4),
                                       _mm512_and_si512(_mm512_srlv_epi16(hh, s02), m30));
    }
    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    const __m512i sc16 = _mm512_castsi256_si512(s16);
#pragma GCC unroll 4
    for (int q = 0; q < 4; q++) sv[q] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)kq_idx6[q]), sc16);
    return s16;
}

/* a super-block's 4 code vectors against 256 activations at x: sum_j sc_j * dot_j in 8 int32 lanes, in two
 * independent chains (the 4-deep vpdpwssd chain was the critical path) */
AI __m256i kq_dot512(const __m512i c[4], const __m512i sv[4], const int8_t *x)
{
    __m512i acc0 = _mm512_madd_epi16(_mm512_maddubs_epi16(c[0], _mm512_loadu_si512((const void *)x)), sv[0]);
    __m512i acc1 = _mm512_madd_epi16(_mm512_maddubs_epi16(c[1], _mm512_loadu_si512((const void *)(x + 64))), sv[1]);
    acc0 = _mm512_dpwssd_epi32(acc0, _mm512_maddubs_epi16(c[2], _mm512_loadu_si512((const void *)(x + 128))), sv[2]);
    acc1 = _mm512_dpwssd_epi32(acc1, _mm512_maddubs_epi16(c[3], _mm512_loadu_si512((const void *)(x + 192))), sv[3]);
    const __m512i acc = _mm512_add_epi32(acc0, acc1);
    return _mm256_add_epi32(_mm512_castsi512_si256(acc), _mm512_extracti64x4_epi64(acc, 1));
}

/* the codes of one q4_k / q5_k super-block for the 512-bit dots: whole 64-byte code loads, bytes 64h.. hold
 * sub-blocks 4h..4h+3, their low nibbles [4h | 4h+2], the high ones [4h+1 | 4h+3], against the activations re-laid
 * to match (plk_act.xw); q5_k's bit 4 of sub-block j is bit j of its qh byte */
AI void kq45_codes512(const int FMT, const uint8_t *blk, __m512i c[4])
{
    const __m512i m4 = _mm512_set1_epi8(0x0f), one8 = _mm512_set1_epi8(1);
    const uint8_t *qs = FMT == PLK_Q4_K ? blk + 16 : blk + 48;
    __m512i qh = _mm512_setzero_si512();
    if (FMT == PLK_Q5_K) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk + 16)));
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const __m512i v = ldw512(qs + 64 * h);
        c[2 * h] = _mm512_and_si512(v, m4);
        c[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        if (FMT == PLK_Q5_K)
#pragma GCC unroll 2
            for (int k = 0; k < 2; k++) {
                const int j = 4 * h + k;   /* sub-blocks j and j + 2 */
                const __m512i sj = _mm512_inserti64x4(_mm512_set1_epi16((short)j), _mm256_set1_epi16((short)(j + 2)), 1);
                c[2 * h + k] = _mm512_or_si512(c[2 * h + k], _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(qh, sj), one8), 4));
            }
    }
}

/* the mins term of 8 rows x one token for one super-block: mpair[k] = [mins of row 2k | of row 2k+1] (int16), bs
 * the token's 16 per-16 sums of the block -> lane i = sum_j mn_ij b32_j (kq_rows8's transposing hadd tree) */
AI __m256i kq_mins8(const __m256i mpair[4], const int16_t *bs)
{
    const __m256i unperm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m128i b32 = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs), _mm_loadu_si128((const __m128i *)(bs + 8)));
    const __m256i bb = _mm256_broadcastsi128_si256(b32);
    __m256i mv[4];
    for (int k = 0; k < 4; k++) mv[k] = _mm256_madd_epi16(mpair[k], bb);
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(mv[0], mv[1]), _mm256_hadd_epi32(mv[2], mv[3]));
    return _mm256_permutevar8x32_epi32(h, unperm);
}

/* kq_rows8 with 512-bit vectors (AVX-512 BW + VNNI): one zmm holds two 32-sub-blocks (q6_k: four 16-sub-blocks)
 * of codes, activations and scales, so a row's super-block costs 4 vpmaddubsw + 4 vpdpwssd per token; the
 * integers are those of the 256-bit kernel (exact), the float steps the same: the same bits. */
AI void kq_rows8_512(const int FMT, const int NT, const uint8_t *row0, size_t rowb, int S, const plk_act *a, int t0,
                     __m256 *yv)
{
    const __m256 signm = _mm256_set1_ps(-0.0f);
    const int QB = plk_qbytes[FMT];
    const int8_t *const xq = FMT != PLK_Q6_K ? a->xw : a->qs;   /* the activations in the order the codes are read */
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) yv[t] = _mm256_setzero_ps();
    for (int b = 0; b < S; b++) {
        __m256i iv[4][8];
        /* q4_k / q5_k: the 8 rows' scales and mins as int16, rows 2k and 2k+1 in W[k] = [sc 0-7, mn 0-7 of row 2k |
         * of row 2k+1], and their d / dmin as floats in dwv / dmv (decoded 4 rows a vector) */
        __m512i W[4];
        __m256 dwv = _mm256_setzero_ps(), dmv = _mm256_setzero_ps();
        if (FMT != PLK_Q6_K) {
            __m512i X[2];
            for (int h = 0; h < 2; h++) {
                const uint8_t *b4[4];
                for (int j = 0; j < 4; j++) b4[j] = row0 + (size_t)(4 * h + j) * rowb + (size_t)b * QB;
                const __m512i R = kq_scales_v4(b4, &X[h]);
                W[2 * h] = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(R));
                W[2 * h + 1] = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(R, 1));
            }
            /* dword 0 of each lane ((d, dmin) of a row) -> [d0 m0 .. d7 m7] -> floats [d0..d7 | m0..m7], from the vectors
             * already loaded (measured 4-7% faster here than dword8 + h2f8) */
            const __m512i dd = _mm512_permutex2var_epi32(X[0], _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0), X[1]);
            const __m512 f = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15),
                                                   _mm512_cvtph_ps(_mm512_castsi512_si256(dd)));
            dwv = _mm512_castps512_ps256(f);
            dmv = _mm512_extractf32x8_ps(f, 1);
        }
        for (int i = 0; i < 8; i++) {
            const uint8_t *blk = row0 + (size_t)i * rowb + (size_t)b * QB;
            kq_prefetch8(row0, rowb, QB, b, i);
            __m512i c[4], sv[4];
            __m256i s16 = _mm256_setzero_si256();
            if (FMT == PLK_Q6_K) {
                s16 = kq6_block512(blk, c, sv);
            } else {
                const __m512i sb = W[i / 2];   /* this row's scales: words 16 (i & 1) .. 16 (i & 1) + 7 */
                kq45_codes512(FMT, blk, c);
#pragma GCC unroll 4
                for (int p = 0; p < 4; p++)
                    sv[p] = _mm512_permutexvar_epi16(_mm512_load_si512((const void *)(i & 1 ? kq_idx4w1[p] : kq_idx4w[p])), sb);
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                __m256i acc8 = kq_dot512(c, sv, xq + (size_t)(t0 + t) * a->Kp + (size_t)b * 256);
                if (FMT == PLK_Q6_K) {
                    const int16_t *bs = a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16;
                    acc8 = _mm256_sub_epi32(acc8, _mm256_slli_epi32(_mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i *)bs)), 5));
                }
                iv[t][i] = acc8;
            }
        }
        if (FMT == PLK_Q6_K) dwv = kq6_d8(row0 + (size_t)b * QB, rowb);
        __m256i mpair[4];
        if (FMT != PLK_Q6_K)
            for (int k = 0; k < 4; k++)   /* [mins of row 2k | of row 2k+1]: words 8-15 and 24-31 of W[k] */
                mpair[k] = _mm512_castsi512_si256(_mm512_permutexvar_epi16(_mm512_load_si512((const void *)kq_idxmn), W[k]));
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const __m256 dxv = _mm256_set1_ps(a->dx[(size_t)(t0 + t) * S + b]);
            yv[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8i(iv[t])), _mm256_mul_ps(dwv, dxv), yv[t]);
            if (FMT != PLK_Q6_K) {
                const __m256i M = kq_mins8(mpair, a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16);
                yv[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(M), _mm256_xor_ps(_mm256_mul_ps(dmv, dxv), signm), yv[t]);
            }
        }
    }
}
/* q6_k, one token, rows in address order (AVX-512): kq_rows8_512's integer steps row by row over the whole row
 * (the 8 rows of a set are one contiguous stream, read front to back), each (row, block) sum kept as its 8-lane
 * vector in P (S x 8 x 32 bytes, L1) with the block's d, then per block the same hsum8x8i and float steps as
 * kq_rows8_512: the same bits. The block-major order reads 8 streams at once; a pure read in that pattern gets 0.86-0.96 of the probe
 * with the best prefetch found, one stream with a 4 KB-ahead prefetch 1.00 (C microbenchmark, 2 threads).
 * Measured 8 Dec 2026 (Zen 5 guest, GEMV 16384 x 8192 from DRAM, 2 threads, builds alternated, paired) against
 * the block-major rows: probe 48 GB/s 0.95 of the time, probe 76 level (L2 distance 4 KB: 0.93 and 1.06; 16 KB:
 * 0.97 and 1.06); in L3 91 -> 101 GB/s. */
#ifndef PLK_KQ6_RM_PF
#define PLK_KQ6_RM_PF 8192
#endif
/* q4_k / q5_k in this order (tried 8 Dec 2026, commit 8dbe5cd): bit-exact, but the scales, mins and (d, dmin)
 * decoded per row, 4 blocks at a time, and stored for the second pass cost more than the address order gains:
 * against the block-major rows q4_k 1.13 / 0.95 of the time with the probe at 74 / 50 GB/s, q5_k 1.06 / 0.99; in
 * L3 q4_k 71 -> 56 GB/s. */
#define KQ6_RM_MAXS 80   /* K <= 20480: P at most 20 KB */
AI void kq6_rows8_rm(const uint8_t *row0, size_t rowb, int S, const plk_act *a, int t0, __m256 *yv)
{
    const int QB = plk_qbytes[PLK_Q6_K];
    const int8_t *xq = a->qs + (size_t)t0 * a->Kp;
    const int16_t *bsr = a->bs + (size_t)t0 * (a->Kp / 16);
    __m256i P[KQ6_RM_MAXS * 8];
    uint16_t dh[KQ6_RM_MAXS * 8] __attribute__((aligned(16)));
    for (int i = 0; i < 8; i++) {
        const uint8_t *row = row0 + (size_t)i * rowb;
        for (int b = 0; b < S; b++) {
            const uint8_t *blk = row + (size_t)b * QB;
            /* the stream PLK_KQ6_RM_PF ahead into L2 (each line once), this row two blocks ahead into L1 */
            const size_t j = (size_t)(blk - row0);
            for (size_t o = (j + 63) & ~(size_t)63; o < j + (size_t)QB; o += 64)
                _mm_prefetch((const char *)row0 + PLK_KQ6_RM_PF + o, _MM_HINT_T1);
            for (int o = 0; o < 256; o += 64) _mm_prefetch((const char *)blk + 2 * QB + o, _MM_HINT_T0);
            __m512i c[4], sv[4];
            const __m256i s16 = kq6_block512(blk, c, sv);
            const __m256i acc8 = kq_dot512(c, sv, xq + (size_t)b * 256);
            P[8 * b + i] = _mm256_sub_epi32(acc8, _mm256_slli_epi32(_mm256_madd_epi16(s16, _mm256_loadu_si256((const __m256i *)(bsr + (size_t)b * 16))), 5));
            memcpy(&dh[8 * b + i], blk + 208, 2);
        }
    }
    yv[0] = _mm256_setzero_ps();
    for (int b = 0; b < S; b++) {
        const __m256 dwv = _mm256_cvtph_ps(_mm_load_si128((const __m128i *)(dh + 8 * b)));
        const __m256 dxv = _mm256_set1_ps(a->dx[(size_t)t0 * S + b]);
        yv[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8i(P + 8 * b)), _mm256_mul_ps(dwv, dxv), yv[0]);
    }
}
#define KQ_ROWS8 kq_rows8_512
#else
#define KQ_ROWS8 kq_rows8
#endif

/* ---- K-quant GEMM (prefill, T >= KQ_GEMM_MINT): tiles of 2 rows x 4 tokens --------------------------------
 * The per-token kernel spends most of its work per (row, token) on scaling each sub-block's products (vpmaddwd
 * / vpdpwssd) and on horizontal sums. Here the codes of a row and the activations of a token are re-laid once per
 * call so that 32-bit lane j of step vector v holds 4 consecutive codes of sub-block j (q6_k: sub-block
 * 8 (v / 4) + j): 8 byte-dot steps leave sub-block j's exact dot in lane j (AVX-512: vpdpbusd on zmm holding
 * both rows, then one vpmulld by the 8 scales; AVX2: vpmaddubsw summed in int16 while that cannot overflow,
 * then vpmaddwd by the scales duplicated per int16 pair), and one transposing hadd tree gives the 8
 * (row, token) integer sums of the tile in one vector; the mins (or q6_k's
 * -32 offset) are vpmaddwd of the scales/mins with the block sums. The float steps are the per-token kernel's
 * (fma(isum, d_w*d_x, y), fma(imin, -(dmin_w*d_x), y) per super-block in order), 8 (row, token) pairs per
 * vector: bit-identical to a token computed alone. Rows left over (odd) and tokens (T % 4) take kq_row. */
#define KQ_GEMM_MINT PLK_KQ_GEMM_MINT

/* natural dword (4 codes) feeding lane j of step v: q4_k/q5_k (sub-blocks of 32), q6_k (of 16) */
AI int kq_perm(const int FMT, int v, int j)
{
    return FMT == PLK_Q6_K ? 32 * (v >> 2) + 4 * j + (v & 3) : 8 * j + v;
}

AI void kq_relayout(const int FMT, const uint32_t *nat, uint32_t *out, int vstride)   /* vstride: dwords per step */
{
    for (int v = 0; v < 8; v++)
        for (int j = 0; j < 8; j++) out[vstride * v + j] = nat[kq_perm(FMT, v, j)];
}

/* one row's super-blocks -> re-laid codes (S x 256 B), scales as int32 (S x 8, q6_k: S x 16), mins as int16
 * (S x 8), scale sources for the q6_k offset (S x 16 int16), d and dmin (S floats each) */
AI void kq_row_prep(const int FMT, const uint8_t *row, int S, uint8_t *wt, size_t bstride, int vstride,
                    int32_t *scv, int16_t *mnv, float *dw, float *dmw)
{   /* step v of super-block b at wt + b bstride + v vstride (bytes) */
    const int QB = plk_qbytes[FMT];
    for (int b = 0; b < S; b++) {
        const uint8_t *blk = row + (size_t)b * QB;
        __m256i c[8];
        kq_codes(FMT, blk, c);
        if (FMT == PLK_Q6_K) {
            const int8_t *sc = (const int8_t *)(blk + 192);
            for (int j = 0; j < 16; j++) { scv[16 * b + j] = sc[j]; mnv[16 * b + j] = sc[j]; }
            uint16_t hd;
            memcpy(&hd, blk + 208, 2);
            dw[b] = _cvtsh_ss(hd);
            dmw[b] = 0.0f;
        } else {
            __m128i sc, mn;
            kq_scale_min(blk + 4, &sc, &mn);
            _mm256_storeu_si256((__m256i *)(scv + 8 * b), _mm256_cvtepi16_epi32(sc));
            _mm_storeu_si128((__m128i *)(mnv + 8 * b), mn);
            uint16_t hd, hm;
            memcpy(&hd, blk, 2);
            memcpy(&hm, blk + 2, 2);
            dw[b] = _cvtsh_ss(hd);
            dmw[b] = _cvtsh_ss(hm);
        }
        uint8_t *o = wt + (size_t)b * bstride;
        if (FMT == PLK_Q6_K) {
            /* step 4h + k, lane j = dword 4 (j % 2) + k of c[4h + j / 2]: per c a dword interleave
             * [d0 d4 d1 d5 d2 d6 d3 d7] (qword k = (dword k, dword 4 + k)), then a 4 x 4 qword transpose */
            const __m256i il = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            for (int h = 0; h < 2; h++) {
                __m256i u[4];
                for (int q = 0; q < 4; q++) u[q] = _mm256_permutevar8x32_epi32(c[4 * h + q], il);
                const __m256i lo01 = _mm256_unpacklo_epi64(u[0], u[1]), hi01 = _mm256_unpackhi_epi64(u[0], u[1]);
                const __m256i lo23 = _mm256_unpacklo_epi64(u[2], u[3]), hi23 = _mm256_unpackhi_epi64(u[2], u[3]);
                uint8_t *oh = o + (size_t)(4 * h) * vstride;
                _mm256_store_si256((__m256i *)(oh), _mm256_permute2x128_si256(lo01, lo23, 0x20));
                _mm256_store_si256((__m256i *)(oh + vstride), _mm256_permute2x128_si256(hi01, hi23, 0x20));
                _mm256_store_si256((__m256i *)(oh + 2 * (size_t)vstride), _mm256_permute2x128_si256(lo01, lo23, 0x31));
                _mm256_store_si256((__m256i *)(oh + 3 * (size_t)vstride), _mm256_permute2x128_si256(hi01, hi23, 0x31));
            }
        } else {   /* lane j of step v = dword v of sub-block j: an 8 x 8 dword transpose */
            tr4_lane(c);
            tr4_lane(c + 4);
            for (int k = 0; k < 4; k++) {
                _mm256_store_si256((__m256i *)(o + (size_t)k * vstride), _mm256_permute2x128_si256(c[k], c[4 + k], 0x20));
                _mm256_store_si256((__m256i *)(o + (size_t)(4 + k) * vstride), _mm256_permute2x128_si256(c[k], c[4 + k], 0x31));
            }
        }
    }
}

/* pairs of rows a K-quant GEMM pass takes: VNNI 2 (4 rows: each activation broadcast feeds both pairs' zmm
 * dots), AVX2 1 */
#define KQ_NP (PLK_VNNI ? 2 : 1)

/* one row pair's prepared planes (kq_row_prep) */
typedef struct { uint8_t *wt[2]; int32_t *scv[2]; int16_t *mnv[2]; float *dw[2], *dmw[2]; } kq_pair;

/* super-block b of a row pair x 4 tokens: the scaled int32 sums iv (lane 4 i + t) -> yv, with the q6_k bias term,
 * the d / dmin scaling and the mins (the per-pair float steps, in the same order whatever the pass width) */
AI void kq_pair_finish(const int FMT, const kq_pair *P, __m256i *iv, int b, int t0, int S, const plk_act *a,
                  const int16_t *b32, const float *dxt, __m256 *yv)
{
    const __m256 signm = _mm256_set1_ps(-0.0f);
    if (FMT == PLK_Q6_K)
        for (int i = 0; i < 2; i++) {
            const __m256i sc16 = _mm256_loadu_si256((const __m256i *)(P->mnv[i] + 16 * b));
            for (int t = 0; t < 4; t++) {
                const __m256i bs16 = _mm256_loadu_si256((const __m256i *)(a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16));
                iv[4 * i + t] = _mm256_sub_epi32(iv[4 * i + t], _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs16), 5));
            }
        }
    const __m256i I = hsum8x8i(iv);                 /* lane 4 i + t: row r + i, token t0 + t */
    const __m256 dxv = _mm256_broadcast_ps((const __m128 *)(dxt + ((size_t)(t0 / 4) * S + b) * 4));
    const __m256 dwv = _mm256_set_m128(_mm_set1_ps(P->dw[1][b]), _mm_set1_ps(P->dw[0][b]));
    *yv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(I), _mm256_mul_ps(dwv, dxv), *yv);
    if (FMT != PLK_Q6_K) {
        /* [mins of row r | of row r+1] . [b32 of token t | the same]: lanes 0-3 (r, t), 4-7 (r+1, t);
         * the hadd tree then leaves lane 4 i + t = imin of (row r + i, token t0 + t) */
        const __m256i A = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(P->mnv[1] + 8 * b)),
                                           _mm_loadu_si128((const __m128i *)(P->mnv[0] + 8 * b)));
        __m256i mv[4];
        for (int t = 0; t < 4; t++)
            mv[t] = _mm256_madd_epi16(A, _mm256_loadu_si256((const __m256i *)(b32 + ((size_t)(t0 + t) * S + b) * 16)));
        const __m256i M = _mm256_hadd_epi32(_mm256_hadd_epi32(mv[0], mv[1]), _mm256_hadd_epi32(mv[2], mv[3]));
        const __m256 dmv = _mm256_set_m128(_mm_set1_ps(P->dmw[1][b]), _mm_set1_ps(P->dmw[0][b]));
        *yv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(M), _mm256_xor_ps(_mm256_mul_ps(dmv, dxv), signm), *yv);
    }
}

/* super-block b, steps of half hh, of NP row pairs x 4 tokens: the scaled int32 sums iv[pair][4 i + t] */
AI void kq_dots(const int FMT, const int NP, const kq_pair *P, int b, int hh, int nsc, const int8_t *const *xq,
                __m256i (*iv)[8])
{
    const int nh = FMT == PLK_Q6_K ? 2 : 1, nv = 8 / nh;
#if PLK_VNNI   /* the two rows' steps interleaved: zmm v of super-block b = [row r step v | row r+1 step v] */
    __m512i az[2][4];
    const __m512i *Wz[2];
    for (int q = 0; q < NP; q++) {
        Wz[q] = (const __m512i *)(P[q].wt[0] + (size_t)b * 512);
        for (int t = 0; t < 4; t++) az[q][t] = _mm512_setzero_si512();
    }
    for (int v = hh * nv; v < (hh + 1) * nv; v++) {
        __m512i Wv[2];
        for (int q = 0; q < NP; q++) Wv[q] = _mm512_load_si512(Wz[q] + v);
        for (int t = 0; t < 4; t++) {
            const __m512i X = _mm512_broadcast_i64x4(_mm256_load_si256((const __m256i *)(xq[t] + 32 * v)));
            for (int q = 0; q < NP; q++) az[q][t] = _mm512_dpbusd_epi32(az[q][t], Wv[q], X);
        }
    }
    for (int q = 0; q < NP; q++) {
        __m256i acc[8];
        for (int t = 0; t < 4; t++) {
            acc[t] = _mm512_castsi512_si256(az[q][t]);
            acc[4 + t] = _mm512_extracti64x4_epi64(az[q][t], 1);
        }
        for (int i = 0; i < 2; i++) {
            const __m256i sc = _mm256_loadu_si256((const __m256i *)(P[q].scv[i] + nsc * b + 8 * hh));
            for (int t = 0; t < 4; t++) {
                const __m256i m = _mm256_mullo_epi32(acc[4 * i + t], sc);
                iv[q][4 * i + t] = hh ? _mm256_add_epi32(iv[q][4 * i + t], m) : m;
            }
        }
    }
#else
    (void)NP;
    const __m256i *W[2] = { (const __m256i *)(P->wt[0] + (size_t)b * 256), (const __m256i *)(P->wt[1] + (size_t)b * 256) };
    /* the scales as int16 pairs per lane: vpmaddwd of the int16 sums by them is the scaled
     * int32 sum of each lane's sub-block (no vpmulld): sc x (s_lo + s_hi) */
    const int fold = FMT == PLK_Q4_K ? 8 : FMT == PLK_Q5_K ? 4 : 2;
    __m256i sc2[2];
    for (int i = 0; i < 2; i++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(P->scv[i] + nsc * b + 8 * hh));
        sc2[i] = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
    }
    for (int v0 = hh * nv; v0 < (hh + 1) * nv; v0 += fold) {
        __m256i s16[8];
        for (int k = 0; k < 8; k++) s16[k] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int v = v0; v < v0 + fold; v++) {   /* not unrolled: 8 sums + 3 operands stay in registers */
            const __m256i W0 = _mm256_load_si256(W[0] + v), W1 = _mm256_load_si256(W[1] + v);
            for (int t = 0; t < 4; t++) {
                const __m256i X = _mm256_load_si256((const __m256i *)(xq[t] + 32 * v));
                s16[t] = _mm256_add_epi16(s16[t], _mm256_maddubs_epi16(W0, X));
                s16[4 + t] = _mm256_add_epi16(s16[4 + t], _mm256_maddubs_epi16(W1, X));
            }
        }
        for (int k = 0; k < 8; k++) iv[0][k] = _mm256_add_epi32(iv[0][k], _mm256_madd_epi16(s16[k], sc2[k >> 2]));
    }
#endif
}

/* NP row pairs from row r over all token tiles (the pairs' planes prepared in P) */
AI void kq_pass(const int FMT, const int NP, const kq_pair *P, int r, int S, int T4, const plk_act *a,
                const uint8_t *xt, const int16_t *b32, const float *dxt, const uint8_t *next, size_t rowb, float *y,
                int ldy, int accum)
{
    const int nsc = FMT == PLK_Q6_K ? 16 : 8, nh = FMT == PLK_Q6_K ? 2 : 1;
    /* the next pass's rows (from DRAM) prefetched a few lines per step over this pass's tiles */
    const long nlines = next ? (long)(2 * NP * rowb / 64) : 0, nslots = (long)(T4 / 4) * S;
    const int per = nlines ? (int)((nlines + nslots - 1) / nslots) : 0;
    for (int t0 = 0; t0 < T4; t0 += 4) {
        __m256 yv[2] = { _mm256_setzero_ps(), _mm256_setzero_ps() };
        for (int b = 0; b < S; b++) {
            for (int k = 0; k < per; k++) {
                const long l = ((long)(t0 / 4) * S + b) * per + k;
                if (l < nlines) _mm_prefetch((const char *)next + 64 * l, _MM_HINT_T0);
            }
            const int8_t *xq[4];
            for (int t = 0; t < 4; t++) xq[t] = (const int8_t *)(xt + ((size_t)(t0 + t) * S + b) * 256);
            __m256i iv[2][8];
            for (int q = 0; q < NP; q++)
                for (int k = 0; k < 8; k++) iv[q][k] = _mm256_setzero_si256();   /* (AVX2 sums into it directly) */
            /* the 8 (row, token) dots of a pair advance together: 8 independent accumulation chains */
            for (int hh = 0; hh < nh; hh++) kq_dots(FMT, NP, P, b, hh, nsc, xq, iv);
            for (int q = 0; q < NP; q++) kq_pair_finish(FMT, &P[q], iv[q], b, t0, S, a, b32, dxt, &yv[q]);
        }
        for (int q = 0; q < NP; q++) {
            float res[8];
            _mm256_storeu_ps(res, yv[q]);
            for (int i = 0; i < 2; i++)
                for (int t = 0; t < 4; t++) {
                    float *o = y + (size_t)(t0 + t) * ldy + r + 2 * q + i;
                    *o = accum ? *o + res[4 * i + t] : res[4 * i + t];
                }
        }
    }
}

AI void kq_gemm(const int FMT, const plk_w *w, int r0, int r1, int T4, const plk_act *a, float *y, int ldy, int accum)
{
    const int S = a->ng, QB = plk_qbytes[FMT];
    const size_t rowb = (size_t)S * QB;
    const int nsc = FMT == PLK_Q6_K ? 16 : 8;
    /* scratch: activations re-laid (T4 x S x 256), per-32 block sums (T4 x S x 8 int16; q6_k: unused),
     * KQ_NP row pairs' re-laid codes, scales, mins, d, dmin */
    const size_t xb = (size_t)T4 * S * 256, bb = (size_t)T4 * S * 16 * 2;
    const size_t wb = (size_t)S * 256, sb = (size_t)S * nsc * 4, mb = (size_t)S * 16 * 2, fb = ((size_t)S * 4 + 31) & ~(size_t)31;
    const size_t db = (size_t)T4 * S * 4, pb = 2 * (wb + sb + mb + 2 * fb);
    uint8_t *buf = (uint8_t *)plk_scratch(xb + bb + KQ_NP * pb + db + 256, 1);
    if (!buf) { plk_oom_set(); return; }
    float *dxt = (float *)(buf + xb + bb + KQ_NP * pb);   /* [tile][b][4 tokens] */
    for (int t = 0; t < T4; t++)
        for (int b = 0; b < S; b++) dxt[((size_t)(t / 4) * S + b) * 4 + t % 4] = a->dx[(size_t)t * S + b];
    uint8_t *xt = buf;
    int16_t *b32 = (int16_t *)(buf + xb);
    kq_pair P[2];
    for (int q = 0; q < KQ_NP; q++) {
        uint8_t *p = buf + xb + bb + q * pb;
        P[q].wt[0] = p;        /* 2 wb contiguous: the VNNI variant interleaves the two rows there */
        P[q].wt[1] = p + wb;
        p += 2 * wb;
        for (int i = 0; i < 2; i++) {
            P[q].scv[i] = (int32_t *)p; p += sb;
            P[q].mnv[i] = (int16_t *)p; p += mb;
            P[q].dw[i] = (float *)p; p += fb;
            P[q].dmw[i] = (float *)p; p += fb;
        }
    }
    for (int t = 0; t < T4; t++)
        for (int b = 0; b < S; b++) {
            kq_relayout(FMT, (const uint32_t *)(a->qs + (size_t)t * a->Kp + (size_t)b * 256),
                        (uint32_t *)(xt + ((size_t)t * S + b) * 256), 8);
            if (FMT != PLK_Q6_K) {
                const int16_t *bs = a->bs + (size_t)t * (a->Kp / 16) + (size_t)b * 16;
                const __m128i h = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bs), _mm_loadu_si128((const __m128i *)(bs + 8)));
                _mm256_storeu_si256((__m256i *)(b32 + ((size_t)t * S + b) * 16), _mm256_set_m128i(h, h));   /* [b32 | b32] */
            }
        }
    for (int r = r0; r + 2 <= r1;) {
        const int np = KQ_NP == 2 && r + 4 <= r1 ? 2 : 1;
        for (int q = 0; q < np; q++)
            for (int i = 0; i < 2; i++)
#if PLK_VNNI
                kq_row_prep(FMT, w->qs + (size_t)(r + 2 * q + i) * rowb, S, P[q].wt[0] + 32 * i, 512, 64, P[q].scv[i],
                            P[q].mnv[i], P[q].dw[i], P[q].dmw[i]);
#else
                kq_row_prep(FMT, w->qs + (size_t)(r + 2 * q + i) * rowb, S, P[q].wt[i], 256, 32, P[q].scv[i],
                            P[q].mnv[i], P[q].dw[i], P[q].dmw[i]);
#endif
        const uint8_t *next = r + 2 * np + 2 <= r1 ? w->qs + (size_t)(r + 2 * np) * rowb : NULL;
        if (np == 2) kq_pass(FMT, 2, P, r, S, T4, a, xt, b32, dxt, next, rowb, y, ldy, accum);
        else kq_pass(FMT, 1, P, r, S, T4, a, xt, b32, dxt, next, rowb, y, ldy, accum);
        r += 2 * np;
    }
    free(buf);
}

#if PLK_VNNI
/* ---- K-quant GEMM on AVX-512 VNNI: 32 rows in lanes x 4 tokens ------------------------------------------------
 * The pair tiles above leave each (row, token) sum spread over 8 lanes, and per super-block the scale multiplies,
 * the transposing hadd tree and the mins' dot cost about as much as the byte dots. Here int32 lane l of a zmm is
 * row 16 h + l: step s of a super-block holds the 4 codes of elements 4s .. 4s+3 of 16 rows, the token's
 * activation dword s is broadcast, and vpdpbusd leaves every row's sub-block dot in its own lane. The scales are
 * one vpmulld per sub-block and 16 rows, the mins (q4_k / q5_k) and q6_k's -32 offset one vpdpwssd per pair of
 * sub-blocks against the broadcast pair of block sums, and no horizontal sum is left. The codes are re-laid once
 * per call and 32 rows (decoded, then a 16 x 16 dword transpose per 16 rows and 16 steps) and stay in L2 while
 * every token tile passes over them, while the next 32 rows are prefetched a few lines per step (without that, the
 * re-laying waited on DRAM: ~4 ms of a 10 ms call below). The integers are the per-token kernel's and so are the
 * float steps per (row, token) (fma(isum, d_w d_x, y), fma(imin, -(dmin_w d_x), y) per super-block in order):
 * bit-identical. Measured (4096 x 8192, 1 thread, best of 7, 3 alternating runs, Zen 4 guest) against the pair
 * tiles: 32 tokens q4_k 10.0 -> 8.1 ms, q5_k 10.0 -> 8.0, q6_k 12.1 -> 10.0; q4_k at 8 / 16 / 64 tokens 3.3-4.0 ->
 * 3.9, 5.4 -> 5.2, 18.8 -> 14.1 ms. */
#define KL_ROWS 32

/* r[i] = 16 dwords of row i -> r[k] = dword k of rows 0 .. 15 */
AI void kl_tr16(__m512i *r)
{
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    __m512i u[16];   /* u[4i + k], 128-bit lane L: dword 4L + k of rows 4i .. 4i+3 */
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int k = 0; k < 4; k++) {   /* dword 4m + k = lane m of u[k], u[4 + k], u[8 + k], u[12 + k] */
        const __m512i ab0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), ab1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xee);
        const __m512i cd0 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44), cd1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xee);
        r[k] = _mm512_shuffle_i32x4(ab0, cd0, 0x88);
        r[4 + k] = _mm512_shuffle_i32x4(ab0, cd0, 0xdd);
        r[8 + k] = _mm512_shuffle_i32x4(ab1, cd1, 0x88);
        r[12 + k] = _mm512_shuffle_i32x4(ab1, cd1, 0xdd);
    }
}

/* 32 rows' prepared planes: per super-block b, codes at w + 8192 b (step s, half h: 64 bytes at 128 s + 64 h),
 * sub-block scales int32 sc[32 (nsc b + j) + lane], pair sources (q4_k/q5_k: mins, q6_k: scales) as int16 pairs
 * in int32 lanes pr[32 (npr b + k) + lane], d and dmin dw / dmw[32 b + lane] */
typedef struct { uint8_t *w; int32_t *sc, *pr; float *dw, *dmw; } kl_blk;

AI void kl_prep(const int FMT, const uint8_t *rows, size_t rowb, int S, const kl_blk *B, uint8_t *tmp)
{
    const int QB = plk_qbytes[FMT], nsc = FMT == PLK_Q6_K ? 16 : 8, npr = nsc / 2;
    for (int b = 0; b < S; b++) {
        for (int r = 0; r < KL_ROWS; r++) {
            const uint8_t *blk = rows + (size_t)r * rowb + (size_t)b * QB;
            __m256i c[8];
            kq_codes(FMT, blk, c);
            for (int k = 0; k < 8; k++) _mm256_store_si256((__m256i *)(tmp + 256 * r + 32 * k), c[k]);
            int16_t sc[16], pv[16];
            uint16_t hd, hm = 0;
            if (FMT == PLK_Q6_K) {
                for (int j = 0; j < 16; j++) sc[j] = pv[j] = ((const int8_t *)(blk + 192))[j];
                memcpy(&hd, blk + 208, 2);
            } else {
                __m128i s8, m8;
                kq_scale_min(blk + 4, &s8, &m8);
                _mm_storeu_si128((__m128i *)sc, s8);
                _mm_storeu_si128((__m128i *)pv, m8);
                memcpy(&hd, blk, 2);
                memcpy(&hm, blk + 2, 2);
            }
            for (int j = 0; j < nsc; j++) B->sc[32 * (nsc * b + j) + r] = sc[j];
            for (int k = 0; k < npr; k++)
                B->pr[32 * (npr * b + k) + r] = (int32_t)((uint32_t)(uint16_t)pv[2 * k] | (uint32_t)(uint16_t)pv[2 * k + 1] << 16);
            B->dw[32 * b + r] = _cvtsh_ss(hd);
            B->dmw[32 * b + r] = FMT == PLK_Q6_K ? 0.0f : _cvtsh_ss(hm);
        }
        uint8_t *o = B->w + (size_t)b * 8192;
        for (int h = 0; h < 2; h++)
            for (int q = 0; q < 4; q++) {
                __m512i v[16];
                for (int i = 0; i < 16; i++) v[i] = _mm512_load_si512((const __m512i *)(tmp + 256 * (16 * h + i) + 64 * q));
                kl_tr16(v);
                for (int k = 0; k < 16; k++) _mm512_store_si512((__m512i *)(o + 128 * (16 * q + k) + 64 * h), v[k]);
            }
    }
}

/* 32 rows from r x tokens 0 .. T4 - 1 (4 at a time); b32: per-32 block sums of the tokens (T4 x S x 8 int16) */
AI void kl_pass(const int FMT, const kl_blk *B, int r, int S, int T4, const plk_act *a, const int16_t *b32,
                const uint8_t *next, size_t rowb, float *y, int ldy, int accum)
{
    /* the next block's 32 rows (from DRAM) prefetched a few lines per super-block step of this pass */
    const long lpr = (long)((rowb + 63) / 64), nlines = next ? KL_ROWS * lpr : 0, nslots = (long)(T4 / 4) * S;
    const int per = nlines ? (int)((nlines + nslots - 1) / nslots) : 0;
    long pl = 0;
    const int nsc = FMT == PLK_Q6_K ? 16 : 8, npr = nsc / 2, spb = 64 / nsc;
    const __m512 signm = _mm512_set1_ps(-0.0f);
    for (int t0 = 0; t0 < T4; t0 += 4) {
        __m512 yv[2][4];
        for (int h = 0; h < 2; h++)
            for (int t = 0; t < 4; t++) yv[h][t] = _mm512_setzero_ps();
        for (int b = 0; b < S; b++) {
            for (int k = 0; k < per && pl < nlines; k++, pl++)
                _mm_prefetch((const char *)next + (size_t)(pl / lpr) * rowb + 64 * (size_t)(pl % lpr), _MM_HINT_T0);
            const int32_t *xq[4];
            for (int t = 0; t < 4; t++) xq[t] = (const int32_t *)(a->qs + (size_t)(t0 + t) * a->Kp + (size_t)b * 256);
            const __m512i *W = (const __m512i *)(B->w + (size_t)b * 8192);
            __m512i iv[2][4];
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 4; t++) iv[h][t] = _mm512_setzero_si512();
            for (int j = 0; j < nsc; j++) {
                /* one sub-block: spb steps, 8 named accumulators (arrays here made GCC copy them every step) */
                __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
                __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00;
                const __m512i *Wj = W + 2 * spb * j;
                const int32_t *x0 = xq[0] + spb * j, *x1 = xq[1] + spb * j, *x2 = xq[2] + spb * j, *x3 = xq[3] + spb * j;
#define KL_STEP(s_) do { \
                    const __m512i W0 = _mm512_load_si512(Wj + 2 * (s_)), W1 = _mm512_load_si512(Wj + 2 * (s_) + 1); \
                    __m512i X = _mm512_set1_epi32(x0[s_]); \
                    a00 = _mm512_dpbusd_epi32(a00, W0, X); a10 = _mm512_dpbusd_epi32(a10, W1, X); \
                    X = _mm512_set1_epi32(x1[s_]); \
                    a01 = _mm512_dpbusd_epi32(a01, W0, X); a11 = _mm512_dpbusd_epi32(a11, W1, X); \
                    X = _mm512_set1_epi32(x2[s_]); \
                    a02 = _mm512_dpbusd_epi32(a02, W0, X); a12 = _mm512_dpbusd_epi32(a12, W1, X); \
                    X = _mm512_set1_epi32(x3[s_]); \
                    a03 = _mm512_dpbusd_epi32(a03, W0, X); a13 = _mm512_dpbusd_epi32(a13, W1, X); \
                } while (0)
                KL_STEP(0); KL_STEP(1); KL_STEP(2); KL_STEP(3);
                if (spb == 8) { KL_STEP(4); KL_STEP(5); KL_STEP(6); KL_STEP(7); }
#undef KL_STEP
                const __m512i sc0 = _mm512_load_si512((const __m512i *)(B->sc + 32 * (nsc * b + j)));
                const __m512i sc1 = _mm512_load_si512((const __m512i *)(B->sc + 32 * (nsc * b + j) + 16));
                iv[0][0] = _mm512_add_epi32(iv[0][0], _mm512_mullo_epi32(a00, sc0));
                iv[0][1] = _mm512_add_epi32(iv[0][1], _mm512_mullo_epi32(a01, sc0));
                iv[0][2] = _mm512_add_epi32(iv[0][2], _mm512_mullo_epi32(a02, sc0));
                iv[0][3] = _mm512_add_epi32(iv[0][3], _mm512_mullo_epi32(a03, sc0));
                iv[1][0] = _mm512_add_epi32(iv[1][0], _mm512_mullo_epi32(a10, sc1));
                iv[1][1] = _mm512_add_epi32(iv[1][1], _mm512_mullo_epi32(a11, sc1));
                iv[1][2] = _mm512_add_epi32(iv[1][2], _mm512_mullo_epi32(a12, sc1));
                iv[1][3] = _mm512_add_epi32(iv[1][3], _mm512_mullo_epi32(a13, sc1));
            }
            /* the pair terms: q4_k/q5_k imin = sum_j mn_j b32_j; q6_k 32 sum_j sc_j bs_j, taken off isum */
            __m512i pv[2][4];
            for (int h = 0; h < 2; h++)
                for (int t = 0; t < 4; t++) pv[h][t] = _mm512_setzero_si512();
            for (int k = 0; k < npr; k++)
                for (int h = 0; h < 2; h++) {
                    const __m512i P = _mm512_load_si512((const __m512i *)(B->pr + 32 * (npr * b + k) + 16 * h));
                    for (int t = 0; t < 4; t++) {
                        int32_t xs;
                        if (FMT == PLK_Q6_K) memcpy(&xs, a->bs + (size_t)(t0 + t) * (a->Kp / 16) + (size_t)b * 16 + 2 * k, 4);
                        else memcpy(&xs, b32 + ((size_t)(t0 + t) * S + b) * 8 + 2 * k, 4);
                        pv[h][t] = _mm512_dpwssd_epi32(pv[h][t], P, _mm512_set1_epi32(xs));
                    }
                }
            for (int h = 0; h < 2; h++) {
                const __m512 dwv = _mm512_load_ps(B->dw + 32 * b + 16 * h), dmv = _mm512_load_ps(B->dmw + 32 * b + 16 * h);
                for (int t = 0; t < 4; t++) {
                    const __m512 dx = _mm512_set1_ps(a->dx[(size_t)(t0 + t) * S + b]);
                    if (FMT == PLK_Q6_K) iv[h][t] = _mm512_sub_epi32(iv[h][t], _mm512_slli_epi32(pv[h][t], 5));
                    yv[h][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iv[h][t]), _mm512_mul_ps(dwv, dx), yv[h][t]);
                    if (FMT != PLK_Q6_K)
                        yv[h][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pv[h][t]),
                                                   _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(_mm512_mul_ps(dmv, dx)),
                                                                                        _mm512_castps_si512(signm))), yv[h][t]);
                }
            }
        }
        for (int t = 0; t < 4; t++)
            for (int h = 0; h < 2; h++) {
                float *o = y + (size_t)(t0 + t) * ldy + r + 16 * h;
                _mm512_storeu_ps(o, accum ? _mm512_add_ps(_mm512_loadu_ps(o), yv[h][t]) : yv[h][t]);
            }
    }
}

/* rows r0 .. r1 - 1 ((r1 - r0) % 32 == 0) x tokens 0 .. T4 - 1 */
AI void kl_gemm(const int FMT, const plk_w *w, int r0, int r1, int T4, const plk_act *a, float *y, int ldy, int accum)
{
    const int S = a->ng, nsc = FMT == PLK_Q6_K ? 16 : 8;
    const size_t rowb = (size_t)S * plk_qbytes[FMT];
    const size_t wb = (size_t)S * 8192, scb = (size_t)S * nsc * 128, prb = scb / 2, fb = (size_t)S * 128;
    const size_t tb = 256 * KL_ROWS, bb = FMT == PLK_Q6_K ? 0 : ((size_t)T4 * S * 16 + 63) & ~(size_t)63;
    uint8_t *buf = (uint8_t *)plk_scratch(wb + scb + prb + 2 * fb + tb + bb, 1);
    if (!buf) { plk_oom_set(); return; }
    kl_blk B;
    B.w = buf;
    B.sc = (int32_t *)(buf + wb);
    B.pr = (int32_t *)(buf + wb + scb);
    B.dw = (float *)(buf + wb + scb + prb);
    B.dmw = (float *)(buf + wb + scb + prb + fb);
    uint8_t *tmp = buf + wb + scb + prb + 2 * fb;
    int16_t *b32 = (int16_t *)(tmp + tb);
    if (FMT != PLK_Q6_K)   /* per-32 sums of the Q8_K per-16 block sums */
        for (int t = 0; t < T4; t++)
            for (int i = 0; i < S * 8; i++) {
                const int16_t *bs = a->bs + (size_t)t * (a->Kp / 16) + 2 * (size_t)i;
                b32[(size_t)t * S * 8 + i] = (int16_t)(bs[0] + bs[1]);
            }
    for (int r = r0; r < r1; r += KL_ROWS) {
        kl_prep(FMT, w->qs + (size_t)r * rowb, rowb, S, &B, tmp);
        const uint8_t *next = r + 2 * KL_ROWS <= r1 ? w->qs + (size_t)(r + KL_ROWS) * rowb : NULL;
        kl_pass(FMT, &B, r, S, T4, a, b32, next, rowb, y, ldy, accum);
    }
    free(buf);
}
#endif

AI void rows_kq(const int FMT, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int accum)
{
    const int S = a->ng;
    const size_t rowb = (size_t)S * plk_qbytes[FMT];
    int t_done = 0;
    if (a->T >= KQ_GEMM_MINT && r1 - r0 >= 2) {
        const int T4 = a->T & ~3;
        int rg = r0;
#if PLK_VNNI   /* whole blocks of 32 rows in lanes, the rest in row pairs */
        if (r1 - r0 >= KL_ROWS) {
            rg = r0 + (r1 - r0) / KL_ROWS * KL_ROWS;
            kl_gemm(FMT, w, r0, rg, T4, a, y, ldy, accum);
        }
#endif
        const int r2 = rg + ((r1 - rg) & ~1);
        if (r2 > rg) kq_gemm(FMT, w, rg, r2, T4, a, y, ldy, accum);
        t_done = T4;
    }
    if (!t_done && r1 - r0 >= 8) {   /* decode / small batches: 8 rows in lanes */
        const int r8 = r0 + (r1 - r0) / 8 * 8;
#if PLK_VNNI
        if (FMT != PLK_Q6_K && !a->xw) { plk_oom_set(); return; }   /* act_prepare could not make it */
#endif
        for (int r = r0; r < r8; r += 8) {
            const uint8_t *row = w->qs + (size_t)r * rowb;
            for (int ts = 0; ts < a->T; ts += 4) {
                const int nt = a->T - ts < 4 ? a->T - ts : 4;
                __m256 yv[4];
                switch (nt) {
                case 1:
#if PLK_VNNI
                    if (FMT == PLK_Q6_K && S <= KQ6_RM_MAXS) { kq6_rows8_rm(row, rowb, S, a, ts, yv); break; }
#endif
                    KQ_ROWS8(FMT, 1, row, rowb, S, a, ts, yv); break;
                case 2: KQ_ROWS8(FMT, 2, row, rowb, S, a, ts, yv); break;
                case 3: KQ_ROWS8(FMT, 3, row, rowb, S, a, ts, yv); break;
                default: KQ_ROWS8(FMT, 4, row, rowb, S, a, ts, yv); break;
                }
                for (int t = 0; t < nt; t++) {
                    float *o = y + (size_t)(ts + t) * ldy + r;
                    __m256 v = yv[t];
                    if (accum) v = _mm256_add_ps(_mm256_loadu_ps(o), v);
                    _mm256_storeu_ps(o, v);
                }
            }
        }
        r0 = r8;
    }
    for (int r = r0; r < r1; r++) {
        const int odd = t_done && ((r - r0) >= ((r1 - r0) & ~1));
        const uint8_t *row = w->qs + (size_t)r * rowb;
        for (int ts = odd ? 0 : t_done; ts < a->T; ts += 4) {
            const int nt = a->T - ts < 4 ? a->T - ts : 4;
            float res[4];
            switch (nt) {
            case 1: kq_row(FMT, 1, row, S, a, ts, res); break;
            case 2: kq_row(FMT, 2, row, S, a, ts, res); break;
            case 3: kq_row(FMT, 3, row, S, a, ts, res); break;
            default: kq_row(FMT, 4, row, S, a, ts, res); break;
            }
            for (int t = 0; t < nt; t++) {
                float *o = y + (size_t)(ts + t) * ldy + r;
                *o = accum ? *o + res[t] : res[t];
            }
        }
    }
}

void NAME(rows_q4_k_q8k)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq(PLK_Q4_K, w, r0, r1, a, y, ldy, acc); }
void NAME(rows_q5_k_q8k)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq(PLK_Q5_K, w, r0, r1, a, y, ldy, acc); }
void NAME(rows_q6_k_q8k)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_kq(PLK_Q6_K, w, r0, r1, a, y, ldy, acc); }

/* ---- q5_0 / q5_1 (32-blocks, q8 activations) ---- */
AI __m256i q5_unpack(const uint8_t *blk, int off)
{
    uint32_t qh;
    memcpy(&qh, blk + off, 4);
    const __m128i ql = _mm_loadu_si128((const __m128i *)(blk + off + 4));
    const __m256i lo = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(ql, 4), ql), _mm256_set1_epi8(0x0f));
#if PLK_VNNI
    const __m256i hi = _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else
    /* byte i <- byte i/8 of qh, then bit i%8 of it */
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
#endif
    return _mm256_or_si256(lo, hi);
}

/* per row and token: acc (8 lanes) += cvt(dot of block b) * (d_w dx_b), block by block; off += Bw bx_b;
 * result hsum8(acc) + off. The same steps for every token whatever the batch (batch invariant). */
AI void q5_row(const int FMT, const int NT, const uint8_t *row, int nb, const plk_act *a, int t0, float *res)
{
    const int QB = plk_qbytes[FMT], off = FMT == PLK_Q5_1 ? 4 : 2;
    __m256 acc[4];
    float bo[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) { acc[t] = _mm256_setzero_ps(); bo[t] = 0.0f; }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + (size_t)b * QB;
        if (!(b & 1)) _mm_prefetch((const char *)blk + PLK_PF, _MM_HINT_T0);
        const __m256i c = q5_unpack(blk, off);
        uint16_t hd, hm;
        memcpy(&hd, blk, 2);
        const float dw = _cvtsh_ss(hd);
        float bw = -16.0f * dw;
        if (FMT == PLK_Q5_1) { memcpy(&hm, blk + 2, 2); bw = _cvtsh_ss(hm); }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const size_t tt = (size_t)(t0 + t);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(a->qs + tt * a->Kp + (size_t)b * 32));
            const float dx = a->dx[tt * nb + b], bx = a->bx[tt * a->ng + b];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sdot(c, xv)), _mm256_set1_ps(dw * dx), acc[t]);
            bo[t] = _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(bw), _mm_set_ss(bx), _mm_set_ss(bo[t])));
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) res[t] = hsum8(acc[t]) + bo[t];
}

/* 8 rows in lanes (rows r..r+7, lane i = row r + i), NT tokens: per block, the 8 rows' integer dots by one
 * transposing reduction, then acc += cvt(dots) * (d_w dx_b) and off += Bw bx_b as vectors over the rows (the d
 * and m of the 8 blocks by 8 dword loads); result acc + off. The same steps for every token whatever the batch. */
AI void q5_rows8(const int FMT, const int NT, const uint8_t *row0, size_t rowb, int nb, const plk_act *a, int t0,
                 __m256 *res)
{
    const int QB = plk_qbytes[FMT], off = FMT == PLK_Q5_1 ? 4 : 2;
    __m256 acc[4], vo[4];
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) { acc[t] = _mm256_setzero_ps(); vo[t] = _mm256_setzero_ps(); }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk0 = row0 + (size_t)b * QB;
        /* d (and m) of the 8 blocks, [d | m << 16] (q5_0: the high half is qh, unused); a vpgatherdd here had cost a
         * third of the kernel's time on Zen 4 */
        const __m256i dm = dword8(blk0, rowb);
        const __m256 dv = h2f8(dm, 0), bw = FMT == PLK_Q5_1 ? h2f8(dm, 1) : _mm256_mul_ps(_mm256_set1_ps(-16.0f), dv);
        /* the next 8-row set into L2 in address order, 8 QB bytes of it per block (kq_prefetch8) */
        for (size_t j = (size_t)b * 8 * QB, o = (j + 63) & ~(size_t)63; o < j + 8 * (size_t)QB; o += 64)
            _mm_prefetch((const char *)row0 + 8 * rowb + o, _MM_HINT_T1);
        __m256i c[8];
        for (int i = 0; i < 8; i++) {
            const uint8_t *blk = blk0 + (size_t)i * rowb;
            if (!(b & 1)) _mm_prefetch((const char *)blk + 256, _MM_HINT_T0);   /* this row a few blocks ahead into L1 */
            c[i] = q5_unpack(blk, off);
        }
#pragma GCC unroll 4
        for (int t = 0; t < NT; t++) {
            const size_t tt = (size_t)(t0 + t);
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(a->qs + tt * a->Kp + (size_t)b * 32));
            __m256i p[8];
            for (int i = 0; i < 8; i++) p[i] = sdot(c[i], xv);
            const __m256 dx = _mm256_set1_ps(a->dx[tt * nb + b]), bx = _mm256_set1_ps(a->bx[tt * a->ng + b]);
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hsum8x8i(p)), _mm256_mul_ps(dv, dx), acc[t]);
            vo[t] = _mm256_fmadd_ps(bw, bx, vo[t]);
        }
    }
#pragma GCC unroll 4
    for (int t = 0; t < NT; t++) res[t] = _mm256_add_ps(acc[t], vo[t]);
}

AI void rows_q5(const int FMT, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int accum)
{
    const int nb = a->nb;
    const size_t rowb = (size_t)nb * plk_qbytes[FMT];
    /* whole sets of 8 rows in lanes (the leftover r1 - r0 < 8 rows: one at a time below) */
    for (; r0 + 8 <= r1; r0 += 8) {
        const uint8_t *row = w->qs + (size_t)r0 * rowb;
        for (int ts = 0; ts < a->T; ts += 4) {
            const int nt = a->T - ts < 4 ? a->T - ts : 4;
            __m256 rv[4];
            switch (nt) {
            case 1: q5_rows8(FMT, 1, row, rowb, nb, a, ts, rv); break;
            case 2: q5_rows8(FMT, 2, row, rowb, nb, a, ts, rv); break;
            case 3: q5_rows8(FMT, 3, row, rowb, nb, a, ts, rv); break;
            default: q5_rows8(FMT, 4, row, rowb, nb, a, ts, rv); break;
            }
            for (int t = 0; t < nt; t++) {
                float *o = y + (size_t)(ts + t) * ldy + r0;
                __m256 v = rv[t];
                if (accum) v = _mm256_add_ps(_mm256_loadu_ps(o), v);
                _mm256_storeu_ps(o, v);
            }
        }
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = w->qs + (size_t)r * rowb;
        for (int ts = 0; ts < a->T; ts += 4) {
            const int nt = a->T - ts < 4 ? a->T - ts : 4;
            float res[4];
            switch (nt) {
            case 1: q5_row(FMT, 1, row, nb, a, ts, res); break;
            case 2: q5_row(FMT, 2, row, nb, a, ts, res); break;
            case 3: q5_row(FMT, 3, row, nb, a, ts, res); break;
            default: q5_row(FMT, 4, row, nb, a, ts, res); break;
            }
            for (int t = 0; t < nt; t++) {
                float *o = y + (size_t)(ts + t) * ldy + r;
                *o = (accum ? *o : 0.0f) + res[t];
            }
        }
    }
}

void NAME(rows_q5_0_q8)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_q5(PLK_Q5_0, w, r0, r1, a, y, ldy, acc); }
void NAME(rows_q5_1_q8)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc)
{ rows_q5(PLK_Q5_1, w, r0, r1, a, y, ldy, acc); }

/* ---- Q8_K activations (formats.quantize_act_k, bit-exact): first largest |x| per 256, q = cvtps (round to
 * nearest even, as rint) of iscale * x, clamped at 127; d = 1 / iscale ---- */
void NAME(quantize_act_q8k)(const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs)
{
    const int S = K / 256;
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int t = 0; t < T; t++)
        for (int b = 0; b < S; b++) {
            const float *v = x + (size_t)t * ldx + (size_t)b * 256;
            int8_t *q = qs + (size_t)t * K + (size_t)b * 256;
            int16_t *s = bs + (size_t)t * (K / 16) + (size_t)b * 16;
            __m256 mx = _mm256_setzero_ps();
            for (int i = 0; i < 256; i += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(v + i), absm));
            __m128 m = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            m = _mm_max_ss(m, _mm_movehdup_ps(m));
            const float amax = _mm_cvtss_f32(m);
            if (!(amax > 0.0f)) {
                memset(q, 0, 256);
                memset(s, 0, 32);
                d[(size_t)t * S + b] = 0.0f;
                continue;
            }
            int i0 = 0;                       /* the first element with |x| == amax, its signed value */
            {
                const __m256 am = _mm256_set1_ps(amax);
                int i = 0, msk = 0;
                for (; i < 256; i += 8) {
                    msk = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(v + i), absm), am, _CMP_EQ_OQ));
                    if (msk) break;
                }
                i0 = i < 256 ? i + __builtin_ctz((unsigned)msk) : 0;
            }
            const float is = -127.0f / v[i0];
            const __m256 vis = _mm256_set1_ps(is);
            const __m256i c127 = _mm256_set1_epi32(127);
            for (int j = 0; j < 256; j += 32) {
                __m256i qi[4];
                for (int k = 0; k < 4; k++)
                    qi[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(vis, _mm256_loadu_ps(v + j + 8 * k))), c127);
                /* sums of 16 (two vectors each) */
                for (int h = 0; h < 2; h++) {
                    __m256i sv = _mm256_add_epi32(qi[2 * h], qi[2 * h + 1]);
                    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sv), _mm256_extracti128_si256(sv, 1));
                    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
                    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
                    s[j / 16 + h] = (int16_t)_mm_cvtsi128_si32(s4);
                }
                __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
                p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256((__m256i *)(q + j), p8);
            }
            d[(size_t)t * S + b] = 1.0f / is;
        }
}
