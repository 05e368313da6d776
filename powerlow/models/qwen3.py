"""Qwen3 (dense): the llama block with QK-norm (per-head RMSNorm of q and k before RoPE), no biases,
head_dim given explicitly (often not hidden / heads).

GGUF: llama.cpp's converter (Qwen3Model, derived from Qwen2Model) writes Q and K rows in Hugging Face order
(no permutation) and head_dim as ``qwen3.attention.key_length``.
"""
from __future__ import annotations

from ..arch import ModelConfig
from .common import HF_LAYER, gguf_common, gguf_linear_scaling
from .qwen2 import qwen_config_from_hf

NAME = "qwen3"
HF_LAYER_MAP = HF_LAYER


def config_from_hf(c: dict, where: str) -> ModelConfig:
    return qwen_config_from_hf(c, where, NAME, attn_bias=bool(c.get("attention_bias", False)), qk_norm=True)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m)}
    return ModelConfig(arch=NAME, attn_bias="blk.0.attn_q.bias" in tensors, qk_norm=True, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    return w
