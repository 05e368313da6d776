"""The sparse FFN: pick a layer's active neuron clusters, get their bundles, compute only those.

Where the bundles come from is a *cluster source*:
  * ResidentStore: all of ffn.bin in RAM (the fully resident run);
  * powerlow.cache.OffloadedStore: hot clusters pinned, cold ones streamed by the I/O thread (issue 5).
Both answer ``ptrs(layer, clusters) -> uint64 addresses`` of the bundles, valid until the next call.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from . import integrity, steps
from .errors import PowerlowError
from .io import aligned_buffer
from .plan import STREAM_PIECE_BYTES
from .store import StoreInfo


_UNMADE = object()        # SparseFFN: no compiled step made yet


class ResidentStore:
    """Every bundle of ffn.bin in one aligned RAM buffer."""

    def __init__(self, path: Path, info: StoreInfo):
        self.info = info
        size = path.stat().st_size
        if size != info.total_bytes:
            raise PowerlowError(f"{path}: {size} bytes, expected {info.total_bytes} from the manifest; re-convert the model")
        self.buf = aligned_buffer(size)
        with open(path, "rb", buffering=0) as f:
            view = memoryview(self.buf)
            done = 0
            while done < size:
                n = f.readinto(view[done: done + (64 << 20)])
                if not n:
                    raise PowerlowError(f"{path}: unexpected end of file; re-convert the model")
                done += n
            try:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
        base = self.buf.ctypes.data
        self._all = [np.asarray(base + info.layer_offsets[l] + np.arange(info.n_clusters, dtype=np.uint64)
                                * info.layouts[l].stride, dtype=np.uint64) for l in range(info.n_layers)]
        self.resident_bytes = size
        self._check(path)

    def _check(self, path: Path) -> None:
        """Every bundle's CRC32C once, at load (nothing to do for a model converted without checksums)."""
        sums = integrity.run_sums(path.parent)
        if sums is None:
            return
        integrity.check_layout(sums, self.info, path)
        for l in range(self.info.n_layers):
            bad = integrity.bad_bundles(sums, self.info, l, self._all[l])
            if len(bad):
                c = int(bad[0])
                more = f" ({len(bad)} bundles of this layer are bad; `powerlow verify` lists all)" if len(bad) > 1 else ""
                raise PowerlowError(integrity.bundle_error(path, l, c, self.info.bundle_offset(l, c)) + more)

    def ptrs(self, layer: int, clusters: np.ndarray | None) -> np.ndarray:
        allp = self._all[layer]
        return allp if clusters is None else allp[clusters]

    def step_source(self) -> dict:
        """What steps.SparseStep reads bundles from: every bundle's address, per layer."""
        return {"resident": self._all}

    def first_pass(self) -> None:
        pass

    def close(self):
        pass


class SparseFFN:
    """``forward(layer, h) -> delta`` (or ``accumulate(layer, h, x)``: x += delta in place) for the
    residual stream, over the clusters the mode selects.

    The predictor (powerlow.predictors; None in dense mode) answers, once per layer:
      select_ahead(layer, h (T, K), layer + 1) -> (int32 sorted cluster ids to compute (stored order), the
      cluster ids layer + 1 will probably need, or None)   [select(layer, h) alone where nothing is prefetched]
    A cluster source with a ``prefetch(layer, clusters_or_None)`` method (the offloaded store) is told what the
    next layer will read as soon as this layer's bundles are in hand (their slots are locked), so its reader
    threads overlap this layer's compute; in dense mode (no predictor), after the layer is computed.
    ``observer(layer, h)``, if set, sees each layer's FFN input first (powerlow.profile's recorder).
    """

    def __init__(self, source, info: StoreInfo, act: str, ops, *, mode: str = "dense", predictor=None,
                 cluster_order=None, router=None, shared=None):
        self.source = source
        self.router = router          # powerlow.moe.Router: a mixture-of-experts model (mode "experts")
        self.shared = shared          # per layer powerlow.moe.SharedExpert (qwen2moe) or None
        # after a cluster re-layout (powerlow.profile), bundles are summed in their converted order, so the
        # outputs stay bit-identical (_orig[l]: converted id of each stored cluster)
        self._orig = None if cluster_order is None else [np.asarray(o, np.int64) for o in cluster_order]
        self._all_order = None if cluster_order is None else [np.argsort(o, kind="stable") for o in self._orig]
        self.info = info
        self.act = act
        self.ops = ops
        self.mode = mode
        self.predictor = predictor
        self.n_layers = info.n_layers
        self._prefetch = getattr(source, "prefetch", None)
        # MoE: the next layer's experts are read ahead unless prefetch_depth is 0 (to measure what that buys)
        self._lookahead = self._prefetch is not None and getattr(getattr(source, "plan", None), "prefetch_depth", 1) > 0
        self.observer = None         # observer(layer, h) before each layer's FFN (powerlow.profile records with it)
        # compiled: a layer in one compiled call where there is one (powerlow.steps); False: the Python steps below
        # (tests compare the two bit for bit). The step is made at first use, again if the predictor is replaced
        self.compiled = True
        self._step, self._step_pred = None, _UNMADE
        self._first = True
        self.clusters_used = 0       # over the whole run, for the density figure
        self.clusters_total = 0
        self._pieces = None
        plan = getattr(source, "plan", None)
        if predictor is None and mode == "dense" and getattr(plan, "stream_window", False):
            self._begin_stream(plan)

    # dense offloaded mode: a layer is computed piece by piece as its bundles arrive (OffloadedStore.stream_*)
    def _begin_stream(self, plan) -> None:
        """Pieces of a layer: the same k bundles of every kernel chunk (so the threads share a piece), k chosen
        for ~STREAM_PIECE_BYTES a piece and at most half the staging window. The kernels add each bundle into its
        chunk's buffer in turn, so pieces give the floats of one call over the whole layer (bit-exact)."""
        N, S = self.info.n_clusters, self.info.layout.stride
        nch = self.ops.ffn_nchunks(N)
        bounds = [N * c // nch for c in range(nch + 1)]
        W = plan.n_staging
        k = max(1, min(STREAM_PIECE_BYTES // (nch * S), W // (2 * nch)))   # nch * k <= W / 2 unless k == 1
        if nch > W:
            raise PowerlowError(f"internal: a staging window of {W} slots cannot hold one bundle of each of {nch} chunks")
        longest = max(bounds[c + 1] - bounds[c] for c in range(nch))
        pieces = []          # (position lists in sum order, lo, hi) per piece
        for st in range(0, longest, k):
            lo = np.array([min(bounds[c] + st, bounds[c + 1]) for c in range(nch)], np.int32)
            hi = np.array([min(bounds[c] + st + k, bounds[c + 1]) for c in range(nch)], np.int32)
            pos = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]).astype(np.int64)
            pieces.append((pos, lo, hi))
        order = [np.arange(N) if self._all_order is None else self._all_order[l] for l in range(self.n_layers)]
        # seq[l]: stored cluster ids in compute order (the sum order is the converted order after a re-layout)
        seq = [np.concatenate([order[l][p] for p, _, _ in pieces]) for l in range(self.n_layers)]
        self._pieces = pieces
        self._piece_start = np.concatenate([[0], np.cumsum([len(p) for p, _, _ in pieces])]).astype(np.int64)
        self._nch = nch
        self._ptrbuf = np.zeros(N, np.uint64)
        self.source.stream_begin(seq)

    def _forward_pieces(self, layer: int, h: np.ndarray, out: np.ndarray) -> None:
        T, K = h.shape
        priv = np.zeros((self._nch - 1, T, K), np.float32)
        ptrs = self._ptrbuf
        for i, (pos, lo, hi) in enumerate(self._pieces):
            a, b = int(self._piece_start[i]), int(self._piece_start[i + 1])
            ptrs[pos] = self.source.stream_piece(layer, a, b)
            self.ops.ffn_bundles_part(ptrs, self.info.layouts[layer], h, self.act, out, priv, lo, hi)
        for p in priv:                       # the kernel's reduction, in chunk order
            out += p

    def select(self, layer: int, h: np.ndarray) -> np.ndarray | None:
        """Active cluster ids for this layer (None = all)."""
        if self.predictor is None:
            return None
        return self.predictor.select(layer, h)

    def forward(self, layer: int, h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """h (T, K) float32 -> the FFN output (T, K) float32 (a new array), or, with ``out``, that output
        added into ``out`` (T, K) in place (the residual stream: no temporary, no extra add) and returned."""
        if out is None:
            out = np.zeros_like(h)
        if self.observer is not None:
            self.observer(layer, h)
        if self.router is not None:
            return self._forward_moe(layer, h, out)
        step = self._compiled()
        if step is not None:                  # the layer in one compiled call
            self.begin_pass()
            n = step.run(layer, h, out)
            if n < 0:
                self.source.raise_error()
            self.clusters_used += n
            self.clusters_total += self.info.n_clusters
            return out
        if self._pieces is not None:
            self.begin_pass()
            self._forward_pieces(layer, h, out)
            self.clusters_used += self.info.n_clusters
            self.clusters_total += self.info.n_clusters
            return out
        pred, prefetch = self.predictor, self._prefetch
        nxt = layer + 1 if layer + 1 < self.n_layers else 0      # after the last layer: the next token's first
        if pred is None:
            clusters = ahead = None
        elif prefetch is not None:
            clusters, ahead = pred.select_ahead(layer, h, nxt)   # the predictor once a layer: both answers
        else:
            clusters = pred.select(layer, h)
        ptrs = self.source.ptrs(layer, clusters)
        if prefetch is not None and pred is not None:
            prefetch(nxt, ahead)              # read while this layer computes (its slots are locked)
        if self._orig is not None and len(ptrs) > 1:
            order = self._all_order[layer] if clusters is None else np.argsort(self._orig[layer][clusters], kind="stable")
            ptrs = ptrs[order]
        if len(ptrs):
            self.ops.ffn_bundles(ptrs, self.info.layouts[layer], h, self.act, out)
        if prefetch is not None and pred is None:
            prefetch(nxt, None)
        self.clusters_used += len(ptrs)
        self.clusters_total += self.info.n_clusters
        return out

    def compiled_step(self):
        """The compiled FFN step a whole forward pass can run (powerlow.steps.LayerLoop), or None (no compiled
        form, or an observer that must see each layer)."""
        return None if self.observer is not None else self._compiled()

    def begin_pass(self) -> None:
        if self._first:
            self._first = False
            self.source.first_pass()

    def _compiled(self):
        if not self.compiled or self.router is not None:
            return None
        if self._step_pred is not self.predictor:
            self._step_pred, self._step = self.predictor, self._make_step(self.predictor)
        return self._step

    def _make_step(self, pred):
        """The steps.* object for this mode and cluster source: DenseStep over the dense window, AllStep over a
        resident store in dense mode, SparseStep over the predictor's compiled rule; None where the ops (the
        numpy reference), the source or the predictor have no compiled form."""
        if not steps.available(self.ops):
            return None
        if self._pieces is not None:
            return steps.DenseStep(self.info.layouts, self.act, self._pieces, self.source.core)
        src = getattr(self.source, "step_source", lambda: None)()
        if src is None:
            return None
        if pred is None:
            if self.mode != "dense" or "resident" not in src:
                return None
            order = self._all_order
            ptrs = src["resident"] if order is None else [p[o] for p, o in zip(src["resident"], order)]
            return steps.AllStep(self.info.layouts, self.act, ptrs)
        jobs = getattr(pred, "step_jobs", lambda: None)()
        if jobs is None:
            return None
        return steps.SparseStep(jobs[0], jobs[1], self.info.layouts, self.act, order=self._all_order, **src)

    def _forward_moe(self, layer: int, h: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out += the layer's routed experts (and shared expert): groups of experts in as few kernel calls as the
        cluster source holds bundles for (one, but for a prefill chunk needing more experts than an offloaded
        cache's free slots); the calls go in expert order, so the sums are those of one call."""
        r = self.router
        experts, gs, tok, wt = r.route(layer, h)
        cap = getattr(self.source, "bundles_per_call", None)
        per = len(experts) if cap is None else max(1, cap() // r.cpe)
        lay = self.info.layouts[layer]
        for g0 in range(0, len(experts), per):
            g1 = min(len(experts), g0 + per)
            ptrs = self.source.ptrs(layer, r.clusters(experts[g0:g1]))
            if g1 == len(experts) and self._lookahead:
                nxt = (layer + 1) % self.n_layers     # read while this layer computes (its slots are locked)
                self._prefetch(nxt, r.lookahead(nxt, h))
            j0, j1 = int(gs[g0]), int(gs[g1])
            self.ops.moe_ffn(ptrs, lay, h, self.act, out, gs[g0:g1 + 1] - gs[g0], tok[j0:j1], wt[j0:j1], r.cpe)
        if self.shared is not None:
            self.shared[layer].add(h, out, self.ops)
        self.clusters_used += len(experts) * r.cpe
        self.clusters_total += self.info.n_clusters
        return out

    def accumulate(self, layer: int, h: np.ndarray, x: np.ndarray) -> None:
        """x += FFN(h) in place: what the engine calls per layer."""
        self.forward(layer, h, out=x)
