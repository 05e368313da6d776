/* powerlow kernels: C API shared by the ISA variants and the Cython wrapper.
 *
 * Naming follows ggml: <op>_<weight format>_<activation format>_<isa>; the activation format is
 * always q8 (int8 blocks of 32, see formats.quantize_act).
 * Every matmul computes, per row n and token t (formats.matmul_ref numerics):
 *   y = sum_b A*d_w[g(b)]*d_x[t,b] * idot_b  +  sum_g Bw[n,g] * bx[t,g]
 * where idot_b is the integer dot of the *unsigned codes* (signed int8 for q8) with the int8
 * activations of block b, and the second sum carries the offset of each format:
 *   q4_1, q2: Bw = m,      bx = sum of the block sums s over the group   (w = d*q + m)
 *   q4_0:     Bw = -8d,    bx = sum of d_x*isum over the group           (w = d*(q-8))
 *   tern:     Bw = -d,     bx = idem                                     (w = d*(c-1))
 *   q1:       A = 2, Bw = -d, bx = idem                                  (w = d*(2b-1))
 * Unsigned codes suit both x86 byte-dot instructions (vpmaddubsw, vpdpbusd take u8 x s8).
 */
#ifndef PLK_H
#define PLK_H
#include <stdint.h>
#include <stddef.h>
#include <math.h>

enum { PLK_Q8 = 0, PLK_Q4_0, PLK_Q4_1, PLK_Q2, PLK_TERN, PLK_Q1,
       PLK_Q5_0, PLK_Q5_1, PLK_Q4_K, PLK_Q5_K, PLK_Q6_K, PLK_NFMT };
/* ISA variants: x86-64 builds have generic, avx2, avx512; aarch64 builds generic, neon, dotprod, i8mm
 * (plk_neon.c). An id of the other architecture has no kernels (plk_rows returns NULL; Python never asks). */
enum { PLK_GENERIC = 0, PLK_AVX2 = 1, PLK_AVX512 = 2, PLK_NEON = 3, PLK_DOTPROD = 4, PLK_I8MM = 5, PLK_NISA };
enum { PLK_ACT_SILU = 0, PLK_ACT_RELU = 1, PLK_ACT_GELU_TANH = 2 };
/* GELU, tanh form: 0.5 g (1 + tanh(u)) = g / (1 + e^(-2u)), u = sqrt(2/pi) (g + 0.044715 g^3) */
#define PLK_GELU_C 0.7978845608028654f
#define PLK_GELU_A 0.044715f
static inline float plk_act_scalar(float g, int act)
{
    if (act == PLK_ACT_SILU) return g / (1.0f + expf(-g));
    if (act == PLK_ACT_GELU_TANH) return g / (1.0f + expf(-2.0f * PLK_GELU_C * (g + PLK_GELU_A * g * g * g)));
    return g > 0.0f ? g : 0.0f;
}

/* group (weights per scale), code bytes per group, has a min (plane, or inside the raw block)
 * q5_0 .. q6_k are raw GGML blocks (formats.py): qs holds the whole blocks (block bytes = qbytes), d and m
 * are unused (NULL). q5_0 / q5_1 take the q8 activations (q5_0: Bw = -16d, bx as q4_0; q5_1: Bw = m, bx as
 * q4_1); the K-quants (plk_kquant) take Q8_K activations: qs int8 (T, Kp), dx (T, Kp/256) float32 scales,
 * bs (T, Kp/16) int16 block sums; nb = ng = Kp/256, bx unused. Their kernels: rows_<fmt>_q8k_<isa>. */
static const int plk_group[PLK_NFMT] = {32, 32, 32, 64, 64, 64, 32, 32, 256, 256, 256};
static const int plk_qbytes[PLK_NFMT] = {32, 16, 16, 16, 16, 8, 22, 24, 144, 176, 210};
static const int plk_has_min[PLK_NFMT] = {0, 0, 1, 1, 0, 0, 0, 1, 1, 1, 0};
static inline int plk_raw_fmt(int fmt) { return fmt >= PLK_Q5_0; }
static inline int plk_kquant(int fmt) { return fmt >= PLK_Q4_K; }

typedef struct {
    int T, Kp, nb, ng;     /* tokens, padded width (multiple of the weight group), 32-blocks, groups */
    const int8_t *qs;      /* (T, Kp) int8 codes */
    const float *dx;       /* (T, nb) block scales (fp16-rounded values) */
    const float *bx;       /* (T, ng) offset factor per weight group (see above) */
    const uint8_t *tab;    /* NULL, or the table-lookup kernels' per-token tables (plk_tl_tables) */
    const int16_t *bs;     /* Q8_K (K-quant) activations: (T, Kp/16) sums of 16 codes; else NULL */
    const int8_t *xw;      /* Q8_K on AVX-512 with T < PLK_KQ_GEMM_MINT: qs with each 256-block's 32-byte pieces in
                            * the order 0 2 1 3 4 6 5 7 (the q4_k / q5_k decode rows' 64-byte code loads); else NULL */
} plk_act;

/* tokens from which the K-quant kernels run their GEMM tiles (below: the decode rows, which read plk_act.xw) */
#define PLK_KQ_GEMM_MINT 8

typedef struct {           /* one packed matrix: row r's planes at qs + r*ng*qbytes, d + r*ng, m + r*ng */
    const uint8_t *qs;
    const uint16_t *d;
    const uint16_t *m;     /* NULL for formats without a min */
    const uint8_t *tl;     /* NULL, or the same matrix re-laid for the x86 table-lookup kernels (plk_tl_pack) */
    int tl_tiles;          /* with tl: its whole 32-row tiles (N / 32 of the matrix it was packed from) */
} plk_w;

/* rows [r0, r1) of y (T, ldy) = W @ x^T (accumulate: +=) */
typedef void (*plk_rows_fn)(const plk_w *w, int r0, int r1, const plk_act *a, float *y, int ldy, int accumulate);

/* plk_common.c */
int plk_detect_isa(void);                               /* best variant this CPU runs */
int plk_isa_supported(int isa);                         /* 1 if this build and CPU run variant isa */
float plk_h2f(uint16_t h);
uint16_t plk_f2h(float f);                              /* round to nearest even */
plk_rows_fn plk_rows(int isa, int fmt, int tl);         /* tl: table-lookup variant (NULL if none) */
void plk_quantize_act(int isa, const float *x, int T, int K, int ldx, int Kp,
                      int8_t *qs, float *dx, float *s, int32_t *isum);
/* Q8_K activations (formats.quantize_act_k): K a multiple of 256, qs (T, K), d (T, K/256), bs (T, K/16) */
void plk_quantize_act_k(int isa, const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs);
void plk_act_bx(int fmt, int T, int nb, const float *dx, const float *s, const int32_t *isum, float *bx);
void plk_matmul(int isa, int fmt, int tl, const plk_w *w, int N, const plk_act *a, float *y, int ldy,
                int accumulate, int nthreads);
int plk_matmul_f32(int isa, int fmt, int tl, const plk_w *w, int N, int K, const float *x, int T,
                   float *y, int nthreads);
/* offs: gate qs,d,m, up qs,d,m, down qs,d,m byte offsets inside a bundle (m: -1 if none) */
int plk_ffn_bundles(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int C, int K,
                    const int64_t *offs, const float *h, int T, int act, float *out, int nthreads);
/* a kernel's scratch allocation failed (its output is incomplete): set by the kernel, taken (and cleared) by
 * the driver that called it, which then returns -1 (the Cython layer raises MemoryError) */
void plk_oom_set(void);
int plk_oom_take(void);
/* kernels' scratch: malloc / 64-byte aligned_alloc, with a fault-injection hook for the tests (the next n
 * scratch allocations fail: plk_test_fail_allocs) */
void *plk_scratch(size_t n, int aligned64);
void plk_test_fail_allocs(int n);
int plk_ffn_nchunks(int n, int nthreads);
int plk_ffn_bundles_part(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int nch,
                         const int *lo, const int *hi, int C, int K, const int64_t *offs, const float *h, int T,
                         int act, float *out, float *priv, int nthreads);
/* mixture of experts: groups of cpe bundles (one expert each) over their routed tokens, see plk_common.c */
int plk_moe_ffn(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int ngroups, int cpe, int C, int K,
                const int64_t *offs, const float *h, int T, const int *gs, const int *tok, const float *wt, int act,
                float *out, int nthreads);
double plk_read_probe(int isa, const uint8_t *buf, size_t n, int nthreads);
/* the kernels' thread pool: fn(ctx, i) for i in 0..n-1 on up to nthreads threads, caller included */
typedef void (*plk_pool_fn)(void *ctx, int item);
void plk_pool_run(plk_pool_fn fn, void *ctx, int n, int nthreads);
/* one layer's attention block, see plk_common.c */
#define PLK_QKV_MAXPARTS 3
typedef struct {
    int fmt_qkv, fmt_o, tl_qkv, tl_o;   /* formats, table-lookup flags (as matmul picks them) */
    plk_w wqkv, wo;            /* (nh + 2 nkv) hd x K and K x nh hd */
    /* nparts > 0: the qkv projection is these parts instead of wqkv (rows stacked in order, each its own
     * format: e.g. q, k in q4_k and v in q6_k), each written into its column slice of qkv */
    int nparts, fmt_p[PLK_QKV_MAXPARTS], tl_p[PLK_QKV_MAXPARTS], rows_p[PLK_QKV_MAXPARTS];
    plk_w wp[PLK_QKV_MAXPARTS];
    const float *bqkv;         /* NULL or (nh + 2 nkv) hd */
    const float *attn_norm, *ffn_norm;
    const float *q_norm, *k_norm;   /* NULL or (hd,): each head's RMSNorm of q and k before RoPE (qwen3) */
    const float *post_norm;    /* NULL or (K,): RMSNorm of the attention output before the residual add (gemma3) */
    int window;                /* sliding window (keys in (pos - window, pos]), 0 = all */
    float attn_scale;          /* score scale, 0 = 1/sqrt(hd) */
} plk_attn_w;
int plk_attn_block(int isa, const plk_attn_w *lw, float eps, float *x, float *h, int T, int K,
                   uint16_t *kc, uint16_t *vc, int maxP, int start, int nh, int nkv, int hd,
                   const float *rcos, const float *rsin, float *scratch, int nthreads);

/* ---- x86 (AVX2 / AVX-512) table-lookup layout (plk_tl.h has the kernels and the reasons) ----
 * Rows in tiles of 32; per tile, per 64-group one record: the 32 rows' fp16 d, then m (q2), then the codes
 * as 4-bit indices (q1: 4 elements of one bit, q2/tern: 2 elements of two bits), one 32-byte vector per pair
 * of indices (low nibble, high nibble) holding that pair for the 32 rows, vectors in element order. Only the
 * floor(N/32) whole tiles are re-laid; the last N % 32 rows use the plain planes. */
#define PLK_TL_ROWS 32
#define PLK_TL_TCHUNK 64       /* tokens whose tables are built at once (more: in chunks of this many) */
static inline int plk_tl_fmt(int fmt) { return fmt == PLK_Q2 || fmt == PLK_TERN || fmt == PLK_Q1; }
static inline int plk_tl_elems(int fmt) { return fmt == PLK_Q1 ? 4 : 2; }          /* elements per index */
static inline int plk_tl_codebytes(int fmt) { return fmt == PLK_Q1 ? 256 : 512; }  /* per group and tile */
static inline int plk_tl_scalebytes(int fmt) { return plk_has_min[fmt] ? 128 : 64; }        /* fp16 d (and m) */
static inline size_t plk_tl_recbytes(int fmt) { return (size_t)plk_tl_codebytes(fmt) + plk_tl_scalebytes(fmt); }
/* byte position of tile row r (0..31) in a code vector: the order in which unpack + widen (plk_tl.h)
 * deliver the rows, so that int32 vector o holds rows 8o..8o+7 in order */
static inline int plk_tl_slot(int r) { int o = r >> 3, l = r & 7; return (o >> 1) * 8 + (o & 1) + 2 * (l & 3) + 16 * (l >> 2); }
/* Records are stored in K-chunks (plk_tl.h says why): super-tiles of PLK_TL_ST tiles (the last may be shorter);
 * within one, chunk by chunk of KC groups (plk_tl_kc: 16 for q2/tern, 32 for q1: 16 KB of a token's tables),
 * the super-tile's tiles one after another, each its chunk's records in group order. plk_tl_rec is the record
 * index of (tile tt, group g) in a layout of ntiles x ng records. */
#define PLK_TL_ST 8
#define PLK_TL_KC 16
static inline int plk_tl_kc(int fmt) { return fmt == PLK_Q1 ? 2 * PLK_TL_KC : PLK_TL_KC; }
static inline size_t plk_tl_rec(int fmt, int ntiles, int ng, int tt, int g)
{
    const int KC = plk_tl_kc(fmt), s0 = tt - tt % PLK_TL_ST, ns = ntiles - s0 < PLK_TL_ST ? ntiles - s0 : PLK_TL_ST;
    const int g0 = g - g % KC, kc = ng - g0 < KC ? ng - g0 : KC;
    return (size_t)s0 * ng + (size_t)g0 * ns + (size_t)(tt - s0) * kc + (size_t)(g - g0);
}
size_t plk_tl_nbytes(int fmt, int N, int K);
int plk_tl_pack(int fmt, const plk_w *w, int N, int K, uint8_t *out);
void plk_tl_tables_avx2(int fmt, const plk_act *a, uint8_t *tab);
void plk_tl_tables_avx512(int fmt, const plk_act *a, uint8_t *tab);
void rowstl_q2_q8_avx512(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_tern_q8_avx512(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_q1_q8_avx512(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_q2_q8_avx2(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_tern_q8_avx2(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_q1_q8_avx2(const plk_w*, int, int, const plk_act*, float*, int, int);

/* per-ISA row kernels: rows_<fmt>_q8_<isa> */
#define PLK_DECL_ROWS(isa) \
    void rows_q8_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q4_0_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q4_1_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q2_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_tern_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q1_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q5_0_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q5_1_q8_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q4_k_q8k_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q5_k_q8k_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void rows_q6_k_q8k_##isa(const plk_w*, int, int, const plk_act*, float*, int, int); \
    void quantize_act_q8k_##isa(const float*, int, int, int, int8_t*, float*, int16_t*); \
    void quantize_act_q8_##isa(const float*, int, int, int, int, int8_t*, float*, float*, int32_t*); \
    double read_probe_##isa(const uint8_t*, size_t); \
    void gated_##isa(float *g, const float *u, size_t n, int act);
PLK_DECL_ROWS(generic)
/* table-lookup (T-MAC style) kernels, portable C: see plk_generic.c */
void rowstl_q2_q8_generic(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_tern_q8_generic(const plk_w*, int, int, const plk_act*, float*, int, int);
void rowstl_q1_q8_generic(const plk_w*, int, int, const plk_act*, float*, int, int);
PLK_DECL_ROWS(avx2)
PLK_DECL_ROWS(avx512)
/* aarch64 (plk_neon.c): row kernels per variant; the quantizers, gated and read_probe are the _neon ones for all three */
PLK_DECL_ROWS(neon)
PLK_DECL_ROWS(dotprod)
PLK_DECL_ROWS(i8mm)

/* plk_ops.c: float helpers for the engine's hot path */
void plk_rmsnorm(const float *x, const float *w, float eps, float *out, int T, int K);
void plk_rope(float *x, int T, int nh, int hd, const int64_t *pos, double theta);
void plk_rope_tables(const int64_t *pos, int T, int hd, double theta, double scale, float *c, float *s);
void plk_rope_apply(float *x, int T, int nh, int hd, size_t ldx, const float *c, const float *s);
void plk_store_f16(const float *src, uint16_t *dst, size_t n);
void plk_silu_mul(const float *g, const float *u, float *out, size_t n);
void plk_relu_mul(const float *g, const float *u, float *out, size_t n);
void plk_gelu_tanh_mul(const float *g, const float *u, float *out, size_t n);
void plk_attention(const float *q, const float *kc, const float *vc, int T, int nh, int nkv, int hd,
                   int maxP, int start, float *out, int nthreads);
/* window > 0: each query at position p attends to keys in (p - window, p] only (sliding-window layers);
 * scale: the softmax scale of q.k (<= 0: 1/sqrt(hd)) */
void plk_attention_f16_ex(const float *q, size_t ldq, const uint16_t *kc, const uint16_t *vc, int T, int nh, int nkv,
                          int hd, int maxP, int start, int window, float scale, float *out, int nthreads);
/* CRC32C (plk_crc.c): hardware crc32 where SSE4.2 is, a slice-by-8 table elsewhere */
void plk_crc32c_init(void);
uint32_t plk_crc32c(const void *p, size_t n, uint32_t crc);
uint32_t plk_crc32c_sw(const void *p, size_t n, uint32_t crc);
void plk_crc32c_many(const uint64_t *ptrs, int k, size_t n, uint32_t *out);
int plk_crc32c_hw(void);
#endif
