/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78): the checksum of every ffn.bin bundle and every
 * resident tensor (powerlow/integrity.py).  The SSE4.2 `crc32` instruction does 8 bytes per instruction;
 * its latency is 3 cycles and its throughput 1 a cycle, so three independent chains fill the pipeline:
 * plk_crc32c_many runs three buffers in lockstep, plk_crc32c splits one long buffer into three lanes and
 * joins them (GF(2) shift).  CPUs without SSE4.2 use a slice-by-8 table. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include "plk.h"

static uint32_t T8[8][256];
static int have_hw = -1;

void plk_crc32c_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        T8[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) T8[t][i] = (T8[t - 1][i] >> 8) ^ T8[0][T8[t - 1][i] & 0xff];
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    have_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    have_hw = 0;           /* aarch64: the table (the ARMv8 crc32c instructions are not used yet) */
#endif
}

static uint32_t crc_sw(uint32_t c, const uint8_t *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) { c = (c >> 8) ^ T8[0][(c ^ *p++) & 0xff]; n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= c;
        c = T8[7][w & 0xff] ^ T8[6][(w >> 8) & 0xff] ^ T8[5][(w >> 16) & 0xff] ^ T8[4][(w >> 24) & 0xff]
          ^ T8[3][(w >> 32) & 0xff] ^ T8[2][(w >> 40) & 0xff] ^ T8[1][(w >> 48) & 0xff] ^ T8[0][w >> 56];
        p += 8; n -= 8;
    }
    while (n--) c = (c >> 8) ^ T8[0][(c ^ *p++) & 0xff];
    return c;
}

#if !(defined(__x86_64__) || defined(__i386__))
/* never called (have_hw is 0): the SSE4.2 builtins below stand for the table there */
#define __builtin_ia32_crc32qi(c, b) crc_sw((uint32_t)(c), &(uint8_t){ (uint8_t)(b) }, 1)
#define __builtin_ia32_crc32di(c, w) crc_sw((uint32_t)(c), (const uint8_t *)&(uint64_t){ (w) }, 8)
#define target(x) unused
#endif
__attribute__((target("sse4.2")))
static uint32_t crc_hw(uint32_t c, const uint8_t *p, size_t n) {
    uint64_t c64 = c;
    while (n && ((uintptr_t)p & 7)) { c64 = __builtin_ia32_crc32qi((uint32_t)c64, *p++); n--; }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c64 = __builtin_ia32_crc32di(c64, w);
        p += 8; n -= 8;
    }
    c = (uint32_t)c64;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

__attribute__((target("sse4.2")))
static void crc_hw3(const uint8_t *a, const uint8_t *b, const uint8_t *d, size_t n, uint32_t out[3]) {
    /* three equal-length buffers, 8-byte words in lockstep; the tail (n % 8) one byte at a time */
    uint64_t ca = 0xffffffffu, cb = 0xffffffffu, cd = 0xffffffffu;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t wa, wb, wd;
        memcpy(&wa, a + i, 8); memcpy(&wb, b + i, 8); memcpy(&wd, d + i, 8);
        ca = __builtin_ia32_crc32di(ca, wa);
        cb = __builtin_ia32_crc32di(cb, wb);
        cd = __builtin_ia32_crc32di(cd, wd);
    }
    out[0] = ~crc_hw((uint32_t)ca, a + i, n - i);
    out[1] = ~crc_hw((uint32_t)cb, b + i, n - i);
    out[2] = ~crc_hw((uint32_t)cd, d + i, n - i);
}

/* GF(2) arithmetic modulo the CRC polynomial, in the reflected bit order of the register: multiplying a
 * register value by x^(8n) is what appending n zero bytes does to it (without the pre/post inversion).  Used to
 * join the three lanes of one buffer: crc(A|B) = shift(crc(A), |B|) ^ crc(B) on the raw registers. */
static uint32_t gf2_mul(uint32_t a, uint32_t b) {      /* a * b mod P; bit 31 is x^0 */
    uint32_t r = 0;
    for (int i = 0; i < 32; i++) {
        if (a & 0x80000000u) r ^= b;
        a <<= 1;
        b = (b >> 1) ^ (0x82F63B78u & (0u - (b & 1u)));
    }
    return r;
}

static uint32_t x_pow_8n(size_t n) {                   /* x^(8n) mod P by square-and-multiply */
    uint32_t r = 0x80000000u, sq = 0x00800000u;         /* 1 and x^8 */
    while (n) {
        if (n & 1) r = gf2_mul(r, sq);
        sq = gf2_mul(sq, sq);
        n >>= 1;
    }
    return r;
}

__attribute__((target("sse4.2")))
static uint32_t crc_hw_long(uint32_t c, const uint8_t *p, size_t n) {
    /* a long buffer as three lanes in lockstep, joined by shifting the first two over the lanes after them */
    size_t third = (n / 3) & ~(size_t)7;
    const uint8_t *a = p, *b = p + third, *d = p + 2 * third;
    uint64_t ca = c, cb = 0, cd = 0;
    for (size_t i = 0; i < third; i += 8) {
        uint64_t wa, wb, wd;
        memcpy(&wa, a + i, 8); memcpy(&wb, b + i, 8); memcpy(&wd, d + i, 8);
        ca = __builtin_ia32_crc32di(ca, wa);
        cb = __builtin_ia32_crc32di(cb, wb);
        cd = __builtin_ia32_crc32di(cd, wd);
    }
    uint32_t k = x_pow_8n(third);
    uint32_t r = gf2_mul((uint32_t)ca, k) ^ (uint32_t)cb;
    r = gf2_mul(r, k) ^ (uint32_t)cd;
    return crc_hw(r, p + 3 * third, n - 3 * third);
}

uint32_t plk_crc32c(const void *p, size_t n, uint32_t crc) {
    if (have_hw < 0) plk_crc32c_init();
    uint32_t c = ~crc;
    if (!have_hw) c = crc_sw(c, (const uint8_t *)p, n);
    else if (n >= 4096) c = crc_hw_long(c, (const uint8_t *)p, n);
    else c = crc_hw(c, (const uint8_t *)p, n);
    return ~c;
}

void plk_crc32c_many(const uint64_t *ptrs, int k, size_t n, uint32_t *out) {
    if (have_hw < 0) plk_crc32c_init();
    int i = 0;
    if (have_hw)
        for (; i + 3 <= k; i += 3)
            crc_hw3((const uint8_t *)(uintptr_t)ptrs[i], (const uint8_t *)(uintptr_t)ptrs[i + 1],
                    (const uint8_t *)(uintptr_t)ptrs[i + 2], n, out + i);
    for (; i < k; i++) out[i] = plk_crc32c((const void *)(uintptr_t)ptrs[i], n, 0);
}

int plk_crc32c_hw(void) {
    if (have_hw < 0) plk_crc32c_init();
    return have_hw;
}

/* for the tests: the portable path on a CPU that has SSE4.2 */
uint32_t plk_crc32c_sw(const void *p, size_t n, uint32_t crc) {
    if (have_hw < 0) plk_crc32c_init();
    return ~crc_sw(~crc, (const uint8_t *)p, n);
}
