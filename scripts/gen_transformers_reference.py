"""Add transformers' side to tests/data/llamacpp_qwen.json: Qwen2ForCausalLM in fp32 with the GGUF's weights
dequantized by the `gguf` package (not by powerlow), teacher-forced over llama.cpp's greedy continuations; per
continuation position its argmax and the log-probs of llama.cpp's token and of its own top token.

    python scripts/gen_llamacpp_reference.py --qwen && python scripts/gen_transformers_reference.py

Needs torch and transformers (the test extras) and ~8 GB of RAM.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data" / "llamacpp_qwen.json"

# GGUF tensor name (per layer) -> transformers parameter; qwen2 GGUFs keep HF's Q/K row order (llama.cpp permutes
# Q/K only for the llama architecture)
LAYER = {"attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
         "attn_q.bias": "self_attn.q_proj.bias", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_k.bias": "self_attn.k_proj.bias", "attn_v.weight": "self_attn.v_proj.weight",
         "attn_v.bias": "self_attn.v_proj.bias", "attn_output.weight": "self_attn.o_proj.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
         "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def load_qwen2(path: Path):
    import gguf
    import torch
    import transformers

    r = gguf.GGUFReader(str(path), "r")

    def f(key):
        return r.fields[f"qwen2.{key}"].contents()
    cfg = transformers.Qwen2Config(
        vocab_size=int(r.tensors[[t.name for t in r.tensors].index("token_embd.weight")].shape[1]),
        hidden_size=f("embedding_length"), intermediate_size=f("feed_forward_length"),
        num_hidden_layers=f("block_count"), num_attention_heads=f("attention.head_count"),
        num_key_value_heads=f("attention.head_count_kv"), rms_norm_eps=f("attention.layer_norm_rms_epsilon"),
        rope_theta=f("rope.freq_base"), max_position_embeddings=f("context_length"), tie_word_embeddings=False,
        torch_dtype="float32")
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    sd = {}
    for t in r.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if t.name in TOP:
            key = TOP[t.name]
        else:
            _, i, rest = t.name.split(".", 2)
            key = f"model.layers.{i}.{LAYER[rest]}"
        sd[key] = torch.from_numpy(np.array(w))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


def main() -> int:
    import torch
    sys.path.insert(0, str(HERE))
    from fetch_qwen import default_path

    data = json.loads(DATA.read_text())
    model = load_qwen2(default_path())
    torch.set_num_threads(2)
    for p in data["prompts"]:
        seq = p["ids"] + p["continuation"]
        with torch.no_grad():
            lg = model(torch.tensor([seq])).logits[0].double().numpy()
        lp = lg - lg.max(axis=1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
        n0 = len(p["ids"]) - 1
        rows = lp[n0: len(seq) - 1]
        p["transformers_argmax"] = [int(i) for i in rows.argmax(axis=1)]
        p["transformers_logprob_of_llamacpp"] = [round(float(rows[j, seq[n0 + 1 + j]]), 5) for j in range(len(rows))]
        agree = np.mean(np.array(p["transformers_argmax"]) == np.array(seq[n0 + 1:]))
        print(f"{p['text'][:40]!r}: transformers = llama.cpp at {agree:.3f} of {len(rows)} positions")
    data["transformers"] = {"version": __import__("transformers").__version__, "dtype": "float32",
                            "weights": "gguf.quants.dequantize"}
    DATA.write_text(json.dumps(data, indent=0))
    print(f"wrote {DATA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
