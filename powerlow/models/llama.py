"""Llama family: Llama 1-3.x (incl. the llama3 RoPE scaling) and Mistral (sliding window on every layer).

GGUF: llama.cpp's converter writes these as architecture ``llama`` and permutes the Q and K rows of every
layer (LlamaModel.modify_tensors -> permute: each head's rotate-half pairs (i, i + hd/2) become adjacent rows
for ggml's interleaved RoPE); sanitize undoes it. The llama3 frequency factors come as the ``rope_freqs``
tensor (one divisor per rotary pair) rather than as metadata.
"""
from __future__ import annotations

import numpy as np

from .. import formats
from ..arch import ModelConfig
from ..loaders.base import gguf_to_hf_qk_index
from .common import HF_LAYER, gguf_common, gguf_linear_scaling, hf_base, hf_rope, hf_scaling, hf_sliding

NAME = "llama"
HF_LAYER_MAP = HF_LAYER


def config_from_hf(c: dict, where: str) -> ModelConfig:
    arch = "mistral" if c.get("model_type") == "mistral" else "llama"
    kw = hf_base(c, where, arch)
    theta, scaling = hf_rope(c)
    kw.update(rope_theta=theta, attn_bias=bool(c.get("attention_bias", False)),
              **hf_scaling(scaling, kw["head_dim"], theta, where))
    kw.update(hf_sliding(c, kw["n_layers"], where, lambda i: arch == "mistral"))
    return ModelConfig(**kw)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m)}
    if "rope_freqs.weight" in tensors:
        kw["rope_freq_factors"] = tuple(float(v) for v in np.asarray(read("rope_freqs.weight")).reshape(-1))
    sw = m.get("attention.sliding_window")
    if sw:     # not written by llama.cpp's converter for llama/mistral; honoured when a file carries it
        kw.update(sliding_window=int(sw), swa_layers=tuple(range(kw["n_layers"])))
    from .moe import gguf_moe, is_gguf_moe
    if is_gguf_moe(m):      # Mixtral: llama.cpp writes it as llama with experts (feed_forward_length = an expert's)
        kw.update(gguf_moe(m, norm_default=True, ffn_key="expert_feed_forward_length"))
    # llama.cpp's llama architecture is always SwiGLU; powerlow's synthetic ReLU models carry their own key
    return ModelConfig(arch="llama", hidden_act=m.raw("powerlow.hidden_act", "silu"),
                       attn_bias="blk.0.attn_q.bias" in tensors, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    """GGUF Q/K rows back to Hugging Face order (see the module docstring); HF tensors pass as they are."""
    if origin != "gguf" or not name.endswith(("attn_q", "attn_k")):
        return w
    n_head = cfg.n_heads if name.endswith("attn_q") else cfg.n_kv_heads
    rows = w.rows if isinstance(w, formats.QMatrix) else w.shape[0]
    idx = gguf_to_hf_qk_index(n_head, rows)
    return formats.select_rows(w, idx) if isinstance(w, formats.QMatrix) else np.ascontiguousarray(w[idx])
