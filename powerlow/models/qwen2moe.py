"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the qwen2 block (q/k/v biases) with a mixture of experts whose
chosen weights are *not* renormalized by default (``norm_topk_prob`` false), plus a shared expert every token runs,
scaled by sigmoid(h . shared_expert_gate).

GGUF (architecture ``qwen2moe``): ``expert_shared_feed_forward_length``; tensors ffn_*_shexp and
ffn_gate_inp_shexp (K,).
"""
from __future__ import annotations

from ..arch import ModelConfig
from .common import gguf_common, gguf_linear_scaling
from .moe import QWEN_MOE_EXPERTS, QWEN_MOE_LAYER, gguf_moe, hf_moe
from .qwen2 import qwen_config_from_hf

NAME = "qwen2moe"
HF_LAYER_MAP = QWEN_MOE_LAYER
HF_EXPERTS = QWEN_MOE_EXPERTS


def config_from_hf(c: dict, where: str) -> ModelConfig:
    moe = hf_moe(c, where, experts_key="num_experts", ffn_key="moe_intermediate_size", norm_default=False, shared=True)
    return qwen_config_from_hf(c, where, NAME, attn_bias=bool(c.get("qkv_bias", True)), **moe)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m), **gguf_moe(m, norm_default=False)}
    return ModelConfig(arch=NAME, attn_bias="blk.0.attn_q.bias" in tensors, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    if name.endswith("ffn_gate_inp_shexp"):       # HF: a Linear(K, 1), (1, K); GGUF: (K,)
        return w.reshape(-1)
    return w
