# cython: language_level=3, boundscheck=False, wraparound=False
"""Thin wrappers over the C kernels: check dtype, shape and contiguity with the GIL held, raise
ValueError naming the problem, then run the C code with the GIL released.  powerlow/kernels.py is
the public face (format names, QMatrix, thread count, ISA choice)."""
cimport numpy as cnp
import numpy as np
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from plk cimport *

cnp.import_array()

_DTN = {cnp.NPY_FLOAT32: 'float32', cnp.NPY_FLOAT16: 'float16', cnp.NPY_UINT8: 'uint8', cnp.NPY_INT8: 'int8',
        cnp.NPY_INT64: 'int64', cnp.NPY_UINT64: 'uint64', cnp.NPY_INT32: 'int32'}

# per format id (order of plk.h): group, code bytes per group, has a min plane
# 6..10: q5_0, q5_1, q4_k, q5_k, q6_k, raw GGML blocks (qs only: d and m are None)
cdef int NFMT = 11
cdef int GROUP[11]
cdef int QBYTES[11]
GROUP[:] = [32, 32, 32, 64, 64, 64, 32, 32, 256, 256, 256]
QBYTES[:] = [32, 16, 16, 16, 16, 8, 22, 24, 144, 176, 210]


cdef inline int _arr(object a, int typenum, int ndim, str name) except -1:
    if not cnp.PyArray_Check(a):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum:
        raise ValueError(f"{name} must have dtype {_DTN[typenum]}, got {a.dtype}")
    if ndim >= 0 and cnp.PyArray_NDIM(arr) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous")
    return 0


cdef inline void* _ptr(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


def detect_isa():
    return plk_detect_isa()


def quantize_act(int isa, x, int Kp):
    """x (T, K) float32 -> (qs int8 (T, Kp), d, s float32 (T, Kp/32), isum int32 (T, Kp/32))."""
    _arr(x, cnp.NPY_FLOAT32, 2, "x")
    cdef int T = x.shape[0], K = x.shape[1]
    if Kp % 32 or Kp < K:
        raise ValueError(f"Kp={Kp} must be a multiple of 32 and >= K={K}")
    cdef cnp.ndarray qs = cnp.PyArray_ZEROS(2, [T, Kp], cnp.NPY_INT8, 0)
    cdef cnp.ndarray d = cnp.PyArray_ZEROS(2, [T, Kp // 32], cnp.NPY_FLOAT32, 0)
    cdef cnp.ndarray s = cnp.PyArray_ZEROS(2, [T, Kp // 32], cnp.NPY_FLOAT32, 0)
    cdef cnp.ndarray isum = cnp.PyArray_ZEROS(2, [T, Kp // 32], cnp.NPY_INT32, 0)
    cdef const float *px = <const float*>_ptr(x)
    with nogil:
        plk_quantize_act(isa, px, T, K, K, Kp, <int8_t*>cnp.PyArray_DATA(qs), <float*>cnp.PyArray_DATA(d),
                         <float*>cnp.PyArray_DATA(s), <int32_t*>cnp.PyArray_DATA(isum))
    return qs, d, s, isum


def quantize_act_k(int isa, x):
    """x (T, K) float32, K a multiple of 256 -> Q8_K (qs int8 (T, K), d float32 (T, K/256), bsums int16 (T, K/16))."""
    _arr(x, cnp.NPY_FLOAT32, 2, "x")
    cdef int T = x.shape[0], K = x.shape[1]
    if K % 256 or K < 256:
        raise ValueError(f"Q8_K activations need K a positive multiple of 256, got K={K}")
    cdef cnp.ndarray qs = cnp.PyArray_ZEROS(2, [T, K], cnp.NPY_INT8, 0)
    cdef cnp.ndarray d = cnp.PyArray_ZEROS(2, [T, K // 256], cnp.NPY_FLOAT32, 0)
    cdef cnp.ndarray bs = cnp.PyArray_ZEROS(2, [T, K // 16], cnp.NPY_INT16, 0)
    cdef const float *px = <const float*>_ptr(x)
    with nogil:
        plk_quantize_act_k(isa, px, T, K, K, <int8_t*>cnp.PyArray_DATA(qs), <float*>cnp.PyArray_DATA(d),
                           <int16_t*>cnp.PyArray_DATA(bs))
    return qs, d, bs


cdef int _planes(int fmt, object qs, object d, object m, int N, int K, plk_w *w) except -1:
    if fmt < 0 or fmt >= NFMT:
        raise ValueError(f"bad format id {fmt}")
    if GROUP[fmt] == 256 and K % 256:
        raise ValueError(f"a K-quant matrix needs K a multiple of 256, got K={K}")
    cdef long ng = (K + GROUP[fmt] - 1) // GROUP[fmt]
    if not cnp.PyArray_Check(qs) or (cnp.PyArray_TYPE(<cnp.ndarray>qs) != cnp.NPY_UINT8 and cnp.PyArray_TYPE(<cnp.ndarray>qs) != cnp.NPY_INT8):
        raise ValueError("qs must be a uint8/int8 numpy array")
    _arr(qs, cnp.PyArray_TYPE(<cnp.ndarray>qs), -1, "qs")
    if cnp.PyArray_SIZE(<cnp.ndarray>qs) != N * ng * QBYTES[fmt]:
        raise ValueError(f"qs has {qs.size} bytes, a ({N}, {K}) matrix needs {N * ng * QBYTES[fmt]}")
    w.qs = <const uint8_t*>_ptr(qs)
    w.d = NULL
    w.m = NULL
    w.tl = NULL
    w.tl_tiles = 0
    if fmt >= 6:            # raw GGML blocks: scales inside qs
        return 0
    _arr(d, cnp.NPY_FLOAT16, -1, "d")
    if cnp.PyArray_SIZE(<cnp.ndarray>d) != N * ng:
        raise ValueError(f"d has {d.size} scales, expected {N * ng}")
    w.qs = <const uint8_t*>_ptr(qs)
    w.d = <const uint16_t*>_ptr(d)
    w.m = NULL
    if fmt == 2 or fmt == 3:
        if m is None:
            raise ValueError("this format needs the m plane")
        _arr(m, cnp.NPY_FLOAT16, -1, "m")
        if cnp.PyArray_SIZE(<cnp.ndarray>m) != N * ng:
            raise ValueError(f"m has {m.size} values, expected {N * ng}")
        w.m = <const uint16_t*>_ptr(m)
    w.tl = NULL
    return 0


cdef int _tl_layout(int fmt, object tl, int N, int K, plk_w *w) except -1:
    """w.tl <- the table-lookup layout tl (uint8, plk_tl_nbytes bytes), or NULL for None."""
    if tl is None:
        return 0
    _arr(tl, cnp.NPY_UINT8, 1, "tl layout")
    cdef size_t need = plk_tl_nbytes(fmt, N, K)
    if <size_t>cnp.PyArray_SIZE(<cnp.ndarray>tl) != need or need == 0:
        raise ValueError(f"tl layout has {tl.size} bytes, a ({N}, {K}) matrix of format {fmt} needs {need}")
    w.tl = <const uint8_t*>_ptr(tl)
    w.tl_tiles = N // 32
    return 0


def tl_pack(int fmt, qs, d, m, int N, int K):
    """The AVX2 table-lookup layout of a q2/tern/q1 matrix (uint8 array; plk.h describes it)."""
    cdef plk_w w
    if fmt < 3 or fmt > 5:
        raise ValueError(f"format id {fmt} has no table-lookup layout")
    _planes(fmt, qs, d, m, N, K, &w)
    cdef size_t n = plk_tl_nbytes(fmt, N, K)
    cdef cnp.ndarray out = cnp.PyArray_ZEROS(1, [<cnp.npy_intp>n], cnp.NPY_UINT8, 0)
    cdef uint8_t *po = <uint8_t*>cnp.PyArray_DATA(out)
    with nogil:
        plk_tl_pack(fmt, &w, N, K, po)
    return out


def matmul(int isa, int fmt, int tl, qs, d, m, tl_layout, int N, int K, x, out, int nthreads):
    """out (T, N) = x (T, K) @ W^T for the packed matrix W (planes qs, d, m; tl_layout None or tl_pack's)."""
    cdef plk_w w
    _planes(fmt, qs, d, m, N, K, &w)
    _tl_layout(fmt, tl_layout, N, K, &w)
    _arr(x, cnp.NPY_FLOAT32, 2, "x")
    _arr(out, cnp.NPY_FLOAT32, 2, "out")
    cdef int T = x.shape[0]
    if x.shape[1] != K:
        raise ValueError(f"x must be (T, {K}), got {x.shape}")
    if out.shape[0] != T or out.shape[1] != N:
        raise ValueError(f"out must be ({T}, {N}), got {out.shape}")
    if T < 1:
        raise ValueError("x has no rows")
    cdef const float *px = <const float*>_ptr(x)
    cdef float *po = <float*>_ptr(out)
    cdef int rc
    with nogil:
        rc = plk_matmul_f32(isa, fmt, tl, &w, N, K, px, T, po, nthreads)
    if rc:
        raise MemoryError("kernel scratch allocation failed")


cdef int _pick_one(int isa, int fa, int fb, const plk_w *wa, const plk_w *wb, int r, int K, int n_out, int group,
                   const float *a, const float *b, float thr, const float *h, int T, float *z, float *y,
                   int32_t *out, int *count, int nthreads) noexcept nogil:
    cdef int rc, t, i, c, j, n = 0, nc = n_out // group
    cdef float v, best
    cdef bint nan
    rc = plk_matmul_f32(isa, fa, 0, wa, r, K, h, T, z, nthreads)
    if rc:
        return rc
    for t in range(T):
        for i in range(r):
            v = z[t * r + i] + a[i]
            z[t * r + i] = 0.0 if v < 0.0 else v                  # np.maximum(z, 0): NaN stays NaN
    rc = plk_matmul_f32(isa, fb, 0, wb, n_out, r, z, T, y, nthreads)
    if rc:
        return rc
    for t in range(T):
        for i in range(n_out):
            y[t * n_out + i] = y[t * n_out + i] + b[i]
    for c in range(nc):
        best = y[c * group]
        nan = best != best
        for t in range(T):
            for j in range(group):
                v = y[t * n_out + c * group + j]
                if v != v:
                    nan = True
                elif v > best:
                    best = v
        if not nan and best > thr:
            out[n] = c
            n += 1
    count[0] = n
    return 0


def lowrank_pick(int isa, int fa, int fb, int group, h, z, y, hs, jobs, int nthreads):
    """Low-rank predictors' decisions in one call (powerlow.predictors.LowRankPredictor, by cluster or by recall).
    Each job (qa, da, a, qb, db, b, thr, scale, ids): y = B relu(A x + a) + b (A (r, K), B (n_out, r) packed in
    formats fa, fb; a (1, r), b (1, n_out)) with x = h, or x = h * scale (1, K) written into hs when scale is given;
    a cluster's score the max of y over the T tokens and its `group` outputs; ids <- the clusters whose score >
    thr, increasing. Returns the counts. The numpy path's float steps (matmul, *, +=, maximum, max, >), so the same
    clusters (tests/test_predictors.py)."""
    cdef plk_w wa, wb
    cdef int T = h.shape[0], K = h.shape[1], r, n_out, k, rc = 0, cnt = 0
    cdef Py_ssize_t i
    cdef const float *px
    cdef const float *psc
    cdef const float *pa
    cdef const float *pb
    cdef float *phs
    cdef float *pz
    cdef float *py
    cdef int32_t *pids
    cdef float fthr
    _arr(h, cnp.NPY_FLOAT32, 2, "h")
    _arr(z, cnp.NPY_FLOAT32, 2, "z")
    _arr(y, cnp.NPY_FLOAT32, 2, "y")
    _arr(hs, cnp.NPY_FLOAT32, 2, "hs")
    if T < 1 or z.shape[0] < T or y.shape[0] < T or group < 1 or hs.shape[0] < T or hs.shape[1] != K:
        raise ValueError("lowrank_pick: h, z, y, hs shapes do not match")
    counts = []
    for qa, da, a, qb, db, b, thr, scale, ids in jobs:
        r, n_out = a.shape[1], b.shape[1]
        _planes(fa, qa, da, None, r, K, &wa)
        _planes(fb, qb, db, None, n_out, r, &wb)
        _arr(a, cnp.NPY_FLOAT32, 2, "a")
        _arr(b, cnp.NPY_FLOAT32, 2, "b")
        _arr(ids, cnp.NPY_INT32, 1, "ids")
        if z.shape[1] < r or y.shape[1] < n_out or n_out % group or ids.shape[0] < n_out // group:
            raise ValueError("lowrank_pick: a job's shapes do not match")
        px = <const float*>_ptr(h)
        if scale is not None:
            _arr(scale, cnp.NPY_FLOAT32, 2, "scale")
            if scale.shape[1] != K:
                raise ValueError("lowrank_pick: scale must be (1, K)")
            psc = <const float*>_ptr(scale)
            phs = <float*>_ptr(hs)
            for i in range(T * K):
                phs[i] = px[i] * psc[i % K]
            px = phs
        pa, pb, fthr = <const float*>_ptr(a), <const float*>_ptr(b), <float>thr
        pz, py, pids = <float*>_ptr(z), <float*>_ptr(y), <int32_t*>_ptr(ids)
        with nogil:
            rc = _pick_one(isa, fa, fb, &wa, &wb, r, K, n_out, group, pa, pb, fthr, px, T, pz, py, pids, &cnt, nthreads)
        if rc:
            raise MemoryError("kernel scratch allocation failed")
        counts.append(cnt)
    return counts


cdef int _check_ffn_fmts(int fmt, int down_fmt, int C, int K) except -1:
    if fmt < 0 or fmt >= NFMT or down_fmt < 0 or down_fmt >= NFMT:
        raise ValueError(f"bad format ids {fmt}, {down_fmt}")
    if GROUP[fmt] == 256 and K % 256:
        raise ValueError(f"K-quant gate/up need K a multiple of 256, got K={K}")
    if GROUP[down_fmt] == 256 and C % 256:
        raise ValueError(f"a K-quant down matrix needs the cluster size C a multiple of 256, got C={C}")
    return 0


cdef int _check_ffn(ptrs, offs, h, out, int K, int act) except -1:
    """The checks both ffn_bundles entry points share; returns T."""
    _arr(ptrs, cnp.NPY_UINT64, 1, "ptrs")
    _arr(offs, cnp.NPY_INT64, 1, "offs")
    _arr(h, cnp.NPY_FLOAT32, 2, "h")
    _arr(out, cnp.NPY_FLOAT32, 2, "out")
    if offs.shape[0] != 9:
        raise ValueError("offs must hold 9 plane offsets")
    cdef int T = h.shape[0]
    if h.shape[1] != K or out.shape[0] != T or out.shape[1] != K:
        raise ValueError(f"h and out must both be (T, {K}), got {h.shape} and {out.shape}")
    if T < 1:
        raise ValueError("h has no rows")
    if act < 0 or act > 2:
        raise ValueError("act must be silu (0), relu (1) or gelu_tanh (2)")
    return T


def ffn_bundles(int isa, int fmt, int down_fmt, int tl, ptrs, int C, int K, offs, h, int act, out, int nthreads):
    """out (T, K) += sum over bundles at ptrs of down @ (act(gate h) * (up h))."""
    _check_ffn_fmts(fmt, down_fmt, C, K)
    cdef int T = _check_ffn(ptrs, offs, h, out, K, act), n = ptrs.shape[0]
    cdef const uint64_t *pp = <const uint64_t*>_ptr(ptrs)
    cdef const int64_t *po = <const int64_t*>_ptr(offs)
    cdef const float *ph = <const float*>_ptr(h)
    cdef float *pout = <float*>_ptr(out)
    cdef int rc = 0
    if n == 0:
        return
    with nogil:
        rc = plk_ffn_bundles(isa, fmt, down_fmt, tl, pp, n, C, K, po, ph, T, act, pout, nthreads)
    if rc:
        raise MemoryError("kernel scratch allocation failed")


def _test_fail_allocs(int n):
    """Tests only: the next n kernel scratch allocations fail (the call must raise MemoryError)."""
    plk_test_fail_allocs(n)


def ffn_nchunks(int n, int nthreads):
    """How many chunks ffn_bundles splits n bundles into at this thread count (its float sums depend on it)."""
    return plk_ffn_nchunks(n, nthreads)


def ffn_bundles_part(int isa, int fmt, int down_fmt, int tl, ptrs, int C, int K, offs, h, int act, out, priv,
                     lo, hi, int nthreads):
    """Bundles lo[c]..hi[c]-1 of each chunk c (of len(lo) chunks) added into out (chunk 0) or priv[c-1]; no
    reduction (the caller adds priv[0], priv[1], ... into out after the last piece). Only those ptrs are read."""
    _check_ffn_fmts(fmt, down_fmt, C, K)
    cdef int T = _check_ffn(ptrs, offs, h, out, K, act), n = ptrs.shape[0]
    _arr(priv, cnp.NPY_FLOAT32, 3, "priv")
    _arr(lo, cnp.NPY_INT32, 1, "lo")
    _arr(hi, cnp.NPY_INT32, 1, "hi")
    cdef int nch = lo.shape[0]
    if nch < 1 or hi.shape[0] != nch:
        raise ValueError(f"lo and hi must have one entry per chunk, got {lo.shape[0]} and {hi.shape[0]}")
    if priv.shape[0] != nch - 1 or priv.shape[1] != T or priv.shape[2] != K:
        raise ValueError(f"priv must be ({nch - 1}, {T}, {K}), got {priv.shape}")
    if (lo < 0).any() or (lo > hi).any() or (hi > n).any():
        raise ValueError(f"chunk ranges must satisfy 0 <= lo <= hi <= {n}")
    cdef const uint64_t *pp = <const uint64_t*>_ptr(ptrs)
    cdef const int64_t *po = <const int64_t*>_ptr(offs)
    cdef const float *ph = <const float*>_ptr(h)
    cdef float *pout = <float*>_ptr(out)
    cdef float *ppriv = <float*>_ptr(priv) if nch > 1 else NULL
    cdef const int *plo = <const int*>_ptr(lo)
    cdef const int *phi = <const int*>_ptr(hi)
    cdef int rc = 0
    with nogil:
        rc = plk_ffn_bundles_part(isa, fmt, down_fmt, tl, pp, n, nch, plo, phi, C, K, po, ph, T, act, pout, ppriv,
                                  nthreads)
    if rc:
        raise MemoryError("kernel scratch allocation failed")


def moe_ffn(int isa, int fmt, int down_fmt, int tl, ptrs, int cpe, int C, int K, offs, h, gs, tok, wt, int act, out,
            int nthreads):
    """out (T, K) += for each group g (its expert: bundles ptrs[g*cpe:(g+1)*cpe]) and each of its tokens
    j in gs[g]..gs[g+1]-1: wt[j] * expert_g(h[tok[j]]). Groups in order; see plk_moe_ffn."""
    _check_ffn_fmts(fmt, down_fmt, C, K)
    cdef int T = _check_ffn(ptrs, offs, h, out, K, act), n = ptrs.shape[0]
    _arr(gs, cnp.NPY_INT32, 1, "gs")
    _arr(tok, cnp.NPY_INT32, 1, "tok")
    _arr(wt, cnp.NPY_FLOAT32, 1, "wt")
    cdef int ng = gs.shape[0] - 1
    if cpe < 1 or ng < 0 or n != ng * cpe:
        raise ValueError(f"ptrs must hold cpe ({cpe}) bundles for each of the {ng} groups, got {n}")
    if ng == 0:
        return
    if gs[0] != 0 or (np.diff(gs) < 0).any() or gs[ng] != tok.shape[0] or wt.shape[0] != tok.shape[0]:
        raise ValueError("gs must rise from 0 to len(tok) == len(wt)")
    if tok.shape[0] and (tok.min() < 0 or tok.max() >= T):
        raise ValueError(f"token indices must be in 0..{T - 1}")
    cdef const uint64_t *pp = <const uint64_t*>_ptr(ptrs)
    cdef const int64_t *po = <const int64_t*>_ptr(offs)
    cdef const float *ph = <const float*>_ptr(h)
    cdef const int *pgs = <const int*>_ptr(gs)
    cdef const int *ptok = <const int*>_ptr(tok)
    cdef const float *pwt = <const float*>_ptr(wt)
    cdef float *pout = <float*>_ptr(out)
    cdef int rc = 0
    with nogil:
        rc = plk_moe_ffn(isa, fmt, down_fmt, tl, pp, ng, cpe, C, K, po, ph, T, pgs, ptok, pwt, act, pout, nthreads)
    if rc:
        raise MemoryError("kernel scratch allocation failed")


def read_probe(int isa, buf, int nthreads):
    _arr(buf, cnp.NPY_UINT8, -1, "buf")
    cdef const uint8_t *p = <const uint8_t*>_ptr(buf)
    cdef size_t n = cnp.PyArray_SIZE(<cnp.ndarray>buf)
    cdef double r
    with nogil:
        r = plk_read_probe(isa, p, n, nthreads)
    return r


def rmsnorm(x, w, float eps, out):
    _arr(x, cnp.NPY_FLOAT32, 2, "x")
    _arr(w, cnp.NPY_FLOAT32, 1, "w")
    _arr(out, cnp.NPY_FLOAT32, 2, "out")
    cdef int T = x.shape[0], K = x.shape[1]
    if w.shape[0] != K or out.shape[0] != T or out.shape[1] != K:
        raise ValueError(f"rmsnorm: x {x.shape}, w {w.shape}, out {out.shape} do not match")
    cdef const float *px = <const float*>_ptr(x)
    cdef const float *pw = <const float*>_ptr(w)
    cdef float *po = <float*>_ptr(out)
    with nogil:
        plk_rmsnorm(px, pw, eps, po, T, K)


def rope(x, pos, double theta):
    _arr(x, cnp.NPY_FLOAT32, 3, "x")
    _arr(pos, cnp.NPY_INT64, 1, "positions")
    cdef int T = x.shape[0], nh = x.shape[1], hd = x.shape[2]
    if pos.shape[0] != T:
        raise ValueError(f"positions must have {T} entries, got {pos.shape[0]}")
    if hd % 2 or hd > 1024:
        raise ValueError(f"head_dim {hd} must be even and <= 1024")
    cdef float *px = <float*>_ptr(x)
    cdef const int64_t *pp = <const int64_t*>_ptr(pos)
    with nogil:
        plk_rope(px, T, nh, hd, pp, theta)


def gated(g, u, out, int act):
    _arr(g, cnp.NPY_FLOAT32, -1, "g")
    _arr(u, cnp.NPY_FLOAT32, -1, "u")
    _arr(out, cnp.NPY_FLOAT32, -1, "out")
    cdef size_t n = cnp.PyArray_SIZE(<cnp.ndarray>g)
    if cnp.PyArray_SIZE(<cnp.ndarray>u) != n or cnp.PyArray_SIZE(<cnp.ndarray>out) != n:
        raise ValueError(f"g, u, out sizes differ: {g.shape}, {u.shape}, {out.shape}")
    cdef const float *pg = <const float*>_ptr(g)
    cdef const float *pu = <const float*>_ptr(u)
    cdef float *po = <float*>_ptr(out)
    with nogil:
        if act == 0:
            plk_silu_mul(pg, pu, po, n)
        elif act == 2:
            plk_gelu_tanh_mul(pg, pu, po, n)
        else:
            plk_relu_mul(pg, pu, po, n)


def attention(q, kc, vc, int start, out, int nthreads, int window=0, double scale=0.0):
    """window > 0: keys in (pos - window, pos] only; scale 0 = 1/sqrt(head_dim). Both need the fp16 cache."""
    _arr(q, cnp.NPY_FLOAT32, 3, "q")
    cdef int kv_t = cnp.PyArray_TYPE(<cnp.ndarray>kc) if cnp.PyArray_Check(kc) else cnp.NPY_FLOAT32
    if kv_t != cnp.NPY_FLOAT16:
        kv_t = cnp.NPY_FLOAT32
    _arr(kc, kv_t, 3, "k_cache")
    _arr(vc, kv_t, 3, "v_cache")
    _arr(out, cnp.NPY_FLOAT32, 2, "out")
    cdef int T = q.shape[0], nh = q.shape[1], hd = q.shape[2]
    cdef int nkv = kc.shape[0], maxP = kc.shape[1]
    if kc.shape != vc.shape or kc.shape[2] != hd:
        raise ValueError(f"k_cache {kc.shape} and v_cache {vc.shape} must be (n_kv, max_pos, {hd})")
    if nkv < 1 or nh % nkv:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} kv heads")
    if start < 0 or start + T > maxP:
        raise ValueError(f"positions {start}..{start + T - 1} exceed the cache length {maxP}")
    if out.shape[0] != T or out.shape[1] != nh * hd:
        raise ValueError(f"out must be ({T}, {nh * hd}), got {out.shape}")
    cdef const float *pq = <const float*>_ptr(q)
    cdef const float *pk = <const float*>_ptr(kc)
    cdef const float *pv = <const float*>_ptr(vc)
    cdef float *po = <float*>_ptr(out)
    cdef const uint16_t *hk = <const uint16_t*>pk
    cdef const uint16_t *hv = <const uint16_t*>pv
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    cdef float sc = <float>scale if scale > 0 else 0.0
    if kv_t != cnp.NPY_FLOAT16 and (window or scale > 0):
        raise ValueError("a sliding window or a custom scale needs the float16 cache")
    if kv_t == cnp.NPY_FLOAT16:
        with nogil:
            plk_attention_f16_ex(pq, <size_t>(nh * hd), hk, hv, T, nh, nkv, hd, maxP, start, window, sc, po, nthreads)
    else:
        with nogil:
            plk_attention(pq, pk, pv, T, nh, nkv, hd, maxP, start, po, nthreads)
    if plk_oom_take():
        raise MemoryError("kernel scratch allocation failed")


def rope_tables(pos, int hd, double theta, double scale, c, s):
    """c, s (T, hd/2) float32 <- RoPE tables of positions pos (int64 (T,)), linear scaling `scale`."""
    _arr(pos, cnp.NPY_INT64, 1, "positions")
    _arr(c, cnp.NPY_FLOAT32, 2, "cos")
    _arr(s, cnp.NPY_FLOAT32, 2, "sin")
    cdef int T = pos.shape[0]
    if hd % 2 or c.shape[0] != T or c.shape[1] != hd // 2 or s.shape[0] != T or s.shape[1] != hd // 2:
        raise ValueError(f"cos/sin must be ({T}, {hd // 2}), got {c.shape} and {s.shape}")
    if scale <= 0:
        raise ValueError(f"rope scale must be > 0, got {scale}")
    cdef const int64_t *pp = <const int64_t*>_ptr(pos)
    cdef float *pc = <float*>_ptr(c)
    cdef float *ps = <float*>_ptr(s)
    with nogil:
        plk_rope_tables(pp, T, hd, theta, scale, pc, ps)


cdef const float *_opt_f32(v, Py_ssize_t n, str name) except? NULL:
    """NULL for None, else the data of v: a float32 vector of n values (checked)."""
    if v is None:
        return NULL
    _arr(v, cnp.NPY_FLOAT32, 1, name)
    if v.shape[0] != n:
        raise ValueError(f"{name} must have {n} values, got {v.shape[0]}")
    return <const float*>_ptr(v)


cdef int _attn_w(int fq, int tlq, qs, d, m, qtl, bqkv, int fo, int tlo, oqs, od, om, otl, attn_norm, ffn_norm,
                 parts, int K, int nq, int qd, plk_attn_w *w, q_norm=None, k_norm=None, int hd=0, post_norm=None,
                 int window=0, double attn_scale=0.0) except -1:
    """Fill one layer's plk_attn_w from its planes (checked): attn_block's and LayerLoop's weights; q_norm, k_norm
    None or (hd,) float32 (each head's RMSNorm before RoPE); post_norm None or (K,) (the attention output's RMSNorm
    before the residual add); window >= 0 (0: every key); attn_scale > 0 or 0 (1/sqrt(hd))."""
    cdef int ip, r_total = 0
    w.nparts = 0
    if parts is None:
        _planes(fq, qs, d, m, nq, K, &w.wqkv)
        _tl_layout(fq, qtl, nq, K, &w.wqkv)
    else:
        if not 1 <= len(parts) <= 3:
            raise ValueError(f"the qkv projection takes 1 to 3 parts, got {len(parts)}")
        for ip in range(len(parts)):
            pf, ptl, pqs, pd, pm, playout, prow = parts[ip]
            if prow < 1:
                raise ValueError(f"qkv part {ip} has {prow} rows")
            _planes(pf, pqs, pd, pm, prow, K, &w.wp[ip])
            _tl_layout(pf, playout, prow, K, &w.wp[ip])
            w.fmt_p[ip] = pf
            w.tl_p[ip] = ptl
            w.rows_p[ip] = prow
            r_total += prow
        if r_total != nq:
            raise ValueError(f"the qkv parts have {r_total} rows in all, the heads need {nq}")
        w.nparts = len(parts)
        w.wqkv = w.wp[0]
        fq = w.fmt_p[0]
        tlq = w.tl_p[0]
    _planes(fo, oqs, od, om, K, qd, &w.wo)
    _tl_layout(fo, otl, K, qd, &w.wo)
    w.fmt_qkv = fq
    w.fmt_o = fo
    w.tl_qkv = tlq
    w.tl_o = tlo
    w.bqkv = _opt_f32(bqkv, nq, "bqkv")
    _arr(attn_norm, cnp.NPY_FLOAT32, 1, "attn_norm")
    _arr(ffn_norm, cnp.NPY_FLOAT32, 1, "ffn_norm")
    if attn_norm.shape[0] != K or ffn_norm.shape[0] != K:
        raise ValueError(f"norm weights must have {K} values")
    w.attn_norm = <const float*>_ptr(attn_norm)
    w.ffn_norm = <const float*>_ptr(ffn_norm)
    if (q_norm is None) != (k_norm is None):
        raise ValueError("q_norm and k_norm go together: give both or neither")
    w.q_norm = _opt_f32(q_norm, hd, "q_norm (head_dim)")
    w.k_norm = _opt_f32(k_norm, hd, "k_norm (head_dim)")
    w.post_norm = _opt_f32(post_norm, K, "post_norm")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if not attn_scale >= 0:
        raise ValueError(f"attn_scale must be >= 0 (0: 1/sqrt(head_dim)), got {attn_scale}")
    w.window = window
    w.attn_scale = <float>attn_scale
    return 0


cdef int _check_kv(kc, vc, int nh, int nkv) except -1:
    _arr(kc, cnp.NPY_FLOAT16, 3, "k_cache")
    _arr(vc, cnp.NPY_FLOAT16, 3, "v_cache")
    cdef int hd = kc.shape[2]
    if kc.shape != vc.shape or kc.shape[0] != nkv:
        raise ValueError(f"k_cache {kc.shape} and v_cache {vc.shape} must be ({nkv}, max_pos, head_dim)")
    if nkv < 1 or nh % nkv or hd % 2:
        raise ValueError(f"{nh} heads, {nkv} kv heads, head_dim {hd}: heads must be a multiple of kv heads, hd even")
    return 0


cdef int _check_rope(rcos, rsin, int T, int hd) except -1:
    _arr(rcos, cnp.NPY_FLOAT32, 2, "rope cos")
    _arr(rsin, cnp.NPY_FLOAT32, 2, "rope sin")
    if rcos.shape[0] < T or rcos.shape[1] != hd // 2 or rsin.shape[0] < T or rsin.shape[1] != hd // 2:
        raise ValueError(f"rope tables must be ({T}, {hd // 2}), got {rcos.shape} and {rsin.shape}")
    return 0


cdef int _check_rope_scratch(rcos, rsin, scratch, int T, int hd, Py_ssize_t need) except -1:
    _check_rope(rcos, rsin, T, hd)
    _arr(scratch, cnp.NPY_FLOAT32, 1, "scratch")
    if scratch.shape[0] < need:
        raise ValueError(f"scratch must hold {need} floats, has {scratch.shape[0]}")
    return 0


def attn_block(int isa, int fq, int tlq, qs, d, m, qtl, bqkv, int fo, int tlo, oqs, od, om, otl, attn_norm, ffn_norm,
               float eps, x, h, kc, vc, int start, int nh, int nkv, rcos, rsin, scratch, int nthreads, parts=None,
               q_norm=None, k_norm=None, post_norm=None, int window=0, double attn_scale=0.0):
    """One layer's attention block (plk_attn_block): x += wo attention(rope(wqkv rmsnorm(x))), K/V rows
    stored into the fp16 caches at start.., h = rmsnorm(x, ffn_norm); q_norm / k_norm (hd,): each head's
    RMSNorm of q and k before RoPE (qwen3), or None; post_norm (K,): the attention output's RMSNorm before the
    add (gemma3); window: sliding window (0: all keys); attn_scale: score scale (0: 1/sqrt(hd)).
    parts: None (the fused wqkv qs, d, m, qtl) or a list of up to 3 (fmt, tl, qs, d, m, tl_layout, rows), rows
    stacked in order (q, k, v); then fq .. qtl are ignored."""
    cdef plk_attn_w w
    _arr(x, cnp.NPY_FLOAT32, 2, "x")
    _arr(h, cnp.NPY_FLOAT32, 2, "h")
    cdef int T = x.shape[0], K = x.shape[1]
    if T < 1 or h.shape[0] != T or h.shape[1] != K:
        raise ValueError(f"h must be x's shape {x.shape}, got {h.shape}")
    _check_kv(kc, vc, nh, nkv)
    cdef int maxP = kc.shape[1], hd = kc.shape[2]
    if start < 0 or start + T > maxP:
        raise ValueError(f"positions {start}..{start + T - 1} exceed the cache length {maxP}")
    cdef int nq = (nh + 2 * nkv) * hd, qd = nh * hd
    _attn_w(fq, tlq, qs, d, m, qtl, bqkv, fo, tlo, oqs, od, om, otl, attn_norm, ffn_norm, parts, K, nq, qd, &w,
            q_norm, k_norm, hd, post_norm, window, attn_scale)
    _check_rope_scratch(rcos, rsin, scratch, T, hd, T * (nq + qd + K))
    cdef float *px = <float*>_ptr(x)
    cdef float *ph = <float*>_ptr(h)
    cdef uint16_t *pk = <uint16_t*>_ptr(kc)
    cdef uint16_t *pv = <uint16_t*>_ptr(vc)
    cdef const float *pc = <const float*>_ptr(rcos)
    cdef const float *ps = <const float*>_ptr(rsin)
    cdef float *psc = <float*>_ptr(scratch)
    cdef int rc
    with nogil:
        rc = plk_attn_block(isa, &w, eps, px, ph, T, K, pk, pv, maxP, start, nh, nkv, hd, pc, ps, psc, nthreads)
    if rc:
        raise MemoryError("kernel scratch allocation failed")


# -- CRC32C (cython_ext/plk_crc.c): the checksums of ffn.bin's bundles and the resident tensors ----------------
plk_crc32c_init()


def all_finite(x) -> bool:
    """No NaN or infinity in the float32 array x (C-contiguous): the engine's check after every layer."""
    _arr(x, cnp.NPY_FLOAT32, -1, "x")
    cdef const uint32_t *p = <const uint32_t*>_ptr(x)
    cdef Py_ssize_t i, n = x.size
    cdef uint32_t bad = 0
    with nogil:
        for i in range(n):
            bad |= ((p[i] & 0x7f800000u) == 0x7f800000u)     # exponent all ones: inf or NaN
    return bad == 0


def crc32c(const uint8_t[::1] data, uint32_t crc=0, bint portable=False):
    """CRC32C of a contiguous buffer (bytes, memoryview, uint8 array); ``crc``: the value of the bytes before,
    to continue a checksum; ``portable``: the table path even where SSE4.2 is (tests). GIL released."""
    cdef size_t n = data.shape[0]
    cdef const void *p = &data[0] if n else NULL
    cdef uint32_t out
    with nogil:
        out = plk_crc32c_sw(p, n, crc) if portable else plk_crc32c(p, n, crc)
    return out


def crc32c_many(ptrs, size_t nbytes):
    """CRC32C of ``len(ptrs)`` buffers of ``nbytes`` each at the uint64 addresses ``ptrs`` -> uint32 array.
    The caller keeps the memory alive. GIL released."""
    _arr(ptrs, cnp.NPY_UINT64, 1, "ptrs")
    cdef int k = ptrs.shape[0]
    cdef cnp.ndarray out = cnp.PyArray_ZEROS(1, [k], cnp.NPY_UINT32, 0)
    cdef const uint64_t *pp = <const uint64_t*>_ptr(ptrs)
    with nogil:
        plk_crc32c_many(pp, k, nbytes, <uint32_t*>cnp.PyArray_DATA(out))
    return out


def crc32c_hardware():
    return bool(plk_crc32c_hw())


include "_step.pxi"
