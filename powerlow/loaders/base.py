from __future__ import annotations

from typing import Iterator

import numpy as np

from ..arch import ModelConfig


def layer_names(cfg: ModelConfig) -> list[str]:
    """Every canonical tensor name a model of this config has."""
    names = ["token_embd", "output_norm"]
    if not cfg.tie_embeddings:
        names.append("output")
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        names += [p + n for n in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
        if cfg.attn_bias:
            names += [p + n for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias")]
        if cfg.qk_norm:
            names += [p + "attn_q_norm", p + "attn_k_norm"]
        if cfg.post_norms:
            names += [p + "post_attention_norm", p + "post_ffw_norm"]
        if cfg.moe:
            names.append(p + "ffn_gate_inp")
        if cfg.shared_ffn:
            names += [p + n for n in ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")]
    return names


def hf_to_gguf_qk_index(n_head: int, rows: int) -> np.ndarray:
    """Row index such that ``w_gguf = w_hf[idx]`` (GGUF stores Q/K rows for interleaved-pair RoPE)."""
    hd = rows // n_head
    return np.arange(rows).reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(rows)


def gguf_to_hf_qk_index(n_head: int, rows: int) -> np.ndarray:
    """Row index such that ``w_hf = w_gguf[idx]``."""
    return np.argsort(hf_to_gguf_qk_index(n_head, rows))


class Source:
    """A model to convert. Subclasses fill ``config``, ``tokenizer_json``, ``chat_template``."""

    config: ModelConfig
    tokenizer_json: str
    chat_template: str | None
    description: str

    def names(self) -> list[str]:
        return layer_names(self.config)

    def get(self, name: str):
        """float32 ndarray or QMatrix (Hugging Face row order)."""
        raise NotImplementedError

    def stored_format(self, name: str) -> str | None:
        """The powerlow format ``get(name)`` returns without loss, "f32" for a float matrix, None for a vector
        (without reading the data, where the source can tell)."""
        w = self.get(name)
        if hasattr(w, "fmt"):
            return w.fmt
        return "f32" if np.ndim(w) > 1 else None

    def items(self) -> Iterator[tuple[str, object]]:
        for n in self.names():
            yield n, self.get(n)
