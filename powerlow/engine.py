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

from . import formats, reference
from .arch import ModelConfig
from .config import RuntimeConfig
from .errors import PowerlowError
from .ffn import ResidentStore, SparseFFN
from .manifest import load_manifest
from .store import StoreInfo
from .tokenizer import Tokenizer


class RefOps:
    """The numpy reference backend (tests and debugging)."""
    name = "reference"
    matmul = staticmethod(reference.matmul)
    ffn_bundles = staticmethod(reference.ffn_bundles)

    def set_threads(self, n):
        pass


def kernel_ops(backend: str | None):
    """The C kernels, or the numpy reference (backend="reference", or POWERLOW_BACKEND=reference for debugging)."""
    backend = backend or os.environ.get("POWERLOW_BACKEND", "kernels")
    if backend == "reference":
        return RefOps()
    try:
        from . import kernels
    except ImportError as e:
        raise PowerlowError(f"the C kernels are not built ({e}); install the package with `pip install -e .`") from None
    return kernels


@dataclass
class Stats:
    """Counters of the last run (also what `powerlow bench` reports)."""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_steps: int = 0         # forward passes of one token (the first generated token comes from prefill)
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
                "density": round(self.ffn_density, 4), "peak_rss_bytes": peak_rss_bytes(), **self.extra}


class KVCache:
    """Per layer K and V: (n_kv, capacity, head_dim) float32; grows by doubling up to ``limit``."""

    def __init__(self, cfg: ModelConfig, limit: int):
        self.cfg = cfg
        self.limit = limit
        self.cap = 0
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.length = 0   # positions filled

    def ensure(self, n: int) -> None:
        if n > self.limit:
            raise PowerlowError(f"sequence of {n} tokens exceeds the context of {self.limit}; shorten the prompt or lower -n")
        if n <= self.cap:
            return
        cap = min(self.limit, max(n, 2 * self.cap, 256))
        c = self.cfg
        shape = (c.n_kv_heads, cap, c.head_dim)
        newk = [np.zeros(shape, np.float32) for _ in range(c.n_layers)]
        newv = [np.zeros(shape, np.float32) for _ in range(c.n_layers)]
        for l in range(len(self.k)):
            newk[l][:, : self.cap] = self.k[l]
            newv[l][:, : self.cap] = self.v[l]
        self.k, self.v, self.cap = newk, newv, cap

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


def _load_qmatrix(tensors: dict, name: str, meta: dict):
    fmt = meta["fmt"]
    if fmt == "f32":
        return tensors[name]
    rows, cols = meta["shape"]
    return formats.QMatrix.from_tensors(fmt, rows, cols, tensors, name)


class Transformer:
    """Weights + KV cache + the forward pass of one model dir."""

    def __init__(self, model_dir, runtime: RuntimeConfig | None = None, *, backend: str | None = None, verify: bool = False):
        from safetensors.numpy import load_file

        self.dir = Path(model_dir)
        self.runtime = runtime or RuntimeConfig()
        self.manifest = load_manifest(self.dir, verify=verify)
        self.config = cfg = ModelConfig.from_json(self.manifest["config"])
        self.tokenizer = Tokenizer.from_file(self.dir / "tokenizer.json", chat_template=self.manifest.get("chat_template"),
                                             bos_id=cfg.bos_id, eos_ids=cfg.eos_ids)
        try:
            tensors = load_file(str(self.dir / "resident.safetensors"))
        except Exception as e:
            raise PowerlowError(f"{self.dir}/resident.safetensors cannot be read ({e}); re-convert the model") from None
        tmeta = self.manifest["tensors"]
        self.w = {name: _load_qmatrix(tensors, name, meta) for name, meta in tmeta.items()}
        self.embed = self.w["token_embd"]
        self.lm_head = self.w.get("output", self.embed)
        self.ops = kernel_ops(backend)
        self.ops.set_threads(self.runtime.n_threads)
        self.store_info = StoreInfo.from_json(self.manifest["ffn"])
        self.ffn_source = self._make_ffn_source()
        self.ffn = SparseFFN(self.ffn_source, self.store_info, cfg.hidden_act, self.ops, mode=self.runtime.mode)
        limit = min(cfg.max_positions, self.runtime.max_context or cfg.max_positions)
        self.kv = KVCache(cfg, limit)
        self._rope_pos = np.zeros(0)

    def _make_ffn_source(self):
        return ResidentStore(self.dir / "ffn.bin", self.store_info)

    # -- the forward pass --------------------------------------------------------------------------
    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """ids (T,) -> x (T, K) float32."""
        if isinstance(self.embed, np.ndarray):
            return self.embed[ids].astype(np.float32)
        return formats.dequantize(formats.select_rows(self.embed, ids))

    def forward(self, ids, *, start_pos: int | None = None, last_only: bool = False) -> np.ndarray:
        """Run tokens ``ids`` at positions start_pos.. (default: a fresh sequence from 0).

        Returns logits (T, vocab) float32, or (1, vocab) for the last token with ``last_only``.
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
        pos = np.arange(start, start + T)
        cos, sin = reference.rope_tables(cfg.head_dim, cfg.rope_theta, pos, cfg.rope_scaling_factor)
        x = self.embed_tokens(ids)                                      # (T, K)
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        mm = self.ops.matmul
        for l in range(cfg.n_layers):
            p = f"blk.{l}."
            w = self.w
            h = reference.rmsnorm(x, w[p + "attn_norm"], cfg.rms_eps)
            q = mm(w[p + "attn_q"], h)                                  # (T, nh*hd)
            k = mm(w[p + "attn_k"], h)                                  # (T, nkv*hd)
            v = mm(w[p + "attn_v"], h)
            if cfg.attn_bias:
                q += w[p + "attn_q.bias"]; k += w[p + "attn_k.bias"]; v += w[p + "attn_v.bias"]
            q = reference.rope(q.reshape(T, nh, hd), cos, sin)
            k = reference.rope(k.reshape(T, nkv, hd), cos, sin)
            self.kv.k[l][:, start: start + T] = k.transpose(1, 0, 2)
            self.kv.v[l][:, start: start + T] = v.reshape(T, nkv, hd).transpose(1, 0, 2)
            a = reference.attention(q, self.kv.k[l], self.kv.v[l], start)
            x = x + mm(w[p + "attn_output"], a)
            h = reference.rmsnorm(x, w[p + "ffn_norm"], cfg.rms_eps)
            x = x + self.ffn.forward(l, h)
        self.kv.length = start + T
        if last_only:
            x = x[-1:]
        x = reference.rmsnorm(x, self.w["output_norm"], cfg.rms_eps)
        return mm(self.lm_head, np.ascontiguousarray(x, dtype=np.float32))
