"""Mixtral (8x7B, 8x22B) and other Mistral-shaped MoE checkpoints: the llama block with every FFN 8 experts, top 2,
softmax over the chosen logits (the same as softmax over all, top-k, renormalized: norm_topk).

HF: model_type ``mixtral``, experts under block_sparse_moe (w1 gate, w3 up, w2 down). GGUF: llama.cpp writes
Mixtral as architecture ``llama`` with ``llama.expert_count`` and ffn_*_exps tensors (powerlow.models.llama reads
it, Q/K rows permuted as every llama GGUF); feed_forward_length is the expert's size.
"""
from __future__ import annotations

from ..arch import ModelConfig
from .common import HF_LAYER, hf_base, hf_rope, hf_scaling, hf_sliding
from .moe import hf_moe

NAME = "mixtral"
HF_LAYER_MAP = {**HF_LAYER, "ffn_gate_inp": "block_sparse_moe.gate.weight"}
HF_EXPERTS = {"ffn_gate": "block_sparse_moe.experts.{e}.w1.weight", "ffn_up": "block_sparse_moe.experts.{e}.w3.weight",
              "ffn_down": "block_sparse_moe.experts.{e}.w2.weight", "fused": "mlp.experts."}


def config_from_hf(c: dict, where: str) -> ModelConfig:
    kw = hf_base(c, where, NAME)
    theta, scaling = hf_rope(c)
    kw.update(rope_theta=theta, attn_bias=bool(c.get("attention_bias", False)),
              **hf_scaling(scaling, kw["head_dim"], theta, where))
    kw.update(hf_sliding(c, kw["n_layers"], where, lambda i: True))
    kw.update(hf_moe(c, where, experts_key="num_local_experts", ffn_key="intermediate_size", norm_default=True))
    return ModelConfig(**kw)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    from . import llama
    return llama.config_from_gguf(m, kw, tensors, read)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    return w
