"""How one memory budget is spent: resident | hot | dynamic | I/O staging (`powerlow run --plan`).

    plan = make_plan(model_dir, manifest, runtime)     # raises BudgetTooSmall (.minimum) if the budget is too small
    print(plan.render())

Segments (bytes, exact where the run allocates them, estimated where numpy does):
  resident  resident.safetensors tensors (embeddings, attention, norms, lm_head; exact), predictors
            (predict mode: their file's tensors), the KV cache at ``context`` positions (exact: the run's
            KVCache never grows past it), scratch (activations of a 64-token prefill; an estimate)
  hot       bundles pinned for the whole run, chosen from profile.safetensors (most activations per byte
            across all layers), else the first clusters of each layer (hot-first once profiled)
  dynamic   recently read cold bundles, evicted by ``cache_policy``
  staging   bundle slots the I/O threads read into. Dense mode: a window (stream_window_bytes) the unpinned
            bundles of all layers stream through in use order, each layer computed in pieces as they land
            (powerlow.ffn, powerlow.cache.stream_*). Other modes: the layer being computed and
            ``prefetch_depth`` layers ahead (density x clusters each; gate without a profile: whole layers)
Hot, dynamic and staging are slots of one aligned arena of ``stride``-byte bundles (powerlow.cache).

Attention and the lm_head are used by every token, so a byte of them resident saves a byte read per token, at
least as much as any FFN cluster: they are resident whenever the budget holds them with one layer of bundles.
Below that, they stream too (powerlow.stream): as many attention layers and lm_head row chunks as fit stay
pinned, the rest go through a ring of two unit-sized buffers read ahead in order. With a budget, token
embeddings are read a row per token instead of being held (they are the lm_head itself when tied).
The smallest budget: the fixed part (norms, KV cache, scratch, tokenizer, predictors) + the ring (if streaming)
+ one whole layer of bundles (the most a single layer can ask for).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import RuntimeConfig, format_size
from .errors import BudgetTooSmall, PowerlowError
from .sizes import (auto_context, kv_bytes_per_position, lowrank_predictor_bytes, predictor_density,
                    scratch_bytes, tokenizer_bytes, tokenizer_load_peak)
from .store import StoreInfo

def hotness(model_dir: Path, info: StoreInfo) -> np.ndarray | None:
    """Per-layer cluster activity (L, n_clusters) from profile.safetensors (`powerlow profile`), or None.

    Uses ``cluster_freq`` (L, nC: share of tokens on which a cluster had an active neuron); else ``freq``
    (L, F: per neuron, summed per cluster of C in stored order); else per-layer ``blk.{l}.*count*`` tensors.
    """
    p = model_dir / "profile.safetensors"
    if not p.exists():
        return None
    from safetensors import safe_open
    L, N, C, F = info.n_layers, info.n_clusters, info.cluster_size, info.n_neurons

    def per_cluster(a: np.ndarray) -> np.ndarray | None:
        a = np.asarray(a, dtype=np.float64).reshape(-1)
        if a.size == N:
            return a
        if a.size == F:
            pad = np.zeros(N * C)
            pad[:F] = a
            return pad.reshape(N, C).sum(1)
        return None

    with safe_open(str(p), "numpy") as f:
        keys = set(f.keys())
        for name in ("cluster_freq", "freq"):
            if name in keys:
                a = f.get_tensor(name)
                if a.ndim == 2 and a.shape[0] == L:
                    rows = [per_cluster(a[l]) for l in range(L)]
                    if all(r is not None for r in rows):
                        return np.stack(rows)
        out = np.full((L, N), np.nan)
        for k in sorted(keys):
            if k.startswith("blk.") and "count" in k:
                l = int(k.split(".")[1])
                c = per_cluster(f.get_tensor(k)) if 0 <= l < L else None
                if c is not None:
                    out[l] = c
    return None if np.isnan(out).any() else out


RING_SLOTS = 2


@dataclass
class DensePlan:
    """Where attention and the lm_head live (powerlow.stream); built by make_plan."""
    attn_resident: list[bool]             # per layer
    attn_bytes: list[int]                 # per layer (fused wqkv + wo, as laid out in memory)
    head_name: str                        # "output", or "token_embd" when tied
    head_chunk_bytes: int | None          # None: the lm_head is one unit; else row chunks of at most this
    head_resident: list[bool]             # per chunk
    head_bytes: list[int]                 # per chunk
    ring_slots: int
    ring_slot_bytes: int
    embed_on_demand: bool                 # token embeddings read per token (not held)

    @property
    def streams(self) -> bool:
        return self.ring_slots > 0

    @property
    def resident_bytes(self) -> int:
        return (sum(b for b, r in zip(self.attn_bytes, self.attn_resident) if r)
                + sum(b for b, r in zip(self.head_bytes, self.head_resident) if r))

    @property
    def streamed_bytes(self) -> int:
        """Attention + lm_head bytes read from storage per forward pass."""
        return (sum(b for b, r in zip(self.attn_bytes, self.attn_resident) if not r)
                + sum(b for b, r in zip(self.head_bytes, self.head_resident) if not r))


def dense_units(model_dir: Path, manifest: dict, chunk_bytes: int | None):
    """(attention units per layer, [(first row, lm_head unit)], head name, TensorFile) of a model dir."""
    from .stream import TensorFile, attention_unit, lm_head_units
    tensors = manifest["tensors"]
    tfile = TensorFile(model_dir / "resident.safetensors", check=True)
    try:
        attn = [attention_unit(tensors, tfile, l) for l in range(manifest["config"]["n_layers"])]
        head = "output" if "output" in tensors else "token_embd"
        heads = lm_head_units(tensors, tfile, head, chunk_bytes)
    except KeyError as e:
        tfile.close()
        raise PowerlowError(f"{model_dir}: the manifest lacks tensor {e}; re-convert the model") from None
    return attn, heads, head, tfile


@dataclass
class Plan:
    budget_bytes: int
    stride: int                           # bytes per bundle slot
    n_layers: int
    n_clusters: int                       # per layer
    context: int                          # KV cache positions
    resident: dict[str, int]              # segment part -> bytes
    hot_per_layer: list[int]              # pinned clusters per layer
    hot_clusters: list[np.ndarray]        # per layer: the pinned cluster ids
    n_dynamic: int                        # slots
    n_staging: int                        # slots
    prefetch_depth: int
    hot_fraction: float
    hot_source: str                       # "profile" | "cluster order" | "everything"
    notes: list[str] = field(default_factory=list)
    expected_read_bytes: int | None = None    # sparse modes: an estimate of the cold bundles read a token
    expected_basis: str = ""
    dense: DensePlan | None = None            # attention / lm_head / embeddings (None: all resident)
    stream_window: bool = False               # dense mode: staging is a window the unpinned bundles stream through
    layer_strides: tuple[int, ...] = ()       # a bundle's bytes on disk per layer (a GGUF quant mix: not all = stride)
    experts: tuple[int, int, int] | None = None   # a MoE model: (experts a layer, bundles an expert, chosen a token)

    @property
    def ffn_store_bytes(self) -> int:
        """ffn.bin's size: every layer's bundles at their own size (memory slots are all ``stride``)."""
        return self.n_clusters * (sum(self.layer_strides) if self.layer_strides else self.n_layers * self.stride)

    @property
    def hot_read_bytes(self) -> int:
        """The pinned clusters' bytes on disk (what they save a dense token in reads)."""
        if not self.layer_strides:
            return self.hot_bytes
        return sum(int(h) * s for h, s in zip(self.hot_per_layer, self.layer_strides))

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident.values())

    @property
    def n_hot(self) -> int:
        return int(sum(self.hot_per_layer))

    @property
    def n_slots(self) -> int:
        return self.n_hot + self.n_dynamic + self.n_staging

    @property
    def hot_bytes(self) -> int:
        return self.n_hot * self.stride

    @property
    def dynamic_bytes(self) -> int:
        return self.n_dynamic * self.stride

    @property
    def staging_bytes(self) -> int:
        return self.n_staging * self.stride

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.n_slots * self.stride

    @property
    def streams(self) -> bool:
        return self.n_hot < self.n_layers * self.n_clusters

    def as_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "resident_bytes": self.resident_bytes, "resident": dict(self.resident),
                "hot_bytes": self.hot_bytes, "dynamic_bytes": self.dynamic_bytes, "staging_bytes": self.staging_bytes,
                "planned_bytes": self.total_bytes, "hot_per_layer": list(map(int, self.hot_per_layer)),
                "context": self.context, "prefetch_depth": self.prefetch_depth, "hot_source": self.hot_source,
                "attn_layers_streamed": 0 if self.dense is None else self.dense.attn_resident.count(False),
                "dense_streamed_bytes": 0 if self.dense is None else self.dense.streamed_bytes}

    def render(self) -> str:
        B = self.budget_bytes
        ffn_total = self.ffn_store_bytes
        sizes = sorted(set(self.layer_strides)) or [self.stride]
        kib = f"{sizes[0] // 1024}" + (f"-{sizes[-1] // 1024}" if len(sizes) > 1 else "")

        def row(name, n, extra=""):
            return f"  {name:<26s} {format_size(n):>12s}  {100 * n / B:5.1f}%  {extra}".rstrip()

        lines = [f"memory budget {format_size(B)} ({B} bytes); FFN store {format_size(ffn_total)} in "
                 f"{self.n_layers} x {self.n_clusters} bundles of {kib} KiB"]
        lines.append(row("resident", self.resident_bytes))
        for k, v in self.resident.items():
            extra = f"{self.context} positions" if k == "kv cache" else ""
            lines.append(row("  " + k, v, extra))
        per = self.hot_per_layer
        lines.append(row("hot (pinned clusters)", self.hot_bytes,
                         f"{self.n_hot} of {self.n_layers * self.n_clusters} clusters, from {self.hot_source}"))
        if len(set(per)) == 1:
            lines.append(f"    per layer: {per[0]} clusters each")
        else:
            lines.append("    per layer: " + " ".join(str(int(h)) for h in per))
        lines.append(row("dynamic (cold cache)", self.dynamic_bytes, f"{self.n_dynamic} slots"))
        lines.append(row("I/O staging", self.staging_bytes,
                         f"{self.n_staging} slots: a window the unpinned bundles stream through in use order"
                         if self.stream_window else
                         f"{self.n_staging} slots: the layer computed + {self.prefetch_depth or 'part of one'} read ahead"))
        lines.append(row("planned total", self.total_bytes, f"unused {format_size(B - self.total_bytes)}"))
        d = self.dense
        if d is not None and d.streams:
            lines.append(f"  attention + lm_head read from storage per token: {format_size(d.streamed_bytes)} "
                         f"({d.attn_resident.count(False)} of {len(d.attn_resident)} attention layers, "
                         f"{d.head_resident.count(False)} of {len(d.head_resident)} lm_head chunks, through "
                         f"{d.ring_slots} x {format_size(d.ring_slot_bytes)} ring buffers)")
        if not self.streams:
            if not (d is not None and d.streams):
                lines.append("  everything fits: no reads after loading")
        elif self.expected_read_bytes is None:
            lines.append(f"  FFN read from storage per token (dense): about {format_size(ffn_total - self.hot_read_bytes)}")
        else:
            lines.append(f"  FFN read from storage per token: about {format_size(self.expected_read_bytes)} "
                         f"({self.expected_basis}; less with dynamic hits)")
        if self.experts is not None:
            E, cpe, k = self.experts
            whole = [int((np.bincount(np.asarray(ids, np.int64) // cpe, minlength=E) == cpe).sum())
                     for ids in self.hot_clusters]
            lines.append(f"  experts: {E} a layer of {cpe} bundle{'s' if cpe > 1 else ''} each "
                         f"({format_size(cpe * self.stride)}); the router picks {k} a token (density {k / E:.3g})")
            lines.append("    pinned experts per layer (whole): " + " ".join(str(w) for w in whole)
                         + f"; {self.n_dynamic + self.n_staging} slots ({(self.n_dynamic + self.n_staging) // cpe} "
                         "experts) for the ones streamed, dynamic + staging")
        lines += ["  note: " + n for n in self.notes]
        return "\n".join(lines)


def _spread(total: int, n_layers: int, cap: int) -> list[int]:
    """``total`` clusters shared evenly over layers (the first layers take the remainder), at most cap each."""
    base, extra = divmod(total, n_layers)
    return [min(cap, base + (1 if l < extra else 0)) for l in range(n_layers)]


def minimum_budget(model_dir, manifest: dict, runtime: RuntimeConfig, *, dense_resident: bool = False) -> int:
    """The smallest budget make_plan accepts for this model and runtime (bytes); with ``dense_resident``, the
    smallest that keeps all attention and lm_head weights resident."""
    try:
        make_plan(model_dir, manifest, runtime.replace(budget_bytes=1), allow_stream=not dense_resident)
    except BudgetTooSmall as e:
        return max(e.minimum, tokenizer_load_peak(Path(model_dir) / "tokenizer.json"))
    return 1


@dataclass
class _Sizes:
    """What the plan shares the budget between, read once from the model directory (bytes)."""
    weights: dict[str, int]            # resident whatever happens: norms, small weights, predictors, tokenizer
    attn_bytes: list[int]              # per layer
    head_name: str
    head_total: int
    chunk_req: int                     # a streamed lm_head chunk's bytes
    stream_head_bytes: list[int]       # the lm_head's chunks when it streams
    tied: bool
    ring_bytes: int                    # the ring of streamed attention / lm_head units + its bounce buffers
    bounce: int
    slot: int                          # one ring slot
    chunks: int                        # the FFN kernel's per-chunk sums (scratch)

    def fixed_for(self, cfg: dict, ctx: int) -> dict:
        return {**self.weights, "kv cache": ctx * kv_bytes_per_position(cfg),
                "scratch (estimate)": scratch_bytes(cfg, ctx, self.chunks)}

    def need(self, cfg: dict, ctx: int, stream: bool, layer_bytes: int) -> int:
        return (sum(self.fixed_for(cfg, ctx).values()) + (self.ring_bytes if stream else
                                                           sum(self.attn_bytes) + self.head_total) + layer_bytes)


def _sizes(model_dir: Path, manifest: dict, runtime: RuntimeConfig, info: StoreInfo) -> _Sizes:
    cfg = manifest["config"]
    L, N = info.n_layers, info.n_clusters
    from .stream import READ_CHUNK, lm_head_units, ring_reader_threads
    attn_units, heads, head_name, tfile = dense_units(model_dir, manifest, None)
    try:
        sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in tfile.meta.items()}
        attn_bytes = [u.nbytes for u in attn_units]
        # the ring's slot: one attention layer, or a chunk of lm_head rows if a chunk cannot be that small
        chunk_req = -(-max(attn_bytes) // 4096) * 4096
        stream_heads = [u.nbytes for _, u in lm_head_units(manifest["tensors"], tfile, head_name, chunk_req)]
    finally:
        tfile.close()

    def stored(name: str) -> int:       # bytes of a matrix in the file (all its planes)
        return sum(n for k, n in sizes.items() if k == name or k.startswith(name + "."))
    tied = head_name == "token_embd"
    dense_names = [f"blk.{l}.attn_{n}" for l in range(L) for n in ("q", "k", "v", "output")] + [head_name]
    other = sum(sizes.values()) - sum(stored(n) for n in dense_names)
    if not tied:        # untied embeddings are read a row per token (powerlow.stream.EmbeddingRows)
        other -= stored("token_embd")
    slot = -(-max(attn_bytes + stream_heads) // 4096) * 4096
    # + the reader threads' O_DIRECT bounce buffers (powerlow.io: a request + 2 blocks, allocated 1 block over)
    bounce = ring_reader_threads(runtime.queue_depth) * (min(READ_CHUNK, slot) + 3 * 4096)

    weights = {"norms and small weights": other}
    if runtime.mode == "predict" and (model_dir / "predictors.safetensors").exists():
        weights["predictors"] = lowrank_predictor_bytes(model_dir / "predictors.safetensors", L, N * info.cluster_size)
    elif runtime.mode in ("threshold", "gate"):
        # these predictors compute every neuron's gate from a resident copy of all gate rows (powerlow.predictors)
        from .formats import packed_nbytes
        weights["predictors (gate rows)"] = L * packed_nbytes(info.layout.fmt, N * info.cluster_size, info.layout.K)
    weights["tokenizer (estimate)"] = tokenizer_bytes(model_dir / "tokenizer.json")
    # the FFN kernel's per-chunk sums: a MoE layer keeps one (T, K) buffer per chunk of each of a token's k experts
    # (kernels.moe_ffn), plus the experts' gathered activations
    chunks = (cfg["n_experts_used"] * ffn_nchunks(N // cfg["n_experts"], runtime.n_threads) + 2
              if cfg.get("n_experts") else ffn_nchunks(N, runtime.n_threads))
    return _Sizes(weights, attn_bytes, head_name, heads[0][1].nbytes, chunk_req, stream_heads, tied,
                  RING_SLOTS * slot + bounce, bounce, slot, chunks)


def _context_and_stream(sz: _Sizes, cfg: dict, runtime: RuntimeConfig, B: int, layer: int,
                        allow_stream: bool) -> tuple[int, bool]:
    """KV positions and whether attention / lm_head stream: the automatic context shrinks (to 64) before
    anything streams; an explicit max_context streams only if that fits where resident does not."""
    def need(ctx: int, stream: bool) -> int:
        return sz.need(cfg, ctx, stream, layer)
    context = min(runtime.max_context or auto_context(cfg, B), cfg["max_positions"])
    if runtime.max_context is not None:
        return context, need(context, False) > B and allow_stream and need(context, True) < need(context, False)
    ctx = context
    while ctx > 64 and need(ctx, False) > B:
        ctx //= 2
    if need(ctx, False) <= B or not allow_stream or need(64, True) >= need(64, False):
        return ctx, False
    while context > 64 and need(context, True) > B:
        context //= 2
    return context, True


def _dense_plan(sz: _Sizes, cfg: dict, B: int, context: int, stream: bool, layer: int) -> DensePlan:
    """Which attention layers and lm_head chunks stay pinned; refuses a budget below the streaming minimum."""
    L = len(sz.attn_bytes)
    if not stream:
        return DensePlan([True] * L, sz.attn_bytes, sz.head_name, None, [True], [sz.head_total], 0, 0, not sz.tied)
    fixed = sz.fixed_for(cfg, context)
    F = sum(fixed.values())
    needed = sz.need(cfg, context, True, layer)
    if B < needed:
        raise BudgetTooSmall(
            f"budget {format_size(B)} is below the minimum {format_size(needed)} ({needed} bytes) for this model: "
            f"{format_size(F)} fixed (norms, KV cache of {context} positions, scratch, tokenizer"
            + (", predictors" if len(sz.weights) > 2 else "") + f") + {format_size(sz.ring_bytes)} ring for "
            f"streamed attention + one layer of bundles {format_size(layer)}; raise --budget to at least "
            f"{-(-needed // (1 << 20))}MiB" + (" or lower max_context" if fixed["kv cache"] > layer else ""), needed)
    sizes = sz.attn_bytes + sz.stream_head_bytes
    room = B - F - layer - sz.ring_bytes
    pinned = []
    for b in sizes:                      # all used once per token: pin in order while they fit
        ok = b <= room
        room -= b if ok else 0
        pinned.append(ok)
    return DensePlan(pinned[:L], sz.attn_bytes, sz.head_name, sz.chunk_req, pinned[L:], sizes[L:],
                     min(RING_SLOTS, pinned.count(False)), sz.slot, True)


def _resident(sz: _Sizes, dense: DensePlan, fixed: dict) -> dict[str, int]:
    resident = dict(sz.weights)
    resident["attention (resident)"] = sum(b for b, r in zip(dense.attn_bytes, dense.attn_resident) if r)
    resident["lm_head (resident)"] = sum(b for b, r in zip(dense.head_bytes, dense.head_resident) if r)
    if dense.streams:
        resident["ring (streamed weights)"] = dense.ring_slots * dense.ring_slot_bytes + sz.bounce
    resident["kv cache"] = fixed["kv cache"]
    resident["scratch (estimate)"] = fixed["scratch (estimate)"]
    return resident


def _check_floor(peak: int, B: int, R: int, layer: int, context: int) -> None:
    """Refuse what the resident part + one layer of bundles, or the tokenizer's parse, does not leave room for."""
    if B < R + layer:     # only without streaming (allow_stream=False)
        need_ = R + layer
        raise BudgetTooSmall(
            f"budget {format_size(B)} is below the minimum {format_size(need_)} ({need_} bytes) for this model with "
            f"attention resident: {format_size(R)} (weights, KV cache of {context} positions, scratch) + one layer "
            f"of bundles {format_size(layer)}; raise --budget to at least {-(-need_ // (1 << 20))}MiB", need_)
    if B < peak:
        raise BudgetTooSmall(
            f"budget {format_size(B)} is below the minimum {format_size(peak)} ({peak} bytes) for this model: parsing "
            f"its tokenizer.json takes that much before any weight is loaded; raise --budget to at least "
            f"{-(-peak // (1 << 20))}MiB", peak)


def _mode_density(measured: float | None, runtime: RuntimeConfig, cfg: dict, counts, N: int) -> float:
    """The share of a layer's clusters a token asks for, by mode."""
    if runtime.mode == "gate" and counts is not None:     # the profile's cluster activity is the demand
        share = counts if counts.max() <= 1.0 else counts / counts.max(axis=1, keepdims=True)
        return float(np.clip(share.sum(axis=1).max() / N, 1.0 / N, 1.0))
    if runtime.mode == "experts":                          # the router's top-k: exactly k of E experts a token
        return cfg["n_experts_used"] / cfg["n_experts"]
    if runtime.mode == "predict" and runtime.density >= 1.0:   # by recall: what the predictor selected when
        return measured or 1.0                                 # train-predictor measured it
    return runtime.density


def _split_slots(runtime: RuntimeConfig, slots: int, L: int, N: int, S: int, counts, density: float,
                 notes: list) -> tuple[list[int], int, int, int, bool]:
    """The FFN slots -> (hot per layer, staging, dynamic, prefetch depth, stream window?) by mode."""
    D = runtime.prefetch_depth
    frac = 1.0 if runtime.hot_fraction is None else runtime.hot_fraction
    if runtime.mode == "dense":
        # every cluster every token, in a fixed order: the unpinned ones stream through a window of slots in the
        # order the layers use them, each piece computed as it lands (powerlow.ffn: the kernels' chunk sums do
        # not change), so only the window is staging, not a whole layer + a read-ahead layer; the rest is pinned
        window = max(-(-stream_window_bytes(N * S, runtime) // S), 3 * ffn_nchunks(N, runtime.n_threads))
        H = int(max(0, slots - window) * frac)
        return _spread(H, L, N), slots - H, 0, D, True
    if runtime.mode == "gate" and counts is None:
        # every cluster is needed every token: a dynamic segment only cycles (LRU never hits); pin all it can,
        # keeping (1 + D) layers of misses for the reads in flight
        H = _max_hot_dense(slots, L, N, D)
        if H is None:
            # not even 1 + D whole layers: pin nothing and read ahead as far as the slots go. A slot of read-ahead
            # hides compute behind reads for every layer (L x stride / bandwidth a token, up to the compute
            # time); a pinned slot saves only its own read (stride / bandwidth a token)
            D, H = 0, 0
            notes.append(f"prefetch_depth {runtime.prefetch_depth} does not fit: one layer and "
                         f"{slots - N} bundles of the next in flight, nothing pinned")
        H = int(H * frac)
        return _spread(H, L, N), slots - H, 0, D, False
    # measured (README.offload.md): the dynamic segment adds 0.1-1% hits over pinning by the profile, on
    # SmolLM2 + its low-rank predictor and on the planted-hotness model; so by default pin everything
    want = (1 + D) * max(1, math.ceil(density * N))     # misses of the layer computed + D read ahead
    # a layer asking for more than the unpinned slots borrows pinned ones (powerlow.cache): all slots >= N
    H = max(0, int((slots - min(want, slots)) * frac))
    hot = _spread(H, L, N) if counts is None else _hot_from_counts(counts, H, N)
    free = slots - sum(hot)
    return hot, min(free, want), free - min(free, want), D, False


def _expect_reads(plan: Plan, runtime: RuntimeConfig, counts, density: float) -> None:
    """A sparse plan's estimate of the cold bundles read a token."""
    L, N, S = plan.n_layers, plan.n_clusters, plan.stride
    if counts is not None and counts.max() <= 1.0 and runtime.mode == "gate":
        cold = sum(float(np.delete(counts[l], plan.hot_clusters[l]).sum()) for l in range(L))
        plan.expected_read_bytes, plan.expected_basis = int(cold * S), "profiled cluster activity"
    else:
        per = max(1, math.ceil(density * N))
        plan.expected_read_bytes = int(sum(max(0, per - h) for h in plan.hot_per_layer) * S)
        plan.expected_basis = f"density {density:.3g} if the pinned clusters are among the chosen"


@dataclass(frozen=True)
class ModelFacts:
    """What a plan needs from a model dir, read once (gather_facts does all the planner's I/O): the manifest's
    config and FFN store, the sizes of what stays resident or streams, the profile's cluster activity, the
    tokenizer's parse peak, and the density train-predictor measured."""
    manifest: dict
    info: StoreInfo
    sizes: _Sizes
    counts: np.ndarray | None
    tokenizer_peak: int
    predictor_density: float | None


def gather_facts(model_dir, manifest: dict, runtime: RuntimeConfig) -> ModelFacts:
    """The model dir's files as the plan sees them (safetensors header, profile, tokenizer, predictors)."""
    model_dir = Path(model_dir)
    from .config import for_model
    runtime = for_model(runtime, manifest["config"])
    info = StoreInfo.from_json(manifest["ffn"])
    dens = predictor_density(model_dir) if runtime.mode == "predict" and runtime.density >= 1.0 else None
    return ModelFacts(manifest, info, _sizes(model_dir, manifest, runtime, info), hotness(model_dir, info),
                      tokenizer_load_peak(model_dir / "tokenizer.json"), dens)


def make_plan(model_dir, manifest: dict, runtime: RuntimeConfig, *, allow_stream: bool = True) -> Plan:
    """Share ``runtime.budget_bytes`` out between the segments; refuse a budget below the minimum
    (BudgetTooSmall, with the minimum). ``allow_stream=False``: attention and lm_head must stay resident (the
    minimum is then higher)."""
    return plan_budget(gather_facts(model_dir, manifest, runtime), runtime, allow_stream=allow_stream)


def plan_budget(facts: ModelFacts, runtime: RuntimeConfig, *, allow_stream: bool = True) -> Plan:
    """make_plan over facts already gathered: no I/O, the same plan for the same facts and runtime."""
    from .config import for_model
    cfg = facts.manifest["config"]
    runtime = for_model(runtime, cfg)
    B = runtime.budget_bytes
    if B is None:
        raise PowerlowError("no memory budget given; pass --budget SIZE (e.g. --budget 512MiB) or set budget in the config")
    info, sz, counts = facts.info, facts.sizes, facts.counts
    L, N, S = info.n_layers, info.n_clusters, info.layout.stride
    strides = tuple(lay.stride for lay in info.layouts)
    context, stream = _context_and_stream(sz, cfg, runtime, B, N * S, allow_stream)
    dense = _dense_plan(sz, cfg, B, context, stream, N * S)
    resident = _resident(sz, dense, sz.fixed_for(cfg, context))
    R = sum(resident.values())
    _check_floor(facts.tokenizer_peak, B, R, N * S, context)
    slots = (B - R) // S
    notes: list[str] = []
    experts = (cfg["n_experts"], N // cfg["n_experts"], cfg["n_experts_used"]) if runtime.mode == "experts" else None
    if slots >= L * N:
        return Plan(B, S, L, N, context, resident, [N] * L, [np.arange(N)] * L, 0, 0, runtime.prefetch_depth, 1.0,
                    "everything", notes, dense=dense, layer_strides=strides, experts=experts)
    dense_like = runtime.mode == "dense" or (runtime.mode == "gate" and counts is None)
    density = 1.0 if dense_like else _mode_density(facts.predictor_density, runtime, cfg, counts, N)
    hot, staging, dynamic, D, window = _split_slots(runtime, slots, L, N, S, counts, density, notes)
    if counts is not None and not dense_like:
        order = [np.argsort(-counts[l], kind="stable")[: hot[l]] for l in range(L)]
        source = "profile"
    else:
        order = [np.arange(h) for h in hot]
        source = "cluster order"
    frac = 1.0 if runtime.hot_fraction is None else runtime.hot_fraction
    plan = Plan(B, S, L, N, context, resident, [int(h) for h in hot], [np.sort(o).astype(np.int64) for o in order],
                int(dynamic), int(staging), D, float(frac), source, notes, dense=dense, stream_window=window,
                layer_strides=strides, experts=experts)
    if not dense_like:
        _expect_reads(plan, runtime, counts, density)
    return plan


# dense mode computes a layer in pieces of about this many bundle bytes (powerlow.ffn); a piece is one kernel
# call (~30 us of overhead), so even 1 MiB pieces cost little next to reading them
STREAM_PIECE_BYTES = 4 << 20


def stream_window_bytes(layer_bytes: int, runtime: RuntimeConfig) -> int:
    """Dense mode's staging window (see make_plan): the reads in flight (queue_depth of them; measured on this
    virtio disk, 216 KiB to 1.7 MiB reads at depth 4 or 8 all give 0.6-0.9 GB/s, so 256 KiB each is counted) +
    the piece being computed + the next one. Every byte more would save a byte read per token if pinned."""
    return runtime.queue_depth * min(runtime.io_block_bytes, 256 << 10) + 2 * min(STREAM_PIECE_BYTES, layer_bytes)


def ffn_nchunks(n: int, threads: int) -> int:
    """The kernels' chunk count for ``n`` bundles at ``threads`` threads (their float sums depend on it)."""
    from .kernels import _k                # the extension (kernels names it if it is not built)
    return _k.ffn_nchunks(int(n), int(threads))


def _max_hot_dense(slots: int, L: int, N: int, D: int, extra: int = 0) -> int | None:
    """Most pinned clusters H (spread evenly) leaving (1 + D) layers of misses (+ extra slots):
    H + (1+D)(N - H//L) + extra <= slots."""
    lo, hi = 0, L * N
    if (1 + D) * N + extra > slots:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid + (1 + D) * (N - mid // L) + extra <= slots:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _hot_from_counts(counts: np.ndarray, H: int, N: int) -> list[int]:
    """Pin the H clusters with the most activations over all layers (every bundle costs the same bytes)."""
    L = counts.shape[0]
    layer = np.repeat(np.arange(L), N)
    rank = np.argsort(np.argsort(-counts, axis=1, kind="stable"), axis=1).reshape(-1)   # rank within its layer
    # most activations first; ties go round-robin over layers (rank within the layer, then layer)
    top = np.lexsort((layer, rank, -counts.reshape(-1)))[:H]
    per = np.bincount(top // N, minlength=L)
    return [int(x) for x in per]


# -- `powerlow run --plan` ------------------------------------------------------------------------------
