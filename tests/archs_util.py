"""Tiny random models of each architecture family, made with transformers, and a GGUF writer that lays them
out as llama.cpp's converter does (metadata keys, tensor names, Q/K permutation for llama, +1 on gemma3 norms)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VOCAB = 300
BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
QK_SCALE, W_STD = 2.0, 0.05
SLIDING, FULL = "sliding_attention", "full_attention"


def _configs():
    import transformers as T
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
        "llama3": (T.LlamaConfig, T.LlamaForCausalLM, {"rope_scaling": llama3, "rope_theta": 500000.0}),
        "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": 7}),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": 32}),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
                   {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 6, "tie_word_embeddings": True,
                    "layer_types": [SLIDING, FULL, SLIDING], "final_logit_softcapping": 3.0,
                    "rope_parameters": {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                        FULL: {"rope_type": "default", "rope_theta": 1000000.0}},
                    "hidden_activation": "gelu_pytorch_tanh"}),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"sliding_window": 9, "original_max_position_embeddings": 128,
                                                   "pad_token_id": 0}),
        "qwen3moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM, MOE | {"head_dim": 32, "norm_topk_prob": True}),
        "qwen2moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM, MOE | {"shared_expert_intermediate_size": 64}),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, {"num_local_experts": 8, "num_experts_per_tok": 2,
                                                            "intermediate_size": 32}),
    }


# tiny mixture-of-experts models: 8 experts of 32 neurons, top 2 (Qwen: moe_intermediate_size)
MOE = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
MOE_KINDS = ("qwen3moe", "qwen2moe", "mixtral")
KINDS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3")     # dense (MOE_KINDS: tests/test_moe.py)


def _norm_center(kind: str, name: str) -> float:
    """Mean of a random norm weight: 1 (gemma3: 0, its norms multiply by 1 + w); gemma3's post-attention and
    post-FFN norms small (as trained ones are), and its q/k norms below 1: else each block's output has unit RMS
    and the QK-normed scores are large, and the random model is chaotic enough that 8-bit rounding moves its
    logits past the tolerance (checked: with the HF weights replaced by their q8 round trip and float matmuls,
    every family agrees with transformers to ~5e-4)."""
    if kind != "gemma3":
        return 1.0
    if "q_norm" in name or "k_norm" in name:
        return -0.5
    return -0.8 if ("post_attention" in name or "post_feedforward" in name) else 0.0


def make_tiny(kind: str, out: Path, seed: int = 0) -> Path:
    """A random ``kind`` model saved as a HF folder (float32 safetensors + a byte-level BPE tokenizer.json)."""
    import torch
    from synthetic import build_tokenizer

    cfg_cls, model_cls, extra = _configs()[kind]
    cfg = cfg_cls(**{**BASE, **extra})
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:          # norms and biases: random, so the (1 + w) fold and the biases are exercised
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + _norm_center(kind, name)
                        if name.endswith("norm.weight") else 0.5 * torch.randn(p.shape, generator=g))
            else:
                scale = QK_SCALE if ("q_proj" in name or "k_proj" in name) else 1.0   # peaky attention: windows matter
                p.copy_(scale * W_STD * torch.randn(p.shape, generator=g))
    out = Path(out)
    model.save_pretrained(str(out), safe_serialization=True)
    build_tokenizer(VOCAB).save(str(out / "tokenizer.json"))
    return out


def hf_logits(hf_dir: Path, ids) -> np.ndarray:
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3",
             "phi3": "phi3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _gguf_name(hf: str, arch: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if hf in glob:
        return glob[hf]
    _, _, i, rest = hf.split(".", 3)
    mod, suffix = rest.rsplit(".", 1)
    if mod == "post_attention_layernorm":      # gemma3: the post-attention norm; else the pre-FFN one
        name = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    else:
        name = {"pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}.get(mod) \
            or GGUF_LAYER[mod]
    return f"blk.{i}.{name}.{suffix}"


_EXPERT_PARTS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                 "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
_MOE_OTHER = {"mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
              "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
              "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}


def _stack_experts(st: dict, E: int) -> dict:
    """HF per-expert tensors -> llama.cpp's blk.{i}.ffn_{gate,up,down}_exps (E, rows, cols), the router and the
    shared expert under their GGUF names; everything else as it was."""
    if not E:
        return st
    out, exps = {}, {}
    for name, t in st.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i, e, kind = parts[2], int(parts[parts.index("experts") + 1]), parts[-2]
            exps.setdefault((i, _EXPERT_PARTS[kind]), {})[e] = t
            continue
        mod = ".".join(parts[3:-1]) if name.startswith("model.layers.") else None
        if mod in _MOE_OTHER:
            v = np.asarray(t, np.float32)
            out[f"blk.{parts[2]}.{_MOE_OTHER[mod]}.weight"] = v.reshape(-1) if mod == "mlp.shared_expert_gate" else v
            continue
        out[name] = t
    for (i, g), d in exps.items():
        out[f"blk.{i}.{g}.weight"] = np.stack([np.asarray(d[e], np.float32) for e in range(E)])
    return out


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotate-half rows interleaved in pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(hf_dir: Path) -> np.ndarray:
    """rope_freqs from transformers' own llama3 inverse frequencies (default / llama3), independent of powerlow."""
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.AutoConfig.from_pretrained(str(hf_dir))
    inv3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    hd = cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    return (inv / inv3.double().numpy()).astype(np.float32)


def gguf_blocks(t: np.ndarray, qtype: str, seed: int = 0):
    """A float matrix (rows, cols) as GGML blocks of ``qtype`` -> (raw uint8 (rows, row bytes), GGML type): the gguf
    package's quantizers where it has one (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), powerlow's for the K-quants it computes
    (Q4_K, Q5_K, Q6_K: raw GGML blocks), and random blocks with small scales for Q2_K / Q3_K (no quantizer at hand:
    they stand for a file made elsewhere)."""
    import gguf
    from powerlow import formats
    typ = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return formats.quantize(t, qtype.lower()).planes["qs"], typ
    if qtype in ("Q2_K", "Q3_K"):
        rng = np.random.default_rng(seed)
        size, d_at = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,))}[qtype]
        b = rng.integers(0, 256, (t.shape[0], t.shape[1] // 256, size), dtype=np.uint8)
        for off in d_at:                                     # d (and dmin) fp16 0.002
            b[:, :, off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return b.reshape(t.shape[0], -1), typ
    return gguf.quants.quantize(t, typ), typ


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32", **meta_override) -> Path:
    """The HF folder as llama.cpp's convert_hf_to_gguf.py would write it (F32 or GGML-quantized matrices, F32 norms);
    ``meta_override``: {key without the arch prefix: value} written instead of the true value (bad-input tests)."""
    import gguf
    from safetensors.numpy import load_file
    from synthetic import _read_tokenizer

    hf_dir = Path(hf_dir)
    c = json.loads((hf_dir / "config.json").read_text())
    arch = GGUF_ARCH[c["model_type"]]
    st = load_file(str(next(hf_dir.glob("*.safetensors"))))
    H, KV = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // H
    w = gguf.GGUFWriter(str(out), arch)
    meta = {"context_length": c["max_position_embeddings"], "embedding_length": c["hidden_size"],
            "block_count": c["num_hidden_layers"], "feed_forward_length": c["intermediate_size"],
            "attention.head_count": H, "attention.head_count_kv": KV,
            "attention.key_length": hd, "attention.value_length": hd}
    E = c.get("num_local_experts") or c.get("num_experts")
    if E:                     # llama.cpp's MoE keys (Mixtral: feed_forward_length is the expert's size)
        meta.update({"expert_count": E, "expert_used_count": c["num_experts_per_tok"]})
        if c.get("moe_intermediate_size"):
            meta["expert_feed_forward_length"] = c["moe_intermediate_size"]
        if c.get("shared_expert_intermediate_size"):
            meta["expert_shared_feed_forward_length"] = c["shared_expert_intermediate_size"]
    for k, v in {**meta, **meta_override}.items():
        w.add_uint32(f"{arch}.{k}", int(v))
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", float(c["rms_norm_eps"]))
    rp = c.get("rope_parameters") or {}
    theta = rp.get("full_attention", rp).get("rope_theta", 10000.0)
    w.add_rope_freq_base(float(theta))
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if c.get("sliding_window") and arch in ("gemma3", "llama", "phi3"):
        w.add_sliding_window(int(c["sliding_window"]))
    if arch == "gemma3":
        w.add_sliding_window_pattern([t == SLIDING for t in c["layer_types"]])
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
    tokens, types, merges = _read_tokenizer(hf_dir, c["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if (c.get("rope_parameters") or {}).get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", _llama3_factors(hf_dir))
    st = _stack_experts(st, E or 0)
    for name, t in st.items():
        t = np.ascontiguousarray(t, np.float32)
        g = name if name.startswith("blk.") else _gguf_name(name, arch)
        if arch == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            t = _permute(t, H if "attn_q" in g else KV)
        if arch == "gemma3" and g.endswith("norm.weight"):
            t = t + np.float32(1.0)                     # Gemma3Model.modify_tensors: norm_shift
        if t.ndim == 3 and qtype != "F32":          # experts (E, rows, cols): each expert's rows as blocks
            raw, typ = gguf_blocks(t.reshape(-1, t.shape[2]), qtype)
            w.add_tensor(g, raw.reshape(t.shape[0], t.shape[1], -1), raw_dtype=typ)
        elif t.ndim == 2 and qtype != "F32" and not g.endswith("ffn_gate_inp.weight"):   # the router stays F32
            raw, typ = gguf_blocks(t, qtype)
            w.add_tensor(g, raw, raw_dtype=typ)
        else:
            w.add_tensor(g, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


def tiny_models(tmp_path_factory):
    """kind -> (HF folder, model dir converted with --bits 8), made once per caller (a module's fixture)."""
    from powerlow.convert import convert
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(kind)
            hf = make_tiny(kind, root / "hf")
            made[kind] = (hf, convert(hf, root / "m", bits="8", progress=False))
        return made[kind]
    return get
