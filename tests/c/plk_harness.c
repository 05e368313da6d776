/* C harness of the kernels (tests/test_arm.py builds it for aarch64 and runs it under qemu-user with several
 * -cpu models). Reads the cases tests/c/gen_cases.py wrote (formats.py packing, numpy reference outputs) and
 * runs every ISA variant this CPU supports (plk_isa_supported) through the production drivers (plk_matmul_f32,
 * plk_matmul, plk_quantize_act[_k], plk_read_probe), checking:
 *   matmul   against the reference: bit for bit where the case says exact (K-quants, exact inputs), else
 *            |y - ref| <= 2e-5 * (|x| @ |W|^T) (tests/test_kernels.py's REL); every variant bit for bit against
 *            the generic variant; each token alone bit for bit against its row of the batch (batch invariance);
 *            accumulate = 1 into a non-zero y with a row stride != N, bit for bit against generic
 *   quantize_act / quantize_act_k   bit for bit against formats.quantize_act / quantize_act_k
 *   gated    relu bit for bit (reference and generic); silu / gelu_tanh within test_gated's rtol 1e-5, atol 1e-6
 *   read_probe   equal to the generic sum, 1 and 2 threads
 *   ffn_bundles  (gate, up, act, requantize, down, accumulate) against reference.ffn_bundles within test_ffn_bundles'
 *            tolerance (rtol 1e-3, atol 1e-3 or 2e-3 x max |ref - base|); relu bit for bit against generic (silu's
 *            vector exp is an ulp or two from expf, which requantization can turn into a different int8 code);
 *            each token alone bit for bit against the batch; 1 and 2 threads
 * and that each variant's row kernels are its own functions (not another variant's under its name).
 * Prints the CPU features it detected and the variants it ran; exit 0 only if every check passed.
 * PLK_HARNESS_CORRUPT=1 flips one bit of every non-generic matmul output before the checks (the harness must
 * then fail: tests/test_arm.py checks that it can). Usage: plk_harness CASES */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "plk.h"
#if defined(__aarch64__)
#include <sys/auxv.h>
#endif

static const char *ISA_NAME[PLK_NISA] = { "generic", "avx2", "avx512", "neon", "dotprod", "i8mm" };
static long n_checks, n_fail;
static int corrupt;

#define CHECK(cond, ...) do { n_checks++; if (!(cond)) { n_fail++; if (n_fail <= 40) { printf("FAIL: "); printf(__VA_ARGS__); printf("\n"); } } } while (0)

/* ---- case file ---- */
typedef struct { int64_t n; uint8_t *p; } blob;
static FILE *cf;
static void rd(void *p, size_t n)
{
    if (fread(p, 1, n, cf) != n) { printf("FAIL: truncated case file\n"); exit(2); }
}
static int read_rec(int *kind, int *ints, int *nint, blob *blobs, int *nblob)
{
    if (fread(kind, 4, 1, cf) != 1) return 0;
    rd(nint, 4);
    rd(ints, 4 * (size_t)*nint);
    rd(nblob, 4);
    for (int i = 0; i < *nblob; i++) {
        rd(&blobs[i].n, 8);
        blobs[i].p = (uint8_t *)malloc((size_t)blobs[i].n + 64);
        rd(blobs[i].p, (size_t)blobs[i].n);
        blobs[i].p[blobs[i].n] = 0;        /* names are strings */
    }
    return 1;
}

static int isas[PLK_NISA], nisa;

static uint32_t lcg = 12345;
static float frand(void) { lcg = lcg * 1664525u + 1013904223u; return (float)((lcg >> 8) & 0xffff) / 32768.0f - 1.0f; }

static int bits_eq(const float *a, const float *b, size_t n, size_t *where)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(a + i, b + i, 4)) { *where = i; return 0; }
    return 1;
}

/* activations of fmt's type, as the drivers prepare them (act_prepare, plk_common.c) */
typedef struct { int8_t *qs; float *dx, *s, *bx; int32_t *isum; int16_t *bs; plk_act a; } actb;
static void act_make(int isa, int fmt, const float *x, int T, int K, actb *b)
{
    const int g = plk_group[fmt], Kp = (K + g - 1) / g * g, nb = Kp / 32;
    b->qs = malloc((size_t)T * Kp + 64);
    b->dx = malloc(sizeof(float) * ((size_t)T * nb + 16));
    b->s = malloc(sizeof(float) * ((size_t)T * nb + 16));
    b->bx = malloc(sizeof(float) * ((size_t)T * nb + 16));
    b->isum = malloc(sizeof(int32_t) * ((size_t)T * nb + 16));
    b->bs = malloc(sizeof(int16_t) * ((size_t)T * (Kp / 16) + 16));
    memset(&b->a, 0, sizeof b->a);
    b->a.T = T; b->a.Kp = Kp; b->a.qs = b->qs; b->a.dx = b->dx;
    if (plk_kquant(fmt)) {
        plk_quantize_act_k(isa, x, T, K, K, b->qs, b->dx, b->bs);
        b->a.nb = b->a.ng = Kp / 256;
        b->a.bs = b->bs;
    } else {
        plk_quantize_act(isa, x, T, K, K, Kp, b->qs, b->dx, b->s, b->isum);
        plk_act_bx(fmt, T, nb, b->dx, b->s, b->isum, b->bx);
        b->a.nb = nb; b->a.ng = Kp / g; b->a.bx = b->bx;
    }
}
static void act_free(actb *b) { free(b->qs); free(b->dx); free(b->s); free(b->bx); free(b->isum); free(b->bs); }

static long per_isa_cases[PLK_NISA];

static void do_matmul(const int *iv, blob *bl)
{
    const int fmt = iv[0], N = iv[1], K = iv[2], T = iv[3], exact = iv[4], nth = iv[5];
    const char *name = (const char *)bl[0].p;
    plk_w w = { bl[1].p, bl[2].n ? (const uint16_t *)bl[2].p : NULL, bl[3].n ? (const uint16_t *)bl[3].p : NULL, NULL };
    const float *x = (const float *)bl[4].p, *ref = (const float *)bl[5].p, *scale = (const float *)bl[6].p;
    const size_t NY = (size_t)T * N;
    float *gen = malloc(4 * NY), *y = malloc(4 * NY), *one = malloc(4 * (size_t)N);
    const int ldy = N + 3;
    float *base = malloc(4 * (size_t)T * ldy), *acc_gen = malloc(4 * (size_t)T * ldy), *acc = malloc(4 * (size_t)T * ldy);
    for (size_t i = 0; i < (size_t)T * ldy; i++) base[i] = frand();
    for (int v = 0; v < nisa; v++) {
        const int isa = isas[v];
        per_isa_cases[isa]++;
        for (size_t i = 0; i < NY; i++) y[i] = NAN;
        int rc = plk_matmul_f32(isa, fmt, 0, &w, N, K, x, T, y, nth);
        CHECK(rc == 0, "%s [%s]: plk_matmul_f32 returned %d", name, ISA_NAME[isa], rc);
        if (corrupt && isa != PLK_GENERIC) { uint32_t u; memcpy(&u, y, 4); u ^= 1; memcpy(y, &u, 4); }
        size_t at;
        if (exact) {
            CHECK(bits_eq(y, ref, NY, &at), "%s [%s]: not the reference's bits at %zu (%.9g vs %.9g)", name,
                  ISA_NAME[isa], at, y[at], ref[at]);
        } else {
            double worst = 0;
            size_t wi = 0;
            for (size_t i = 0; i < NY; i++) {
                double e = fabs((double)y[i] - ref[i]) / scale[i];
                if (!(e <= worst)) { worst = e; wi = i; }
            }
            CHECK(worst <= 2e-5, "%s [%s]: relative error %.3g at %zu (%.9g vs %.9g)", name, ISA_NAME[isa], worst, wi,
                  y[wi], ref[wi]);
        }
        if (isa == PLK_GENERIC) memcpy(gen, y, 4 * NY);
        else CHECK(bits_eq(y, gen, NY, &at), "%s [%s]: differs from generic at %zu (%.9g vs %.9g)", name, ISA_NAME[isa],
                   at, y[at], gen[at]);
        /* batch invariance: each token alone */
        for (int t = 0; t < T && T > 1; t++) {
            plk_matmul_f32(isa, fmt, 0, &w, N, K, x + (size_t)t * K, 1, one, 1);
            CHECK(bits_eq(one, y + (size_t)t * N, N, &at) || (corrupt && t == 0), "%s [%s]: token %d alone differs at row %zu",
                  name, ISA_NAME[isa], t, at);
        }
        /* accumulate into y with row stride ldy */
        actb ab;
        act_make(isa, fmt, x, T, K, &ab);
        memcpy(acc, base, 4 * (size_t)T * ldy);
        plk_matmul(isa, fmt, 0, &w, N, &ab.a, acc, ldy, 1, nth);
        act_free(&ab);
        if (isa == PLK_GENERIC) memcpy(acc_gen, acc, 4 * (size_t)T * ldy);
        else CHECK(bits_eq(acc, acc_gen, (size_t)T * ldy, &at), "%s [%s]: accumulate (ldy %d) differs from generic at %zu",
                   name, ISA_NAME[isa], ldy, at);
    }
    free(gen); free(y); free(one); free(base); free(acc_gen); free(acc);
}

static void do_qact(const int *iv, blob *bl)
{
    const int T = iv[0], K = iv[1], Kp = iv[2], nb = Kp / 32;
    const float *x = (const float *)bl[0].p;
    int8_t *qs = malloc((size_t)T * Kp);
    float *d = malloc(4 * (size_t)T * nb), *s = malloc(4 * (size_t)T * nb);
    int32_t *is = malloc(4 * (size_t)T * nb);
    for (int v = 0; v < nisa; v++) {
        const int isa = isas[v];
        memset(qs, 0x55, (size_t)T * Kp);
        plk_quantize_act(isa, x, T, K, K, Kp, qs, d, s, is);
        CHECK(!memcmp(qs, bl[1].p, (size_t)T * Kp) && !memcmp(d, bl[2].p, 4 * (size_t)T * nb) &&
              !memcmp(s, bl[3].p, 4 * (size_t)T * nb) && !memcmp(is, bl[4].p, 4 * (size_t)T * nb),
              "quantize_act T=%d K=%d Kp=%d [%s]: not formats.quantize_act's bits", T, K, Kp, ISA_NAME[isa]);
    }
    free(qs); free(d); free(s); free(is);
}

static void do_qactk(const int *iv, blob *bl)
{
    const int T = iv[0], K = iv[1];
    const float *x = (const float *)bl[0].p;
    int8_t *qs = malloc((size_t)T * K);
    float *d = malloc(4 * (size_t)T * (K / 256));
    int16_t *bs = malloc(2 * (size_t)T * (K / 16));
    for (int v = 0; v < nisa; v++) {
        const int isa = isas[v];
        memset(qs, 0x55, (size_t)T * K);
        plk_quantize_act_k(isa, x, T, K, K, qs, d, bs);
        CHECK(!memcmp(qs, bl[1].p, (size_t)T * K) && !memcmp(d, bl[2].p, 4 * (size_t)T * (K / 256)) &&
              !memcmp(bs, bl[3].p, 2 * (size_t)T * (K / 16)),
              "quantize_act_k T=%d K=%d [%s]: not formats.quantize_act_k's bits", T, K, ISA_NAME[isa]);
    }
    free(qs); free(d); free(bs);
}

static void gated_for(int isa, float *g, const float *u, size_t n, int act)
{
#if defined(__aarch64__)
    if (isa >= PLK_NEON) { gated_neon(g, u, n, act); return; }
#endif
    gated_generic(g, u, n, act);
}

static void do_gated(const int *iv, blob *bl)
{
    const int n = iv[0], act = iv[1];
    const float *g0 = (const float *)bl[0].p, *u = (const float *)bl[1].p, *ref = (const float *)bl[2].p;
    float *g = malloc(4 * (size_t)n), *gen = malloc(4 * (size_t)n);
    for (int v = 0; v < nisa; v++) {
        const int isa = isas[v];
        memcpy(g, g0, 4 * (size_t)n);
        gated_for(isa, g, u, n, act);
        size_t at;
        if (act == PLK_ACT_RELU) CHECK(bits_eq(g, ref, n, &at), "gated relu [%s]: not the reference's bits at %zu", ISA_NAME[isa], at);
        int ok = 1;
        for (int i = 0; i < n && ok; i++)
            if (!(fabsf(g[i] - ref[i]) <= 1e-6f + 1e-5f * fabsf(ref[i]))) { ok = 0; at = i; }
        CHECK(ok, "gated act=%d [%s]: %.9g vs reference %.9g at %zu", act, ISA_NAME[isa], g[at], ref[at], at);
        if (isa == PLK_GENERIC) memcpy(gen, g, 4 * (size_t)n);
        else if (act == PLK_ACT_RELU) CHECK(bits_eq(g, gen, n, &at), "gated relu [%s]: differs from generic at %zu", ISA_NAME[isa], at);
    }
    free(g); free(gen);
}

static void do_probe(void)
{
    const size_t n = 64 * 1024 + 96;
    uint8_t *buf = malloc(n);
    for (size_t i = 0; i < n; i++) { lcg = lcg * 1664525u + 1013904223u; buf[i] = (uint8_t)(lcg >> 24); }
    const double want = read_probe_generic(buf, n - n % 32);
    for (int v = 0; v < nisa; v++)
        for (int th = 1; th <= 2; th++) {
            const double got1 = plk_read_probe(isas[v], buf, n, th), ref1 = plk_read_probe(PLK_GENERIC, buf, n, th);
            CHECK(got1 == ref1, "read_probe [%s] %d threads: %.17g vs generic %.17g", ISA_NAME[isas[v]], th, got1, ref1);
        }
#if defined(__aarch64__)
    if (plk_isa_supported(PLK_NEON)) CHECK(read_probe_neon(buf, n - n % 32) == want, "read_probe_neon: %.17g vs %.17g",
                                           read_probe_neon(buf, n - n % 32), want);
#endif
    free(buf);
}

static void do_ffn(const int *iv, blob *bl)
{
    const int fmt = iv[0], down = iv[1], C = iv[2], Kd = iv[3], n = iv[4], T = iv[5], act = iv[6];
    const float atol_f = iv[7] * 1e-3f;
    const int64_t stride = *(const int64_t *)bl[1].p;
    const int64_t *offs = (const int64_t *)bl[2].p;
    const float *h = (const float *)bl[3].p, *base = (const float *)bl[4].p, *ref = (const float *)bl[5].p;
    uint8_t *arena = aligned_alloc(4096, ((size_t)bl[0].n + 4095) & ~(size_t)4095);
    memcpy(arena, bl[0].p, (size_t)bl[0].n);
    uint64_t ptrs[64];
    for (int i = 0; i < n; i++) ptrs[i] = (uint64_t)(uintptr_t)(arena + (size_t)i * stride);
    const size_t NY = (size_t)T * Kd;
    float *out = malloc(4 * NY), *gen = malloc(4 * NY), *one = malloc(4 * (size_t)Kd);
    float dmax = 0;
    for (size_t i = 0; i < NY; i++) dmax = fmaxf(dmax, fabsf(ref[i] - base[i]));
    for (int v = 0; v < nisa; v++) {
        const int isa = isas[v];
        for (int th = 1; th <= 2; th++) {
            memcpy(out, base, 4 * NY);
            int rc = plk_ffn_bundles(isa, fmt, down, 0, ptrs, n, C, Kd, offs, h, T, act, out, th);
            CHECK(rc == 0, "ffn fmt %d/%d T=%d [%s]: rc %d", fmt, down, T, ISA_NAME[isa], rc);
            if (corrupt && isa != PLK_GENERIC) out[0] += 1.0f;
            size_t at = 0;
            int ok = 1;
            for (size_t i = 0; i < NY && ok; i++)
                if (!(fabsf(out[i] - ref[i]) <= atol_f * dmax + 1e-3f * fabsf(ref[i]))) { ok = 0; at = i; }
            CHECK(ok, "ffn fmt %d/%d act %d T=%d threads %d [%s]: %.9g vs reference %.9g at %zu", fmt, down, act, T, th,
                  ISA_NAME[isa], out[at], ref[at], at);
            if (th == 1) {
                if (isa == PLK_GENERIC) memcpy(gen, out, 4 * NY);
                else if (act == PLK_ACT_RELU)
                    CHECK(bits_eq(out, gen, NY, &at), "ffn fmt %d/%d relu T=%d [%s]: differs from generic at %zu", fmt, down, T,
                          ISA_NAME[isa], at);
                for (int t = 0; t < T && T > 1; t++) {
                    memcpy(one, base + (size_t)t * Kd, 4 * (size_t)Kd);
                    plk_ffn_bundles(isa, fmt, down, 0, ptrs, n, C, Kd, offs, h + (size_t)t * Kd, 1, act, one, 1);
                    CHECK(bits_eq(one, out + (size_t)t * Kd, Kd, &at) || (corrupt && t == 0),
                          "ffn fmt %d/%d T=%d [%s]: token %d alone differs at %zu", fmt, down, T, ISA_NAME[isa], t, at);
                }
            }
        }
    }
    free(arena); free(out); free(gen); free(one);
}

int main(int argc, char **argv)
{
    if (argc != 2) { fprintf(stderr, "usage: %s CASES\n", argv[0]); return 2; }
    corrupt = getenv("PLK_HARNESS_CORRUPT") && atoi(getenv("PLK_HARNESS_CORRUPT"));
#if defined(__aarch64__)
    const unsigned long hw = getauxval(AT_HWCAP), hw2 = getauxval(AT_HWCAP2);
    printf("cpu: aarch64 asimd=%d asimddp=%d i8mm=%d\n", !!(hw & (1UL << 1)), !!(hw & (1UL << 20)), !!(hw2 & (1UL << 13)));
#else
    printf("cpu: not aarch64\n");
#endif
    const int best = plk_detect_isa();
    printf("detected: %s\n", ISA_NAME[best]);
    printf("variants:");
    for (int i = 0; i < PLK_NISA; i++)
        if (plk_isa_supported(i)) { isas[nisa++] = i; printf(" %s", ISA_NAME[i]); }
    printf("\n");
    CHECK(isas[nisa - 1] == best, "the best supported variant is not the detected one");
    /* each variant runs its own row kernels */
    for (int f = 0; f < PLK_NFMT; f++)
        for (int i = 0; i < nisa; i++) {
            CHECK(plk_rows(isas[i], f, 0) != NULL, "no %s kernel for format %d", ISA_NAME[isas[i]], f);
            for (int j = 0; j < i; j++)
                CHECK(plk_rows(isas[i], f, 0) != plk_rows(isas[j], f, 0), "%s and %s run the same kernel for format %d",
                      ISA_NAME[isas[i]], ISA_NAME[isas[j]], f);
        }
    cf = fopen(argv[1], "rb");
    char magic[8];
    if (!cf || fread(magic, 1, 8, cf) != 8 || memcmp(magic, "PLKCASES", 8)) { printf("FAIL: cannot read %s\n", argv[1]); return 2; }
    int kind, ints[16], nint, nblob;
    blob bl[16];
    long nrec[6] = {0};
    while (read_rec(&kind, ints, &nint, bl, &nblob)) {
        if (kind == 1) do_matmul(ints, bl);
        else if (kind == 2) do_qact(ints, bl);
        else if (kind == 3) do_qactk(ints, bl);
        else if (kind == 4) do_gated(ints, bl);
        else if (kind == 5) do_ffn(ints, bl);
        else { printf("FAIL: unknown record kind %d\n", kind); return 2; }
        if (kind >= 1 && kind <= 5) nrec[kind]++;
        for (int i = 0; i < nblob; i++) free(bl[i].p);
    }
    fclose(cf);
    do_probe();
    printf("cases: %ld matmul, %ld quantize_act, %ld quantize_act_k, %ld gated, %ld ffn_bundles, read_probe\n", nrec[1],
           nrec[2], nrec[3], nrec[4], nrec[5]);
    for (int i = 0; i < nisa; i++) printf("ran %s: %ld matmul cases\n", ISA_NAME[isas[i]], per_isa_cases[isas[i]]);
    if (nrec[1] == 0) { printf("FAIL: no matmul cases\n"); return 1; }
    printf("RESULT: %s (%ld checks, %ld failed)\n", n_fail ? "FAIL" : "PASS", n_checks, n_fail);
    return n_fail ? 1 : 0;
}
