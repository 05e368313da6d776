"""Phi-3 (dense, HF Phi3ForCausalLM; GGUF architecture ``phi3``): the llama block with q, k, v fused into one
``qkv_proj`` and gate, up fused into one ``gate_up_proj`` (gate rows first); split into the canonical tensors at
convert. A sliding_window, when set, applies to every layer (transformers' Phi3Model).

GGUF: llama.cpp's converter (Phi3MiniModel) keeps the fusions as ``attn_qkv`` and ``ffn_up`` (2 x
feed_forward_length rows, gate first) and writes rows in Hugging Face order (NEOX RoPE: no permutation).
LongRoPE checkpoints (rope_factors_long/short) and partial rotary dims are refused.
"""
from __future__ import annotations

from ..arch import ModelConfig
from ..errors import PowerlowError
from .common import HF_LAYER, gguf_common, hf_base, hf_rope, hf_scaling, hf_sliding

NAME = "phi3"
HF_LAYER_MAP = {**HF_LAYER, "attn_q": "self_attn.qkv_proj.weight", "attn_k": "self_attn.qkv_proj.weight",
                "attn_v": "self_attn.qkv_proj.weight", "ffn_gate": "mlp.gate_up_proj.weight",
                "ffn_up": "mlp.gate_up_proj.weight"}
GGUF_SOURCE = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "ffn_gate": "ffn_up", "ffn_up": "ffn_up"}


def rows(part: str, cfg: ModelConfig):
    """The rows of the fused tensor that hold canonical tensor ``part`` (None: not a fused part)."""
    qd, kd, F = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    return {"attn_q": slice(0, qd), "attn_k": slice(qd, qd + kd), "attn_v": slice(qd + kd, qd + 2 * kd),
            "ffn_gate": slice(0, F), "ffn_up": slice(F, 2 * F)}.get(part)


def config_from_hf(c: dict, where: str) -> ModelConfig:
    kw = hf_base(c, where, NAME)
    theta, scaling = hf_rope(c)
    prf = float((c.get("rope_parameters") or {}).get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0)))
    if prf != 1.0:
        raise PowerlowError(f"{where}: partial_rotary_factor {prf} is not supported (powerlow rotates whole heads)")
    kw.update(rope_theta=theta, attn_bias=False, **hf_scaling(scaling, kw["head_dim"], theta, where))
    kw.update(hf_sliding(c, kw["n_layers"], where, lambda i: True))
    return ModelConfig(**kw)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    if "rope_factors_long.weight" in tensors or m.get("rope.scaling.type") not in (None, "none"):
        raise PowerlowError(f"{m.path}: a LongRoPE / scaled-RoPE Phi-3 is not supported (powerlow runs the plain RoPE ones)")
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw}
    sw = m.get("attention.sliding_window")
    if sw:
        kw.update(sliding_window=int(sw), swa_layers=tuple(range(kw["n_layers"])))
    return ModelConfig(arch=NAME, attn_bias=False, **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    return w
