"""Blocks the architecture modules share: config keys of HF config.json and GGUF metadata, tensor names,
RoPE variants, and the check that a config agrees with the tensors it describes."""
from __future__ import annotations

import math

import numpy as np

from ..errors import PowerlowError

# canonical (GGUF) tensor name -> Hugging Face name; per layer under model.layers.{i}.
HF_GLOBAL = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight", "output": "lm_head.weight"}
HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
NORMS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm")


def hf_name(name: str, layer_map: dict = HF_LAYER) -> str:
    if name in HF_GLOBAL:
        return HF_GLOBAL[name]
    _, i, rest = name.split(".", 2)
    return f"model.layers.{i}.{layer_map[rest]}"


def part_rows(fam, name: str, cfg) -> slice | None:
    """Rows of a fused source tensor holding canonical tensor ``name`` (families that fuse, e.g. phi3), or None."""
    f = getattr(fam, "rows", None)
    if f is None or not name.startswith("blk."):
        return None
    return f(name.split(".", 2)[2], cfg)


def part_shape(shape: tuple, r: slice | None) -> tuple:
    if r is None:
        return shape
    return (max(0, min(r.stop, shape[0]) - r.start),) + tuple(shape[1:])


def take_rows(w, r: slice | None):
    """Rows r of a float32 array or a QMatrix."""
    if r is None:
        return w
    from .. import formats
    if isinstance(w, formats.QMatrix):
        return formats.select_rows(w, np.arange(r.start, r.stop))
    return np.ascontiguousarray(w[r])


def eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def hf_rope(c: dict, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from config.json: transformers >= 5 writes ``rope_parameters``
    (per layer type for gemma3), older checkpoints ``rope_theta`` + ``rope_scaling``."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        kind = params.get("rope_type", params.get("type", "default"))
        return float(params["rope_theta"]), (None if kind == "default" else params)
    scaling = c.get("rope_scaling") or None
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(c.get("rope_theta", 10000.0)), scaling


def llama3_freq_factors(head_dim: int, theta: float, s: dict) -> tuple[float, ...]:
    """Llama 3.x RoPE as divisors of each pair's frequency (llama.cpp's rope_freqs tensor): high frequencies
    (wavelength under original_max / high_freq_factor) kept, low ones divided by ``factor``, the band between
    interpolated smoothly; Hugging Face's _compute_llama3_parameters gives the same inverse frequencies."""
    try:
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old = float(s["original_max_position_embeddings"])
    except KeyError as e:
        raise PowerlowError(f"llama3 rope scaling lacks {e.args[0]!r} (needs factor, low_freq_factor, "
                            "high_freq_factor, original_max_position_embeddings)") from None
    if not (factor > 0 and hi > lo > 0 and old > 0):
        raise PowerlowError(f"llama3 rope scaling {s}: needs factor > 0 and high_freq_factor > low_freq_factor > 0")
    out = []
    for i in range(head_dim // 2):
        inv = theta ** (-2.0 * i / head_dim)
        wavelen = 2 * math.pi / inv
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return tuple(out)


def hf_scaling(scaling: dict | None, head_dim: int, theta: float, where: str) -> dict:
    """ModelConfig keywords of a HF rope scaling: linear, llama3, or none."""
    if scaling is None:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return {"rope_scaling_factor": float(scaling.get("factor", 1.0))}
    if kind == "llama3":
        return {"rope_freq_factors": llama3_freq_factors(head_dim, theta, scaling)}
    raise PowerlowError(f"{where}: rope scaling type {kind!r} is not supported (powerlow runs none, linear and llama3)")


def hf_layer_types(c: dict, n_layers: int, where: str) -> list[str] | None:
    """config.json's ``layer_types`` ("sliding_attention" / "full_attention" per layer), checked."""
    lt = c.get("layer_types")
    if lt is None:
        return None
    if not isinstance(lt, list) or len(lt) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in lt):
        raise PowerlowError(f"{where}: layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                            f"{n_layers} layers, got {lt!r}")
    return lt


def positive_int(v, name: str, missing: str, fix: str = "") -> int:
    """v as a positive int, else a PowerlowError: ``missing`` when v is None, else naming ``name`` = v (+ ``fix``)."""
    if v is None:
        raise PowerlowError(missing)
    try:
        v = int(v)
    except (TypeError, ValueError):
        raise PowerlowError(f"{name} = {v!r} is not an integer") from None
    if v <= 0:
        raise PowerlowError(f"{name} = {v} must be positive{fix}")
    return v


def hf_int(c: dict, key: str, where: str, default=None) -> int:
    v = c.get(key)
    if v is None:              # absent, or null (transformers writes "head_dim": null for Mixtral)
        v = default
    return positive_int(v, f"{where}/config.json: {key}",
                        f"{where}/config.json lacks {key!r}; it is not a complete HF model config")


class GGUFMeta:
    """Reads ``{arch}.*`` keys of a GGUF file; a missing or non-positive required count is a PowerlowError."""

    def __init__(self, reader, arch: str, path):
        self.reader, self.arch, self.path = reader, arch, path

    def raw(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def get(self, key: str, default=None):
        return self.raw(f"{self.arch}.{key}", default)

    def count(self, key: str, default=None) -> int:
        return positive_int(self.get(key, default), f"{self.path}: GGUF metadata {self.arch}.{key}",
                            f"{self.path}: GGUF metadata lacks {self.arch}.{key}; the file is incomplete — re-export it",
                            "; the file is broken — re-export it")


def gguf_common(m: GGUFMeta, vocab: int) -> dict:
    """The ModelConfig keywords every llama-like GGUF architecture writes the same way."""
    hidden = m.count("embedding_length")
    heads = m.count("attention.head_count")
    eos = m.raw("tokenizer.ggml.eos_token_id")
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=m.count("feed_forward_length"),
        n_layers=m.count("block_count"),
        n_heads=heads,
        n_kv_heads=m.count("attention.head_count_kv", heads),
        head_dim=m.count("attention.key_length", m.get("rope.dimension_count", hidden // heads)),
        rms_eps=float(m.get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m.get("rope.freq_base", 10000.0)),
        max_positions=m.count("context_length", 2048),
        bos_id=m.raw("tokenizer.ggml.bos_token_id"),
        eos_ids=eos_tuple(eos),
    )


def gguf_linear_scaling(m: GGUFMeta) -> dict:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind == "linear":
        return {"rope_scaling_factor": float(m.get("rope.scaling.factor", 1.0))}
    raise PowerlowError(f"{m.path}: GGUF rope scaling {kind!r} is not supported (powerlow runs none, linear, and "
                        "llama3 through the rope_freqs tensor)")


def check_shapes(cfg, shape_of, where: str, names) -> None:
    """Every tensor's shape against what the config says (shape_of(name) -> HF-order shape tuple). Metadata that
    disagrees with the tensors is refused here, at convert, instead of making a broken model dir."""
    K, F, qd, kd, hd = cfg.hidden_size, cfg.ffn_neurons, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    E, Fs = cfg.n_experts, cfg.shared_ffn
    want = {"token_embd": (cfg.vocab_size, K), "output": (cfg.vocab_size, K), "output_norm": (K,),
            "attn_norm": (K,), "ffn_norm": (K,), "post_attention_norm": (K,), "post_ffw_norm": (K,),
            "attn_q": (qd, K), "attn_k": (kd, K), "attn_v": (kd, K), "attn_output": (K, qd),
            "attn_q.bias": (qd,), "attn_k.bias": (kd,), "attn_v.bias": (kd,), "attn_q_norm": (hd,), "attn_k_norm": (hd,),
            "ffn_gate": (F, K), "ffn_up": (F, K), "ffn_down": (K, F), "ffn_gate_inp": (E, K),
            "ffn_gate_shexp": (Fs, K), "ffn_up_shexp": (Fs, K), "ffn_down_shexp": (K, Fs), "ffn_gate_inp_shexp": (K,)}
    keys = {"attn_q": "head_count x head_dim", "attn_k": "head_count_kv x head_dim", "attn_v": "head_count_kv x head_dim",
            "ffn_gate": "feed_forward_length", "ffn_up": "feed_forward_length", "ffn_down": "feed_forward_length",
            "ffn_gate_inp": "expert_count", "ffn_gate_shexp": "expert_shared_feed_forward_length"}
    if cfg.moe:
        keys.update(dict.fromkeys(("ffn_gate", "ffn_up", "ffn_down"), "expert_count x expert_feed_forward_length"))
    for name in names:
        short = name.split(".", 2)[-1] if name.startswith("blk.") else name
        got = tuple(int(s) for s in shape_of(name))
        exp = want[short]
        if got != exp:
            what = keys.get(short, "embedding_length" if K in exp else "the head sizes")
            raise PowerlowError(
                f"{where}: tensor {name} is {got} but the config says {exp} (hidden {K}, heads {cfg.n_heads}/"
                f"{cfg.n_kv_heads} x {hd}, FFN {F}{f' = {E} experts x {cfg.expert_ffn}' if E else ''}); the metadata "
                f"({what}) and the tensors disagree — the file is broken or was edited: re-export it from the original "
                "model")


HF_ACTS = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def hf_base(c: dict, where: str, arch: str) -> dict:
    """The ModelConfig keywords every llama-like config.json spells the same way."""
    hidden = hf_int(c, "hidden_size", where)
    heads = hf_int(c, "num_attention_heads", where)
    act = c.get("hidden_act", c.get("hidden_activation", "silu"))
    return dict(
        arch=arch,
        vocab_size=hf_int(c, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=hf_int(c, "intermediate_size", where),
        n_layers=hf_int(c, "num_hidden_layers", where),
        n_heads=heads,
        n_kv_heads=hf_int(c, "num_key_value_heads", where, c.get("num_key_value_heads") or heads),
        head_dim=hf_int(c, "head_dim", where, c.get("head_dim") or hidden // heads),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_positions=hf_int(c, "max_position_embeddings", where, 2048),
        hidden_act=HF_ACTS.get(act, act),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_id=c.get("bos_token_id"),
        eos_ids=eos_tuple(c.get("eos_token_id")),
    )


def hf_sliding(c: dict, n_layers: int, where: str, default_local) -> dict:
    """sliding_window / swa_layers from config.json: its layer_types if written (transformers >= 4.5x), else
    ``default_local(i)`` for each layer i (the family's rule) when a sliding_window is set."""
    sw = c.get("sliding_window")
    lt = hf_layer_types(c, n_layers, where)
    if lt is not None:
        local = tuple(i for i, t in enumerate(lt) if t == "sliding_attention")
    elif sw:
        local = tuple(i for i in range(n_layers) if default_local(i))
    else:
        local = ()
    if not local:
        return {}
    if not sw or int(sw) <= 0:
        raise PowerlowError(f"{where}/config.json: sliding-attention layers but sliding_window = {sw!r}")
    return {"sliding_window": int(sw), "swa_layers": local}
