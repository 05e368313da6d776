/* Table-lookup (T-MAC style) kernels for q1, tern and q2 on 256-bit vectors; included by plk_avx2.c and
 * plk_avx512.c after plk_simd.h (inside their `#pragma GCC target` regions). Our own code; the idea is T-MAC's /
 * bitnet.cpp's TL. The AVX-512 build is the same code compiled with AVX-512 VL enabled: 32 vector registers (the
 * tile's 8 accumulators, 4 scale vectors and the lookups' temporaries no longer spill) and EVEX forms, and since
 * the fourteenth session its lookups are vpermw over exact int16 tables (tl_block_permw); same bits. Measured
 * in the thirteenth session (both builds vpshufb, T0 prefetch; GEMV 32768 / 65536 x 8192, 1 thread, best of 15,
 * the two builds alternating in one process, three runs, Zen 4 guest), AVX2 -> AVX-512 build: weights in DRAM
 * q2 11.6-11.9 -> 14.6-14.9 GB/s, tern 12.0-12.3 -> 13.7-14.8, q1 14.5-14.6 -> 15.4-15.7; in L3 (2048 / 4096 rows)
 * q2 20.8 -> 22.0, tern 20.2 -> 20.3, q1 19.0 -> 19.6. This session's figures: tl_block_permw and the prefetch.
 *
 * Tables (plk_tl_tables_avx2 / _avx512, once per call and token, shared by every row): for each run of E
 * consecutive activations (E = 4 for q1: 1-bit codes; E = 2 for q2/tern: 2-bit codes) the 16 integer
 * dots of those activations with every possible 4-bit index: q1 v -> sum_k bit_k(v) x_k, q2/tern
 * v -> (v & 3) x_0 + (v >> 2) x_1. Entries reach +-508 / +-762: more than a byte, and vpshufb looks up
 * bytes (16 per 128-bit lane), so a table is two 16-byte planes and one lookup of 32 indices is two
 * vpshufb. The planes are the low 6 bits and the rest of v + BIAS (>= 0; BIAS = 512 for q1, 768 for
 * q2/tern), each summed in bytes over 4 lookups (<= 4 x 63 = 252 and <= 4 x 23 = 92: no overflow), then
 * one vpmaddubsw (1, 64) per half rebuilds lo + 64 hi in int16, and the bias is taken off once (the int16
 * sums start at -lookups x BIAS).
 *
 * Why the weights are re-laid (plk_tl_pack, layout in plk.h): one vpshufb applies one table to 32
 * indices, so the 32 indices of a vector must belong to 32 different rows at the same activation run.
 * The stored planes are row-major (one row's codes are contiguous), and their bit order puts elements
 * i, 8+i, 16+i, 24+i (q1) or i, 16+i (q2) into one nibble, not 4 (2) consecutive elements whose
 * activations a table covers. So the codes are re-laid once, per
 * tile of 32 rows: a group's record is the rows' fp16 scales (d, then m for q2), then 8 (q1) or 16 (q2/tern)
 * vectors of 32 bytes, vector i holding the indices of runs 2i (low nibble) and 2i+1 (high nibble) of that
 * group for the 32 rows (scales first: the kernel reads them first, so the record is read in address order;
 * measured, AVX2 build, GEMV from DRAM, 1 thread: 11.4-11.9 -> 13.3-14.1 GB/s). The records are stored in the
 * order the kernel reads them (K-chunks of super-tiles, plk.h), so a thread's rows are one linear stream for the
 * prefetcher. Same bytes per weight as the plain planes.
 *
 * Exactness and order: a 32-block's lookups (q1: 8; q2/tern: 16) are summed in int16 (|sum| <= 8 x 508,
 * resp. 16 x 762 around the bias) and widened once per block: I_b, the exact integer dot of the block.
 * The float steps per row are then acc += I_b * (d_w * (A dx_b)) block by block and vs += (m or d) * bx_g
 * group by group, out = ((out or 0) + acc) + (+-1) vs, with acc and vs in registers (4 + 4 vectors of 8
 * rows). The multiply-add kernel of these formats (rows_lane8 in plk_simd.h) takes the same float steps
 * in the same order, lane = row, so TL and multiply-add give bit-identical outputs and may be mixed
 * freely (rows outside whole tiles, short rows (ng <= SMALL_NG), matrices without a TL layout, a failed
 * table allocation: multiply-add), and batch invariance holds whichever runs. */

/* table entry form: the biased 6-bit split for every format (measured, GEMV 4096 x 4096, 1 thread, best
 * of 200: q2/tern ~15% faster than exact int16 byte planes unpacked per lookup; q1, since a whole block's
 * 8 lookups are summed before widening, 163 vs 173 us) */
#define TL_BIAS(f) ((f) == PLK_Q1 ? 512 : 768)
/* the AVX-512 build looks up exact int16 entries with vpermw (TL_PERMW, tl_block_permw); the AVX2 one byte planes */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define TL_PERMW 1
#else
#define TL_PERMW 0
#endif
/* software prefetch of the stream (a thread's tiles are one linear stream), in group records: far ahead into L2
 * (prefetcht1), and again a little ahead into L1. A T0 prefetch holds one of the core's few L1 miss buffers until
 * its line arrives, so T0 alone (8 records ahead: the kernel until the fourteenth session) kept ~20 lines in
 * flight, ~10-15 GB/s a thread from DRAM, where a plain read gets ~30; the L2's queue is deeper. Measured (GEMV
 * 32768 x 8192 q2, weights in DRAM, Zen 4 guest, best of 15, builds alternating, 3 rounds), 1 thread: T0 at 8
 * 13.5-15.2 GB/s, T1 at 32 15.4-21.9, T1 at 32 + T0 at 2 16.7-21.6; 2 threads 20-26 -> 30-34 (probe ~35). */
#ifndef PLK_TL_PF_L2
#define PLK_TL_PF_L2 32
#endif
/* L1 distance 4 records, not 2 (7 Dec 2026, Zen 5 guest, GEMV from DRAM, 2 threads, the two builds with the same
 * flags alternated in one process, paired per round, scripts/phase_ab.py --tl): AVX-512 q2 / tern 2-3% faster in
 * both of the host's phases, q1 1.5% slower, AVX2 level to 3% faster; 6 and 8 records level, 1 or none slower */
#ifndef PLK_TL_PF_L1
#define PLK_TL_PF_L1 4
#endif

/* tables of one token: run a (0 .. Kp/E - 1) at tab + 32a: AVX2 16 low bytes, 16 high bytes; AVX-512 16 int16 */
void NAME(plk_tl_tables)(int fmt, const plk_act *a, uint8_t *tab)
{
    const int E = plk_tl_elems(fmt), nrun = a->Kp / E;
    const size_t stride = (size_t)nrun * 32;
#if !TL_PERMW
    /* per 128-bit lane: the even (low) bytes of the 8 int16 to bytes 0..7, the odd (high) to 8..15 */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i bias = _mm256_set1_epi16(TL_BIAS(fmt)), m63 = _mm256_set1_epi16(63);
#endif
    const __m256i v = _mm256_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i one = _mm256_set1_epi16(1), three = _mm256_set1_epi16(3);
    const __m256i zero = _mm256_setzero_si256();
    /* q1: bit k of v as a 0 / -1 mask; q2/tern: the two 2-bit codes of v */
    const __m256i b0 = _mm256_sub_epi16(zero, _mm256_and_si256(v, one));
    const __m256i b1 = _mm256_sub_epi16(zero, _mm256_and_si256(_mm256_srli_epi16(v, 1), one));
    const __m256i b2 = _mm256_sub_epi16(zero, _mm256_and_si256(_mm256_srli_epi16(v, 2), one));
    const __m256i b3 = _mm256_sub_epi16(zero, _mm256_and_si256(_mm256_srli_epi16(v, 3), one));
    const __m256i c0 = _mm256_and_si256(v, three), c1 = _mm256_srli_epi16(v, 2);
    for (int t = 0; t < a->T; t++) {
        const int8_t *x = a->qs + (size_t)t * a->Kp;
        uint8_t *o = tab + (size_t)t * stride;
        for (int r = 0; r < nrun; r++) {
            const int8_t *xr = x + (size_t)r * E;
            __m256i e;
            if (fmt == PLK_Q1)
                e = _mm256_add_epi16(
                    _mm256_add_epi16(_mm256_and_si256(_mm256_set1_epi16(xr[0]), b0), _mm256_and_si256(_mm256_set1_epi16(xr[1]), b1)),
                    _mm256_add_epi16(_mm256_and_si256(_mm256_set1_epi16(xr[2]), b2), _mm256_and_si256(_mm256_set1_epi16(xr[3]), b3)));
            else
                e = _mm256_add_epi16(_mm256_mullo_epi16(_mm256_set1_epi16(xr[0]), c0),
                                     _mm256_mullo_epi16(_mm256_set1_epi16(xr[1]), c1));
#if !TL_PERMW   /* vpermw takes the exact int16 entries as they are; vpshufb the biased byte planes */
            e = _mm256_add_epi16(e, bias);
            e = _mm256_or_si256(_mm256_and_si256(e, m63), _mm256_slli_epi16(_mm256_srli_epi16(e, 6), 8));
            /* qwords [lo 0-7, hi 0-7 | lo 8-15, hi 8-15] -> [lo 0-15 | hi 0-15] */
            e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(e, split), 0xd8);
#endif
            _mm256_storeu_si256((__m256i *)(o + (size_t)r * 32), e);
        }
    }
}

/* 32 lookups: indices idx (0..15, one per row slot) into the table at tab, which holds v + BIAS (>= 0)
 * as 6 low bits and the rest; both parts are summed in bytes (b_lo, b_hi) over up to 4 lookups
 * (<= 4 x 63, <= 4 x 23), then tl_flush adds lo + 64 hi to the int16 sums. The int16 sums s_lo hold
 * slots 0-7 | 16-23, s_hi slots 8-15 | 24-31. */
AI void tl_look(const __m256i idx, const uint8_t *tab, __m256i *b_lo, __m256i *b_hi)
{
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tab));
    const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + 16)));
    *b_lo = _mm256_add_epi8(*b_lo, _mm256_shuffle_epi8(tlo, idx));
    *b_hi = _mm256_add_epi8(*b_hi, _mm256_shuffle_epi8(thi, idx));
}

AI void tl_flush(const __m256i b_lo, const __m256i b_hi, __m256i *s_lo, __m256i *s_hi)
{
    const __m256i w = _mm256_set1_epi16(0x4001);      /* bytes (1, 64): lo + 64 hi */
    *s_lo = _mm256_add_epi16(*s_lo, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(b_lo, b_hi), w));
    *s_hi = _mm256_add_epi16(*s_hi, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(b_lo, b_hi), w));
}

/* the int16 sums start at -(lookups x BIAS): the table values' bias */
AI __m256i tl_start(const int FMT, int nlook) { return _mm256_set1_epi16((short)(-nlook * TL_BIAS(FMT))); }

/* the int16 sums of a tile -> 4 float vectors, f[o] = rows 8o..8o+7 in order (see plk_tl_slot):
 * vpmaddwd with (1, 0) takes the even int16 of each pair sign-extended, srai 16 the odd one */
AI void tl_widen(const __m256i s_lo, const __m256i s_hi, __m256 *f)
{
    const __m256i even = _mm256_set1_epi32(1);
    f[0] = _mm256_cvtepi32_ps(_mm256_madd_epi16(s_lo, even));
    f[1] = _mm256_cvtepi32_ps(_mm256_srai_epi32(s_lo, 16));
    f[2] = _mm256_cvtepi32_ps(_mm256_madd_epi16(s_hi, even));
    f[3] = _mm256_cvtepi32_ps(_mm256_srai_epi32(s_hi, 16));
}

#if TL_PERMW
/* one 32-block of a tile, AVX-512 build: the int16 sums s_lo, s_hi (slots as tl_flush leaves them) of its
 * 2 x nreg lookups. Each 32-byte code vector, read as 16 words, holds in word k the index pairs of slots 2k
 * (bits 0-7) and 2k + 1 (bits 8-15); vpermw looks up 16 words by bits 0-3 of each, so shifts by 0 / 4 / 8 / 12
 * give slot 2k's two runs and slot 2k + 1's, straight from the exact int16 table (no planes, bias or byte
 * flush: 11 vector ops per code vector where the vpshufb form takes ~15; vpermw and vpshufb both issue 2 a cycle
 * on Zen 4). unpack lo / hi of the even and odd slots' sums restore the slot order tl_widen expects. Same
 * integers, so the same bits. Measured (GEMV 2048 (q1 4096) x 8192, weights in L3, 1 thread, best of 100, the
 * AVX2 and AVX-512 builds alternating in one process, two runs; AVX2-build time / AVX-512-build time): vpshufb
 * in both 1.05 / 1.04 / 1.02 (q2 / tern / q1), vpermw in the AVX-512 build 1.29 / 1.26 / 1.26 (q2 231 -> 192 us);
 * from DRAM (32768 x 8192) level to +4% at 1 thread. That was the ymm form, 4 vpermw and 11 ops a code vector;
 * below, since 8 Dec 2026, one zmm a code vector. */
AI void tl_block_permw(const int nreg, const uint8_t *qb, const uint8_t *tb, __m256i *s_lo, __m256i *s_hi)
{
    /* one zmm per code vector: [v | v >> 8] looks up the even slots' and the odd slots' run-2ri indices in one
     * 32-word vpermw over t0 broadcast into both halves (index bit 4, the next nibble's low bit, picks between two
     * equal copies), and >> 4 of it the run-2ri+1 ones over t1: the sums of [even | odd] in one vector, 2 vpermw
     * and 7 ops a code vector, not 4 and 11; the same int16 sums, so the same bits. Measured 8 Dec 2026 (Zen 5
     * guest, GEMV 32768 x 8192 from DRAM, 2 threads, builds alternated, paired) against the ymm form: q2 0.96 /
     * 0.97 of the time with the probe at 77 / 49 GB/s, tern 0.90 / 0.96. q1 keeps the two-tile kernel (against
     * this form 0.94 of the time at 78 GB/s, 1.07 at 50: the fast phase is where the bar is tight). */
    __m512i acc = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int ri = 0; ri < nreg; ri++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * ri));
        const __m512i A = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 8), 1);
        const __m512i t0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(tb + 64 * ri)));
        const __m512i t1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(tb + 64 * ri + 32)));
        acc = _mm512_add_epi16(acc, _mm512_add_epi16(_mm512_permutexvar_epi16(A, t0),
                                                     _mm512_permutexvar_epi16(_mm512_srli_epi16(A, 4), t1)));
    }
    const __m256i se = _mm512_castsi512_si256(acc), so = _mm512_extracti64x4_epi64(acc, 1);
    *s_lo = _mm256_unpacklo_epi16(se, so);
    *s_hi = _mm256_unpackhi_epi16(se, so);
}
#endif

/* one tile (32 rows) x one token x groups g0 .. g1 - 1 (their records at rec, REC bytes apart). Per 32-block:
 * all its lookups summed in int16 (q1: 8, q2/tern: 16; AVX2: biased, from bytes flushed every 4), widened once,
 * acc[o] += I x ((A d_w) dx[b]); per 64-group the offset term vs[o] += (m or d) x bx[g]. acc and vs live in
 * st (st[0..31], st[32..63]) between chunks and in registers (4 + 4 vectors) within one. */
AI void tl_part(const int FMT, const uint8_t *rec, int g0, int g1, const uint8_t *tab, const float *dx, const float *bx,
                float *st)
{
    const int E = FMT == PLK_Q1 ? 4 : 2, NREG = 16 / E, SB = plk_tl_scalebytes(FMT);
    const int RUNB = 32 / E * 32;                      /* table bytes per 32-block */
    const size_t REC = plk_tl_recbytes(FMT);
    const float A = FMT == PLK_Q1 ? 2.0f : 1.0f;
    __m256 acc[4], vs[4];
    for (int o = 0; o < 4; o++) {
        acc[o] = _mm256_loadu_ps(st + 8 * o);
        vs[o] = _mm256_loadu_ps(st + 32 + 8 * o);
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *q = rec + (size_t)(g - g0) * REC;
        /* the stream, into L2 far ahead and into L1 near (the hardware prefetcher alone falls behind) */
        for (size_t l = 0; l < REC; l += 64) {
            _mm_prefetch((const char *)q + PLK_TL_PF_L2 * REC + l, _MM_HINT_T1);
            _mm_prefetch((const char *)q + PLK_TL_PF_L1 * REC + l, _MM_HINT_T0);
        }
        const uint16_t *dh = (const uint16_t *)q;
        const __m256 bxg = _mm256_set1_ps(bx[g]);
        __m256 dv[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) {
            dv[o] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + 8 * o)));
            const __m256 src = plk_has_min[FMT] ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + 32 + 8 * o))) : dv[o];
            vs[o] = _mm256_fmadd_ps(src, bxg, vs[o]);
        }
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            const int b = 2 * g + j;
            const uint8_t *tb = tab + (size_t)b * RUNB, *qb = q + SB + (size_t)j * NREG * 32;
#if TL_PERMW
            __m256i slo, shi;
            tl_block_permw(NREG, qb, tb, &slo, &shi);
#else
            const __m256i m4 = _mm256_set1_epi8(0x0f);
            __m256i slo = tl_start(FMT, 2 * NREG), shi = slo;
#pragma GCC unroll 8
            for (int c = 0; c < NREG; c += 2) {        /* 4 lookups per flush */
                __m256i blo = _mm256_setzero_si256(), bhi = blo;
#pragma GCC unroll 2
                for (int ri = c; ri < c + 2; ri++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + 32 * ri));
                    tl_look(_mm256_and_si256(v, m4), tb + 64 * ri, &blo, &bhi);
                    tl_look(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), tb + 64 * ri + 32, &blo, &bhi);
                }
                tl_flush(blo, bhi, &slo, &shi);
            }
#endif
            __m256 f[4];
            tl_widen(slo, shi, f);
            const __m256 sb = _mm256_set1_ps(A * dx[b]);
#pragma GCC unroll 4
            for (int o = 0; o < 4; o++) acc[o] = _mm256_fmadd_ps(f[o], _mm256_mul_ps(dv[o], sb), acc[o]);
        }
    }
    for (int o = 0; o < 4; o++) {
        _mm256_storeu_ps(st + 8 * o, acc[o]);
        _mm256_storeu_ps(st + 32 + 8 * o, vs[o]);
    }
}

#if TL_PERMW
/* tl_part for two tiles at once (AVX-512 build; q1 only: see below): tiles A and B (records recA, recB; states stA, stB) in the two
 * 256-bit halves of 512-bit vectors. A zmm of codes is [A's code vector | B's] for the same runs, so one 32-word
 * vpermw over the run's 16-word table broadcast into both halves looks up 64 rows: the index bit 4 (the next
 * nibble's low bit) then picks between two equal copies, so no masking. Same shifts and adds per vector as
 * tl_block_permw, for twice the rows (vpermw zmm issues at ~0.9x the ymm rate here: 3.96 against 4.48 a ns),
 * and every lane takes the operations it takes in tl_part, in the same order: the same bits.
 * Measured 8 Dec 2026, Zen 5 guest, 2 threads, GEMV 32768 (q1 65536) x 8192, against tl_part alone: in L3 (4096
 * rows) q2 67 -> 86 GB/s, tern 61 -> 81, q1 61 -> 83; from DRAM, paired, probe 73 GB/s: q2 level, tern 0.88-0.91
 * of the time, q1 0.85; probe 45-47: q2 1.06-1.12 (slower: tl_part reads q2 at the probe's rate there), tern
 * 1.02-1.04, q1 0.98-1.00. So q2 keeps tl_part, and so does tern: in the slow phase AVX2's table lookup read it
 * 6-8% faster than the pairs (bench-kernels), so the dispatcher timed there chose AVX2, which in the fast phase is
 * 25-36% slower than the pairs and 0.59-0.68 of the probe; AVX-512's one tile is within a few % of AVX2 in the slow
 * phase and 16% ahead in the fast one. At one thread the pairs are 21% faster for q2 even in the slow phase: the
 * loss is a two-thread effect, not understood (a pure read in the pairs' pattern matches one stream). */
AI void tl_part2(const int FMT, const uint8_t *recA, const uint8_t *recB, int g0, int g1, const uint8_t *tab,
                 const float *dx, const float *bx, float *stA, float *stB)
{
    const int E = FMT == PLK_Q1 ? 4 : 2, NREG = 16 / E, SB = plk_tl_scalebytes(FMT);
    const int RUNB = 32 / E * 32;
    const size_t REC = plk_tl_recbytes(FMT);
    const float A = FMT == PLK_Q1 ? 2.0f : 1.0f;
    __m512 acc[4], vs[4];
    for (int o = 0; o < 4; o++) {
        acc[o] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(stA + 8 * o)), _mm256_loadu_ps(stB + 8 * o), 1);
        vs[o] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_loadu_ps(stA + 32 + 8 * o)), _mm256_loadu_ps(stB + 32 + 8 * o), 1);
    }
    for (int g = g0; g < g1; g++) {
        const uint8_t *qa = recA + (size_t)(g - g0) * REC, *qb_ = recB + (size_t)(g - g0) * REC;
        /* into L2 in address order: A's and B's records are adjacent (B's chunk follows A's, the next pair's follows
         * B's), so 2 REC bytes a group at twice tl_part's distance keep one stream for the hardware and reach the
         * next pair's records (2 kc <= 2 PLK_TL_PF_L2 records on) before it starts; no L1 prefetch (each tile's
         * own, 2 or 4 records ahead: level to 6% slower) */
        const char *lin = (const char *)recA + 2 * (size_t)(g - g0) * REC + 2 * (size_t)PLK_TL_PF_L2 * REC;
        for (size_t l = 0; l < 2 * REC; l += 64) _mm_prefetch(lin + l, _MM_HINT_T1);
        const uint16_t *da = (const uint16_t *)qa, *db = (const uint16_t *)qb_;
        const __m512 bxg = _mm512_set1_ps(bx[g]);
        __m512 dv[4];
#pragma GCC unroll 4
        for (int o = 0; o < 4; o++) {
            dv[o] = _mm512_cvtph_ps(_mm256_loadu2_m128i((const __m128i *)(db + 8 * o), (const __m128i *)(da + 8 * o)));
            const __m512 src = plk_has_min[FMT]
                ? _mm512_cvtph_ps(_mm256_loadu2_m128i((const __m128i *)(db + 32 + 8 * o), (const __m128i *)(da + 32 + 8 * o)))
                : dv[o];
            vs[o] = _mm512_fmadd_ps(src, bxg, vs[o]);
        }
#pragma GCC unroll 2
        for (int j = 0; j < 2; j++) {
            const int b = 2 * g + j;
            const uint8_t *tb = tab + (size_t)b * RUNB;
            const uint8_t *ca = qa + SB + (size_t)j * NREG * 32, *cb = qb_ + SB + (size_t)j * NREG * 32;
            __m512i se = _mm512_setzero_si512(), so = se;
#pragma GCC unroll 8
            for (int ri = 0; ri < NREG; ri++) {
                const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(ca + 32 * ri))),
                                                     _mm256_loadu_si256((const __m256i *)(cb + 32 * ri)), 1);
                const __m512i t0 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(tb + 64 * ri)));
                const __m512i t1 = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(tb + 64 * ri + 32)));
                se = _mm512_add_epi16(se, _mm512_add_epi16(_mm512_permutexvar_epi16(v, t0),
                                                           _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), t1)));
                so = _mm512_add_epi16(so, _mm512_add_epi16(_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), t0),
                                                           _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), t1)));
            }
            const __m512i slo = _mm512_unpacklo_epi16(se, so), shi = _mm512_unpackhi_epi16(se, so);
            const __m512i even = _mm512_set1_epi32(1);
            __m512 f[4];
            f[0] = _mm512_cvtepi32_ps(_mm512_madd_epi16(slo, even));
            f[1] = _mm512_cvtepi32_ps(_mm512_srai_epi32(slo, 16));
            f[2] = _mm512_cvtepi32_ps(_mm512_madd_epi16(shi, even));
            f[3] = _mm512_cvtepi32_ps(_mm512_srai_epi32(shi, 16));
            const __m512 sb = _mm512_set1_ps(A * dx[b]);
#pragma GCC unroll 4
            for (int o = 0; o < 4; o++) acc[o] = _mm512_fmadd_ps(f[o], _mm512_mul_ps(dv[o], sb), acc[o]);
        }
    }
    for (int o = 0; o < 4; o++) {
        _mm256_storeu_ps(stA + 8 * o, _mm512_castps512_ps256(acc[o]));
        _mm256_storeu_ps(stB + 8 * o, _mm512_extractf32x8_ps(acc[o], 1));
        _mm256_storeu_ps(stA + 32 + 8 * o, _mm512_castps512_ps256(vs[o]));
        _mm256_storeu_ps(stB + 32 + 8 * o, _mm512_extractf32x8_ps(vs[o], 1));
    }
}
#endif

/* tiles t0 .. t1 - 1, per super-tile (plk.h) and token: K-chunk by K-chunk, every tile of the super-tile over
 * that chunk, so the chunk's 16 KB of tables stay in L1 for all of them (one tile over all of K reads 64-128 KB
 * of tables per token: from L2, beside the weight stream). Measured (GEMV 32768 / 65536 x 8192, weights in DRAM,
 * 1 thread, best of 25, 4 alternating runs, Zen 4 guest): q2 10.3-10.4 -> 11.2-11.4 GB/s, tern 10.4-10.6 ->
 * 11.2-11.6, q1 11.7-11.8 -> 14.2-14.5. Then out = ((out or 0) + acc) + (+-1) vs per row. */
AI void rows_tl(const int FMT, const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int accum)
{
    const plk_rows_fn mad = FMT == PLK_Q1 ? NAME(rows_q1_q8) : FMT == PLK_TERN ? NAME(rows_tern_q8) : NAME(rows_q2_q8);
    const int ng = a->ng;
    const int t0 = (r0 + PLK_TL_ROWS - 1) / PLK_TL_ROWS, t1 = r1 / PLK_TL_ROWS;
    if (!w->tl || !a->tab || ng <= SMALL_NG || t0 >= t1) {
        mad(w, r0, r1, a, y, ldy, accum);
        return;
    }
    if (r0 < t0 * PLK_TL_ROWS) mad(w, r0, t0 * PLK_TL_ROWS, a, y, ldy, accum);
    const size_t tabstride = (size_t)a->Kp / plk_tl_elems(FMT) * 32, REC = plk_tl_recbytes(FMT);
    const int ntiles = w->tl_tiles, KC = plk_tl_kc(FMT);
    const __m256 bmul = _mm256_set1_ps(plk_has_min[FMT] ? 1.0f : -1.0f);
    float st[PLK_TL_ST][64];
    for (int s0 = t0; s0 < t1;) {
        const int se = (s0 / PLK_TL_ST + 1) * PLK_TL_ST, s1 = se < t1 ? se : t1;
        for (int t = 0; t < a->T; t++) {
            const uint8_t *tab = a->tab + (size_t)t * tabstride;
            const float *dx = a->dx + (size_t)t * a->nb, *bx = a->bx + (size_t)t * ng;
            memset(st, 0, sizeof st);
            for (int g0 = 0; g0 < ng; g0 += KC) {
                const int g1 = g0 + KC < ng ? g0 + KC : ng;
                const uint8_t *rec = w->tl + plk_tl_rec(FMT, ntiles, ng, s0, g0) * REC;
                int tt = s0;
#if TL_PERMW
                for (; FMT == PLK_Q1 && tt + 2 <= s1; tt += 2, rec += 2 * (size_t)(g1 - g0) * REC)
                    tl_part2(FMT, rec, rec + (size_t)(g1 - g0) * REC, g0, g1, tab, dx, bx, st[tt - s0], st[tt + 1 - s0]);
#endif
                for (; tt < s1; tt++, rec += (size_t)(g1 - g0) * REC)
                    tl_part(FMT, rec, g0, g1, tab, dx, bx, st[tt - s0]);
            }
            for (int tt = s0; tt < s1; tt++) {
                float *out = y + (size_t)t * ldy + (size_t)tt * PLK_TL_ROWS;
                const float *sa = st[tt - s0];
#pragma GCC unroll 4
                for (int o = 0; o < 4; o++) {
                    const __m256 base = accum ? _mm256_loadu_ps(out + 8 * o) : _mm256_setzero_ps();
                    const __m256 sum = _mm256_add_ps(base, _mm256_loadu_ps(sa + 8 * o));
                    _mm256_storeu_ps(out + 8 * o, _mm256_add_ps(sum, _mm256_mul_ps(bmul, _mm256_loadu_ps(sa + 32 + 8 * o))));
                }
            }
        }
        s0 = s1;
    }
    if (t1 * PLK_TL_ROWS < r1) mad(w, t1 * PLK_TL_ROWS, r1, a, y, ldy, accum);
}

#define ROWSTL(F, ID) \
void NAME(rowstl_##F##_q8)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int acc) \
{ rows_tl(ID, w, r0, r1, a, y, ldy, acc); }
ROWSTL(q2, PLK_Q2)
ROWSTL(tern, PLK_TERN)
ROWSTL(q1, PLK_Q1)
#undef ROWSTL
