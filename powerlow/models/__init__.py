"""The architecture registry: one module per model family, keyed by the checkpoint's own architecture name
(HF config.json ``model_type`` or ``architectures``, GGUF ``general.architecture``).

A family module has:
    NAME                     the family
    HF_LAYER_MAP             canonical per-layer tensor name -> HF name under model.layers.{i}.
    config_from_hf(c, where) -> ModelConfig           from config.json
    config_from_gguf(meta, kw, tensors, read) -> ModelConfig   from GGUF metadata (kw: vocab_size, tie_embeddings)
    sanitize(name, w, cfg, origin) -> w               the one per-tensor fix-up ("hf" or "gguf" origin)
and, for checkpoints that fuse tensors (phi3):
    GGUF_SOURCE              canonical per-layer name -> the GGUF tensor holding it
    rows(part, cfg)          the rows of the fused tensor that are canonical tensor ``part`` (None: not fused)
"""
from __future__ import annotations

from ..errors import PowerlowError
from . import gemma3, llama, mixtral, phi3, qwen2, qwen2moe, qwen3, qwen3moe

FAMILIES = {m.NAME: m for m in (llama, qwen2, qwen3, gemma3, phi3, qwen3moe, qwen2moe, mixtral)}

# every name a checkpoint may give its architecture -> family (HF model_type, HF architectures[0], GGUF arch)
ALIASES = {
    "llama": "llama", "mistral": "llama", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
    "qwen2": "qwen2", "Qwen2ForCausalLM": "qwen2",
    "qwen3": "qwen3", "Qwen3ForCausalLM": "qwen3",
    "gemma3_text": "gemma3", "gemma3": "gemma3", "Gemma3ForCausalLM": "gemma3",
    "phi3": "phi3", "Phi3ForCausalLM": "phi3",
    "qwen3_moe": "qwen3moe", "qwen3moe": "qwen3moe", "Qwen3MoeForCausalLM": "qwen3moe",
    "qwen2_moe": "qwen2moe", "qwen2moe": "qwen2moe", "Qwen2MoeForCausalLM": "qwen2moe",
    "mixtral": "mixtral", "MixtralForCausalLM": "mixtral",
}
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3moe", "qwen2moe", "mixtral")


def family(name, where: str, what: str = "architecture"):
    """The family module of architecture ``name``, or a PowerlowError naming the supported ones."""
    fam = ALIASES.get(name) if isinstance(name, str) else None
    if fam is None:
        raise PowerlowError(f"{where}: {what} {name!r} is not supported; powerlow runs {', '.join(SUPPORTED)} "
                            "(HF model_type llama, mistral, qwen2, qwen3, gemma3_text, gemma3, phi3, qwen3_moe, qwen2_moe, mixtral)")
    return FAMILIES[fam]


def hf_family(c: dict, where: str):
    """The family of a config.json: its model_type, else its architectures[0]."""
    mt = c.get("model_type")
    if mt is None and isinstance(c.get("architectures"), list) and c["architectures"]:
        return family(c["architectures"][0], where, "architectures")
    return family(mt, where, "model_type")
