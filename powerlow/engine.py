"""The transformer: resident weights (attention, norms, embeddings) + the sparse FFN over bundles.

Per token and layer (DESIGN.md):
    h = norm(x); x += attention(h)          resident weights, KV cache
    h = norm(x); x += sparse_ffn(l, h)      only the active clusters' bundles
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import formats, kernels, reference, steps
from .arch import ModelConfig
from .config import RuntimeConfig
from .errors import PowerlowError, extension
from .ffn import ResidentStore, SparseFFN
from .manifest import load_manifest
from .sizes import SCRATCH_PREFILL_TOKENS
from .store import StoreInfo
from .tokenizer import Tokenizer
from .util import release_free_heap


def qkv_matmul(wqkv, h: np.ndarray, matmul) -> np.ndarray:
    """qkv (T, sum of rows) = h @ wqkv^T for one fused QMatrix, or a tuple of parts (q, k, v: rows stacked in
    order, each its own format), each part by ``matmul`` into its column slice (what attn_block computes)."""
    if not isinstance(wqkv, (tuple, list)):
        return matmul(wqkv, h)
    out = np.empty((h.shape[0], sum(p.rows for p in wqkv)), np.float32)
    r0 = 0
    for p in wqkv:
        out[:, r0: r0 + p.rows] = matmul(p, h)
        r0 += p.rows
    return out


class RefOps:
    """The numpy reference backend, with the kernels' signatures (tests and debugging)."""
    name = isa = "reference"
    matmul = staticmethod(reference.matmul)
    ffn_bundles = staticmethod(reference.ffn_bundles)

    @staticmethod
    def ffn_nchunks(n):
        return 1            # reference.ffn_bundles adds every bundle into out in turn: one chunk

    @staticmethod
    def all_finite(x):
        return bool(np.isfinite(x).all())

    @staticmethod
    def moe_ffn(ptrs, layout, h, act, out, gs, tok, wt, cpe):
        reference.moe_ffn(ptrs, layout, h, act, out, gs, tok, wt, cpe, 1)

    @staticmethod
    def ffn_bundles_part(ptrs, layout, h, act, out, priv, lo, hi):
        reference.ffn_bundles(ptrs[int(lo[0]): int(hi[0])], layout, h, act, out)

    @staticmethod
    def rmsnorm(x, w, eps, out=None):
        return reference.rmsnorm(x, w, eps).astype(np.float32)

    @staticmethod
    def rope(x, positions, theta):
        cos, sin = reference.rope_tables(x.shape[-1], theta, positions)
        x[...] = reference.rope(x, cos, sin)
        return x

    @staticmethod
    def attention(q, k_cache, v_cache, start, out=None, *, window=0, scale=0.0):
        return reference.attention(q, k_cache, v_cache, start, window=window, scale=scale)

    @staticmethod
    def rope_tables(positions, head_dim, theta, scale=1.0, factors=None):
        return reference.rope_tables(head_dim, theta, positions, scale, factors)

    @staticmethod
    def attn_scratch(T, n_heads, n_kv, head_dim, K):
        return None

    @staticmethod
    def attn_block(lw, x, h, k_cache, v_cache, start, rope, n_heads, n_kv, eps, scratch=None):
        """kernels.attn_block composed from the reference operations."""
        cos, sin = rope
        T, hd = x.shape[0], k_cache.shape[2]
        qd, kd = n_heads * hd, n_kv * hd
        qkv = qkv_matmul(lw.wqkv, reference.rmsnorm(x, lw.attn_norm, eps).astype(np.float32), reference.matmul)
        if lw.bqkv is not None:
            qkv += lw.bqkv
        q, k = qkv[:, :qd].reshape(T, n_heads, hd), qkv[:, qd: qd + kd].reshape(T, n_kv, hd)
        qn, kn, post, window, scale = kernels.attn_extras(lw)
        if qn is not None:             # each head RMS-normed over head_dim (qwen3), as Transformer._attention
            q = RefOps.rmsnorm(np.ascontiguousarray(q).reshape(T * n_heads, hd), qn, eps).reshape(T, n_heads, hd)
            k = RefOps.rmsnorm(np.ascontiguousarray(k).reshape(T * n_kv, hd), kn, eps).reshape(T, n_kv, hd)
        q, k = reference.rope(q, cos, sin), reference.rope(k, cos, sin)
        k_cache[:, start: start + T] = k.transpose(1, 0, 2)
        v_cache[:, start: start + T] = qkv[:, qd + kd:].reshape(T, n_kv, hd).transpose(1, 0, 2)
        o = reference.matmul(lw.wo, reference.attention(q, k_cache, v_cache, start, window=window, scale=scale))
        x += o if post is None else RefOps.rmsnorm(o, post, eps)
        h[...] = reference.rmsnorm(x, lw.ffn_norm, eps)
        return h

    def set_threads(self, n):
        pass


def kernel_ops(backend: str | None):
    """The C kernels, or the numpy reference (backend="reference", or POWERLOW_BACKEND=reference for debugging)."""
    backend = backend or os.environ.get("POWERLOW_BACKEND", "kernels")
    if backend == "reference":
        return RefOps()
    return kernels                # imported above (kernels names the fix if the extension is not built)


@dataclass
class Stats:
    """Counters of the last run (also what `powerlow bench` reports)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0         # tokens made by decode passes (the first generated token comes from prefill)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    ffn_density: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    def as_dict(self) -> dict:
        from .util import peak_rss_bytes
        return {"prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "prefill_tok_s": round(self.prefill_tok_s, 2), "decode_tok_s": round(self.decode_tok_s, 2),
                "density": round(self.ffn_density, 4), "peak_rss_bytes": peak_rss_bytes(),
                **{k: (v.as_dict() if hasattr(v, "as_dict") else v) for k, v in self.extra.items()}}


class KVCache:
    """Per layer K and V: (n_kv, capacity, head_dim) float16; grows by doubling up to ``limit``.

    fp16 as llama.cpp's default cache: half the memory of float32, and the kernels write and read it
    directly (attention converts fp16 -> float32 in registers)."""

    def __init__(self, cfg: ModelConfig, limit: int, *, whole: bool = False):
        self.cfg = cfg
        self.limit = limit
        # whole: the full limit at the first use (a budget's plan has paid for it). Doubling under a budget kept
        # every outgrown cache in RSS: after the first one is freed, malloc raises its mmap threshold and the next
        # ones come from the heap, which does not shrink (SmolLM2, -n 2000: +33 MiB past budget + baseline)
        self.whole = whole
        self.cap = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.length = 0   # positions filled

    def ensure(self, n: int) -> None:
        if n > self.limit:
            raise PowerlowError(f"sequence of {n} tokens exceeds the context of {self.limit}; shorten the prompt or lower -n")
        if n <= self.cap:
            return
        cap = self.limit if self.whole else min(self.limit, max(n, 2 * self.cap, 256))
        c = self.cfg
        shape = (c.n_kv_heads, cap, c.head_dim)
        newk = [np.zeros(shape, np.float16) for _ in range(c.n_layers)]
        newv = [np.zeros(shape, np.float16) for _ in range(c.n_layers)]
        for l in range(len(self.k)):
            newk[l][:, : self.cap] = self.k[l]
            newv[l][:, : self.cap] = self.v[l]
        self.k, self.v, self.cap = newk, newv, cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


@dataclass(frozen=True)
class LayerWeights:
    """One layer's resident weights, looked up once (no string keys on the per-token path)."""
    attn_norm: np.ndarray          # (K,)
    wqkv: "formats.QMatrix"        # (q_dim + 2 kv_dim, K): q, k, v rows fused into one matmul, or a tuple of
                                   # parts (q, k, v: rows stacked in order) when their formats differ
    bqkv: np.ndarray | None        # (q_dim + 2 kv_dim,) qwen2 biases
    wo: "formats.QMatrix"          # (K, q_dim)
    ffn_norm: np.ndarray           # (K,)
    q_norm: np.ndarray | None = None   # (hd,) each head's RMSNorm of q and k before RoPE (qwen3), or None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None   # (K,) norm of the attention output before the residual add (gemma3)
    window: int = 0                # sliding window of the layer's attention, 0 = all keys
    attn_scale: float = 0.0        # score scale, 0 = 1/sqrt(head_dim)



class Transformer:
    """Weights + KV cache + the forward pass of one model dir."""

    def __init__(self, model_dir, runtime: RuntimeConfig | None = None, *, backend: str | None = None, verify: bool = False):
        self.dir = Path(model_dir)
        self.runtime = runtime or RuntimeConfig()
        self.manifest = load_manifest(self.dir, verify=verify)
        self.config = cfg = ModelConfig.from_json(self.manifest["config"])
        from .config import for_model
        self.runtime = for_model(self.runtime, self.manifest["config"])
        from .stream import TensorFile, check_tensors
        tfile = TensorFile(self.dir / "resident.safetensors")
        try:
            check_tensors(self.manifest["tensors"], cfg, tfile)
        finally:
            tfile.close()
        # a budget is checked before anything big is loaded: under a memory limit below the minimum, a late
        # check would be an OOM kill instead of this error
        self.plan = None
        if self.runtime.budget_bytes is not None:
            from .plan import make_plan
            self.plan = make_plan(self.dir, self.manifest, self.runtime)
            # the KV cache is part of the budget: its capacity is the positions the plan paid for
            self.runtime = self.runtime.replace(max_context=self.plan.context)
        self.tokenizer = Tokenizer.of_model(self.dir, self.manifest, cfg)
        # parsing tokenizer.json leaves ~2/3 of its peak in malloc's free lists (SmolLM2: +44 MiB while loading,
        # +15 MiB kept); hand them back before the weights come in (powerlow.sizes.tokenizer_bytes)
        release_free_heap()
        self.ring = None
        self.io_clock = extension("_iocore").Clock()   # time with a read in flight in the ring or the FFN reader
        self._load_weights()
        self.ops = kernel_ops(backend)
        self.ops.set_threads(self.runtime.n_threads)
        prep = getattr(self.ops, "prepare_resident", None)
        if prep is not None and self.plan is None:
            # fully resident: the 1/1.58/2-bit matrices get their table-lookup layout (same results, ~2x faster
            # on AVX2; a re-laid copy as big as the matrix, so not under a budget, whose plan does not count it)
            for lw in self.layers:
                for part in (lw.wqkv if isinstance(lw.wqkv, tuple) else (lw.wqkv,)):
                    prep(part)
                prep(lw.wo)
            for _, _, m, _ in self.head_chunks:
                prep(m)
        self.store_info = StoreInfo.from_json(self.manifest["ffn"])
        order = self.manifest.get("cluster_order")
        if order is not None:
            nC = self.store_info.n_clusters
            if (not isinstance(order, list) or len(order) != cfg.n_layers
                    or any(sorted(o) != list(range(nC)) for o in order)):
                raise PowerlowError(f"{self.dir}/manifest.json: cluster_order is not a permutation of each layer's "
                                    f"{nC} clusters; re-run `powerlow profile` on a fresh convert")
        self.ffn_source = self._make_ffn_source()
        self.predictor = self._make_predictor()
        router, shared = self._moe_parts()
        self.ffn = SparseFFN(self.ffn_source, self.store_info, cfg.hidden_act, self.ops, mode=self.runtime.mode,
                             predictor=self.predictor, cluster_order=self.manifest.get("cluster_order"),
                             router=router, shared=shared)
        limit = min(cfg.max_positions, self.runtime.max_context or cfg.max_positions)
        self.kv = KVCache(cfg, limit, whole=self.plan is not None)
        # fused: one attn_block call per layer (kernels or reference); False runs the unfused op sequence
        # (the same kernels one by one: tests compare the two bit for bit)
        self.fused = True
        self._loop = None             # steps.LayerLoop (built at the first pass that can use it)
        self._loopable = None
        self._scratch, self._scratch_T = None, 0
        self._draft_ptrs = None

    def _make_ffn_source(self):
        """All of ffn.bin in RAM, or (with a budget) the segmented cache fed by the I/O thread."""
        if self.runtime.budget_bytes is None:
            return ResidentStore(self.dir / "ffn.bin", self.store_info)
        from .cache import OffloadedStore
        return OffloadedStore(self.dir, self.store_info, self.plan, self.runtime, clock=self.io_clock, ring=self.ring)

    def _moe_parts(self):
        """(Router, shared experts or None) of a mixture-of-experts model, else (None, None)."""
        cfg = self.config
        if not cfg.moe:
            return None, None
        from .moe import Router, SharedExpert
        if self.manifest.get("cluster_order") is not None:
            raise PowerlowError(f"{self.dir}: a mixture-of-experts model dir with a neuron re-layout (cluster_order); "
                                "experts are never re-laid: re-convert the model")
        cpe, rem = divmod(cfg.expert_ffn, self.store_info.cluster_size)
        if rem or self.store_info.n_clusters != cfg.n_experts * cpe:
            raise PowerlowError(f"{self.dir}/manifest.json: {self.store_info.n_clusters} bundles of "
                                f"{self.store_info.cluster_size} neurons a layer do not make {cfg.n_experts} experts of "
                                f"{cfg.expert_ffn}; re-convert the model")
        L = cfg.n_layers
        router = Router(cfg, [self.w[f"blk.{l}.ffn_gate_inp"] for l in range(L)],
                        [self.w[f"blk.{l}.ffn_norm"] for l in range(L)], cpe)
        shared = None
        if cfg.shared_ffn:
            shared = [SharedExpert(*(self.w[f"blk.{l}.{n}"] for n in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                                                                      "ffn_gate_inp_shexp")), cfg.hidden_act)
                      for l in range(L)]
        return router, shared

    def _make_predictor(self):
        """None in dense and experts mode (a MoE model's router is its predictor: powerlow.moe); else the
        predictor of the mode (powerlow.predictors)."""
        if self.runtime.mode in ("dense", "experts"):
            return None
        from .predictors import make_predictor
        return make_predictor(self)

    def _load_weights(self) -> None:
        """Read resident.safetensors by pread (no mmap, no second copy): small tensors, then attention and the
        lm_head as units (powerlow.stream) -- resident ones now, the rest through a ring read every token."""
        from .plan import dense_units
        from .stream import EmbeddingRows, WeightRing, read_matrix, ring_reader_threads
        cfg, tmeta = self.config, self.manifest["tensors"]
        dp = self.plan.dense if self.plan is not None else None
        attn, heads, head_name, tf_ = dense_units(self.dir, self.manifest, dp.head_chunk_bytes if dp else None)
        self._tfile = tf_
        # attention + lm_head bytes one forward pass uses (bench's bytes-per-token figure)
        self.dense_weight_bytes = sum(u.nbytes for u in attn) + sum(u.nbytes for _, u in heads)
        big = {f"blk.{l}.attn_{n}" for l in range(cfg.n_layers) for n in ("q", "k", "v", "output")}
        big |= {head_name, "token_embd"}
        self.w = {}
        for name, meta in tmeta.items():
            if name in big or name.endswith((".attn_q.bias", ".attn_k.bias", ".attn_v.bias")):
                continue
            self.w[name] = read_matrix(tmeta, tf_, name)
        attn_res = dp.attn_resident if dp else [True] * cfg.n_layers
        head_res = dp.head_resident if dp else [True] * len(heads)
        ring_units: list = []
        self.layers: list[LayerWeights | None] = []
        self._small = []                    # per layer: (attn_norm, bqkv, ffn_norm), always resident
        self._extra: list[tuple] = []       # per layer: LayerWeights' fields beyond the llama block (q_norm ..)
        self._post_ffn: list = []           # per layer: gemma3's post-FFN norm (K,), or None
        self._ring_of_layer: dict[int, int] = {}
        self._streamed_lw: dict[int, LayerWeights] = {}     # id(ring views) -> LayerWeights (ring keeps the views)
        for l in range(cfg.n_layers):
            p = f"blk.{l}."
            bqkv = (np.concatenate([tf_.read(p + f"attn_{n}.bias") for n in ("q", "k", "v")]).astype(np.float32)
                    if cfg.attn_bias else None)
            small = (self.w[p + "attn_norm"], bqkv, self.w[p + "ffn_norm"])
            self._small.append(small)
            self._extra.append((self.w.get(p + "attn_q_norm"), self.w.get(p + "attn_k_norm"),
                                self.w.get(p + "post_attention_norm"), cfg.sliding_window if cfg.is_local(l) else 0,
                                float(cfg.attn_scale)))
            self._post_ffn.append(self.w.get(p + "post_ffw_norm"))
            if attn_res[l]:
                m = attn[l].load(tf_)
                self.layers.append(LayerWeights(small[0], m["wqkv"], bqkv, m["wo"], small[2], *self._extra[l]))
            else:
                self._ring_of_layer[l] = len(ring_units)
                ring_units.append(attn[l])
                self.layers.append(None)
        # the lm_head: one resident matrix, or row chunks (resident or streamed)
        self.head_chunks = []               # (first row, rows, matrix or None, ring unit index or None)
        for (r0, unit), res in zip(heads, head_res):
            rows = unit.matrices[0][2]
            if res:
                self.head_chunks.append((r0, rows, unit.load(tf_)["w"], None))
            else:
                self.head_chunks.append((r0, rows, None, len(ring_units)))
                ring_units.append(unit)
        self.lm_head = self.head_chunks[0][2] if len(self.head_chunks) == 1 else None
        if dp is not None and dp.embed_on_demand and not (head_name == "token_embd" and self.lm_head is not None):
            self.embed = EmbeddingRows(tf_, "token_embd", tmeta["token_embd"])
        elif head_name == "token_embd" and self.lm_head is not None:
            self.embed = self.lm_head
        else:
            self.embed = read_matrix(tmeta, tf_, "token_embd")
        if ring_units:
            self.ring = WeightRing(self.dir / "resident.safetensors", ring_units, dp.ring_slots, o_direct=self.runtime.o_direct,
                                   queue_depth=ring_reader_threads(self.runtime.queue_depth), clock=self.io_clock)
        tf_.drop_cache()

    def _layer(self, l: int) -> tuple[LayerWeights, bool]:
        """Layer l's weights; True if they came from the ring (release it after use)."""
        lw = self.layers[l]
        if lw is not None:
            return lw, False
        m = self.ring.acquire(self._ring_of_layer[l])      # the same dict whenever the unit is in the same slot
        lw = self._streamed_lw.get(id(m))
        if lw is None:
            an, bqkv, fn = self._small[l]
            lw = self._streamed_lw[id(m)] = LayerWeights(an, m["wqkv"], bqkv, m["wo"], fn, *self._extra[l])
        return lw, True

    def logits(self, x: np.ndarray) -> np.ndarray:
        """lm_head: x (T, K) normed -> (T, vocab); chunk by chunk when it is streamed."""
        if self.lm_head is not None:
            return self.ops.matmul(self.lm_head, x)
        out = np.empty((x.shape[0], self.config.vocab_size), np.float32)
        for r0, n, mat, j in self.head_chunks:
            w = mat if mat is not None else self.ring.acquire(j)["w"]
            if x.shape[0] == 1:
                self.ops.matmul(w, x, out[:, r0: r0 + n])
            else:
                out[:, r0: r0 + n] = self.ops.matmul(w, x)
            if mat is None:
                self.ring.release()
        return out

    def close(self) -> None:
        """Stop the I/O threads and close files (the offloaded run's reader pools)."""
        for obj in (self.ffn_source, self.ring, self._tfile):
            if obj is not None:
                obj.close()

    # -- the forward pass --------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """ids (T,) -> x (T, K) float32."""
        if isinstance(self.embed, np.ndarray):
            return self.embed[ids].astype(np.float32)
        if not isinstance(self.embed, formats.QMatrix):        # powerlow.stream.EmbeddingRows
            return self.embed.rows_f32(ids)
        return formats.dequantize(formats.select_rows(self.embed, ids))

    def self_draft_unavailable(self) -> str | None:
        """Why the model cannot draft from its resident part (powerlow.speculate.SelfDrafter), or None."""
        if self.plan is None:
            return ("the model is fully resident (no --budget), so nothing of it is cheaper than the whole; "
                    "self-drafting drafts from what a budget keeps resident")
        if any(m is None for _, _, m, _ in self.head_chunks):
            return "the lm_head streams at this budget, so a drafted token would read it from storage"
        if not hasattr(self.ffn_source, "pinned_ptrs"):
            return "this cluster source has no pinned clusters"
        return None

    def _draft_ffn(self, l: int, h: np.ndarray, out: np.ndarray) -> None:
        """out += layer l's FFN over its pinned clusters only (the self-drafter's FFN; nothing is read)."""
        if self._draft_ptrs is None:
            self._draft_ptrs = [self.ffn_source.pinned_ptrs(i) for i in range(self.config.n_layers)]
        ptrs = self._draft_ptrs[l]
        if len(ptrs):
            self.ops.ffn_bundles(ptrs, self.store_info.layouts[l], h, self.config.hidden_act, out)

    def forward(self, ids, *, start_pos: int | None = None, last_only: bool = False, draft: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions start_pos.. (default: a fresh sequence from 0).

        Returns logits (T, vocab) float32, or (1, vocab) for the last token with ``last_only``. ``draft``: the
        self-drafter's approximation from what is resident (layers whose attention streams are skipped, the FFN
        over the pinned clusters only); it writes the KV cache of the layers it runs like a real pass.
        """
        cfg = self.config
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = len(ids)
        if T == 0:
            raise PowerlowError("no tokens to run; give a non-empty prompt")
        if ids.min() < 0 or ids.max() >= cfg.vocab_size:
            raise PowerlowError(f"token id out of range 0..{cfg.vocab_size - 1}")
        start = 0 if start_pos is None else int(start_pos)
        if start > self.kv.length:
            raise PowerlowError(f"start_pos {start} is past the cached sequence ({self.kv.length} tokens)")
        self.kv.ensure(start + T)
        if self.plan is not None and T > SCRATCH_PREFILL_TOKENS:
            # under a budget the plan paid for the activations of a SCRATCH_PREFILL_TOKENS-token prefill: a longer
            # prompt goes in pieces (a token's outputs are the same alone or in a batch, so the logits are too)
            n = SCRATCH_PREFILL_TOKENS
            outs = [self.forward(ids[s: s + n], start_pos=start + s, last_only=last_only) for s in range(0, T, n)]
            return outs[-1] if last_only else np.concatenate(outs)
        pos = np.arange(start, start + T, dtype=np.int64)
        ops = self.ops
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        x = self.embed_tokens(ids)                                      # (T, K)
        if cfg.embed_scale != 1.0:
            x *= np.float32(cfg.embed_scale)
        ropes: dict = {}              # RoPE tables of these positions: global (False), gemma3's local base (True)

        def rope(local: bool):
            if local not in ropes:
                ropes[local] = ops.rope_tables(pos, hd, cfg.rope_theta_local) if local else \
                    ops.rope_tables(pos, hd, cfg.rope_theta, cfg.rope_scaling_factor, cfg.rope_freq_factors)
            return ropes[local]
        h = np.empty_like(x)
        loop = None if draft else self._layer_loop()
        if loop is not None:          # every layer in one compiled call (predict mode, all weights resident)
            self._run_loop(loop, x, h, start, rope(False), rope(True) if any(loop.local) else None)
        for l in range(cfg.n_layers if loop is None else 0):
            if draft and self.layers[l] is None:
                continue
            lw, streamed = self._layer(l)
            if self.fused:   # every family's block in one call (norm, qkv, its extras, RoPE, cache store, attention,
                #              o, +=, ffn norm); gemma3's post-FFN norm stays below
                ops.attn_block(lw, x, h, self.kv.k[l], self.kv.v[l], start, rope(cfg.local_rope(l)), nh, nkv,
                               cfg.rms_eps, self._attn_scratch(T))
            else:
                self._attention(l, lw, x, pos, start)
                h = ops.rmsnorm(x, lw.ffn_norm, cfg.rms_eps)
            if streamed:
                self.ring.release()
            post = self._post_ffn[l]
            if draft:
                if post is None:
                    self._draft_ffn(l, h, x)
                else:
                    d = np.zeros_like(h)
                    self._draft_ffn(l, h, d)
                    x += ops.rmsnorm(d, post, cfg.rms_eps)
            elif post is None:
                self.ffn.accumulate(l, h, x)                            # the FFN adds its output straight into x
            else:
                x += ops.rmsnorm(self.ffn.forward(l, h), post, cfg.rms_eps)
            if not ops.all_finite(x):                                   # ~0.3 us a layer at T = 1
                self._not_finite(l)
        self.kv.length = start + T
        if last_only:
            x = x[-1:]
        x = self.ops.rmsnorm(np.ascontiguousarray(x), self.w["output_norm"], cfg.rms_eps)
        out = self.logits(x)
        if cfg.logit_softcap:
            cap = np.float32(cfg.logit_softcap)
            out = (np.tanh(out / cap) * cap).astype(np.float32)
        return out

    def _layer_loop(self):
        """steps.LayerLoop over this model's layers and the FFN's compiled step, or None where the pass must go
        layer by layer in Python: weights streamed through the ring, no compiled FFN step, unfused (fused = False),
        or ops without the loop (the reference ops). gemma3's post-FFN norms and local RoPE base go into the loop."""
        if self._loopable is None:     # what the model is (fixed at load): every layer resident
            self._loopable = steps.available(self.ops) and all(lw is not None for lw in self.layers)
        step = self.ffn.compiled_step() if self.fused and self._loopable else None
        if step is None:
            return None
        loop = self._loop
        if loop is not None and loop.step is step:
            return loop
        cfg = self.config
        self._loop = steps.LayerLoop(list(self.layers), step, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                     list(self._post_ffn), [cfg.local_rope(l) for l in range(cfg.n_layers)])
        return self._loop

    def _run_loop(self, loop, x: np.ndarray, h: np.ndarray, start: int, rope, local_rope=None) -> None:
        ffn = self.ffn
        ffn.begin_pass()
        used = loop.step.used
        rc = loop.run(x, h, self.kv.k, self.kv.v, start, rope, self.config.rms_eps, self._attn_scratch(x.shape[0]),
                      local_rope)
        ffn.clusters_used += loop.step.used - used
        ffn.clusters_total += self.store_info.n_clusters * self.config.n_layers
        if rc == -1:
            ffn.source.raise_error()
        if rc == -3:
            self._not_finite(loop.failed_layer)

    def _not_finite(self, l: int):
        raise PowerlowError(
            f"layer {l} produced non-finite values (NaN or inf): its weights in {self.dir} are corrupt (a "
            "damaged ffn.bin or resident.safetensors; `powerlow convert --force` makes a fresh copy) or the "
            "activations overflowed")

    def _attention(self, l: int, lw: LayerWeights, x: np.ndarray, pos: np.ndarray, start: int) -> None:
        """x += attention block of layer l, as the unfused op sequence (the same kernels attn_block runs, one by one:
        QK-norm, sliding window, attention scale and post-attention norm from lw where the layer has them)."""
        cfg, ops = self.config, self.ops
        T, nh, nkv, hd = x.shape[0], cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qd, kd = cfg.q_dim, cfg.kv_dim
        h = ops.rmsnorm(x, lw.attn_norm, cfg.rms_eps)
        qkv = qkv_matmul(lw.wqkv, h, ops.matmul)                        # (T, q_dim + 2 kv_dim)
        if lw.bqkv is not None:
            qkv += lw.bqkv
        q, k = qkv[:, :qd].reshape(T, nh, hd), qkv[:, qd: qd + kd].reshape(T, nkv, hd)
        if lw.q_norm is not None:                                       # per-head RMSNorm over head_dim
            q = ops.rmsnorm(np.ascontiguousarray(q).reshape(T * nh, hd), lw.q_norm, cfg.rms_eps).reshape(T, nh, hd)
            k = ops.rmsnorm(np.ascontiguousarray(k).reshape(T * nkv, hd), lw.k_norm, cfg.rms_eps).reshape(T, nkv, hd)
        q, k = self._rope(q, pos, l), self._rope(k, pos, l)
        # the cache is fp16, as llama.cpp's default: on SmolLM2 this moved teacher-forced agreement
        # with llama.cpp from 96.4% to 97.4% (float32 cache vs fp16, same kernels otherwise)
        kc, vc = self.kv.k[l], self.kv.v[l]
        kc[:, start: start + T] = k.transpose(1, 0, 2)                  # float32 -> float16 on store
        vc[:, start: start + T] = qkv[:, qd + kd:].reshape(T, nkv, hd).transpose(1, 0, 2)
        if lw.window or lw.attn_scale:
            a = ops.attention(np.ascontiguousarray(q, np.float32), kc, vc, start, window=lw.window, scale=lw.attn_scale)
        else:
            a = ops.attention(q, kc, vc, start)                         # (T, nh*hd)
        o = ops.matmul(lw.wo, a)
        x += o if lw.post_attn_norm is None else ops.rmsnorm(o, lw.post_attn_norm, cfg.rms_eps)

    def _attn_scratch(self, T: int):
        """attn_block's scratch for T tokens: one buffer per Transformer, grown (never per token)."""
        if self._scratch_T < T:
            c = self.config
            self._scratch = self.ops.attn_scratch(T, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_size)
            self._scratch_T = T
        return self._scratch

    def _rope(self, x: np.ndarray, pos: np.ndarray, l: int) -> np.ndarray:
        """RoPE of layer l on x (T, heads, hd): local (sliding-window) layers of a model with a local base use
        it unscaled (gemma3); linear scaling and llama3 frequency factors go through the tables."""
        cfg = self.config
        if cfg.local_rope(l):
            return self.ops.rope(np.ascontiguousarray(x), pos, cfg.rope_theta_local)
        if cfg.rope_scaling_factor != 1.0 or cfg.rope_freq_factors:
            cos, sin = self.ops.rope_tables(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                            cfg.rope_freq_factors)
            return reference.rope(x, cos, sin).astype(np.float32)
        return self.ops.rope(np.ascontiguousarray(x), pos, cfg.rope_theta)
