/* Dispatch, fp16 conversion, activation preparation, the OpenMP drivers (matmul, ffn_bundles). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "plk.h"
#if defined(__x86_64__) || defined(__i386__)
#define PLK_X86 1
#elif defined(__aarch64__)
#define PLK_ARM64 1
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1UL << 1)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1UL << 20)
#endif
#ifndef HWCAP2_I8MM
#define HWCAP2_I8MM (1UL << 13)
#endif
#endif

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
#if PLK_ARM64
    /* the kernel's view of the CPU features (user space may not read the ID registers everywhere) */
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    if (!(hw & HWCAP_ASIMD)) return PLK_GENERIC;
    if (!(hw & HWCAP_ASIMDDP)) return PLK_NEON;
    if (!(hw2 & HWCAP2_I8MM)) return PLK_DOTPROD;
    return PLK_I8MM;
#elif PLK_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
        return PLK_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return PLK_AVX2;   /* F16C: every AVX2 CPU has it (Haswell+, Zen) */
    return PLK_GENERIC;
#else
    return PLK_GENERIC;
#endif
}

/* the variants of this build's architecture up to the detected one (x86: generic < avx2 < avx512; aarch64:
 * generic, neon < dotprod < i8mm), each a superset of the one before */
int plk_isa_supported(int isa)
{
    const int best = plk_detect_isa();
    if (isa == PLK_GENERIC) return 1;
#if PLK_ARM64
    return isa >= PLK_NEON && isa <= best;
#elif PLK_X86
    return isa >= PLK_AVX2 && isa <= PLK_AVX512 && isa <= best;
#else
    return 0;
#endif
}

#define TABLE(isa) { rows_q8_q8_##isa, rows_q4_0_q8_##isa, rows_q4_1_q8_##isa, \
                     rows_q2_q8_##isa, rows_tern_q8_##isa, rows_q1_q8_##isa, \
                     rows_q5_0_q8_##isa, rows_q5_1_q8_##isa, \
                     rows_q4_k_q8k_##isa, rows_q5_k_q8k_##isa, rows_q6_k_q8k_##isa }
#define NONE { 0 }
#if PLK_ARM64
static const plk_rows_fn ma_table[PLK_NISA][PLK_NFMT] = { TABLE(generic), NONE, NONE, TABLE(neon), TABLE(dotprod), TABLE(i8mm) };
#elif PLK_X86
static const plk_rows_fn ma_table[PLK_NISA][PLK_NFMT] = { TABLE(generic), TABLE(avx2), TABLE(avx512), NONE, NONE, NONE };
#else
static const plk_rows_fn ma_table[PLK_NISA][PLK_NFMT] = { TABLE(generic) };
#endif
/* table lookup: the portable kernels (plk_generic.c) on generic, the vpshufb ones (plk_tl.h, need a plk_tl_pack
 * layout; without one they run the multiply-add, bit-identical) on AVX2 and, compiled for AVX-512 (32 registers,
 * the same bits), on AVX-512 CPUs, where they beat AVX-512's multiply-add (bench-kernels) */
#define TLG { 0, 0, 0, rowstl_q2_q8_generic, rowstl_tern_q8_generic, rowstl_q1_q8_generic }
#define TLA { 0, 0, 0, rowstl_q2_q8_avx2, rowstl_tern_q8_avx2, rowstl_q1_q8_avx2 }
#define TLX { 0, 0, 0, rowstl_q2_q8_avx512, rowstl_tern_q8_avx512, rowstl_q1_q8_avx512 }
#if PLK_ARM64   /* no NEON table lookup: the portable one where asked for (TL_PREFERRED has no ARM entry) */
static const plk_rows_fn tl_table[PLK_NISA][PLK_NFMT] = { TLG, NONE, NONE, TLG, TLG, TLG };
#elif PLK_X86
static const plk_rows_fn tl_table[PLK_NISA][PLK_NFMT] = { TLG, TLA, TLX, NONE, NONE, NONE };
#else
static const plk_rows_fn tl_table[PLK_NISA][PLK_NFMT] = { TLG };
#endif

plk_rows_fn plk_rows(int isa, int fmt, int tl)
{
    if (isa < 0 || isa >= PLK_NISA || fmt < 0 || fmt >= PLK_NFMT) return 0;
    return tl ? tl_table[isa][fmt] : ma_table[isa][fmt];
}

size_t plk_tl_nbytes(int fmt, int N, int K)
{
    if (!plk_tl_fmt(fmt)) return 0;
    return (size_t)(N / PLK_TL_ROWS) * (size_t)((K + 63) / 64) * plk_tl_recbytes(fmt);
}

/* the AVX2 table-lookup layout of the whole tiles of w (N x K) into out (plk_tl_nbytes bytes); see plk.h */
int plk_tl_pack(int fmt, const plk_w *w, int N, int K, uint8_t *out)
{
    if (!plk_tl_fmt(fmt)) return -1;
    const int ng = (K + 63) / 64, E = plk_tl_elems(fmt), nreg = 16 / E, QB = plk_qbytes[fmt];
    const int SB = plk_tl_scalebytes(fmt);
    const size_t REC = plk_tl_recbytes(fmt);
    for (int tt = 0; tt < N / PLK_TL_ROWS; tt++)
        for (int g = 0; g < ng; g++) {
            uint8_t *rec = out + plk_tl_rec(fmt, N / PLK_TL_ROWS, ng, tt, g) * REC;
            for (int r = 0; r < PLK_TL_ROWS; r++) {
                const size_t row = (size_t)tt * PLK_TL_ROWS + r;
                const uint8_t *q = w->qs + (row * ng + g) * QB;
                const int s = plk_tl_slot(r);
                for (int j = 0; j < 2; j++)
                    for (int ri = 0; ri < nreg; ri++) {
                        int byte = 0;
                        for (int h = 0; h < 2; h++) {
                            const int e0 = 32 * j + E * (2 * ri + h);   /* first element of the run */
                            int v = 0;
                            if (fmt == PLK_Q1)       /* element e: bit e / 8 of byte e % 8 */
                                for (int k = 0; k < 4; k++) v |= ((q[(e0 + k) & 7] >> ((e0 + k) >> 3)) & 1) << k;
                            else                     /* element e: bits 2(e / 16) of byte e % 16 */
                                for (int k = 0; k < 2; k++) v |= ((q[(e0 + k) & 15] >> (2 * ((e0 + k) >> 4))) & 3) << (2 * k);
                            byte |= v << (4 * h);
                        }
                        rec[SB + (size_t)(j * nreg + ri) * 32 + s] = (uint8_t)byte;
                    }
                memcpy(rec + 2 * r, w->d + row * ng + g, 2);
                if (plk_has_min[fmt]) memcpy(rec + 64 + 2 * r, w->m + row * ng + g, 2);
            }
        }
    return 0;
}

void plk_quantize_act(int isa, const float *x, int T, int K, int ldx, int Kp,
                      int8_t *qs, float *dx, float *s, int32_t *isum)
{
#if PLK_X86
    if (isa == PLK_AVX2) { quantize_act_q8_avx2(x, T, K, ldx, Kp, qs, dx, s, isum); return; }
    if (isa == PLK_AVX512) { quantize_act_q8_avx512(x, T, K, ldx, Kp, qs, dx, s, isum); return; }
#elif PLK_ARM64
    if (isa >= PLK_NEON) { quantize_act_q8_neon(x, T, K, ldx, Kp, qs, dx, s, isum); return; }
#endif
    quantize_act_q8_generic(x, T, K, ldx, Kp, qs, dx, s, isum);
}

void plk_quantize_act_k(int isa, const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs)
{
#if PLK_X86
    if (isa == PLK_AVX2) { quantize_act_q8k_avx2(x, T, K, ldx, qs, d, bs); return; }
    if (isa == PLK_AVX512) { quantize_act_q8k_avx512(x, T, K, ldx, qs, d, bs); return; }
#elif PLK_ARM64
    if (isa >= PLK_NEON) { quantize_act_q8k_neon(x, T, K, ldx, qs, d, bs); return; }
#endif
    quantize_act_q8k_generic(x, T, K, ldx, qs, d, bs);
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


/* ---- work-claiming thread pool (matmul rows, ffn bundle chunks) ------------------------------------
 * Why not an OpenMP region: its closing barrier waits for every thread to arrive, so on a shared
 * machine one preempted thread stalls the region for a scheduler time slice (ms). Measured here with
 * 2 threads and a load average of 4-6: 130-290 ms per SmolLM2 token instead of 9 ms. Here a job is n
 * items claimed one at a time from one atomic ticket (job generation | worker limit | n | next item);
 * the caller works too and returns once every item is *done*, so a worker that is not running never
 * blocks it (it finds no items left when it wakes). Results do not depend on which thread ran an item
 * (items write disjoint outputs, or fixed per-item accumulators reduced in item order).
 * Workers spin (pause) ~0.2 ms after a job, then sleep on a futex word. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#if PLK_X86
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif PLK_ARM64
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() ((void)0)
#endif

#define POOL_MAXW 15
#define T_GEN(t) ((uint32_t)((t) >> 44))
#define T_MAXW(t) ((int)(((t) >> 40) & 15))
#define T_N(t) ((int)(((t) >> 20) & 0xfffff))
#define T_NEXT(t) ((int)((t) & 0xfffff))
static struct {
    pthread_mutex_t lock;          /* one job at a time (a second caller runs its job serially) */
    int nworkers;
    _Atomic uint64_t ticket;
    _Atomic uint32_t gen;          /* futex word */
    _Atomic int done, sleepers;
    plk_pool_fn fn;
    void *ctx;
} P = { PTHREAD_MUTEX_INITIALIZER, 0 };

static void pool_claim(uint64_t t, int wid)
{
    for (;;) {
        if (wid >= T_MAXW(t) || T_NEXT(t) >= T_N(t)) return;
        plk_pool_fn fn = P.fn;           /* the job of this generation: it cannot end before this item is done */
        void *ctx = P.ctx;
        if (atomic_compare_exchange_weak_explicit(&P.ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire)) {
            fn(ctx, T_NEXT(t));
            atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
            t = atomic_load_explicit(&P.ticket, memory_order_acquire);
        }
    }
}

static void *pool_worker(void *arg)
{
    const int wid = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&P.gen);
    for (;;) {
        uint32_t g;
        int spins = 0;
        while ((g = atomic_load_explicit(&P.gen, memory_order_acquire)) == seen) {
            if (++spins < 4000) { cpu_relax(); continue; }
            atomic_fetch_add(&P.sleepers, 1);
            if (atomic_load(&P.gen) == seen) syscall(SYS_futex, &P.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&P.sleepers, 1);
            spins = 0;
        }
        seen = g;
        uint64_t t = atomic_load_explicit(&P.ticket, memory_order_acquire);
        if (T_GEN(t) == (g & 0xfffff)) pool_claim(t, wid);
    }
    return NULL;
}

/* after fork() the child has none of the workers: start again (the caller alone would also finish
 * every job, since it claims items too) */
static void pool_atfork_child(void)
{
    pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
    P.lock = m;
    P.nworkers = 0;
    atomic_store(&P.sleepers, 0);
}

/* run fn(ctx, i) for i in 0..n-1 on up to nthreads threads (the caller included) */
void plk_pool_run(plk_pool_fn fn, void *ctx, int n, int nthreads)
{
    int nw = nthreads - 1;
    if (nw > POOL_MAXW) nw = POOL_MAXW;
    if (nw > n - 1) nw = n - 1;
    if (nw <= 0 || n > 0xfffff || pthread_mutex_trylock(&P.lock)) {
        for (int i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    static int atfork_done;
    if (!atfork_done) { pthread_atfork(NULL, NULL, pool_atfork_child); atfork_done = 1; }
    while (P.nworkers < nw) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &at, pool_worker, (void *)(intptr_t)P.nworkers)) { pthread_attr_destroy(&at); break; }
        pthread_attr_destroy(&at);
        P.nworkers++;
    }
    if (nw > P.nworkers) nw = P.nworkers;
    P.fn = fn;
    P.ctx = ctx;
    atomic_store_explicit(&P.done, 0, memory_order_relaxed);
    uint32_t g = (atomic_load(&P.gen) + 1) & 0xfffff;
    atomic_store_explicit(&P.ticket, ((uint64_t)g << 44) | ((uint64_t)nw << 40) | ((uint64_t)n << 20), memory_order_release);
    atomic_store_explicit(&P.gen, g, memory_order_release);
    if (atomic_load(&P.sleepers)) syscall(SYS_futex, &P.gen, FUTEX_WAKE_PRIVATE, POOL_MAXW, NULL, NULL, 0);
    /* the caller claims items too (as worker id -1 < any limit) */
    uint64_t t = atomic_load_explicit(&P.ticket, memory_order_acquire);
    for (;;) {
        if (T_NEXT(t) >= T_N(t)) break;
        if (atomic_compare_exchange_weak_explicit(&P.ticket, &t, t + 1, memory_order_acq_rel, memory_order_acquire)) {
            fn(ctx, T_NEXT(t));
            atomic_fetch_add_explicit(&P.done, 1, memory_order_release);
            t = atomic_load_explicit(&P.ticket, memory_order_acquire);
        }
    }
    int spins = 0;
    while (atomic_load_explicit(&P.done, memory_order_acquire) < n) {
        if (++spins < 2000) cpu_relax();
        else { sched_yield(); spins = 0; }
    }
    pthread_mutex_unlock(&P.lock);
}

#if !PLK_X86   /* the vpshufb table-lookup tables exist on x86 only (x86_tl below is never true elsewhere) */
#define plk_tl_tables_avx2(fmt, a, tab) ((void)(fmt), (void)(a), (void)(tab))
#define plk_tl_tables_avx512(fmt, a, tab) ((void)(fmt), (void)(a), (void)(tab))
#endif

typedef struct { plk_rows_fn fn; const plk_w *w; int N, chunk; const plk_act *a; float *y; int ldy, acc; } mm_job;
static void mm_item(void *c, int i)
{
    const mm_job *j = (const mm_job *)c;
    int r0 = i * j->chunk, r1 = r0 + j->chunk < j->N ? r0 + j->chunk : j->N;
    j->fn(j->w, r0, r1, j->a, j->y, j->ldy, j->acc);
}

/* rows are split in ranges of multiples of 8 rows, run by the pool */
void plk_matmul(int isa, int fmt, int tl, const plk_w *w, int N, const plk_act *a, float *y, int ldy,
                int accumulate, int nthreads)
{
    plk_rows_fn fn = plk_rows(isa, fmt, tl);
    if (!fn) fn = plk_rows(isa, fmt, 0);
    /* x86 table lookup: the tokens' tables once per call (every row reads them), for at most
     * PLK_TL_TCHUNK tokens at a time (Kp x 8 or 16 bytes each) */
    const int x86_tl = tl && (isa == PLK_AVX2 || isa == PLK_AVX512) && plk_tl_fmt(fmt) && w->tl && N >= PLK_TL_ROWS;
    if (x86_tl && a->T > PLK_TL_TCHUNK) {
        for (int c0 = 0; c0 < a->T; c0 += PLK_TL_TCHUNK) {
            plk_act c = *a;
            c.T = a->T - c0 < PLK_TL_TCHUNK ? a->T - c0 : PLK_TL_TCHUNK;
            c.qs += (size_t)c0 * a->Kp;
            c.dx += (size_t)c0 * a->nb;
            c.bx += (size_t)c0 * a->ng;
            plk_matmul(isa, fmt, tl, w, N, &c, y + (size_t)c0 * ldy, ldy, accumulate, nthreads);
        }
        return;
    }
    plk_act at = *a;
    uint8_t *tab = NULL;
    if (x86_tl) {
        tab = (uint8_t *)malloc((size_t)a->T * a->Kp / plk_tl_elems(fmt) * 32);
        if (tab) {
            if (isa == PLK_AVX512) plk_tl_tables_avx512(fmt, a, tab); else plk_tl_tables_avx2(fmt, a, tab);
            at.tab = tab;
        }
    }
    a = &at;
    long work = (long)N * a->Kp * (a->T < 8 ? a->T : 8);
    int nth = nthreads;
    if (work < 65536 * 4) nth = 1;            /* too small to pay a fork/join */
    if (nth > (N + 7) / 8) nth = (N + 7) / 8;
    if (nth <= 1) { fn(w, 0, N, a, y, ldy, accumulate); free(tab); return; }
    /* items of 32-row multiples (whole table-lookup tiles), about 4 per thread (claimed dynamically;
     * rows are independent, so the split does not change any result) */
    int chunk = ((N + 4 * nth - 1) / (4 * nth) + 31) & ~31;
    if (chunk < 64) chunk = 64;
    mm_job j = { fn, w, N, chunk, a, y, ldy, accumulate };
    plk_pool_run(mm_item, &j, (N + chunk - 1) / chunk, nth);
    free(tab);
}

/* 64-byte aligned (size rounded up to it): the kernels' 512-bit loads split no cache line */
static void *alloc64(size_t n) { return aligned_alloc(64, (n + 63) & ~(size_t)63); }

typedef struct {                   /* activations in the layout plk_act points into */
    int8_t *qs; float *dx, *s, *bx; int32_t *isum; int16_t *bs;
    int8_t *xw;                    /* plk_act.xw, made by act_prepare where it is read */
} act_buf;

static int act_alloc(act_buf *b, int T, int Kp, int ng)
{
    int nb = Kp / 32;
    b->qs = (int8_t *)alloc64((size_t)T * Kp + 64);
    b->dx = (float *)alloc64(sizeof(float) * ((size_t)T * nb * 2 + (size_t)T * ng + 16));
    b->isum = (int32_t *)malloc(sizeof(int32_t) * ((size_t)T * nb + 16));
    b->bs = (int16_t *)malloc(sizeof(int16_t) * ((size_t)T * (Kp / 16) + 32));   /* Q8_K block sums */
    if (!b->qs || !b->dx || !b->isum || !b->bs) { free(b->qs); free(b->dx); free(b->isum); free(b->bs); return -1; }
    b->s = b->dx + (size_t)T * nb;
    b->bx = b->s + (size_t)T * nb;
    b->xw = NULL;
    return 0;
}

static void act_free(act_buf *b) { free(b->qs); free(b->dx); free(b->isum); free(b->bs); free(b->xw); }

/* x quantized in fmt's activation type: Q8_K for the K-quants (Kp == K, a multiple of 256), else q8 */
static void act_prepare(int isa, int fmt, const float *x, int T, int K, int ldx, int Kp, act_buf *b, plk_act *a)
{
    if (plk_kquant(fmt)) {
        plk_quantize_act_k(isa, x, T, K, ldx, b->qs, b->dx, b->bs);
        a->T = T; a->Kp = Kp; a->nb = a->ng = Kp / 256;
        a->qs = b->qs; a->dx = b->dx; a->bx = NULL; a->tab = NULL; a->bs = b->bs; a->xw = NULL;
        if (isa == PLK_AVX512 && T < PLK_KQ_GEMM_MINT) {   /* once per call, for every row the decode kernels take */
            static const int ord[8] = {0, 2, 1, 3, 4, 6, 5, 7};
            if (!b->xw) b->xw = (int8_t *)plk_scratch((size_t)T * Kp, 1);
            if (!b->xw) { plk_oom_set(); return; }
            for (size_t o = 0; o < (size_t)T * Kp; o += 256)
                for (int j = 0; j < 8; j++) memcpy(b->xw + o + 32 * j, b->qs + o + 32 * ord[j], 32);
            a->xw = b->xw;
        }
        return;
    }
    int nb = Kp / 32;
    plk_quantize_act(isa, x, T, K, ldx, Kp, b->qs, b->dx, b->s, b->isum);
    plk_act_bx(fmt, T, nb, b->dx, b->s, b->isum, b->bx);
    a->T = T; a->Kp = Kp; a->nb = nb; a->ng = Kp / plk_group[fmt];
    a->qs = b->qs; a->dx = b->dx; a->bx = b->bx; a->tab = NULL; a->bs = NULL; a->xw = NULL;
}


/* out (T, K) += sum over bundles of down @ (act(gate h) * up h).  The bundles are cut into a fixed
 * number of contiguous chunks (by thread count, not by who runs them: plk_ffn_nchunks); chunk 0 sums into out,
 * chunk c into its own (T, K) buffer, reduced in chunk order at the end: the float sums are the same from run
 * to run at a given thread count, whichever thread ran which chunk (no atomics in the hot loop).
 * Within a chunk every bundle is added into its buffer in turn, so a chunk may also be computed in pieces,
 * call after call, with the caller keeping the buffers (plk_ffn_bundles_part): the dense offloaded run
 * computes a layer as its bundles arrive and gets the same floats as one call over all of them. */
static _Atomic int plk_oom_flag;
void plk_oom_set(void) { atomic_store(&plk_oom_flag, 1); }
int plk_oom_take(void) { return atomic_exchange(&plk_oom_flag, 0); }

static _Atomic int plk_fail_next;
void plk_test_fail_allocs(int n) { atomic_store(&plk_fail_next, n); }
void *plk_scratch(size_t n, int aligned64)
{
    if (atomic_load(&plk_fail_next) > 0 && atomic_fetch_sub(&plk_fail_next, 1) > 0) return NULL;
    return aligned64 ? alloc64(n) : malloc(n);
}

int plk_ffn_nchunks(int n, int nthreads)
{
    int nch = nthreads <= 1 ? 1 : 4 * nthreads;   /* a preempted thread leaves at most one chunk to wait for */
    if (nch > n) nch = n;
    return nch < 1 ? 1 : nch;
}

static void gated_isa(int isa, float *g, const float *u, size_t n, int act)
{
#if PLK_X86
    if (isa == PLK_AVX512) { gated_avx512(g, u, n, act); return; }
    if (isa == PLK_AVX2) { gated_avx2(g, u, n, act); return; }
#elif PLK_ARM64
    if (isa >= PLK_NEON) { gated_neon(g, u, n, act); return; }
#endif
    gated_generic(g, u, n, act);
}

typedef struct {
    int isa, fmt, down_fmt, C, K, Cp, T, act, n, nch;
    const int *lo, *hi;          /* bundle range of each chunk (NULL: the whole chunk) */
    plk_rows_fn fgu, fd;
    const uint64_t *ptrs;
    const int64_t *offs;
    const plk_act *ha;
    float *out, *priv;
    _Atomic int err;
} ffn_job;

/* bundles i0..i1-1 of ptrs, each gate/up rows -> gated activation -> down rows added into dst (T x K), for the
 * T activation rows of ha; the one body of the dense/sparse FFN (ffn_item) and of a MoE expert chunk (moe_item).
 * Returns -1 if its scratch cannot be had. */
static int bundles_into(int isa, int down_fmt, int C, int K, int Cp, int act, plk_rows_fn fgu, plk_rows_fn fd,
                        const uint64_t *ptrs, const int64_t *offs, int i0, int i1, const plk_act *ha, int T, float *dst)
{
    float *gu = (float *)malloc(sizeof(float) * (size_t)T * C * 2);
    act_buf ab;
    if (!gu || act_alloc(&ab, T, Cp, Cp / plk_group[down_fmt])) {
        free(gu);
        return -1;
    }
    for (int i = i0; i < i1; i++) {
        const uint8_t *base = (const uint8_t *)(uintptr_t)ptrs[i];
#define PLANE16(o) ((o) >= 0 ? (const uint16_t *)(base + (o)) : 0)   /* -1: no such plane (raw GGML blocks) */
        plk_w wg = { base + offs[0], PLANE16(offs[1]), PLANE16(offs[2]) };
        plk_w wu = { base + offs[3], PLANE16(offs[4]), PLANE16(offs[5]) };
        plk_w wd = { base + offs[6], PLANE16(offs[7]), PLANE16(offs[8]) };
#undef PLANE16
        float *g = gu, *u = gu + (size_t)T * C;
        fgu(&wg, 0, C, ha, g, C, 0);
        fgu(&wu, 0, C, ha, u, C, 0);
        gated_isa(isa, g, u, (size_t)T * C, act);
        plk_act aa;
        act_prepare(isa, down_fmt, g, T, C, C, Cp, &ab, &aa);
        fd(&wd, 0, K, &aa, dst, K, 1);
    }
    act_free(&ab);
    free(gu);
    return 0;
}

static void ffn_item(void *c, int ch)
{
    ffn_job *j = (ffn_job *)c;
    const int i0 = j->lo ? j->lo[ch] : (int)((long)j->n * ch / j->nch);
    const int i1 = j->hi ? j->hi[ch] : (int)((long)j->n * (ch + 1) / j->nch);
    if (i0 >= i1) return;
    float *dst = ch == 0 ? j->out : j->priv + (size_t)(ch - 1) * j->T * j->K;
    if (bundles_into(j->isa, j->down_fmt, j->C, j->K, j->Cp, j->act, j->fgu, j->fd, j->ptrs, j->offs, i0, i1, j->ha,
                     j->T, dst))
        atomic_store(&j->err, -1);
}

/* chunks c with lo[c] < hi[c]: bundles lo[c]..hi[c]-1 of the nch-chunk split of n (plk_ffn_chunk_bounds) added
 * into out (chunk 0) or priv + (c-1) T K; only those bundles' ptrs are read. No reduction: the caller adds
 * priv[0..nch-2] into out, in order, after the last piece. */
static int ffn_run(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int nch, const int *lo,
                   const int *hi, int C, int K, const int64_t *offs, const float *h, int T, int act, float *out,
                   float *priv, int nthreads)
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
    int nth = nthreads < 1 ? 1 : nthreads;
    ffn_job j = { isa, fmt, down_fmt, C, K, Cp, T, act, n, nch, lo, hi, fgu, fd, ptrs, offs, &ha, out, priv, 0 };
    plk_pool_run(ffn_item, &j, nch, nth);
    act_free(&hb);
    return plk_oom_take() ? -1 : atomic_load(&j.err);
}

int plk_ffn_bundles(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int C, int K,
                    const int64_t *offs, const float *h, int T, int act, float *out, int nthreads)
{
    int nch = plk_ffn_nchunks(n, nthreads);
    float *priv = nch > 1 ? (float *)calloc((size_t)(nch - 1) * T * K, sizeof(float)) : NULL;
    if (nch > 1 && !priv) return -1;
    int rc = ffn_run(isa, fmt, down_fmt, tl, ptrs, n, nch, NULL, NULL, C, K, offs, h, T, act, out, priv, nthreads);
    if (priv) {
        for (int p = 0; p < nch - 1; p++) {
            const float *src = priv + (size_t)p * T * K;
            for (size_t k = 0; k < (size_t)T * K; k++) out[k] += src[k];
        }
        free(priv);
    }
    return rc;
}

int plk_ffn_bundles_part(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int nch,
                         const int *lo, const int *hi, int C, int K, const int64_t *offs, const float *h, int T,
                         int act, float *out, float *priv, int nthreads)
{
    return ffn_run(isa, fmt, down_fmt, tl, ptrs, n, nch, lo, hi, C, K, offs, h, T, act, out, priv, nthreads);
}

/* Mixture of experts, one call per layer: out (T, K) += sum over groups g, in order, of wt[j] * expert_g(h[tok[j]])
 * for j in gs[g] .. gs[g+1]-1 (the tokens routed to group g's expert, and their router weights). Group g's
 * expert is the cpe bundles ptrs[g*cpe ..]. Its bundles are cut into nch = plk_ffn_nchunks(cpe, nthreads) chunks;
 * item (g, c) sums chunk c's bundles in order into its own zeroed (Tg, K) buffer; then, per group in order and
 * per token, res = chunk 0 + chunk 1 + ... and out[t] += w * res. Nothing a token gets depends on the other
 * tokens of the call: decode (T = 1), prefill and batched verification give a token the same bits. */
typedef struct {
    int isa, fmt, down_fmt, C, K, Kp, Cp, act, cpe, nch;
    plk_rows_fn fgu, fd;
    const uint64_t *ptrs;
    const int64_t *offs;
    const float *h;
    const int *gs, *tok;
    act_buf *ab;                /* per group: its tokens' activations */
    plk_act *ga;
    float *buf;                 /* item (g, c): buf + (gs[g] * nch + c * Tg) * K */
    _Atomic int err;
} moe_job;

static void moe_gather(void *c, int g)
{
    moe_job *j = (moe_job *)c;
    const int t0 = j->gs[g], Tg = j->gs[g + 1] - t0, K = j->K;
    if (Tg <= 0) return;
    float *x = (float *)malloc(sizeof(float) * (size_t)Tg * K);
    if (!x || act_alloc(&j->ab[g], Tg, j->Kp, j->Kp / plk_group[j->fmt])) {
        free(x);
        j->ab[g].qs = NULL;
        atomic_store(&j->err, -1);
        return;
    }
    for (int i = 0; i < Tg; i++) memcpy(x + (size_t)i * K, j->h + (size_t)j->tok[t0 + i] * K, sizeof(float) * K);
    act_prepare(j->isa, j->fmt, x, Tg, K, K, j->Kp, &j->ab[g], &j->ga[g]);   /* per row: the bits of h's rows */
    free(x);
}

static void moe_item(void *c, int it)
{
    moe_job *j = (moe_job *)c;
    const int g = it / j->nch, ch = it % j->nch, K = j->K;
    const int t0 = j->gs[g], Tg = j->gs[g + 1] - t0;
    const int i0 = g * j->cpe + (int)((long)j->cpe * ch / j->nch);
    const int i1 = g * j->cpe + (int)((long)j->cpe * (ch + 1) / j->nch);
    if (Tg <= 0 || i0 >= i1 || !j->ab[g].qs) return;
    float *dst = j->buf + ((size_t)t0 * j->nch + (size_t)ch * Tg) * K;
    if (bundles_into(j->isa, j->down_fmt, j->C, K, j->Cp, j->act, j->fgu, j->fd, j->ptrs, j->offs, i0, i1, &j->ga[g],
                     Tg, dst))
        atomic_store(&j->err, -1);
}

int plk_moe_ffn(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int ngroups, int cpe, int C, int K,
                const int64_t *offs, const float *h, int T, const int *gs, const int *tok, const float *wt, int act,
                float *out, int nthreads)
{
    (void)T;
    if (ngroups <= 0 || cpe <= 0) return 0;
    const int Kp = (K + plk_group[fmt] - 1) / plk_group[fmt] * plk_group[fmt];
    const int Cp = (C + plk_group[down_fmt] - 1) / plk_group[down_fmt] * plk_group[down_fmt];
    const int nch = plk_ffn_nchunks(cpe, nthreads), pairs = gs[ngroups];
    plk_rows_fn fgu = plk_rows(isa, fmt, tl), fd = plk_rows(isa, down_fmt, tl);
    if (!fgu) fgu = plk_rows(isa, fmt, 0);
    if (!fd) fd = plk_rows(isa, down_fmt, 0);
    act_buf *ab = (act_buf *)calloc((size_t)ngroups, sizeof(act_buf));
    plk_act *ga = (plk_act *)calloc((size_t)ngroups, sizeof(plk_act));
    float *buf = (float *)calloc((size_t)pairs * nch * K + 1, sizeof(float));
    if (!ab || !ga || !buf) { free(ab); free(ga); free(buf); return -1; }
    int nth = nthreads < 1 ? 1 : nthreads;
    moe_job j = { isa, fmt, down_fmt, C, K, Kp, Cp, act, cpe, nch, fgu, fd, ptrs, offs, h, gs, tok, ab, ga, buf, 0 };
    plk_pool_run(moe_gather, &j, ngroups, nth < ngroups ? nth : ngroups);
    if (!atomic_load(&j.err)) plk_pool_run(moe_item, &j, ngroups * nch, nth);
    int rc = plk_oom_take() ? -1 : atomic_load(&j.err);
    if (!rc) {
        for (int g = 0; g < ngroups; g++) {         /* in group order: each token's experts add in order */
            const int t0 = gs[g], Tg = gs[g + 1] - t0;
            for (int i = 0; i < Tg; i++) {
                float *y = out + (size_t)tok[t0 + i] * K;
                const float *b0 = buf + ((size_t)t0 * nch + i) * K;
                const float w = wt[t0 + i];
                for (int k = 0; k < K; k++) {
                    float r = b0[k];
                    for (int c = 1; c < nch; c++) r += b0[(size_t)c * Tg * K + k];
                    y[k] += w * r;
                }
            }
        }
    }
    for (int g = 0; g < ngroups; g++) if (ab[g].qs) act_free(&ab[g]);
    free(ab); free(ga); free(buf);
    return rc;
}

typedef struct { int isa; const uint8_t *buf; size_t n, chunk; double part[64]; } probe_job;
static void probe_item(void *c, int i)
{
    probe_job *j = (probe_job *)c;
    size_t i0 = (size_t)i * j->chunk, i1 = i0 + j->chunk < j->n ? i0 + j->chunk : j->n;
    size_t len = i0 < i1 ? (i1 - i0) & ~(size_t)127 : 0;
    if (!len) { j->part[i] = 0.0; return; }
#if PLK_X86
    if (j->isa == PLK_AVX512) { j->part[i] = read_probe_avx512(j->buf + i0, len); return; }
    if (j->isa == PLK_AVX2) { j->part[i] = read_probe_avx2(j->buf + i0, len); return; }
#elif PLK_ARM64
    if (j->isa >= PLK_NEON) { j->part[i] = read_probe_neon(j->buf + i0, len); return; }
#endif
    j->part[i] = read_probe_generic(j->buf + i0, len);
}

/* plain read of buf with the kernels' threads (the same pool), one contiguous share per thread */
double plk_read_probe(int isa, const uint8_t *buf, size_t n, int nthreads)
{
    if (nthreads < 1) nthreads = 1;
    if (nthreads > 64) nthreads = 64;
    probe_job j = { isa, buf, n, ((n / (size_t)nthreads) + 4095) & ~(size_t)4095, {0} };
    plk_pool_run(probe_item, &j, nthreads, nthreads);
    double total = 0.0;
    for (int i = 0; i < nthreads; i++) total += j.part[i];
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
    return plk_oom_take() ? -1 : 0;
}

/* qkv (T, ldq) column slices <- the parts of the qkv projection, rows stacked in order. h is quantized once per
 * activation type (and padded width): Q8_K for the K-quant parts, q8 for the others (their offset factors bx,
 * which depend on the format, recomputed per part from the same blocks). Each part's values are those of
 * plk_matmul_f32 on it alone (same activations, same kernel and row split): the unfused engine's bits. */
static int qkv_parts(int isa, const plk_attn_w *lw, const float *h, int T, int K, float *qkv, int ldq, int nthreads)
{
    act_buf bq, bk;
    int kp_q = 0, have_k = 0, rc = 0, row0 = 0;
    plk_act ak;
    for (int p = 0; p < lw->nparts && !rc; p++) {
        const int fmt = lw->fmt_p[p], g = plk_group[fmt], Kp = (K + g - 1) / g * g;
        plk_act a;
        if (plk_kquant(fmt)) {
            if (!have_k) {
                if (act_alloc(&bk, T, Kp, Kp / 256)) { rc = -1; break; }
                act_prepare(isa, fmt, h, T, K, K, Kp, &bk, &ak);
                have_k = 1;
            }
            a = ak;
        } else {
            if (kp_q != Kp) {
                if (kp_q) act_free(&bq);
                kp_q = 0;
                if (act_alloc(&bq, T, Kp, Kp / 32)) { rc = -1; break; }
                plk_quantize_act(isa, h, T, K, K, Kp, bq.qs, bq.dx, bq.s, bq.isum);
                kp_q = Kp;
            }
            plk_act_bx(fmt, T, Kp / 32, bq.dx, bq.s, bq.isum, bq.bx);
            a.T = T; a.Kp = Kp; a.nb = Kp / 32; a.ng = Kp / g;
            a.qs = bq.qs; a.dx = bq.dx; a.bx = bq.bx; a.tab = NULL; a.bs = NULL; a.xw = NULL;
        }
        plk_matmul(isa, fmt, lw->tl_p[p], &lw->wp[p], lw->rows_p[p], &a, qkv + row0, ldq, 0, nthreads);
        row0 += lw->rows_p[p];
    }
    if (kp_q) act_free(&bq);
    if (have_k) act_free(&bk);
    return rc || plk_oom_take() ? -1 : 0;
}

/* One layer's attention block, the unfused engine sequence in one call (same kernels, same order):
 *   h = rmsnorm(x, attn_norm); qkv = wqkv h (+ bqkv); each head of q and k RMS-normed over hd with q_norm /
 *   k_norm where given (qwen3); RoPE on q and k (tables rcos/rsin (T, hd/2));
 *   k, v -> fp16 cache rows start..start+T-1 (kc, vc (nkv, maxP, hd)); a = attention(q, cache) (a sliding
 *   window and a score scale where given); x += wo a (product first, then the add, as `x += matmul(wo, a)`;
 *   the product RMS-normed with post_norm first where given, gemma3); h = rmsnorm(x, ffn_norm).
 * scratch: T * ((nh + 2 nkv) hd + nh hd + K) floats. */
int plk_attn_block(int isa, const plk_attn_w *lw, float eps, float *x, float *h, int T, int K,
                   uint16_t *kc, uint16_t *vc, int maxP, int start, int nh, int nkv, int hd,
                   const float *rcos, const float *rsin, float *scratch, int nthreads)
{
    const int qd = nh * hd, kd = nkv * hd, nq = qd + 2 * kd;
    float *qkv = scratch, *att = qkv + (size_t)T * nq, *y = att + (size_t)T * qd;
    plk_rmsnorm(x, lw->attn_norm, eps, h, T, K);
    if (lw->nparts > 0) {
        if (qkv_parts(isa, lw, h, T, K, qkv, nq, nthreads)) return -1;
    } else if (plk_matmul_f32(isa, lw->fmt_qkv, lw->tl_qkv, &lw->wqkv, nq, K, h, T, qkv, nthreads)) return -1;
    for (int t = 0; t < T; t++) {
        float *r = qkv + (size_t)t * nq;
        if (lw->bqkv)
            for (int j = 0; j < nq; j++) r[j] += lw->bqkv[j];
        if (lw->q_norm) plk_rmsnorm(r, lw->q_norm, eps, r, nh, hd);             /* in place, row by row */
        if (lw->k_norm) plk_rmsnorm(r + qd, lw->k_norm, eps, r + qd, nkv, hd);
        for (int g = 0; g < nkv; g++) {
            size_t c = ((size_t)g * maxP + start + t) * hd;
            plk_rope_apply(r + qd + (size_t)g * hd, 1, 1, hd, hd, rcos + (size_t)t * (hd / 2), rsin + (size_t)t * (hd / 2));
            plk_store_f16(r + qd + (size_t)g * hd, kc + c, hd);
            plk_store_f16(r + qd + kd + (size_t)g * hd, vc + c, hd);
        }
    }
    plk_rope_apply(qkv, T, nh, hd, nq, rcos, rsin);
    plk_attention_f16_ex(qkv, nq, kc, vc, T, nh, nkv, hd, maxP, start, lw->window, lw->attn_scale, att, nthreads);
    if (plk_matmul_f32(isa, lw->fmt_o, lw->tl_o, &lw->wo, K, qd, att, T, y, nthreads)) return -1;
    if (lw->post_norm) plk_rmsnorm(y, lw->post_norm, eps, y, T, K);
    for (size_t j = 0; j < (size_t)T * K; j++) x[j] += y[j];
    plk_rmsnorm(x, lw->ffn_norm, eps, h, T, K);
    return plk_oom_take() ? -1 : 0;              /* the attention's scratch */
}
