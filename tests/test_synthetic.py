"""Synthetic model maker: HF folder loads in transformers, planted hotness is real, GGUF matches llama.cpp."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import synthetic as S
from powerlow.errors import PowerlowError
from synthetic import (BOS_ID, EOS_ID, FIRE_GATE, build_tokenizer, export_gguf, load_planted_hotness,
                                make_hf_model, numpy_forward)

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=512, max_positions=256)
BENCH_PY = Path.home() / ".cache/powerlow/bench-venv/bin/python"


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman)."""
    order = np.argsort(a, kind="stable")
    _, inv, counts = np.unique(a[order], return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    r = np.empty(len(a))
    r[order] = ((ends - counts + ends - 1) / 2)[inv]
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(_ranks(np.asarray(a)), _ranks(np.asarray(b)))[0, 1])


def _hf_run(path: Path, ids: np.ndarray):
    """transformers logits [S, T, V] plus per-layer gate pre-activations and act*up, via hooks."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    gates, acts = {}, {}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.gate_proj.register_forward_hook(
            lambda m, i, o, l=l: gates.__setitem__(l, o.detach().numpy().copy())))
        hooks.append(layer.mlp.down_proj.register_forward_hook(  # input of down = act(gate) * up
            lambda m, i, o, l=l: acts.__setitem__(l, i[0].detach().numpy().copy())))
    with torch.no_grad():
        logits = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    for h in hooks:
        h.remove()
    return logits, [gates[l] for l in sorted(gates)], [acts[l] for l in sorted(acts)]


@pytest.fixture(scope="module")
def hot_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {act: make_hf_model(root / f"hot_{act}", **SHAPE, act=act, hot_alpha=1.5, seed=3)
            for act in ("relu", "silu")}


def _random_ids(vocab: int, shape=(8, 128), seed=11) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, size=shape)


# ---------------------------------------------------------------------------------------------- HF folder


@pytest.mark.parametrize("kw", [
    dict(act="silu", dtype="float32"),
    dict(act="relu", dtype="bfloat16", tie_embeddings=True),
    dict(act="silu", dtype="float16", hot_alpha=1.0, kv_heads=4),
])
def test_hf_folder_loads_in_transformers_and_matches_numpy(tmp_path, kw):
    path = make_hf_model(tmp_path / "m", **{**SHAPE, **kw})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_act"] == kw["act"] and cfg["torch_dtype"] == kw["dtype"]
    assert cfg["tie_word_embeddings"] == kw.get("tie_embeddings", False)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (BOS_ID, EOS_ID)
    assert not list(tmp_path.glob(".*tmp*")), "temporary folder left behind"

    ids = _random_ids(SHAPE["vocab"], (2, 24))
    logits, gates, _ = _hf_run(path, ids)
    assert logits.shape == (2, 24, SHAPE["vocab"]) and np.isfinite(logits).all()
    assert 0.5 < logits.std() < 20  # neither collapsed nor exploding
    ref, ref_gates = numpy_forward(path, ids)
    np.testing.assert_allclose(ref, logits, atol=2e-4, rtol=0)
    for g, rg in zip(gates, ref_gates):
        np.testing.assert_allclose(rg, g, atol=2e-4, rtol=0)


def test_tensor_names_and_dtypes(tmp_path):
    from safetensors import safe_open
    path = make_hf_model(tmp_path / "m", **SHAPE, dtype="float16")
    with safe_open(str(path / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").shape == (128, 352)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.weight").dtype == np.float16
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for l in range(2):
        want |= {f"model.layers.{l}.{n}.weight" for n in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
    assert keys == want


def test_sharded_folder_equals_single_file(tmp_path, monkeypatch):
    one = make_hf_model(tmp_path / "one", **SHAPE, seed=5)
    monkeypatch.setattr(S, "SHARD_MAX_BYTES", 300_000)
    many = make_hf_model(tmp_path / "many", **SHAPE, seed=5)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (many / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == (one / "model.safetensors").stat().st_size - _header_bytes(
        one / "model.safetensors")
    ids = _random_ids(SHAPE["vocab"], (1, 16))
    np.testing.assert_array_equal(_hf_run(one, ids)[0], _hf_run(many, ids)[0])


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_same_seed_same_model_other_seed_differs(tmp_path):
    a = make_hf_model(tmp_path / "a", **SHAPE, seed=1)
    b = make_hf_model(tmp_path / "b", **SHAPE, seed=1)
    c = make_hf_model(tmp_path / "c", **SHAPE, seed=2)
    data = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert data(a) == data(b) and data(a) != data(c)


def test_errors(tmp_path):
    path = make_hf_model(tmp_path / "m", **SHAPE)
    with pytest.raises(PowerlowError, match="already exists"):
        make_hf_model(path, **SHAPE)
    make_hf_model(path, **SHAPE, seed=9, overwrite=True)
    assert json.loads((path / "config.json").read_text())["powerlow_synthetic"]["seed"] == 9
    with pytest.raises(PowerlowError, match="multiples of 32"):
        make_hf_model(tmp_path / "x", **{**SHAPE, "hidden": 100})
    with pytest.raises(PowerlowError, match="kv_heads"):
        make_hf_model(tmp_path / "x", **{**SHAPE, "kv_heads": 3})
    with pytest.raises(PowerlowError, match="act"):
        make_hf_model(tmp_path / "x", **SHAPE, act="gelu")
    with pytest.raises(PowerlowError, match="hot_alpha"):
        load_planted_hotness(path)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_layout(tmp_path):
    from tokenizers import Tokenizer
    path = make_hf_model(tmp_path / "m", **SHAPE)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tok.get_vocab_size() == SHAPE["vocab"]
    assert tok.token_to_id("<s>") == BOS_ID and tok.token_to_id("</s>") == EOS_ID
    text = "Hello world, the quick brown fox 123!\n\ttabs ümlaut 日本 </s>"
    enc = tok.encode(text)
    assert enc.ids[0] == BOS_ID
    assert tok.decode(enc.ids) == text.replace("</s>", "")  # specials are skipped when decoding
    assert tok.encode("</s>", add_special_tokens=False).ids == [EOS_ID]
    assert tok.encode("A", add_special_tokens=False).ids == [S.BYTE_OFFSET + ord("A")]
    assert len(tok.encode("the theory", add_special_tokens=False).ids) < len("the theory")  # merges are used
    assert max(enc.ids) < SHAPE["vocab"]
    assert build_tokenizer(20000).get_vocab_size() == 20000


# ---------------------------------------------------------------------------------------------- planted hotness


def test_planted_hotness_relu(hot_models):
    path = hot_models["relu"]
    planted = load_planted_hotness(path)
    assert planted.shape == (SHAPE["layers"], SHAPE["intermediate"])
    assert abs(planted.mean() - 0.15) < 1e-3
    assert not np.all(np.diff(planted[0]) <= 0), "hot neurons must not simply be the first ones"
    _, gates, _ = _hf_run(path, _random_ids(SHAPE["vocab"]))
    for l, g in enumerate(gates):
        freq = (g.reshape(-1, g.shape[-1]) > 0).mean(axis=0)  # measured per-neuron firing frequency
        assert spearman(freq, planted[l]) > 0.85
        assert np.corrcoef(freq, planted[l])[0, 1] > 0.98
        top = np.sort(freq)[::-1]
        assert top[: len(top) // 5].sum() / top.sum() > 0.6  # the hottest 20% take well over 20% of firings
        assert 0.12 < freq.mean() < 0.18


def test_planted_hotness_silu(hot_models):
    path = hot_models["silu"]
    planted = load_planted_hotness(path)
    _, gates, acts = _hf_run(path, _random_ids(SHAPE["vocab"]))
    for l, (g, a) in enumerate(zip(gates, acts)):
        g, a = g.reshape(-1, g.shape[-1]), np.abs(a.reshape(-1, a.shape[-1]))
        planted_event = (g > FIRE_GATE["silu"]).mean(axis=0)  # silu(gate) > 0.73
        assert spearman(planted_event, planted[l]) > 0.85
        large = (a > 1.0).mean(axis=0)  # |silu(gate) * up| large
        assert spearman(large, planted[l]) > 0.8
        top = np.sort(large)[::-1]
        assert top[: len(top) // 5].sum() / top.sum() > 0.6


def test_no_hot_alpha_means_no_structure(tmp_path):
    path = make_hf_model(tmp_path / "m", **SHAPE, act="relu")
    assert not (path / "planted_hotness.safetensors").exists()
    _, gates, _ = _hf_run(path, _random_ids(SHAPE["vocab"], (4, 64)))
    freq = (gates[0].reshape(-1, SHAPE["intermediate"]) > 0).mean(axis=0)
    assert 0.4 < freq.mean() < 0.6
    top = np.sort(freq)[::-1]
    assert top[: len(top) // 5].sum() / top.sum() < 0.4


def test_power_law_frequencies():
    p = S.power_law_frequencies(1000, 1.5, 0.15)
    assert abs(p.mean() - 0.15) < 1e-6 and p.max() <= S.P_MAX and np.all(np.diff(p) <= 0)
    assert np.allclose(S.power_law_frequencies(100, 0.0, 0.2), 0.2)


# ---------------------------------------------------------------------------------------------- GGUF


def _gguf_field(reader, key):
    f = reader.fields[key]
    if len(f.data) == 1:
        v = f.parts[f.data[0]]
        return bytes(v).decode() if v.dtype == np.uint8 else v[0]
    return [bytes(f.parts[i]).decode() if f.parts[i].dtype == np.uint8 else f.parts[i][0] for i in f.data]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "F16"])
def test_gguf_export_structure(hot_models, tmp_path, qtype):
    import gguf
    from gguf.quants import dequantize
    path = hot_models["silu"]
    out = export_gguf(path, tmp_path / f"m-{qtype}.gguf", qtype)
    r = gguf.GGUFReader(out)
    assert _gguf_field(r, "general.architecture") == "llama"
    assert _gguf_field(r, "llama.block_count") == 2
    assert _gguf_field(r, "llama.embedding_length") == 128
    assert _gguf_field(r, "llama.attention.head_count_kv") == 2
    assert _gguf_field(r, "llama.rope.dimension_count") == 32
    assert _gguf_field(r, "tokenizer.ggml.model") == "gpt2"
    assert _gguf_field(r, "tokenizer.ggml.bos_token_id") == BOS_ID
    tokens = _gguf_field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == 512 and tokens[:2] == ["<s>", "</s>"]
    assert len(_gguf_field(r, "tokenizer.ggml.merges")) == 512 - 258
    t = {x.name: x for x in r.tensors}
    assert len(t) == 2 + 9 * 2 + 1
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert t["blk.1.ffn_down.weight"].tensor_type.name == qtype
    W = S._HFTensors(path)
    for name, hname, heads in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 4),
                               ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight", 0)):
        w = W.get(hname)
        d = dequantize(t[name].data, t[name].tensor_type).reshape(w.shape)
        if heads:  # undo the GGUF Q/K permutation: (head, i, half) -> (head, half, i)
            hd = w.shape[0] // heads
            d = d.reshape(heads, hd // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        tol = {"F16": 1e-3, "Q8_0": 0.01, "Q4_0": 0.15}[qtype] * np.abs(w).max()
        assert np.abs(d - w).max() < tol, name


def test_gguf_chunked_export_is_identical(hot_models, tmp_path, monkeypatch):
    whole = export_gguf(hot_models["relu"], tmp_path / "whole.gguf", "Q4_0").read_bytes()
    monkeypatch.setattr(S, "GGUF_CHUNK_ROWS", 96)  # big tensors are read and quantized in row chunks
    assert export_gguf(hot_models["relu"], tmp_path / "chunked.gguf", "Q4_0").read_bytes() == whole


def test_gguf_tied_has_no_output(tmp_path):
    import gguf
    path = make_hf_model(tmp_path / "m", **SHAPE, tie_embeddings=True)
    names = {t.name for t in gguf.GGUFReader(export_gguf(path, tmp_path / "m.gguf", "Q8_0")).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names


_LLAMA_SCRIPT = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids, out, text = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
llm = Llama(model_path=path, n_ctx=128, logits_all=True, verbose=False, n_threads=1)
llm.eval(ids)
np.save(out, np.asarray(llm.scores[: llm.n_tokens], dtype=np.float32))
print(json.dumps(llm.tokenize(text.encode(), add_bos=True, special=False)))
"""


def _bench_venv_ready() -> bool:
    if not BENCH_PY.exists():
        return False
    return subprocess.run([str(BENCH_PY), "-c", "import llama_cpp"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _bench_venv_ready(),
                    reason="llama-cpp-python bench venv (~/.cache/powerlow/bench-venv) missing")
@pytest.mark.parametrize("qtype,atol", [("F16", 0.05), ("Q8_0", 0.5)])
def test_llama_cpp_agrees_with_transformers(hot_models, tmp_path, qtype, atol):
    from tokenizers import Tokenizer
    path = hot_models["silu"]  # llama.cpp's llama graph is SiLU-only
    gguf_path = export_gguf(path, tmp_path / f"m-{qtype}.gguf", qtype)
    ids = [BOS_ID] + [int(i) for i in _random_ids(SHAPE["vocab"], (24,), seed=4)]
    text = "Hello world, the quick brown fox jumps over 12345 lazy dogs!!  ok\n\ttab: ümlaut 日本"
    script = tmp_path / "run_llama.py"
    script.write_text(_LLAMA_SCRIPT)
    res = subprocess.run([str(BENCH_PY), str(script), str(gguf_path), json.dumps(ids), str(tmp_path / "l.npy"), text],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    ll = np.load(tmp_path / "l.npy")
    ref = _hf_run(path, np.array([ids]))[0][0]
    diff = np.abs(ll - ref).max()
    print(f"{qtype}: llama.cpp vs transformers max |dlogit| = {diff:.4g} (logit std {ref.std():.3g})")
    assert np.array_equal(ll.argmax(-1), ref.argmax(-1))
    assert diff < atol
    assert json.loads(res.stdout.strip().splitlines()[-1]) == Tokenizer.from_file(
        str(path / "tokenizer.json")).encode(text).ids


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_tiny_with_gguf(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "tiny"
    res = subprocess.run([sys.executable, str(ROOT / "scripts/make_synthetic.py"), "--preset", "tiny",
                          "--out", str(out), "--act", "silu", "--gguf", "Q8_0", "--layers", "3"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert (tmp_path / "tiny-Q8_0.gguf").stat().st_size > 0
    assert (out / "planted_hotness.safetensors").exists()
    res = subprocess.run([sys.executable, str(ROOT / "scripts/make_synthetic.py"), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "already exists" in res.stderr


def test_coactivation_groups_fire_together(tmp_path):
    """coact_group=32: a group's neurons share their planted probability and fire together, so 32-neuron
    clusters are active far less often than with independent neurons of the same density."""
    ids = _random_ids(SHAPE["vocab"], (4, 64))
    any_density = {}
    for G in (1, 32):
        path = make_hf_model(tmp_path / f"g{G}", **SHAPE, act="relu", hot_alpha=1.5, coact_group=G)
        planted = load_planted_hotness(path)
        if G > 1:
            assert np.all(planted.reshape(SHAPE["layers"], -1, G).std(axis=2) == 0)
        _, gates, _ = _hf_run(path, ids)
        fire = gates[0].reshape(-1, SHAPE["intermediate"]) > 0
        assert 0.1 < fire.mean() < 0.2
        any_density[G] = fire.reshape(len(fire), -1, 32).any(axis=2).mean()
    assert any_density[32] < 0.6 * any_density[1], any_density
    with pytest.raises(PowerlowError, match="coact_group"):
        make_hf_model(tmp_path / "bad", **SHAPE, act="relu", coact_group=7)
