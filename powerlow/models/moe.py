"""What the mixture-of-experts families share (qwen3moe, qwen2moe, mixtral): config keys, tensor names, and how
a layer's experts are laid side by side as one FFN of n_experts * expert_ffn neurons for ffn.bin.

A layer's canonical MoE tensors (powerlow.loaders: HF row order, (out, in)):
    ffn_gate_inp          (E, K)      the router, kept float32 (its top-k choice is the exact predictor)
    ffn_gate, ffn_up      (E*F, K)    expert e's rows at e*F .. e*F + F - 1 (GGUF ffn_{gate,up}_exps (E, F, K))
    ffn_down              (K, E*F)    expert e's columns at e*F .. (GGUF ffn_down_exps (E, K, F): per row of K,
                                      the experts' blocks side by side; F is a multiple of the block, so no
                                      block straddles two experts and the bytes are copied, never re-quantized)
    ffn_gate_shexp, ffn_up_shexp (Fs, K), ffn_down_shexp (K, Fs), ffn_gate_inp_shexp (K,)   qwen2moe's shared
                                      expert, resident (every token runs it)
"""
from __future__ import annotations

from ..errors import PowerlowError
from .common import HF_LAYER

EXPERT_PARTS = ("ffn_gate", "ffn_up", "ffn_down")
SHARED = ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp", "ffn_gate_inp_shexp")
GGUF_EXPS = {"ffn_gate": "ffn_gate_exps", "ffn_up": "ffn_up_exps", "ffn_down": "ffn_down_exps"}

# Hugging Face names under model.layers.{i}.: the router, per-expert matrices ({e}: the expert), and the fused
# 3-D parameters transformers >= 5 keeps in memory (experts.gate_up_proj (E, 2F, K), experts.down_proj (E, K, F))
QWEN_MOE_LAYER = {**HF_LAYER, "ffn_gate_inp": "mlp.gate.weight",
                  "ffn_gate_shexp": "mlp.shared_expert.gate_proj.weight", "ffn_up_shexp": "mlp.shared_expert.up_proj.weight",
                  "ffn_down_shexp": "mlp.shared_expert.down_proj.weight",
                  "ffn_gate_inp_shexp": "mlp.shared_expert_gate.weight"}
QWEN_MOE_EXPERTS = {"ffn_gate": "mlp.experts.{e}.gate_proj.weight", "ffn_up": "mlp.experts.{e}.up_proj.weight",
                    "ffn_down": "mlp.experts.{e}.down_proj.weight", "fused": "mlp.experts."}


def hf_moe(c: dict, where: str, *, experts_key: str, ffn_key: str, norm_default: bool, shared: bool = False) -> dict:
    """ModelConfig keywords of a MoE config.json; layers that are not MoE (mlp_only_layers, decoder_sparse_step)
    are refused: every layer's FFN must be experts."""
    from .common import hf_int
    # transformers >= 5 writes num_local_experts for every family; released Qwen checkpoints say num_experts
    other = "num_local_experts" if experts_key == "num_experts" else "num_experts"
    kw = dict(n_experts=hf_int(c, experts_key if experts_key in c else other, where), n_experts_used=hf_int(c, "num_experts_per_tok", where),
              expert_ffn=hf_int(c, ffn_key, where), norm_topk=bool(c.get("norm_topk_prob", norm_default)))
    if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1) or 1) != 1:
        raise PowerlowError(f"{where}/config.json: mlp_only_layers {c.get('mlp_only_layers')} / decoder_sparse_step "
                            f"{c.get('decoder_sparse_step')}: powerlow runs MoE models whose every layer is experts")
    if shared:
        kw["shared_ffn"] = int(c.get("shared_expert_intermediate_size") or 0)
    if kw["n_experts_used"] > kw["n_experts"]:
        raise PowerlowError(f"{where}/config.json: num_experts_per_tok {kw['n_experts_used']} > {kw['n_experts']} experts")
    return kw


def gguf_moe(m, *, norm_default: bool, ffn_key: str = "expert_feed_forward_length") -> dict:
    """ModelConfig keywords of a MoE GGUF ({arch}.expert_count etc.)."""
    kw = dict(n_experts=m.count("expert_count"), n_experts_used=m.count("expert_used_count"),
              expert_ffn=m.count(ffn_key) if m.get(ffn_key) is not None else m.count("feed_forward_length"))
    norm = m.get("expert_weights_norm")
    kw["norm_topk"] = norm_default if norm is None else bool(norm)
    if m.get("expert_shared_feed_forward_length") is not None:
        kw["shared_ffn"] = m.count("expert_shared_feed_forward_length")
    return kw


def is_gguf_moe(m) -> bool:
    return m.get("expert_count") not in (None, 0)
