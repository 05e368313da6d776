"""Tiny random Llama models (HF format, SiLU and ReLU): convert, run, cache consistency, parity with transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest

import powerlow
from powerlow.convert import convert
from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_dir(tiny_hf, tmp_path_factory):
    return convert(tiny_hf, tmp_path_factory.mktemp("tinyconv") / "m", bits="8", progress=False)


def test_convert_writes_model_dir(tiny_dir, tiny_hf):
    m = json.loads((tiny_dir / "manifest.json").read_text())
    assert set(m["files"]) == {"tokenizer.json", "resident.safetensors", "ffn.bin"}
    cfg = json.loads((tiny_hf / "config.json").read_text())
    assert m["config"]["hidden_act"] == cfg["hidden_act"]
    ffn = m["ffn"]
    assert ffn["stride"] % 4096 == 0 and (tiny_dir / "ffn.bin").stat().st_size == ffn["n_layers"] * ffn["n_clusters"] * ffn["stride"]


def test_prefill_plus_decode_equals_full_forward(tiny_dir):
    model = powerlow.load(tiny_dir)
    ids = list(range(3, 40))
    full = model.forward(ids)
    model.forward(ids[:20])
    inc = [model.forward([ids[i]], start_pos=i)[0] for i in range(20, len(ids))]
    np.testing.assert_allclose(np.stack(inc), full[20:], rtol=0, atol=1e-4 * np.abs(full).max())


def _hf_logits(hf_dir, ids):
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_matches_transformers(tiny_dir, tiny_hf):
    """8-bit weights and int8 activations against float32 transformers: relative error of the logits small."""
    ids = list(range(5, 60, 2))
    ref = _hf_logits(tiny_hf, ids)
    ours = powerlow.load(tiny_dir).forward(ids)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"\nrelative L2 error vs transformers: {rel:.4f}")
    assert rel < 0.03


def test_gguf_export_equals_hf_convert(tiny_hf, tmp_path):
    """The same weights through GGUF (Q/K rows permuted, Q8_0) and through HF (--bits 8) give the same logits:
    this checks the un-permutation of Q/K rows and the lossless Q8_0 import."""
    from synthetic import export_gguf

    g = export_gguf(tiny_hf, tmp_path / "m.gguf", "Q8_0")
    a = powerlow.load(convert(g, tmp_path / "from_gguf", progress=False))
    b = powerlow.load(convert(tiny_hf, tmp_path / "from_hf", bits="8", progress=False))
    ids = list(range(3, 30))
    la, lb = a.forward(ids), b.forward(ids)
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-3 * np.abs(lb).max())


def test_qwen2_attention_biases(tiny_hf, tmp_path):
    """A qwen2-type model (q/k/v biases) against transformers' Qwen2ForCausalLM."""
    import shutil

    from safetensors.numpy import load_file, save_file

    hf = tmp_path / "qwen2"
    shutil.copytree(tiny_hf, hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    (hf / "config.json").write_text(json.dumps(cfg))
    st = load_file(str(hf / "model.safetensors"))
    rng = np.random.default_rng(0)
    for l in range(cfg["num_hidden_layers"]):
        for proj in ("q", "k", "v"):
            w = st[f"model.layers.{l}.self_attn.{proj}_proj.weight"]
            st[f"model.layers.{l}.self_attn.{proj}_proj.bias"] = (0.5 * rng.standard_normal(w.shape[0])).astype(w.dtype)
    save_file(st, str(hf / "model.safetensors"))
    ids = list(range(5, 40))
    ref = _hf_logits(hf, ids)
    ours = powerlow.load(convert(hf, tmp_path / "q", bits="8", progress=False)).forward(ids)
    assert np.linalg.norm(ours - ref) / np.linalg.norm(ref) < 0.03


def test_run_cli_on_tiny(tiny_dir):
    r = run_cli("run", "-m", tiny_dir, "-p", "hello", "-n", "5", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr


def test_bench_json_fields(tiny_dir):
    r = run_cli("bench", "-m", tiny_dir, "-n", "4", "--prompt-tokens", "8", "--repeats", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for k in ("model", "format", "threads", "budget_bytes", "prefill_tok_s", "decode_tok_s", "peak_rss_bytes",
              "read_bytes_per_token", "cache_hit_rate", "predictor_recall", "density", "isa"):
        assert k in res
    assert res["decode_tok_s"] > 0 and res["prefill_tok_s"] > 0


def test_bench_decode_input_text_feeds_the_text(tiny_dir):
    """--decode-input text feeds decode step i the bench text's token prompt + i (teacher forcing) and
    reports how many distinct inputs the steps got; greedy feeds the argmax; anything else is refused."""
    import powerlow
    from powerlow.bench import BENCH_TEXT, run_bench
    m = powerlow.load(tiny_dir)
    want = m.tokenize(BENCH_TEXT * 40, add_special=False)[8:8 + 12]
    fed = []
    orig = m.tf.forward

    def spy(ids, start_pos=0, last_only=False):
        if len(ids) == 1:
            fed.append((start_pos, ids[0]))
        return orig(ids, start_pos=start_pos, last_only=last_only)
    m.tf.forward = spy
    res = run_bench(m, n_tokens=12, prompt_tokens=8, repeats=1, decode_input="text")
    assert fed == [(8 + i, t) for i, t in enumerate(want)]
    assert res["decode_input"] == "text" and res["distinct_decode_inputs"] == len(set(want)) > 1
    fed.clear()
    res = run_bench(m, n_tokens=3, prompt_tokens=8, repeats=1)
    assert res["decode_input"] == "greedy" and len(fed) == 3
    with pytest.raises(ValueError, match="decode_input"):
        run_bench(m, n_tokens=3, prompt_tokens=8, repeats=1, decode_input="sample")


def test_bench_warns_when_greedy_inputs_repeat():
    """Under a budget, a greedy run fed at most half as many distinct tokens as steps is flagged (the cache
    serves repeats for free); text-fed, resident or short runs are not."""
    from powerlow.bench import repeat_warning
    r = {"budget_bytes": 1 << 26, "decode_input": "greedy", "decode_tokens": 32, "distinct_decode_inputs": 5}
    assert "5 distinct tokens in 32 steps" in repeat_warning(r) and "--decode-input text" in repeat_warning(r)
    assert repeat_warning(dict(r, distinct_decode_inputs=17)) is None
    assert repeat_warning(dict(r, decode_input="text")) is None
    assert repeat_warning(dict(r, budget_bytes=None)) is None
    assert repeat_warning(dict(r, decode_tokens=4, distinct_decode_inputs=1)) is None


@pytest.mark.parametrize("bits", ["2", "ternary", "1"])
def test_resident_low_bit_matrices_use_table_lookup(tmp_path, bits):
    """A fully resident run gives its 1/1.58/2-bit attention matrices the table-lookup layout where the
    dispatcher runs TL (the AVX2 kernels, on AVX2 and AVX-512 CPUs), with the multiply-add logits bit for bit; under
    a budget they stay as stored."""
    from powerlow import kernels as K
    from powerlow.config import RuntimeConfig
    from powerlow.engine import Transformer
    from conftest import make_converted
    _, d = make_converted(tmp_path, bits=bits, act="silu", seed=7, hidden=128, intermediate=256, layers=2, heads=4,
                          kv_heads=2, vocab=300, max_positions=64)
    ids = [3, 17, 42, 99, 5, 250, 7]
    tf = Transformer(d)
    try:
        mats = [m for lw in tf.layers for m in (lw.wqkv, lw.wo)]
        want_tl = K.isa in ("avx2", "avx512") and K.TL_PREFERRED.get((mats[0].fmt, K.isa), False)
        assert all((m.tl is not None) == want_tl for m in mats)
        got = tf.forward(ids)
        for m in mats:
            m.tl = None
        np.testing.assert_array_equal(tf.forward(ids), got)
    finally:
        tf.close()
    tf = Transformer(d, RuntimeConfig(budget_bytes=64 << 20))
    try:
        assert all(m.tl is None for lw in tf.layers for m in (lw.wqkv, lw.wo))
    finally:
        tf.close()
