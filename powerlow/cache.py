"""The segmented neuron cache: the cluster source of an offloaded run (a memory budget smaller than the model).

One aligned arena of bundle *slots* (``stride`` bytes each) holds, as powerlow.plan decided:
  hot      clusters pinned for the whole run (read once at start)
  dynamic  cold clusters read for earlier tokens, kept until the eviction policy (lru | lfu | fifo) drops them
  staging  the slots the I/O threads read into: the layer being computed and the layers read ahead
Dynamic and staging slots are one pool; the plan sizes it. The slot table, the request queue and the reader
threads are C (cython_ext/plk_io.c, powerlow._iocore.SlotCore): the readers never take the GIL, and a layer costs
Python one ``fetch`` call, or none (powerlow.steps calls the core from C). Per slot (numpy arrays the core works on, so rare bookkeeping reads them here):
  key       layer * n_clusters + cluster held, or -1
  state     FREE | LOADING | READY | FAILED (written by the reader threads)
  lock      == epoch while the slot is part of the last ptrs() answer (not evictable)
  pending   read ahead and not used yet (read-ahead may not evict it; a demand miss may)
  fresh     read from storage and not used yet (its first use counts as a miss, later ones as hits)

SparseFFN calls, per layer l: ptrs(l, clusters) -> addresses (misses are read now, at top priority; dense mode
also queues the next layers) ... compute ... prefetch(l + 1, predicted clusters | None).
Dense mode (plan.stream_window) goes another way: stream_begin(order) once, then stream_piece(l, i0, i1) per
piece of a layer: the staging slots are a window the unpinned bundles of all layers stream through in use
order, each read as soon as the slot's previous bundle has been computed (the window runs in the core:
plk_io_stream_begin / plk_io_stream_piece).
Addresses are returned in the order of ``clusters`` (sorted ids), as the resident store does, so the
kernels sum the bundles in the same order and the offloaded run gives the resident run's tokens.
"""
from __future__ import annotations

import os

import numpy as np

from . import integrity
from .errors import PowerlowError, extension
from .io import aligned_buffer, drop_page_cache, open_direct
from .util import release_free_heap

_io = extension("_iocore")
ERR_CRC, ERR_EOF, ERR_IO, ERR_SLOTS, SlotCore = _io.ERR_CRC, _io.ERR_EOF, _io.ERR_IO, _io.ERR_SLOTS, _io.SlotCore


class OffloadedStore:
    """Cluster source with a byte budget: pinned hot clusters, a dynamic cache, reads in a background pool.

    ``model_dir``: ffn.bin's dir; ``info``: its StoreInfo; ``plan``: powerlow.plan.Plan of the budget;
    ``runtime``: the RuntimeConfig (mode, cache_policy, queue_depth, o_direct, io_block_bytes); ``clock``: an
    _iocore.Clock shared with the weight ring (io_all_busy_s); ``ring``: that ring, for its counters."""

    def __init__(self, model_dir, info, plan, runtime, *, clock=None, ring=None):
        rt = runtime
        self.info, self.plan = info, plan
        self.path = model_dir / "ffn.bin"
        # resident.safetensors was read through the page cache when the engine loaded it; let it go. The load
        # also leaves freed blocks in malloc's heap (measured: 104 MiB on the 2 GB model); hand them back
        drop_page_cache(model_dir / "resident.safetensors")
        release_free_heap()
        self._trimmed = False
        # a slot holds a bundle of any layer (stride: the largest layer's); a read fills a slot's first
        # _lstride[l] bytes (a GGUF quant mix stores some layers' down in a bigger format: powerlow.store)
        self.L, self.N, self.stride = info.n_layers, info.n_clusters, info.layout.stride
        self._lstride = np.array([lay.stride for lay in info.layouts], np.int64)
        self.dense = rt.mode == "dense"
        self.policy = rt.cache_policy
        self.depth = plan.prefetch_depth
        self.block = max(self.stride, rt.io_block_bytes // self.stride * self.stride)
        # a bundle's first read in this run (every read with POWERLOW_CHECKSUMS=every) is checked against its
        # CRC32C in the reader thread (None: no checksums stored)
        sums = integrity.run_sums(model_dir)
        if sums is not None:
            integrity.check_layout(sums, info, self.path)
        n = plan.n_slots
        self.arena = aligned_buffer(n * self.stride)          # hot + dynamic + staging, exactly
        self.base = self.arena.ctypes.data
        LN = self.L * self.N
        self.t = t = {"slot_of": np.full(LN, -1, np.int32), "freq": np.zeros(LN, np.int64),
                      "verified": np.zeros(LN, np.uint8), "key": np.full(n, -1, np.int32),
                      "state": np.zeros(n, np.int8), "lock": np.full(n, -1, np.int64), "pending": np.zeros(n, np.uint8),
                      "fresh": np.zeros(n, np.uint8), "pinned": np.zeros(n, np.uint8),
                      "last_used": np.zeros(n, np.int64), "loaded_at": np.zeros(n, np.int64)}
        self.key, self.pinned = t["key"], t["pinned"]
        self.fd, self.direct = open_direct(self.path, rt.o_direct)
        size = os.fstat(self.fd).st_size
        if size != info.total_bytes:
            os.close(self.fd)
            raise PowerlowError(f"{self.path}: {size} bytes, the manifest's store has {info.total_bytes} (a read "
                                "would go past the end of the file or miss its bundles); re-convert the model")
        self.clock = clock
        self.ring = ring                  # streamed attention / lm_head (powerlow.stream), or None
        self.core = SlotCore(self.fd, self.direct, self.arena, self.stride, self.L, self.N,
                             np.array(info.layer_offsets, np.int64), self._lstride, self.block // self.stride,
                             rt.queue_depth, self.policy,
                             None if sums is None else np.concatenate(sums.bundles).astype(np.uint32),
                             integrity.every_read(), clock, t)
        self._out = np.zeros(self.N, np.uint64)
        self._all = np.arange(self.N, dtype=np.int32)
        self._load_hot()

    @property
    def passes(self) -> int:
        """Forward passes seen (layer 0 asked for)."""
        return self.core.stats()["passes"]

    # -- setup -------------------------------------------------------------------------------------
    def _load_hot(self) -> None:
        """Read the pinned clusters into the first slots (once, before the first token)."""
        for l, ids in enumerate(self.plan.hot_clusters):
            if len(ids) and self.core.pin(l, np.ascontiguousarray(ids, np.int32)) < 0:
                raise PowerlowError("internal: the plan's hot clusters do not fit its slots")
        if self.core.wait_all() < 0:
            self.raise_error()
        self.t["fresh"][:] = 0
        self.hot_load_bytes = self.core.stats()["bytes_read"]

    def raise_error(self):
        """Raise the PowerlowError of the core's failure (after a call answered -1)."""
        kind, layer, cluster, err_no, offset, nbytes = self.core.error()
        if kind == ERR_CRC:
            raise PowerlowError(integrity.bundle_error(self.path, layer, cluster, offset))
        if kind == ERR_IO:
            raise PowerlowError(f"{self.path}: read of {nbytes} bytes at {offset} failed ({os.strerror(err_no)}); "
                                "check the disk")
        if kind == ERR_EOF:
            raise PowerlowError(f"{self.path}: read of {nbytes} bytes at {offset} is past the end of the file; "
                                "re-convert the model")
        if kind == ERR_SLOTS:
            raise PowerlowError(f"layer {layer} needs {cluster} bundle slots, only {nbytes} are free; "
                                "raise --budget or lower prefetch_depth")
        raise PowerlowError(f"internal: the streaming core refused a request of layer {layer} (error {kind})")

    # -- the cluster-source interface --------------------------------------------------------------
    def ptrs(self, layer: int, clusters: np.ndarray | None) -> np.ndarray:
        """uint64 addresses of the bundles of ``clusters`` (None = all; sorted ids) of ``layer``, valid until the
        next call."""
        if layer == 0:
            self.first_pass()
        ids = self._all if clusters is None else np.ascontiguousarray(clusters, np.int32)
        out = self._out if len(ids) <= len(self._out) else np.zeros(len(ids), np.uint64)
        if self.core.fetch(layer, ids, out, self.dense, self.depth) < 0:
            self.raise_error()
        return out[:len(ids)].copy()

    def first_pass(self) -> None:
        """Called as the first forward pass begins: the heap is trimmed once more, after the predictor and the
        first KV allocation."""
        if not self._trimmed:
            self._trimmed = True
            release_free_heap()

    def step_source(self) -> dict:
        """What steps.SparseStep reads bundles through: this core (fetch and prefetch in C, per layer)."""
        return None if self.dense else {"core": self.core, "depth": self.depth}

    def prefetch(self, layer: int, clusters: np.ndarray | None) -> None:
        """Start reading what ``layer`` will probably need (called while the previous layer finishes)."""
        if clusters is None:
            if self.dense:                  # the layers after the one computed: read ahead in ptrs(), as there
                for d in range(max(1, self.depth)):
                    if self.core.prefetch((layer + d) % self.L, self._all, d + 1) < 1:
                        break
            else:
                self.core.prefetch(layer, self._all, 1)
            return
        ids = np.ascontiguousarray(clusters, np.int32)
        if self.core.prefetch(layer, ids, 1) < 0:        # not increasing (a guess may repeat ids): sort them
            self.core.error()
            self.core.prefetch(layer, np.unique(ids), 1)

    # -- dense mode: the unpinned bundles stream through the staging window in use order ------------
    def stream_begin(self, seq: list[np.ndarray]) -> None:
        """``seq[l]``: every cluster id of layer l in the order the FFN computes them (powerlow.ffn). The
        unpinned ones form one cyclic stream over the layers (and tokens); item g goes to window slot g mod W,
        read once item g - W has been used. Reads merge runs of adjacent bundles up to io_block_bytes. The window
        runs in the core (plk_io_stream_*); these are its tables."""
        stage = np.flatnonzero(self.pinned == 0).astype(np.int32)
        if not len(stage):
            raise PowerlowError("internal: a streamed dense plan without staging slots")
        L, N = self.L, self.N
        slot_of = self.t["slot_of"].reshape(L, N)
        seq = [np.asarray(q, np.int64) for q in seq]
        if any(len(q) != N for q in seq):
            raise PowerlowError(f"internal: a dense stream order must hold each layer's {N} clusters")
        pinned_of = [slot_of[l, q] >= 0 for l, q in enumerate(seq)]   # hot: already in place
        items = [q[~p] for q, p in zip(seq, pinned_of)]
        sizes = [len(it) for it in items]
        free_pos = np.zeros((L, N), np.int32)        # per layer: the seq positions of the streamed items
        before = np.zeros((L, N + 1), np.int64)      # per layer: how many streamed items come before position i
        addr = np.zeros((L, N), np.uint64)           # per layer, in seq order (the pinned ones in place)
        for l, (q, p) in enumerate(zip(seq, pinned_of)):
            fp = np.flatnonzero(~p)
            free_pos[l, :len(fp)] = fp
            before[l, 1:] = np.cumsum(~p)
            addr[l, p] = self.base + slot_of[l, q[p]].astype(np.uint64) * np.uint64(self.stride)
        layer_base = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)    # a layer's first item
        item_layer = np.repeat(np.arange(L, dtype=np.int32), sizes)
        item_id = (np.concatenate(items) if layer_base[-1] else np.zeros(0, np.int64)).astype(np.int32)
        self.core.stream_begin(stage, item_layer, item_id, layer_base, before.reshape(-1), free_pos.reshape(-1),
                               addr.reshape(-1))

    def stream_piece(self, layer: int, i0: int, i1: int) -> np.ndarray:
        """Addresses (uint64) of seq[layer][i0:i1], once they are in memory. Calling it says the previous
        piece is computed: its window slots are read into next. Pieces must come in order; anything else
        (an interrupted pass) drains the reads and restarts the stream at the piece asked for."""
        a = self.core.stream_piece(layer, i0, i1)
        if a is None:
            self.raise_error()
        return a

    def bundles_per_call(self) -> int:
        """Most bundles one ptrs() call should ask for: the unpinned slots (a MoE prefill chunk asks expert group by
        group within this, so it never unpins hot experts)."""
        return int((self.pinned == 0).sum())

    def pinned_ptrs(self, layer: int) -> np.ndarray:
        """Addresses of layer's pinned bundles, by cluster id (what the self-drafter computes; never evicted)."""
        slots = np.flatnonzero((self.pinned != 0) & (self.key // self.N == layer) & (self.key >= 0))
        slots = slots[np.argsort(self.key[slots] % self.N, kind="stable")]
        return (self.base + slots.astype(np.uint64) * np.uint64(self.stride)).astype(np.uint64)

    def counters(self) -> dict:
        st = self.core.stats()
        hits, misses = st["hits"], st["misses"]
        used = hits + misses
        passes = max(1, st["passes"])
        streamed = st["bytes_read"] - self.hot_load_bytes
        busy = st["busy_seconds"]
        ring = self.ring
        dense_read = ring.reader.bytes_read if ring is not None else 0
        return {
            "read_bytes_per_token": int((streamed + dense_read) / passes),
            "ffn_read_bytes_per_token": int(streamed / passes),
            "dense_read_bytes_per_token": int(dense_read / passes),
            "ring_wait_s": round(ring.wait_seconds, 3) if ring is not None else 0.0,
            "cache_hit_rate": round(hits / used, 4) if used else 1.0,
            "hits": hits, "misses": misses, "demand_misses": st["demand_misses"],
            "bytes_read": streamed, "evictions": st["evictions"], "prefetch_wasted": st["wasted"],
            "unpinned": st["unpinned"], "bundle_checks": st["checks"], "io_requests": st["requests"], "io_busy_s": round(busy, 3),
            "io_gbps": round(st["bytes_read"] / busy / 1e9, 3) if busy > 0 else 0.0,
            # FFN bundles and streamed attention/lm_head together, over the time either had a read in flight
            "io_all_bytes": st["bytes_read"] + dense_read,
            "io_all_busy_s": round(self.clock.seconds, 3) if self.clock is not None else round(busy, 3),
            "io_wait_s": round(st["wait_seconds"], 3), "o_direct": self.direct,
            "read_block_bytes": self.block, "queue_depth": self.core.n_threads,
            "forward_passes": st["passes"], "hot_load_bytes": self.hot_load_bytes,
            "cache_arena_bytes": int(self.arena.nbytes), **{f"plan_{k}": v for k, v in self.plan.as_dict().items()
                                                            if k not in ("resident", "hot_per_layer")},
        }

    def close(self) -> None:
        if getattr(self, "core", None) is not None:
            self.core.close()
            self.core = None
            os.close(self.fd)

    __del__ = close      # dropped unclosed: the threads stop (each finishing its read) before the fd closes
