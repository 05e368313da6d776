"""SmolLM2-135M-Instruct (the default model, real weights): tokens and logits against llama.cpp and transformers."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import log_softmax, run_cli, teacher_forced

NEAR_TIE = 0.25   # log-prob gap under which rounding may flip the argmax (the tolerance)


def test_tokenization_matches_llamacpp(smol, llamacpp_ref):
    for p in llamacpp_ref["prompts"]:
        text = smol.tokenizer.apply_chat(p["text"]) if p["chat"] else p["text"]
        assert text == p["formatted"]
        assert smol.tokenize(text) == p["ids"], p["text"]


def test_detokenize_roundtrip(smol, llamacpp_ref):
    for p in llamacpp_ref["prompts"]:
        assert smol.detokenize(p["ids"]) == p["formatted"]


def test_teacher_forced_agreement_with_llamacpp(smol, llamacpp_ref):
    rows = teacher_forced(smol, llamacpp_ref["prompts"])
    gaps = [lp[mine] - lp[ref] for mine, ref, _, lp in rows if mine != ref]
    rate = 1 - len(gaps) / len(rows)
    print(f"\nllama.cpp agreement {rate:.3f} over {len(rows)} positions; misses' gaps {np.round(gaps, 3).tolist()}")
    assert all(g <= NEAR_TIE for g in gaps), f"a miss that is not a near-tie: {max(gaps):.3f}"
    assert rate >= 0.96       # measured 0.979 (4 near-tie misses of 192): room for 3 more near ties, not for a bug


def test_greedy_decode_matches_prefill(smol):
    """Incremental decode (one token at a time, KV cache) gives the logits of one full forward."""
    ids = smol.tokenize("The quick brown fox jumps over the lazy dog because")
    full = smol.forward(ids)
    smol.forward(ids[:5])
    steps = [smol.forward(ids[i:i + 1], start_pos=i)[0] for i in range(5, len(ids))]
    np.testing.assert_allclose(np.stack(steps), full[5:], rtol=0, atol=2e-3 * np.abs(full).max())


@pytest.fixture(scope="module")
def hf_llama(smol_gguf):
    """transformers LlamaForCausalLM with the GGUF's weights dequantized (Q/K rows un-permuted by our loader)."""
    import torch
    import transformers
    from powerlow import formats
    from powerlow.loaders import open_source

    src = open_source(smol_gguf)
    c = src.config
    hc = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                  num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
                                  rope_theta=c.rope_theta, max_position_embeddings=c.max_positions,
                                  tie_word_embeddings=c.tie_embeddings, hidden_act=c.hidden_act)
    model = transformers.LlamaForCausalLM(hc).eval()
    names = {"token_embd": "model.embed_tokens.weight", "output_norm": "model.norm.weight"}
    layer = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for n in src.names():
        w = src.get(n)
        w = formats.dequantize(w) if isinstance(w, formats.QMatrix) else w
        if n in names:
            key = names[n]
        else:
            _, i, rest = n.split(".", 2)
            key = f"model.layers.{i}.{layer[rest]}.weight"
        sd[key] = torch.from_numpy(np.array(w, dtype=np.float32))   # a writable copy
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def test_teacher_forced_agreement_with_transformers(smol, hf_llama, llamacpp_ref):
    import torch

    rows, max_diff = [], 0.0
    for p in llamacpp_ref["prompts"]:
        seq = p["ids"] + p["continuation"]
        with torch.no_grad():
            ref = log_softmax(hf_llama(torch.tensor([seq])).logits[0].float().numpy())
        ours = log_softmax(smol.forward(seq))
        n0 = len(p["ids"]) - 1
        for i in range(n0, len(seq) - 1):
            rows.append((int(ours[i].argmax()), int(ref[i].argmax()), ours[i]))
        # log-prob difference on the tokens transformers ranks top
        top = ref[n0:].argmax(axis=1)
        max_diff = max(max_diff, float(np.abs(ours[n0:][np.arange(len(top)), top] - ref[n0:][np.arange(len(top)), top]).max()))
    gaps = [lp[mine] - lp[ref] for mine, ref, lp in rows if mine != ref]
    rate = 1 - len(gaps) / len(rows)
    print(f"\ntransformers agreement {rate:.3f} over {len(rows)} positions; max |dlogp| of its top token {max_diff:.3f}; "
          f"misses' gaps {np.round(gaps, 3).tolist()}")
    assert all(g <= NEAR_TIE for g in gaps)
    assert rate >= 0.96       # measured 0.979 (4 near-tie misses of 192): room for 3 more near ties, not for a bug
    assert max_diff < 1.0


def test_default_model_says_paris(tmp_path):
    """`powerlow run` with no -m converts the default model on first use and answers greedily."""
    r = run_cli("run", "-p", "The capital of France is", "-n", "8", env={"POWERLOW_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "peak RSS" in r.stderr
    assert any((tmp_path / "models").iterdir())


def test_chat_run(smol_dir, llamacpp_ref):
    """--chat formats the prompt with the template: the answer is the chat answer, ended at <|im_end|>."""
    p = next(p for p in llamacpp_ref["prompts"] if p["chat"] and "boiling" in p["text"])
    r = run_cli("run", "-m", smol_dir, "-p", p["text"], "--chat", "-n", "24")
    assert r.returncode == 0, r.stderr
    assert "100 degrees Celsius" in r.stdout      # llama.cpp's greedy answer says the same
    assert "<|im_end|>" not in r.stdout and "<|im_start|>" not in r.stdout


def test_sampling_is_seeded(smol):
    a = [t.id for t in smol.generate("Once upon a time", 12, temperature=0.9, top_k=40, top_p=0.95, seed=7)]
    b = [t.id for t in smol.generate("Once upon a time", 12, temperature=0.9, top_k=40, top_p=0.95, seed=7)]
    c = [t.id for t in smol.generate("Once upon a time", 12, temperature=0.9, top_k=40, top_p=0.95, seed=8)]
    assert a == b and a != c
