# C declarations of the kernels (cython_ext/plk.h); no code here.
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "plk.h" nogil:
    ctypedef struct plk_w:
        const uint8_t *qs
        const uint16_t *d
        const uint16_t *m
        const uint8_t *tl
        int tl_tiles
    int plk_detect_isa()
    size_t plk_tl_nbytes(int fmt, int N, int K)
    int plk_tl_pack(int fmt, const plk_w *w, int N, int K, uint8_t *out)
    void plk_quantize_act_k(int isa, const float *x, int T, int K, int ldx, int8_t *qs, float *d, int16_t *bs)
    void plk_quantize_act(int isa, const float *x, int T, int K, int ldx, int Kp,
                          int8_t *qs, float *dx, float *s, int32_t *isum)
    int plk_matmul_f32(int isa, int fmt, int tl, const plk_w *w, int N, int K, const float *x, int T,
                       float *y, int nthreads)
    int plk_ffn_bundles(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int C, int K,
                        const int64_t *offs, const float *h, int T, int act, float *out, int nthreads)
    int plk_ffn_nchunks(int n, int nthreads)
    int plk_oom_take()
    void plk_test_fail_allocs(int n)
    int plk_ffn_bundles_part(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int n, int nch,
                             const int *lo, const int *hi, int C, int K, const int64_t *offs, const float *h, int T,
                             int act, float *out, float *priv, int nthreads)
    int plk_moe_ffn(int isa, int fmt, int down_fmt, int tl, const uint64_t *ptrs, int ngroups, int cpe, int C, int K,
                    const int64_t *offs, const float *h, int T, const int *gs, const int *tok, const float *wt, int act,
                    float *out, int nthreads)
    double plk_read_probe(int isa, const uint8_t *buf, size_t n, int nthreads)
    void plk_rmsnorm(const float *x, const float *w, float eps, float *out, int T, int K)
    void plk_rope(float *x, int T, int nh, int hd, const int64_t *pos, double theta)
    void plk_silu_mul(const float *g, const float *u, float *out, size_t n)
    void plk_relu_mul(const float *g, const float *u, float *out, size_t n)
    void plk_gelu_tanh_mul(const float *g, const float *u, float *out, size_t n)
    void plk_attention_f16_ex(const float *q, size_t ldq, const uint16_t *kc, const uint16_t *vc, int T, int nh, int nkv,
                              int hd, int maxP, int start, int window, float scale, float *out, int nthreads)
    void plk_attention(const float *q, const float *kc, const float *vc, int T, int nh, int nkv, int hd,
                       int maxP, int start, float *out, int nthreads)
    void plk_rope_tables(const int64_t *pos, int T, int hd, double theta, double scale, float *c, float *s)
    ctypedef struct plk_attn_w:
        int fmt_qkv
        int fmt_o
        int tl_qkv
        int tl_o
        plk_w wqkv
        plk_w wo
        int nparts
        int fmt_p[3]
        int tl_p[3]
        int rows_p[3]
        plk_w wp[3]
        const float *bqkv
        const float *attn_norm
        const float *ffn_norm
        const float *q_norm
        const float *k_norm
        const float *post_norm
        int window
        float attn_scale
    int plk_attn_block(int isa, const plk_attn_w *lw, float eps, float *x, float *h, int T, int K,
                       uint16_t *kc, uint16_t *vc, int maxP, int start, int nh, int nkv, int hd,
                       const float *rcos, const float *rsin, float *scratch, int nthreads)
    void plk_crc32c_init()
    uint32_t plk_crc32c(const void *p, size_t n, uint32_t crc)
    uint32_t plk_crc32c_sw(const void *p, size_t n, uint32_t crc)
    void plk_crc32c_many(const uint64_t *ptrs, int k, size_t n, uint32_t *out)
    int plk_crc32c_hw()
