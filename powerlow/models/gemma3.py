"""Gemma 3 text models (HF Gemma3ForCausalLM, model_type ``gemma3_text``, or the text model of a
Gemma3ForConditionalGeneration, model_type ``gemma3``; GGUF architecture ``gemma3``).

The block: x += post_attention_norm(attn(attn_norm(x))); x += post_ffw_norm(ffn(ffn_norm(x))), with GeGLU
(tanh-approximated GELU), QK-norm, softmax scale query_pre_attn_scalar^-0.5, embeddings times sqrt(hidden)
(rounded to the checkpoint's dtype, as Gemma3TextScaledWordEmbedding does), interleaved sliding-window
(local) and global layers with their own RoPE bases (rope_local_base_freq, unscaled, for local layers), and
final logit softcapping if the config sets it.

Gemma's RMSNorm multiplies by (1 + w). sanitize folds the 1 into the stored weight of every norm at convert
(HF route), so the engine's rmsnorm (x / rms * w) is unchanged. llama.cpp's converter does the same fold
(Gemma3Model.modify_tensors adds norm_shift = 1.0 to every "*norm.weight"), so GGUF norms are taken as they
are, and its Q/K rows are in Hugging Face order (no permutation, unlike ``llama``).
"""
from __future__ import annotations

import math

import numpy as np

from ..arch import ModelConfig
from ..errors import PowerlowError
from .common import HF_LAYER, NORMS, gguf_common, gguf_linear_scaling, hf_base, hf_rope, hf_scaling, hf_sliding

NAME = "gemma3"
HF_LAYER_MAP = {**HF_LAYER, "ffn_norm": "pre_feedforward_layernorm.weight",
                "post_attention_norm": "post_attention_layernorm.weight",
                "post_ffw_norm": "post_feedforward_layernorm.weight"}
SWA_PATTERN = 6          # every 6th layer global: HF's default sliding_window_pattern and llama.cpp's set_swa_pattern(6)
LOCAL_THETA = 10000.0    # HF's default rope_local_base_freq; llama.cpp hardcodes it for gemma3 unless the GGUF
                         # has gemma3.rope.freq_base_swa


def _embed_scale(hidden: int, dtype: str | None) -> float:
    """sqrt(hidden) rounded to the embedding dtype (HF multiplies by the scale cast to the weights' dtype)."""
    s = np.float32(math.sqrt(hidden))
    if dtype in ("bfloat16", "bf16"):
        u = int(np.array([s], np.float32).view(np.uint32)[0])
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16          # round to nearest even bf16
        return float(np.array([u], np.uint32).view(np.float32)[0])
    if dtype in ("float16", "fp16"):
        return float(np.float16(s))
    return float(s)


def _pattern_local(pattern: int):
    return lambda i: pattern <= 0 or (i + 1) % pattern != 0


# Gemma3ForConditionalGeneration (model_type "gemma3"): the text model's tensors under one of these prefixes (instead of
# "model."), its config under text_config, which real checkpoints write sparsely: transformers' Gemma3TextConfig
# defaults for what they leave out (sizes stay required)
HF_PREFIXES = ("language_model.model.", "model.language_model.")
TEXT_DEFAULTS = {"vocab_size": 262208, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                 "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072,
                 "sliding_window": 4096, "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1000000.0,
                 "rope_local_base_freq": 10000.0, "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": 1}


def _text_config(c: dict, where: str) -> dict:
    """The text model's config of a vision-language checkpoint (the vision tower is not converted)."""
    tc = c["text_config"]
    if not isinstance(tc, dict):
        raise PowerlowError(f"{where}/config.json: text_config is not an object")
    out = {**TEXT_DEFAULTS, **tc}
    if "rope_parameters" in tc:                      # transformers >= 5 spells both bases here
        out.pop("rope_theta"), out.pop("rope_local_base_freq")
    for k in ("bos_token_id", "eos_token_id", "dtype", "torch_dtype"):
        if c.get(k) is not None:
            out[k] = c[k]
    return out


def config_from_hf(c: dict, where: str) -> ModelConfig:
    if "text_config" in c:
        c = _text_config(c, where)
    if c.get("attn_logit_softcapping"):
        raise PowerlowError(f"{where}: attn_logit_softcapping is not supported (Gemma 3 has none; this looks like Gemma 2)")
    kw = hf_base(c, where, NAME)
    theta, scaling = hf_rope(c, "full_attention")
    local = float(c["rope_local_base_freq"]) if "rope_local_base_freq" in c else hf_rope(c, "sliding_attention")[0]
    if "rope_parameters" not in c and "rope_local_base_freq" not in c:
        local = LOCAL_THETA
    kw.update(rope_theta=theta, rope_theta_local=local, **hf_scaling(scaling, kw["head_dim"], theta, where))
    if kw.get("rope_freq_factors"):
        raise PowerlowError(f"{where}: llama3 rope scaling on a Gemma 3 model is not supported")
    pattern = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", SWA_PATTERN)))
    kw.update(hf_sliding(c, kw["n_layers"], where, _pattern_local(pattern)))
    kw.update(tie_embeddings=bool(c.get("tie_word_embeddings", True)), attn_bias=bool(c.get("attention_bias", False)),
              qk_norm=True, post_norms=True,
              attn_scale=float(c.get("query_pre_attn_scalar", kw["head_dim"])) ** -0.5,
              embed_scale=_embed_scale(kw["hidden_size"], c.get("dtype", c.get("torch_dtype"))),
              logit_softcap=float(c.get("final_logit_softcapping") or 0.0))
    return ModelConfig(**kw)


def config_from_gguf(m, kw: dict, tensors: dict, read) -> ModelConfig:
    kw = {**gguf_common(m, kw.pop("vocab_size")), **kw, **gguf_linear_scaling(m)}
    L, hidden = kw["n_layers"], kw["hidden_size"]
    pattern = m.get("attention.sliding_window_pattern", SWA_PATTERN)
    if isinstance(pattern, (list, tuple)):           # newer files: one flag per layer
        local = tuple(i for i, f in enumerate(pattern) if f)
    else:
        local = tuple(i for i in range(L) if _pattern_local(int(pattern))(i))
    sw = m.get("attention.sliding_window")
    if local and sw is None:
        raise PowerlowError(f"{m.path}: GGUF metadata lacks gemma3.attention.sliding_window; re-export the file")
    # llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3): the 27B model (62 layers) scales by (hidden / heads)^-0.5, every
    # other size by head_dim^-0.5 -- the query_pre_attn_scalar of their HF configs, which the GGUF does not carry
    scalar = hidden / kw["n_heads"] if L == 62 else kw["head_dim"]
    return ModelConfig(arch=NAME, hidden_act="gelu_tanh", attn_bias=False, qk_norm=True, post_norms=True,
                       rope_theta_local=float(m.get("rope.freq_base_swa", LOCAL_THETA)), sliding_window=int(sw or 0) if local else 0, swa_layers=local,
                       attn_scale=float(scalar) ** -0.5, embed_scale=_embed_scale(hidden, None),
                       logit_softcap=float(m.get("final_logit_softcapping") or 0.0), **kw)


def sanitize(name: str, w, cfg: ModelConfig, origin: str):
    """HF norms: (1 + w) folded into the weight (see the module docstring); GGUF ones already hold it."""
    if origin == "hf" and (name == "output_norm" or name.split(".")[-1] in NORMS):
        return (np.asarray(w, np.float32) + np.float32(1.0)).astype(np.float32)
    return w
