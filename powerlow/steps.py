"""The compiled layer steps: a forward pass of the offloaded modes with no Python per layer.

    SparseStep   a predict-mode layer: low-rank pick (this layer and the next's guess), the streaming core's
                 fetch and prefetch, the converted summing order, the FFN kernel
    DenseStep    a dense-window layer: piece by piece, the core's window hands over bundles, the kernel adds them
    AllStep      a dense layer, every bundle resident: the kernel over all of them
    LayerLoop    every layer of a pass: the fused attention block, one of the steps above, the finite check

cython_ext/_step.pxi holds them in C (the GIL released, the core called through powerlow._iocore.API); these
classes work out the kernel variants (powerlow.kernels' dispatcher) and re-do it when the dispatcher, the ISA or
the batch class (T == 1 | T > 1) changes. They give the floats, clusters and reads of the Python path
(powerlow.ffn.SparseFFN, engine.Transformer.forward's layer loop): tests/test_predictors.py, tests/test_offload.py.
``available(ops)``: whether the ops backend has them (the compiled kernels do; the numpy reference does not).
"""
from __future__ import annotations

import numpy as np

from . import kernels                  # first: a clear error if the extension is not built
from . import _kernels as _k


def available(ops) -> bool:
    return ops is kernels


def _key(x: np.ndarray) -> tuple:
    return (x.shape[0] > 1, kernels._dispatcher, kernels.isa)


def _ffn_variants(layouts: list, T: int) -> list:
    """Per layer (isa, fmt, down fmt, tl) of the FFN kernel for T tokens; one cluster size and width for all."""
    out = []
    for lay in layouts:
        which, f, df, tl, C, width, _ = kernels._ffn_args(lay, T, None)
        if C != layouts[0].C or width != layouts[0].K:
            raise ValueError("every layer's bundles must have one cluster size and width")
        out.append((which, f, df, int(tl)))
    return out


class _Step:
    """What the two FFN steps share: the compiled object, its variants re-worked out when the key changes."""
    _s = None
    _key = None

    @property
    def used(self) -> int:
        """Clusters computed so far."""
        return self._s.used

    def _configure(self, key: tuple) -> None:
        raise NotImplementedError

    def run(self, layer: int, h: np.ndarray, out: np.ndarray) -> int:
        """out (T, K) += layer's FFN; the clusters computed, or -1 (the streaming core failed: its error())."""
        key = _key(h)
        if key != self._key:
            self._configure(key)
        return self._s.run(layer, h, out, kernels._threads)


class SparseStep(_Step):
    """A predict-mode layer in one compiled call: the low-rank predictor's clusters of the layer and its guess for
    the next, the bundles' addresses (a resident buffer's, or the streaming core's fetch), the read-ahead of the
    guess (the core's prefetch), the converted summing order after a re-layout, and the FFN kernel
    (cython_ext/_step.pxi). The same clusters, reads and floats as SparseFFN.forward over
    LowRankPredictor.select_ahead (tests/test_offload.py, tests/test_predictors.py).

    ``jobs[l]``: (A, a, B, b, thr, scale) of layer l (A, B q8 QMatrix; scale the lookahead's (1, K) re-scaling
    of layer l, None for layer 0); ``group``: outputs per cluster; ``layouts``: the BundleLayout per layer;
    ``order``: None or per layer the stored cluster ids in summing order; ``resident``: per layer the uint64
    addresses of all bundles, or ``core`` (an _iocore.SlotCore) with its fetch ``depth``."""

    def __init__(self, jobs: list, group: int, layouts: list, act: str, *, order=None, resident=None, core=None,
                 depth: int = 1):
        A0, B0 = jobs[0][0], jobs[0][2]
        if any(j[0].fmt != A0.fmt or j[2].fmt != B0.fmt for j in jobs):
            raise ValueError("SparseStep: every layer's A (B) must have one format")
        if act not in kernels._ACT_ID:
            raise ValueError(f"act must be one of {', '.join(kernels._ACT_ID)}, got {act!r}")
        self.layouts = layouts
        self._A0, self._B0 = A0, B0
        self._s = _k.SparseStep(layouts[0].K, kernels._FMT_ID[A0.fmt], kernels._FMT_ID[B0.fmt], group,
                                [(j[0].planes["qs"], j[0].planes.get("d")) for j in jobs], [j[1] for j in jobs],
                                [(j[2].planes["qs"], j[2].planes.get("d")) for j in jobs], [j[3] for j in jobs],
                                [j[4] for j in jobs], [j[5] for j in jobs], kernels._ACT_ID[act], layouts[0].C,
                                [kernels._bundle_offsets(lay) for lay in layouts], resident, core, depth, order)

    def _configure(self, key: tuple) -> None:
        T = 2 if key[0] else 1
        wa, wb = kernels._mm_args(self._A0, T), kernels._mm_args(self._B0, T, self._A0.cols)
        if wa[0] != wb[0] or wa[2] or wb[2]:
            raise ValueError("SparseStep: A and B must run the same multiply-add variant")
        self._s.set_matmul(wa[0])
        self._s.configure(int(key[0]), _ffn_variants(self.layouts, T))
        self._key = key


class DenseStep(_Step):
    """A layer of the dense offloaded mode in one compiled call: piece by piece, the streaming core's window hands
    over the next bundles (plk_io_stream_piece) and the FFN kernel adds them into their chunks (ffn_bundles_part);
    then the chunks are summed in order (cython_ext/_step.pxi). The floats of SparseFFN's piece loop and of one
    ffn_bundles call over the whole layer (tests/test_offload.py).

    ``pieces``: per piece (kernel positions, lo, hi) as SparseFFN._begin_stream makes them; ``core``: the SlotCore
    whose window (OffloadedStore.stream_begin) serves them."""

    def __init__(self, layouts: list, act: str, pieces: list, core):
        if act not in kernels._ACT_ID:
            raise ValueError(f"act must be one of {', '.join(kernels._ACT_ID)}, got {act!r}")
        self.layouts = layouts
        lay = layouts[0]
        start = np.concatenate([[0], np.cumsum([len(p) for p, _, _ in pieces])]).astype(np.int64)
        pos = np.concatenate([p for p, _, _ in pieces]).astype(np.int64)
        lo = np.ascontiguousarray(np.stack([l for _, l, _ in pieces]), np.int32)
        hi = np.ascontiguousarray(np.stack([h for _, _, h in pieces]), np.int32)
        self._s = _k.DenseStep(lay.K, int(start[-1]), kernels._ACT_ID[act], lay.C,
                               [kernels._bundle_offsets(x) for x in layouts], pos, lo, hi, start, core)

    def _configure(self, key: tuple) -> None:
        self._s.configure(int(key[0]), _ffn_variants(self.layouts, 2 if key[0] else 1))
        self._key = key


class AllStep(_Step):
    """A dense layer with every bundle resident (no budget) in one compiled call: the FFN kernel over all the
    layer's bundles in their summing order (``ptrs[l]``: uint64 addresses, the converted order after a re-layout),
    what SparseFFN.forward does with ResidentStore.ptrs(l, None)."""

    def __init__(self, layouts: list, act: str, ptrs: list):
        if act not in kernels._ACT_ID:
            raise ValueError(f"act must be one of {', '.join(kernels._ACT_ID)}, got {act!r}")
        self.layouts = layouts
        self._s = _k.AllStep(layouts[0].K, kernels._ACT_ID[act], layouts[0].C,
                             [kernels._bundle_offsets(x) for x in layouts],
                             [np.ascontiguousarray(p, np.uint64) for p in ptrs])

    def _configure(self, key: tuple) -> None:
        self._s.configure(int(key[0]), _ffn_variants(self.layouts, 2 if key[0] else 1))
        self._key = key


class LayerLoop:
    """Every layer of a forward pass in one compiled call: per layer the fused attention block (attn_block), the
    FFN step (SparseStep: the predict mode; DenseStep: the dense window) added into the residual stream, and the
    finite check (cython_ext/_step.pxi).
    What Transformer.forward's layer loop does call by call, with the same kernels in the same order, so the same
    floats (tests/test_predictors.py). ``layers``: the engine's LayerWeights per layer (all resident); ``post_ffn``
    per layer a post-FFN norm (K,) or None (gemma3: x += rmsnorm(FFN(h), post)); ``local`` per layer whether it
    takes the second RoPE table set run() is given (gemma3's sliding-window layers, their own base)."""

    def __init__(self, layers: list, step: "SparseStep | DenseStep", n_heads: int, n_kv: int, head_dim: int,
                 post_ffn: list | None = None, local: list | None = None):
        self.layers, self.step = layers, step
        self.post_ffn = post_ffn or [None] * len(layers)
        self.local = local or [False] * len(layers)
        if len(self.post_ffn) != len(layers) or len(self.local) != len(layers):
            raise ValueError("LayerLoop: one post_ffn and local entry per layer")
        self._s = _k.LayerLoop(len(layers), step.layouts[0].K, n_heads, n_kv, head_dim, step._s)
        self._key = None

    def _configure(self, key: tuple, x: np.ndarray) -> None:
        for l, lw in enumerate(self.layers):
            which, fq, tlq, qs, d, m, qtl, fo, tlo, oqs, od, om, otl, parts = kernels._attn_args(lw, x, None)
            self._s.set_layer(l, which, fq, tlq, qs, d, m, qtl, lw.bqkv, fo, tlo, oqs, od, om, otl, lw.attn_norm,
                              lw.ffn_norm, parts, *kernels.attn_extras(lw), post_ffn=self.post_ffn[l],
                              local_rope=int(bool(self.local[l])))
        self._s.set_batch(int(key[0]))
        self._key = key

    @property
    def failed_layer(self) -> int:
        return self._s.failed_layer

    def run(self, x: np.ndarray, h: np.ndarray, k_caches: list, v_caches: list, start: int, rope, eps: float,
            scratch: np.ndarray, local_rope=None) -> int:
        """x (T, K) through every layer in place (h: scratch for the FFN input; rope the (cos, sin) tables, local_rope
        those of the ``local`` layers). 0, -1 (the streaming core failed at failed_layer: its error()), -3 (layer
        failed_layer produced NaN or inf)."""
        key = _key(x)
        if key != self._key:
            self._configure(key, x)
        if key != self.step._key:
            self.step._configure(key)
        if not self._s.kv_is(k_caches):
            self._s.set_kv(k_caches, v_caches)
        lc, ls = local_rope if local_rope is not None else (None, None)
        return self._s.run(x, h, start, rope[0], rope[1], scratch, eps, kernels._threads, lc, ls)
