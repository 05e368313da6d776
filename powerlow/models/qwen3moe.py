"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): the qwen3 block (QK-norm, no biases) with every
FFN a mixture of experts: softmax over the router's logits, the top n_experts_used, renormalized when
``norm_topk_prob`` (the released models set it).

GGUF (architecture ``qwen3moe``): Q/K rows in HF order as qwen3; ``expert_count``, ``expert_used_count``,
``expert_feed_forward_length``; llama.cpp's qwen3moe graph always renormalizes the chosen weights, so a GGUF
without ``expert_weights_norm`` gets norm_topk = True.
"""
from __future__ import annotations

from ..arch import ModelConfig
from .common import gguf_common, gguf_linear_scaling
from .moe import QWEN_MOE_EXPERTS, QWEN_MOE_LAYER, gguf_moe, hf_moe
from .qwen2 import qwen_config_from_hf

NAME = "qwen3moe"
HF_LAYER_MAP = QWEN_MOE_LAYER
HF_EXPERTS = QWEN_MOE_EXPERTS


def config_from_hf(c: dict, where: str) -> ModelConfig:
    moe = hf_moe(c, where, experts_key="num_experts", ffn_key="moe_intermediate_size", norm_default=False)
    return qwen_config_from_hf(c, where, NAME, attn_bias=bool(c.get("attention_bias", False)), qk_norm=True, **moe)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m), **gguf_moe(m, norm_default=True)}
    return ModelConfig(arch=NAME, attn_bias="blk.0.attn_q.bias" in tensors, qk_norm=True, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    return w
