"""Qwen2 / Qwen2.5: the llama block with biases on q, k and v.

GGUF: llama.cpp's converter (Qwen2Model, a plain TextModel) writes Q and K rows in Hugging Face order: no
permutation to undo, unlike ``llama``.
"""
from __future__ import annotations

from ..arch import ModelConfig
from .common import HF_LAYER, gguf_common, gguf_linear_scaling, hf_base, hf_rope, hf_scaling, hf_sliding

NAME = "qwen2"
HF_LAYER_MAP = HF_LAYER


def config_from_hf(c: dict, where: str) -> ModelConfig:
    return qwen_config_from_hf(c, where, NAME, attn_bias=True)


def qwen_config_from_hf(c: dict, where: str, name: str, **fields) -> ModelConfig:
    """The Qwen families' config.json (qwen3 too): llama keys, rope scaling, sliding window from max_window_layers."""
    kw = hf_base(c, where, name)
    theta, scaling = hf_rope(c)
    kw.update(rope_theta=theta, **fields, **hf_scaling(scaling, kw["head_dim"], theta, where))
    if c.get("use_sliding_window"):
        first = int(c.get("max_window_layers", 0))
        kw.update(hf_sliding(c, kw["n_layers"], where, lambda i: i >= first))
    return ModelConfig(**kw)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m)}
    return ModelConfig(arch=NAME, attn_bias=True, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    return w
