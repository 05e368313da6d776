# The compiled layer steps (included by _kernels.pyx; powerlow/steps.py is their face): a layer's FFN in one call
# with the GIL released, and LayerLoop, every layer of a pass in one call.
#
# SparseStep: the low-rank predictor's clusters of this layer and its guess for the next (_pick_one, as
# lowrank_pick), the bundles' addresses from the cluster source (the resident buffer, or the streaming core's
# fetch through powerlow._iocore.API), the next layer's read-ahead (the core's prefetch), the bundles put in their
# converted order after a cluster re-layout, and the FFN kernel: the steps of powerlow.ffn.SparseFFN.forward and
# predictors.LowRankPredictor.select_ahead. DenseStep: the dense window's pieces. AllStep: every resident bundle.
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcpy, memset

cdef extern from "plk_io.h" nogil:
    ctypedef struct plk_io:
        pass
    ctypedef struct plk_io_api:
        int (*fetch)(plk_io *io, int layer, const int32_t *ids, int n, uint64_t *out, int dense, int depth) noexcept nogil
        int (*prefetch)(plk_io *io, int layer, const int32_t *ids, int n, int priority) noexcept nogil
        int (*stream_piece)(plk_io *io, int layer, int i0, int i1, const uint64_t **addr) noexcept nogil
    const char *PLK_IO_API_NAME


cdef class _FFNStep:
    """A layer's FFN in one call (what LayerLoop runs per layer): SparseStep, DenseStep or AllStep. Holds what they
    share: per layer the bundle plane offsets and the FFN kernel's variant (isa, fmt, down fmt, tl: configure),
    the streaming core (or None), the clusters computed so far; run() checks and calls the subclass's _run."""
    cdef int L, K, N, act, C, batch
    cdef int *ffn_isa                  # [4 L]: isa, then fmt, down fmt, tl, each L long
    cdef const int64_t **offs
    cdef plk_io_api *api
    cdef object core
    cdef object _offs
    cdef public int64_t used

    def __dealloc__(self):
        free(self.ffn_isa); free(self.offs)

    cdef int _init_ffn(self, int L, int K, int N, int act, int C, offs, core) except -1:
        cdef int l
        if L < 1 or K < 1 or N < 1 or len(offs) != L:
            raise ValueError("a layer step needs >= 1 layer, K, bundles and one offsets table per layer")
        self.L, self.K, self.N, self.act, self.C, self.batch = L, K, N, act, C, -1
        self.ffn_isa = <int *>calloc(4 * L, sizeof(int))
        self.offs = <const int64_t **>calloc(L, sizeof(int64_t *))
        if self.ffn_isa == NULL or self.offs == NULL:
            raise MemoryError("layer step: out of memory")
        for l in range(L):
            _arr(offs[l], cnp.NPY_INT64, 1, "offs")
            self.offs[l] = <const int64_t *>_ptr(offs[l])
        self._offs = offs
        self.core, self.api = core, NULL
        if core is not None:
            from powerlow import _iocore
            self.api = <plk_io_api *>PyCapsule_GetPointer(_iocore.API, PLK_IO_API_NAME)
        return 0

    def configure(self, int batch, ffn):
        """Per layer (isa, fmt, down fmt, tl) of the FFN kernel for T == 1 (batch 0) or T > 1 (batch 1)."""
        cdef int l, L = self.L
        if len(ffn) != L:
            raise ValueError("configure: one FFN variant per layer")
        for l in range(L):
            self.ffn_isa[l], self.ffn_isa[L + l], self.ffn_isa[2 * L + l], self.ffn_isa[3 * L + l] = ffn[l]
        self.batch = batch

    cdef inline int _ffn(self, int layer, const uint64_t *ptrs, int n, const float *h, int T, float *out,
                         int nthreads) noexcept nogil:
        cdef int L = self.L
        return plk_ffn_bundles(self.ffn_isa[layer], self.ffn_isa[L + layer], self.ffn_isa[2 * L + layer],
                               self.ffn_isa[3 * L + layer], ptrs, n, self.C, self.K, self.offs[layer], h, T, self.act,
                               out, nthreads)

    cdef int _grow(self, int T) except -1:
        return 0

    cdef int _run(self, plk_io *io, int layer, const float *h, int T, float *out, int nthreads) noexcept nogil:
        return -2

    def run(self, int layer, h, out, int nthreads) -> int:
        """out (T, K) += the layer's FFN. The clusters computed, or -1 when the streaming core failed (its error()
        says why)."""
        _arr(h, cnp.NPY_FLOAT32, 2, "h")
        _arr(out, cnp.NPY_FLOAT32, 2, "out")
        cdef int T = h.shape[0], rc
        if h.shape[1] != self.K or out.shape[0] != T or out.shape[1] != self.K or T < 1:
            raise ValueError(f"run: h and out must be (T, {self.K})")
        if layer < 0 or layer >= self.L:
            raise ValueError(f"run: layer {layer} out of range")
        if self.batch != (T > 1):
            raise ValueError("run: configure() the variants of this batch size first")
        self._grow(T)
        cdef plk_io *io = self._core_io()
        cdef const float *ph = <const float *>_ptr(h)
        cdef float *po = <float *>_ptr(out)
        with nogil:
            rc = self._run(io, layer, ph, T, po, nthreads)
        if rc == -2:
            raise MemoryError("kernel scratch allocation failed")
        return rc

    @property
    def batch_class(self) -> int:
        """The T class the variants were configured for (-1: not yet)."""
        return self.batch

    cdef plk_io *_core_io(self) except? NULL:
        cdef plk_io *io = NULL
        if self.core is not None:
            io = <plk_io *><size_t>self.core.handle
            if io == NULL:
                raise RuntimeError("the streaming core is closed")
        return io


cdef class SparseStep(_FFNStep):
    """See powerlow.kernels.SparseStep. Layer tables are C arrays over numpy arrays kept in ``_keep``."""
    cdef int r, n_out, group, depth, prefetch_on
    cdef int mm_isa, fa, fb
    cdef plk_w *wa
    cdef plk_w *wb
    cdef const float **pa
    cdef const float **pb
    cdef const float **psc
    cdef float *thr
    cdef const uint64_t **resident
    cdef const int64_t **order
    cdef int32_t *ids
    cdef int32_t *ahead
    cdef int32_t *last0
    cdef int n_last0
    cdef int32_t *mark
    cdef uint64_t *ptrs
    cdef uint64_t *ptrs2
    cdef float *z
    cdef float *y
    cdef float *hs
    cdef int cap_T
    cdef object _keep

    def __cinit__(self):
        self.cap_T = 0

    def __init__(self, int K, int fa, int fb, int group, A, a, B, b, thr, scale, int act, int C, offs, resident,
                 core, int depth, order):
        """Per layer l: A[l] (qs, d) q8 planes of (r, K), a[l] (1, r), B[l] (qs, d) of (n_out, r), b[l] (1, n_out),
        thr[l], scale[l] (1, K) float32 or None (the lookahead's re-scaling of layer l from layer l - 1's input),
        offs[l] the bundle plane offsets (int64 (9,)), order[l] None or stored cluster ids in summing order
        (int64 (N,)). Source: resident[l] uint64 (N,) addresses, or core (a powerlow._iocore.SlotCore) with its
        fetch ``depth``."""
        cdef int l, L = len(A)
        self.group, self.depth, self.fa, self.fb = group, depth, fa, fb
        self.r, self.n_out = a[0].shape[1], b[0].shape[1]
        if self.n_out % group:
            raise ValueError("SparseStep: n_out must be a multiple of group")
        if (resident is None) == (core is None):
            raise ValueError("SparseStep: give resident addresses or a streaming core, not both")
        self._init_ffn(L, K, self.n_out // group, act, C, offs, core)
        self.wa = <plk_w *>calloc(L, sizeof(plk_w))
        self.wb = <plk_w *>calloc(L, sizeof(plk_w))
        self.pa = <const float **>calloc(L, sizeof(float *))
        self.pb = <const float **>calloc(L, sizeof(float *))
        self.psc = <const float **>calloc(L, sizeof(float *))
        self.thr = <float *>calloc(L, sizeof(float))
        self.resident = <const uint64_t **>calloc(L, sizeof(uint64_t *))
        self.order = <const int64_t **>calloc(L, sizeof(int64_t *))
        self.ids = <int32_t *>malloc(self.N * sizeof(int32_t))
        self.ahead = <int32_t *>malloc(self.N * sizeof(int32_t))
        self.last0 = <int32_t *>malloc(self.N * sizeof(int32_t))
        self.mark = <int32_t *>calloc(self.N, sizeof(int32_t))
        self.ptrs = <uint64_t *>malloc(self.N * sizeof(uint64_t))
        self.ptrs2 = <uint64_t *>malloc(self.N * sizeof(uint64_t))
        if (self.wa == NULL or self.wb == NULL or self.pa == NULL or self.pb == NULL or self.psc == NULL
                or self.thr == NULL or self.resident == NULL
                or self.order == NULL or self.ids == NULL or self.ahead == NULL or self.last0 == NULL
                or self.mark == NULL or self.ptrs == NULL or self.ptrs2 == NULL):
            raise MemoryError("SparseStep: out of memory")
        self.n_last0 = -1
        for l in range(L):
            if a[l].shape[1] != self.r or b[l].shape[1] != self.n_out:
                raise ValueError("SparseStep: every layer's predictor must have one rank and one output size")
            _arr(a[l], cnp.NPY_FLOAT32, 2, "a")
            _arr(b[l], cnp.NPY_FLOAT32, 2, "b")
            self.pa[l], self.pb[l], self.thr[l] = <const float *>_ptr(a[l]), <const float *>_ptr(b[l]), <float>thr[l]
            if scale[l] is not None:
                _arr(scale[l], cnp.NPY_FLOAT32, 2, "scale")
                if scale[l].shape[1] != K:
                    raise ValueError(f"SparseStep: scale[{l}] must be (1, {K})")
                self.psc[l] = <const float *>_ptr(scale[l])
            if order is not None and order[l] is not None:
                _arr(order[l], cnp.NPY_INT64, 1, "order")
                if order[l].shape[0] != self.N:
                    raise ValueError(f"SparseStep: order[{l}] must hold {self.N} cluster ids")
                self.order[l] = <const int64_t *>_ptr(order[l])
            if resident is not None:
                _arr(resident[l], cnp.NPY_UINT64, 1, "resident")
                if resident[l].shape[0] != self.N:
                    raise ValueError(f"SparseStep: resident[{l}] must hold {self.N} addresses")
                self.resident[l] = <const uint64_t *>_ptr(resident[l])
        for l in range(L):
            _planes(fa, A[l][0], A[l][1], None, self.r, self.K, &self.wa[l])
            _planes(fb, B[l][0], B[l][1], None, self.n_out, self.r, &self.wb[l])
        self.prefetch_on = core is not None
        self._keep = (A, a, B, b, scale, resident, order)

    def __dealloc__(self):
        free(self.wa); free(self.wb); free(self.pa); free(self.pb); free(self.psc); free(self.thr)
        free(self.resident); free(self.order)
        free(self.ids); free(self.ahead); free(self.last0); free(self.mark); free(self.ptrs); free(self.ptrs2)
        free(self.z); free(self.y); free(self.hs)

    def set_matmul(self, int mm_isa):
        """The predictor's q8 matmul variant (with configure: the batch class's kernel variants)."""
        self.mm_isa = mm_isa

    cdef int _grow(self, int T) except -1:
        cdef float *z
        cdef float *y
        cdef float *hs
        if T <= self.cap_T:
            return 0
        z = <float *>realloc(self.z, <size_t>T * self.r * sizeof(float))
        if z != NULL:
            self.z = z
        y = <float *>realloc(self.y, <size_t>T * self.n_out * sizeof(float))
        if y != NULL:
            self.y = y
        hs = <float *>realloc(self.hs, <size_t>T * self.K * sizeof(float))
        if hs != NULL:
            self.hs = hs
        if z == NULL or y == NULL or hs == NULL:
            raise MemoryError("SparseStep: out of memory for the predictor's scratch")
        self.cap_T = T
        return 0

    cdef int _pick(self, int l, const float *h, int T, const float *scale, int32_t *dst, int *n,
                   int nthreads) noexcept nogil:
        cdef Py_ssize_t i
        if scale != NULL:
            for i in range(<Py_ssize_t>T * self.K):
                self.hs[i] = h[i] * scale[i % self.K]
            h = self.hs
        return _pick_one(self.mm_isa, self.fa, self.fb, &self.wa[l], &self.wb[l], self.r, self.K, self.n_out,
                         self.group, self.pa[l], self.pb[l], self.thr[l], h, T, self.z, self.y, dst, n, nthreads)

    cdef int _run(self, plk_io *io, int layer, const float *h, int T, float *out, int nthreads) noexcept nogil:
        cdef int n = 0, na = 0, i, j, k, c
        cdef int nxt = layer + 1 if layer + 1 < self.L else 0     # after the last layer: the next token's first
        cdef int32_t *ahead = self.ahead
        cdef uint64_t *p = self.ptrs
        cdef uint64_t *swap
        cdef const int64_t *order = self.order[layer]
        if self._pick(layer, h, T, NULL, self.ids, &n, nthreads):
            return -2
        if layer == 0:                               # the next token's layer 0 is guessed by this one's
            memcpy(self.last0, self.ids, n * sizeof(int32_t))
            self.n_last0 = n
        if self.prefetch_on:
            if nxt != 0:
                if self._pick(nxt, h, T, self.psc[nxt], ahead, &na, nthreads):
                    return -2
            else:
                ahead, na = self.last0, self.n_last0
        if io != NULL:
            if self.api.fetch(io, layer, self.ids, n, p, 0, self.depth) < 0:
                return -1
            self.api.prefetch(io, nxt, ahead, na, 1)     # read while this layer computes (its slots are locked)
        else:
            for i in range(n):
                p[i] = self.resident[layer][self.ids[i]]
        if order != NULL and n > 1:                   # sum in the converted order (bit-identical outputs)
            for i in range(n):
                self.mark[self.ids[i]] = i + 1
            j = 0
            for k in range(self.N):
                c = <int>order[k]
                if self.mark[c]:
                    self.ptrs2[j] = p[self.mark[c] - 1]
                    self.mark[c] = 0
                    j += 1
            p = self.ptrs2
        if n and self._ffn(layer, p, n, h, T, out, nthreads):
            return -2
        self.used += n
        return n


cdef class DenseStep(_FFNStep):
    """See powerlow.steps.DenseStep: a layer of the dense window, piece by piece as its bundles arrive."""
    cdef int nch, npieces
    cdef const int64_t *pos
    cdef const int *lo
    cdef const int *hi
    cdef const int64_t *start
    cdef uint64_t *ptrs
    cdef float *priv
    cdef int cap_T
    cdef object _keep

    def __cinit__(self):
        self.cap_T = 0

    def __init__(self, int K, int N, int act, int C, offs, pos, lo, hi, start, core):
        """offs[l]: the bundle plane offsets of layer l; piece p: compute positions start[p]..start[p+1] of a
        layer, whose bundles go to the kernel's positions pos[start[p]:start[p+1]], chunk ranges lo[p], hi[p]
        (rows of (npieces, nch) int32 arrays). core: the SlotCore whose window (stream_begin) serves them."""
        _arr(pos, cnp.NPY_INT64, 1, "pos")
        _arr(lo, cnp.NPY_INT32, 2, "lo")
        _arr(hi, cnp.NPY_INT32, 2, "hi")
        _arr(start, cnp.NPY_INT64, 1, "start")
        self.npieces, self.nch = lo.shape[0], lo.shape[1]
        if (hi.shape[0] != self.npieces or hi.shape[1] != self.nch or start.shape[0] != self.npieces + 1
                or start[0] != 0 or start[self.npieces] != N or (np.diff(start) < 0).any() or pos.shape[0] != N
                or self.nch < 1 or (pos < 0).any() or (pos >= N).any() or (lo < 0).any() or (lo > hi).any()
                or (hi > N).any() or core is None):
            raise ValueError("DenseStep: the pieces' tables do not match, or no streaming core")
        self._init_ffn(len(offs), K, N, act, C, offs, core)
        self.ptrs = <uint64_t *>calloc(N, sizeof(uint64_t))
        if self.ptrs == NULL:
            raise MemoryError("DenseStep: out of memory")
        self.pos = <const int64_t *>_ptr(pos)
        self.lo, self.hi, self.start = <const int *>_ptr(lo), <const int *>_ptr(hi), <const int64_t *>_ptr(start)
        self._keep = (pos, lo, hi, start)

    def __dealloc__(self):
        free(self.ptrs); free(self.priv)

    cdef int _grow(self, int T) except -1:
        cdef float *p
        if T <= self.cap_T:
            return 0
        p = <float *>realloc(self.priv, <size_t>max(1, self.nch - 1) * T * self.K * sizeof(float))
        if p == NULL:
            raise MemoryError("DenseStep: out of memory for the chunk buffers")
        self.priv, self.cap_T = p, T
        return 0

    cdef int _run(self, plk_io *io, int layer, const float *h, int T, float *out, int nthreads) noexcept nogil:
        cdef int p, j, c, L = self.L, nch = self.nch
        cdef Py_ssize_t k, TK = <Py_ssize_t>T * self.K
        cdef const uint64_t *a
        cdef int64_t i0, i1
        if io == NULL:
            return -1
        memset(self.priv, 0, <size_t>max(1, nch - 1) * TK * sizeof(float))
        for p in range(self.npieces):
            i0, i1 = self.start[p], self.start[p + 1]
            if self.api.stream_piece(io, layer, <int>i0, <int>i1, &a) < 0:
                return -1
            for j in range(<int>(i1 - i0)):
                self.ptrs[self.pos[i0 + j]] = a[j]
            if plk_ffn_bundles_part(self.ffn_isa[layer], self.ffn_isa[L + layer], self.ffn_isa[2 * L + layer],
                                    self.ffn_isa[3 * L + layer], self.ptrs, self.N, nch, self.lo + p * nch,
                                    self.hi + p * nch, self.C, self.K, self.offs[layer], h, T, self.act, out,
                                    self.priv if nch > 1 else NULL, nthreads):
                return -2
        for c in range(nch - 1):                    # the kernel's reduction, in chunk order
            for k in range(TK):
                out[k] = out[k] + self.priv[c * TK + k]
        self.used += self.N
        return self.N


cdef class AllStep(_FFNStep):
    """See powerlow.steps.AllStep: a layer's FFN over all its bundles, resident (dense mode without a budget)."""
    cdef const uint64_t **ptrs
    cdef object _keep

    def __init__(self, int K, int act, int C, offs, ptrs):
        """offs[l]: layer l's bundle plane offsets; ptrs[l]: uint64 (N,) addresses of its bundles, in summing order."""
        cdef int l, L = len(offs)
        self._init_ffn(L, K, ptrs[0].shape[0], act, C, offs, None)
        self.ptrs = <const uint64_t **>calloc(L, sizeof(uint64_t *))
        if self.ptrs == NULL:
            raise MemoryError("AllStep: out of memory")
        for l in range(L):
            _arr(ptrs[l], cnp.NPY_UINT64, 1, "ptrs")
            if ptrs[l].shape[0] != self.N:
                raise ValueError("AllStep: every layer has the same number of bundles")
            self.ptrs[l] = <const uint64_t *>_ptr(ptrs[l])
        self._keep = ptrs

    def __dealloc__(self):
        free(self.ptrs)

    cdef int _run(self, plk_io *io, int layer, const float *h, int T, float *out, int nthreads) noexcept nogil:
        if self._ffn(layer, self.ptrs[layer], self.N, h, T, out, nthreads):
            return -2
        self.used += self.N
        return self.N


cdef inline bint _finite(const float *x, Py_ssize_t n) noexcept nogil:
    cdef const uint32_t *p = <const uint32_t *>x
    cdef uint32_t bad = 0
    cdef Py_ssize_t i
    for i in range(n):
        bad |= ((p[i] & 0x7f800000u) == 0x7f800000u)     # exponent all ones: inf or NaN
    return bad == 0


cdef class LayerLoop:
    """See powerlow.kernels.LayerLoop: every layer of a forward pass in one call (attention block, the
    predict-mode FFN step, the finite check), over weights and KV caches whose C views it keeps. Per layer
    optionally a post-FFN norm (gemma3: x += rmsnorm(FFN(h), post)) and the second RoPE table set (gemma3's
    local layers: local = 1)."""
    cdef int L, K, nh, nkv, hd, nq, qd, maxP, batch, n_post, n_local
    cdef plk_attn_w *w
    cdef int *isa
    cdef int *local
    cdef const float **post
    cdef object _y
    cdef uint16_t **kc
    cdef uint16_t **vc
    cdef _FFNStep step
    cdef public int failed_layer
    cdef object _keep
    cdef object _kv

    def __cinit__(self, int L, int K, int nh, int nkv, int hd, _FFNStep step):
        self.L, self.K, self.nh, self.nkv, self.hd = L, K, nh, nkv, hd
        self.nq, self.qd = (nh + 2 * nkv) * hd, nh * hd
        self.w = <plk_attn_w *>calloc(L, sizeof(plk_attn_w))
        self.isa = <int *>calloc(L, sizeof(int))
        self.kc = <uint16_t **>calloc(L, sizeof(uint16_t *))
        self.vc = <uint16_t **>calloc(L, sizeof(uint16_t *))
        self.local = <int *>calloc(L, sizeof(int))
        self.post = <const float **>calloc(L, sizeof(float *))
        if self.w == NULL or self.isa == NULL or self.kc == NULL or self.vc == NULL or self.local == NULL or \
                self.post == NULL:
            raise MemoryError("LayerLoop: out of memory")
        if step.L != L or step.K != K:
            raise ValueError("LayerLoop: the FFN step is for another model")
        self.step, self.batch, self.maxP, self.failed_layer = step, -1, 0, -1
        self._keep = [None] * L
        self._kv = None
        self._y = None
        self.n_post = self.n_local = 0

    def __dealloc__(self):
        free(self.w); free(self.isa); free(self.kc); free(self.vc); free(self.local); free(self.post)

    def set_layer(self, int l, int isa, int fq, int tlq, qs, d, m, qtl, bqkv, int fo, int tlo, oqs, od, om, otl,
                  attn_norm, ffn_norm, parts, q_norm=None, k_norm=None, post_norm=None, int window=0,
                  double attn_scale=0.0, post_ffn=None, int local_rope=0):
        """Layer l's attention weights (attn_block's arguments) and kernel variant; post_ffn: its post-FFN norm
        (K,) or None; local_rope: 1 when it takes run()'s second RoPE tables."""
        if l < 0 or l >= self.L:
            raise ValueError(f"LayerLoop: layer {l} out of range")
        if local_rope not in (0, 1):
            raise ValueError(f"LayerLoop: local_rope must be 0 or 1, got {local_rope}")
        _attn_w(fq, tlq, qs, d, m, qtl, bqkv, fo, tlo, oqs, od, om, otl, attn_norm, ffn_norm, parts, self.K, self.nq,
                self.qd, &self.w[l], q_norm, k_norm, self.hd, post_norm, window, attn_scale)
        cdef const float *pf = _opt_f32(post_ffn, self.K, "post_ffn")
        self.n_post += (pf != NULL) - (self.post[l] != NULL)
        self.n_local += local_rope - self.local[l]
        self.post[l], self.local[l] = pf, local_rope
        self.isa[l] = isa
        self._keep[l] = (qs, d, m, qtl, bqkv, oqs, od, om, otl, attn_norm, ffn_norm, parts, q_norm, k_norm, post_norm,
                         post_ffn)

    def set_batch(self, int batch):
        self.batch = batch

    def set_kv(self, k, v):
        """The KV caches (lists of L fp16 arrays (n_kv, max_pos, head_dim)); kept until the next set_kv."""
        cdef int l
        if len(k) != self.L or len(v) != self.L:
            raise ValueError(f"LayerLoop: {self.L} K and V caches expected")
        for l in range(self.L):
            _check_kv(k[l], v[l], self.nh, self.nkv)
            if k[l].shape[2] != self.hd or (l and k[l].shape[1] != self.maxP):
                raise ValueError("LayerLoop: every layer's cache must be (n_kv, max_pos, head_dim)")
            self.maxP = k[l].shape[1]
            self.kc[l], self.vc[l] = <uint16_t *>_ptr(k[l]), <uint16_t *>_ptr(v[l])
        self._kv = (k, v)

    def kv_is(self, k) -> bool:
        return self._kv is not None and self._kv[0] is k

    def run(self, x, h, int start, rcos, rsin, scratch, float eps, int nthreads, lcos=None, lsin=None) -> int:
        """All layers: x (T, K) += attention, then += the FFN over the predicted clusters (or its post-FFN norm);
        h the FFN input (scratch); lcos / lsin the RoPE tables of the local_rope layers. 0; -1 the streaming core
        failed at layer failed_layer (its error() says why); -3 layer failed_layer produced a non-finite value."""
        _arr(x, cnp.NPY_FLOAT32, 2, "x")
        _arr(h, cnp.NPY_FLOAT32, 2, "h")
        cdef int T = x.shape[0], K = self.K, l, rc = 0, n
        if T < 1 or x.shape[1] != K or h.shape[0] != T or h.shape[1] != K:
            raise ValueError(f"LayerLoop.run: x and h must be (T, {K})")
        if self._kv is None or start < 0 or start + T > self.maxP:
            raise ValueError(f"LayerLoop.run: positions {start}..{start + T - 1} exceed the cache")
        if self.batch != (T > 1) or self.step.batch != (T > 1):
            raise ValueError("LayerLoop.run: set the variants of this batch size first")
        _check_rope_scratch(rcos, rsin, scratch, T, self.hd, T * (self.nq + self.qd + K))
        if self.n_local:
            if lcos is None or lsin is None:
                raise ValueError("LayerLoop.run: local_rope layers need the local RoPE tables (lcos, lsin)")
            _check_rope(lcos, lsin, T, self.hd)
        cdef const float *plc = <const float *>_ptr(lcos) if self.n_local else NULL
        cdef const float *pls = <const float *>_ptr(lsin) if self.n_local else NULL
        if self.n_post and (self._y is None or self._y.shape[0] < T * K):
            self._y = np.empty(T * K, np.float32)
        cdef float *py = <float *>_ptr(self._y) if self.n_post else NULL
        cdef Py_ssize_t i, TK = <Py_ssize_t>T * K
        self.step._grow(T)
        cdef plk_io *io = self.step._core_io()
        cdef float *px = <float *>_ptr(x)
        cdef float *ph = <float *>_ptr(h)
        cdef const float *pc = <const float *>_ptr(rcos)
        cdef const float *ps = <const float *>_ptr(rsin)
        cdef float *psc = <float *>_ptr(scratch)
        with nogil:
            for l in range(self.L):
                if plk_attn_block(self.isa[l], &self.w[l], eps, px, ph, T, K, self.kc[l], self.vc[l], self.maxP,
                                  start, self.nh, self.nkv, self.hd, plc if self.local[l] else pc,
                                  pls if self.local[l] else ps, psc, nthreads):
                    rc = -2
                    break
                if self.post[l] == NULL:
                    n = self.step._run(io, l, ph, T, px, nthreads)
                else:   # x += rmsnorm(FFN(h), post): the FFN into zeros, normed in place, then added (the layer
                    #     loop in Python: x += ops.rmsnorm(ffn.forward(l, h), post); the same ops, the same bits)
                    memset(py, 0, TK * sizeof(float))
                    n = self.step._run(io, l, ph, T, py, nthreads)
                    if n >= 0:
                        plk_rmsnorm(py, self.post[l], eps, py, T, K)
                        for i in range(TK):
                            px[i] += py[i]
                if n < 0:
                    rc = n
                    break
                if not _finite(px, <Py_ssize_t>T * K):
                    rc = -3
                    break
        self.failed_layer = l if rc else -1
        if rc == -2:
            raise MemoryError("kernel scratch allocation failed")
        return rc
