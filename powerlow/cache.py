"""The segmented neuron cache: the cluster source of an offloaded run (a memory budget smaller than the model).

One aligned arena of bundle *slots* (``stride`` bytes each) holds, as powerlow.plan decided:
  hot      clusters pinned for the whole run (read once at start)
  dynamic  cold clusters read for earlier tokens, kept until the eviction policy (lru | lfu | fifo) drops them
  staging  the slots the I/O threads read into: the layer being computed and the layers read ahead
Dynamic and staging slots are one pool; the plan sizes it. Per slot (numpy arrays, so lookups are vectorized):
  key       layer * n_clusters + cluster held, or -1
  state     FREE | LOADING | READY
  lock      == epoch while the slot is part of the last ptrs() answer (not evictable)
  pending   read ahead and not used yet (read-ahead may not evict it; a demand miss may)
  fresh     read from storage and not used yet (its first use counts as a miss, later ones as hits)

SparseFFN calls, per layer l: ptrs(l, clusters) -> addresses (misses are read now, at top priority; gate mode
without a profile also queues the next layers) ... compute ... prefetch(l + 1, predicted clusters | None).
Dense mode (plan.stream_window) goes another way: stream_begin(order) once, then stream_piece(l, i0, i1) per
piece of a layer: the staging slots are a window the unpinned bundles of all layers stream through in use
order, each read as soon as the slot's previous bundle has been computed. Reads run in
powerlow.io.BundleReader threads while the compute thread works.
Addresses are returned in the order of ``clusters`` (sorted ids), as the resident store does, so the
kernels sum the bundles in the same order and the offloaded run gives the resident run's tokens.
"""
from __future__ import annotations

import sys
import time
from functools import partial

import numpy as np

from . import integrity
from .errors import PowerlowError
from .io import BundleReader, aligned_buffer, drop_page_cache
from .plan import make_plan
from .util import release_free_heap

FREE, LOADING, READY = 0, 1, 2


class OffloadedStore:
    """Cluster source with a byte budget: pinned hot clusters, a dynamic cache, reads in a background pool."""

    def __init__(self, tf):
        rt = tf.runtime
        self.info = info = tf.store_info
        # the engine made the plan before loading (and capped the KV cache at plan.context); tests may hand
        # a bare namespace instead of a Transformer
        self.plan = plan = getattr(tf, "plan", None) or make_plan(tf.dir, tf.manifest, rt)
        # resident.safetensors was read through the page cache when the engine loaded it; let it go. The load
        # also leaves freed blocks in malloc's heap (measured: 104 MiB on the 2 GB model); hand them back
        drop_page_cache(tf.dir / "resident.safetensors")
        release_free_heap()
        self._trimmed = False
        # a slot holds a bundle of any layer (stride: the largest layer's); a read fills a slot's first
        # _lstride[l] bytes (a GGUF quant mix stores some layers' down in a bigger format: powerlow.store)
        self.L, self.N, self.stride = info.n_layers, info.n_clusters, info.layout.stride
        self._lstride = [lay.stride for lay in info.layouts]
        self.dense = getattr(tf, "predictor", None) is None and rt.mode == "dense"
        self.policy = rt.cache_policy
        self.depth = plan.prefetch_depth
        self.block = max(self.stride, rt.io_block_bytes // self.stride * self.stride)
        # a bundle's first read in this run (every read with POWERLOW_CHECKSUMS=every) is checked against its
        # CRC32C in the reader thread (None: no checksums stored)
        self.sums = integrity.run_sums(tf.dir)
        if self.sums is not None:
            integrity.check_layout(self.sums, info, tf.dir / "ffn.bin")
        self._check_every = integrity.every_read()
        self._verified = np.zeros((info.n_layers, info.n_clusters), dtype=bool)
        n = plan.n_slots
        self.arena = aligned_buffer(n * self.stride)          # hot + dynamic + staging, exactly
        self.base = self.arena.ctypes.data
        self._views = [memoryview(self.arena[i * self.stride:(i + 1) * self.stride]) for i in range(n)]
        self.slot_of = np.full((self.L, self.N), -1, dtype=np.int64)   # (layer, cluster) -> slot
        self.key = np.full(n, -1, dtype=np.int64)
        self.state = np.zeros(n, dtype=np.int8)
        self.lock = np.full(n, -1, dtype=np.int64)
        self.pending = np.zeros(n, dtype=bool)
        self.fresh = np.zeros(n, dtype=bool)
        self.pinned = np.zeros(n, dtype=bool)
        self.last_used = np.zeros(n, dtype=np.int64)
        self.loaded_at = np.zeros(n, dtype=np.int64)
        self.freq = np.zeros((self.L, self.N), dtype=np.int64)
        self._req: list = [None] * n
        self.epoch = 0
        self.tick = 0
        self.clock = getattr(tf, "io_clock", None)
        self.reader = BundleReader(tf.dir / "ffn.bin", depth=rt.queue_depth, o_direct=rt.o_direct, clock=self.clock)
        self.ring = getattr(tf, "ring", None)          # streamed attention / lm_head (powerlow.stream), or None
        # counters
        self.hits = self.misses = self.demand_misses = self.evictions = self.wasted = self.unpinned = 0
        self.passes = 0
        self.wait_seconds = 0.0
        self._load_hot()
        # a finished read needs the GIL to mark its slots ready; the default 5 ms switch interval can hold a
        # reader thread that long behind the compute thread's Python (measured on the planted-hotness model,
        # predict mode, 48 MB budget: 1.8-2.0 -> 3.1-4.8 tok/s with 0.5 ms, on a loaded machine)
        self._switch = sys.getswitchinterval()
        if plan.streams:
            sys.setswitchinterval(min(self._switch, 0.0005))

    # -- setup -------------------------------------------------------------------------------------
    def _load_hot(self) -> None:
        """Read the pinned clusters into the first slots (once, before the first token)."""
        slot = 0
        for l, ids in enumerate(self.plan.hot_clusters):
            k = len(ids)
            s = np.arange(slot, slot + k)
            self._assign(l, ids, s)
            self.pinned[s] = True
            slot += k
        for l, ids in enumerate(self.plan.hot_clusters):
            self._submit(l, ids, priority=0)
        self._wait(np.arange(slot))
        self.fresh[:] = False
        self.hot_load_bytes = self.reader.bytes_read

    def _assign(self, layer: int, clusters: np.ndarray, slots: np.ndarray) -> None:
        old = self.key[slots]
        had = old >= 0
        if had.any():
            ok = old[had]
            self.slot_of.reshape(-1)[ok] = -1
            self.evictions += int(had.sum())
            self.wasted += int((self.fresh[slots] & had).sum())
        self.key[slots] = layer * self.N + clusters
        self.slot_of[layer, clusters] = slots
        self.state[slots] = LOADING
        self.fresh[slots] = True
        self.loaded_at[slots] = self.tick

    def _submit(self, layer: int, clusters: np.ndarray, *, priority: int) -> None:
        """Queue reads of the (sorted) clusters of one layer, merging runs of adjacent bundles."""
        if not len(clusters):
            return
        per = self.block // self.stride
        slots = self.slot_of[layer, clusters]
        breaks = np.flatnonzero(np.diff(clusters) != 1) + 1
        for run_c, run_s in zip(np.split(clusters, breaks), np.split(slots, breaks)):
            for i in range(0, len(run_c), per):
                cs, ss = run_c[i:i + per], run_s[i:i + per]
                off = self.info.bundle_offset(layer, int(cs[0]))
                req = self.reader.submit(off, [self._views[s][:self._lstride[layer]] for s in ss], priority=priority,
                                         on_done=self._on_done, tag=ss, check=self._checker(layer, cs, ss))
                for s in ss:
                    self._req[s] = req

    def _checker(self, layer: int, clusters: np.ndarray, slots: np.ndarray):
        """The check of one read (run in the I/O thread): the CRC32C of its buffers that hold a bundle not yet
        checked in this run (every one with POWERLOW_CHECKSUMS=every) against the stored ones."""
        if self.sums is None:
            return None
        clusters = np.asarray(clusters)
        pos = np.arange(len(clusters)) if self._check_every else np.flatnonzero(~self._verified[layer, clusters])
        if not len(pos):
            return None
        cl = clusters[pos]
        check = partial(integrity.check_buffers, self.reader.path, self.info, layer, cl.tolist(),
                        self.sums.bundles[layer][cl].tolist(), pos.tolist())

        def run(req):
            err = check(req)
            if err is None:
                self._verified[layer, cl] = True
            return err
        return run

    def _on_done(self, req) -> None:      # I/O thread: data is in place
        self.state[req.tag] = READY

    def _wait(self, slots: np.ndarray) -> None:
        waiting = slots[self.state[slots] != READY]
        if not len(waiting):
            return
        self._wait_reqs(self._req[s] for s in waiting)

    def _wait_reqs(self, reqs) -> None:
        """Wait for each distinct read of ``reqs`` (the compute thread's wait is counted)."""
        t = time.perf_counter()
        seen = set()
        for req in reqs:
            if id(req) not in seen:
                seen.add(id(req))
                req.wait()
        self.wait_seconds += time.perf_counter() - t

    # -- slots -------------------------------------------------------------------------------------
    def _take(self, k: int, *, demand: bool, protect: np.ndarray) -> np.ndarray:
        """Up to ``k`` slots to read into (free first, then evicted by the policy); ``protect`` stays."""
        ok = ~self.pinned & (self.lock != self.epoch) & (self.state != LOADING)
        ok[protect] = False
        if not demand:
            ok &= ~self.pending
        cand = np.flatnonzero(ok)
        if len(cand) <= k:
            return cand
        if self.policy == "lru":
            score = self.last_used[cand]
        elif self.policy == "fifo":
            score = self.loaded_at[cand]
        else:   # lfu: how often the held cluster was asked for over the run; ties -> least recent
            keys = self.key[cand]
            f = np.where(keys >= 0, self.freq.reshape(-1)[np.maximum(keys, 0)], 0)
            score = f * (1 << 32) + self.last_used[cand]
        score = np.where(self.key[cand] < 0, -1, score)      # empty slots first
        return cand[np.argpartition(score, k - 1)[:k]]

    def _fetch(self, layer: int, clusters: np.ndarray, *, demand: bool, priority: int) -> bool:
        """Start reading the clusters of ``layer`` that are not cached; False if slots ran out."""
        have = self.slot_of[layer, clusters]
        missing = clusters[have < 0]
        if not len(missing):
            return True
        slots = self._take(len(missing), demand=demand, protect=have[have >= 0])
        if len(slots) < len(missing) and demand:
            # slots still being read ahead: let those reads land, then they can be evicted
            busy = np.flatnonzero((self.state == LOADING) & (self.lock != self.epoch) & ~self.pinned)
            self._wait(busy)
            slots = self._take(len(missing), demand=demand, protect=have[have >= 0])
        if len(slots) < len(missing) and demand:
            # a layer asking for more clusters than the unpinned pool holds: borrow pinned slots of other
            # layers (they stop being hot; counted in "unpinned"). The plan keeps all slots >= one layer.
            short = len(missing) - len(slots)
            spare = np.flatnonzero(self.pinned & (self.lock != self.epoch) & (self.key // self.N != layer))[:short]
            self.pinned[spare] = False
            self.unpinned += len(spare)
            slots = self._take(len(missing), demand=demand, protect=have[have >= 0])
        if len(slots) < len(missing):
            if demand:
                raise PowerlowError(f"layer {layer} needs {len(missing)} bundle slots, only {len(slots)} are free; "
                                    "raise --budget or lower prefetch_depth")
            short = True
            missing = missing[: len(slots)]
        else:
            short = False
        self._assign(layer, missing, slots)
        self.pending[slots] = not demand
        self._submit(layer, missing, priority=priority)
        return not short

    def _read_ahead(self, layer: int) -> None:
        """Dense mode: keep the reads of the next ``depth`` layers queued (every cluster of a layer is needed)."""
        allc = np.arange(self.N)
        for d in range(1, max(1, self.depth) + 1):        # depth 0: as much of the next layer as fits
            nxt = (layer + d) % self.L
            if not self._fetch(nxt, allc, demand=False, priority=d):
                break

    # -- the cluster-source interface --------------------------------------------------------------
    def ptrs(self, layer: int, clusters: np.ndarray | None) -> np.ndarray:
        """uint64 addresses of the bundles of ``clusters`` (None = all) of ``layer``, valid until the next call."""
        self.epoch += 1                      # releases the last answer's slots
        self.tick += 1
        if layer == 0:
            self.passes += 1
            if not self._trimmed:            # once more after the predictor and the first KV allocation
                self._trimmed = True
                release_free_heap()
        cl = np.arange(self.N) if clusters is None else np.asarray(clusters, dtype=np.int64)
        self._fetch(layer, cl, demand=True, priority=0)
        slots = self.slot_of[layer, cl]
        self.lock[slots] = self.epoch
        if self.dense:
            self._read_ahead(layer)
        self._wait(slots)
        fresh = self.fresh[slots]
        n_fresh = int(fresh.sum())
        self.misses += n_fresh
        self.demand_misses += int((fresh & ~self.pending[slots]).sum())
        self.hits += len(slots) - n_fresh
        self.fresh[slots] = False
        self.pending[slots] = False
        self.last_used[slots] = self.tick
        self.freq[layer, cl] += 1
        return (self.base + slots.astype(np.uint64) * np.uint64(self.stride)).astype(np.uint64)

    # -- dense mode: the unpinned bundles stream through the staging window in use order ------------
    def stream_begin(self, seq: list[np.ndarray]) -> None:
        """``seq[l]``: every cluster id of layer l in the order the FFN computes them (powerlow.ffn). The
        unpinned ones form one cyclic stream over the layers (and tokens); item g goes to window slot g mod W,
        read once item g - W has been used. Reads merge runs of adjacent bundles up to io_block_bytes."""
        stage = np.flatnonzero(~self.pinned)
        if not len(stage):
            raise PowerlowError("internal: a streamed dense plan without staging slots")
        self._win = stage                                  # window slots, in order
        seq = [np.asarray(q, np.int64) for q in seq]
        pinned_of = [self.slot_of[l, q] >= 0 for l, q in enumerate(seq)]   # hot: already in place
        items = [q[~p] for q, p in zip(seq, pinned_of)]
        # per layer: the seq positions of the streamed items, and how many come before position i
        self._free_pos = [np.flatnonzero(~p) for p in pinned_of]
        self._before = [np.concatenate([[0], np.cumsum(~p)]).astype(np.int64) for p in pinned_of]
        sizes = [len(it) for it in items]
        self._layer_base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)   # a layer's first item
        self._cycle = int(self._layer_base[-1])
        self._flat_layer = np.repeat(np.arange(self.L), sizes)
        self._flat_id = np.concatenate(items) if self._cycle else np.zeros(0, np.int64)
        self._addr = [np.zeros(len(q), np.uint64) for q in seq]      # per layer, in seq order
        for l, (q, p) in enumerate(zip(seq, pinned_of)):
            self._addr[l][p] = (self.base + self.slot_of[l, q[p]].astype(np.uint64) * np.uint64(self.stride))
        self._item_req = [None] * len(stage)               # window slot index -> its read
        self._issued = self._used = self._next = 0         # stream positions (they only grow)
        if self._cycle:
            self._issue()

    def _issue(self) -> None:
        """Queue reads for the stream positions the window has room for."""
        W = len(self._win)
        end = self._used + W
        per = self.block // self.stride
        while self._issued < end:
            g0 = self._issued
            c0 = g0 % self._cycle
            l = int(self._flat_layer[c0])
            stop = min(end, g0 + per, g0 + int(self._layer_base[l + 1]) - c0)   # one layer, one block at most
            ids = self._flat_id[c0: c0 + (stop - g0)]
            run = 1
            while run < len(ids) and ids[run] == ids[run - 1] + 1:
                run += 1                                   # a read is one contiguous file range
            ids = ids[:run]
            wi = np.arange(g0, g0 + run) % W
            slots = self._win[wi]
            req = self.reader.submit(self.info.bundle_offset(l, int(ids[0])), [self._views[s][:self._lstride[l]] for s in slots],
                                     priority=0, tag=None, check=self._checker(l, ids, slots))
            for w in wi:
                self._item_req[w] = req
            self._issued += run

    def stream_piece(self, layer: int, i0: int, i1: int) -> np.ndarray:
        """Addresses (uint64) of seq[layer][i0:i1], once they are in memory. Calling it says the previous
        piece is computed: its window slots are read into next. Pieces must come in order; anything else
        (an interrupted pass) drains the reads and restarts the stream at the piece asked for."""
        before = self._before[layer]
        f0, f1 = int(before[i0]), int(before[i1])          # the piece's streamed items, counted in the layer
        n = f1 - f0
        if layer == 0 and i0 == 0:
            self.passes += 1
            if not self._trimmed:
                self._trimmed = True
                release_free_heap()
        addr = self._addr[layer]
        self.hits += (i1 - i0) - n
        if not self._cycle:
            return addr[i0:i1]
        pos = int(self._layer_base[layer]) + f0              # where the piece starts in the cycle
        g = self._next
        if pos != g % self._cycle:
            self._drain()
            g = g - g % self._cycle + self._cycle + pos
            self._issued = g
        self._used = g                                       # everything before is computed: slots free
        self._issue()
        self._next = g + n
        if n:
            W = len(self._win)
            wi = np.arange(g, g + n) % W
            self._wait_reqs(self._item_req[w] for w in wi)
            addr[self._free_pos[layer][f0:f1]] = self.base + self._win[wi].astype(np.uint64) * np.uint64(self.stride)
            self.misses += n
        return addr[i0:i1]

    def _drain(self) -> None:
        for req in self._item_req:
            if req is not None:
                req.event.wait()
        self._item_req = [None] * len(self._win)

    def prefetch(self, layer: int, clusters: np.ndarray | None) -> None:
        """Start reading what ``layer`` will probably need (called while the previous layer finishes)."""
        if clusters is None:
            if self.dense:
                self._read_ahead(layer - 1)
            else:
                self._fetch(layer, np.arange(self.N), demand=False, priority=1)
            return
        self._fetch(layer, np.unique(np.asarray(clusters, dtype=np.int64)), demand=False, priority=1)

    def bundles_per_call(self) -> int:
        """Most bundles one ptrs() call should ask for: the unpinned slots (a MoE prefill chunk asks expert group by
        group within this, so it never unpins hot experts)."""
        return int((~self.pinned).sum())

    def pinned_ptrs(self, layer: int) -> np.ndarray:
        """Addresses of layer's pinned bundles, by cluster id (what the self-drafter computes; never evicted)."""
        slots = np.flatnonzero(self.pinned & (self.key // self.N == layer) & (self.key >= 0))
        slots = slots[np.argsort(self.key[slots] % self.N, kind="stable")]
        return (self.base + slots.astype(np.uint64) * np.uint64(self.stride)).astype(np.uint64)

    def counters(self) -> dict:
        used = self.hits + self.misses
        passes = max(1, self.passes)
        streamed = self.reader.bytes_read - self.hot_load_bytes
        busy = self.reader.busy_seconds
        ring = self.ring
        dense_read = ring.reader.bytes_read if ring is not None else 0
        return {
            "read_bytes_per_token": int((streamed + dense_read) / passes),
            "ffn_read_bytes_per_token": int(streamed / passes),
            "dense_read_bytes_per_token": int(dense_read / passes),
            "ring_wait_s": round(ring.wait_seconds, 3) if ring is not None else 0.0,
            "cache_hit_rate": round(self.hits / used, 4) if used else 1.0,
            "hits": self.hits, "misses": self.misses, "demand_misses": self.demand_misses,
            "bytes_read": streamed, "evictions": self.evictions, "prefetch_wasted": self.wasted, "unpinned": self.unpinned,
            "io_requests": self.reader.requests, "io_busy_s": round(busy, 3),
            "io_gbps": round(self.reader.bytes_read / busy / 1e9, 3) if busy > 0 else 0.0,
            # FFN bundles and streamed attention/lm_head together, over the time either had a read in flight
            "io_all_bytes": self.reader.bytes_read + dense_read,
            "io_all_busy_s": round(self.clock.seconds, 3) if self.clock is not None else round(busy, 3),
            "io_wait_s": round(self.wait_seconds, 3), "o_direct": self.reader.direct,
            "read_block_bytes": self.block, "queue_depth": self.reader.depth,
            "forward_passes": self.passes, "hot_load_bytes": self.hot_load_bytes,
            "cache_arena_bytes": int(self.arena.nbytes), **{f"plan_{k}": v for k, v in self.plan.as_dict().items()
                                                            if k not in ("resident", "hot_per_layer")},
        }

    def close(self) -> None:
        self.reader.close()
        sys.setswitchinterval(self._switch)
