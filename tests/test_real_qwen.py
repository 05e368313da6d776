"""Qwen2.5-Coder-1.5B-Instruct Q4_K_M (real weights, K-quants kept as they are): tokens and logits against llama.cpp
and transformers. The GGUF comes from `python scripts/fetch_qwen.py` (the test command runs it); the reference data
from `python scripts/gen_llamacpp_reference.py --qwen` (llama.cpp) and `python scripts/gen_transformers_reference.py`
(transformers, fp32, the GGUF's weights dequantized)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, run_cli, teacher_forced

NEAR_TIE = 0.25


@pytest.fixture(scope="module")
def qwen_dir(qwen_gguf, tmp_path_factory):
    from powerlow.convert import convert
    return convert(qwen_gguf, tmp_path_factory.mktemp("qwen") / "model", progress=False)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    import powerlow
    with powerlow.load(qwen_dir) as m:
        yield m


@pytest.fixture(scope="module")
def ref():
    return json.loads((DATA / "llamacpp_qwen.json").read_text())


def test_model_dir_is_the_size_of_the_gguf(qwen_gguf, qwen_dir):
    """Q4_K/Q6_K kept as they are: the model dir is within 3% of the GGUF."""
    size = sum(f.stat().st_size for f in qwen_dir.iterdir())
    ratio = size / qwen_gguf.stat().st_size
    print(f"\nmodel dir {size} bytes = {ratio:.4f} x the GGUF")
    assert ratio <= 1.03


def test_formats_kept(qwen_dir):
    m = json.loads((qwen_dir / "manifest.json").read_text())
    fm = m["formats"]
    assert fm["ffn"] == "q4_k" and m["tensors"]["output"]["fmt"] == "q6_k" and m["tensors"]["token_embd"]["fmt"] == "q4_k"
    downs = {f[1] for f in m["ffn"]["layer_formats"]}
    assert downs == {"q4_k", "q6_k"}


def test_tokenization_matches_llamacpp(qwen, ref):
    for p in ref["prompts"]:
        text = qwen.tokenizer.apply_chat(p["text"]) if p["chat"] else p["text"]
        assert text == p["formatted"]
        assert qwen.tokenize(text) == p["ids"], p["text"]
        assert qwen.detokenize(p["ids"]) == p["formatted"]


def test_teacher_forced_agreement_with_llamacpp_and_transformers(qwen, ref):
    rows = teacher_forced(qwen, ref["prompts"])
    misses = [(mine, lc, tf, lp[mine] - lp[lc]) for mine, lc, tf, lp in rows if mine != lc]
    rate = 1 - len(misses) / len(rows)
    tf_rate = np.mean([mine == tf for mine, _, tf, _ in rows])
    lc_tf = np.mean([lc == tf for _, lc, tf, _ in rows])
    print(f"\nllama.cpp agreement {rate:.3f} over {len(rows)} positions, transformers {tf_rate:.3f} "
          f"(llama.cpp vs transformers {lc_tf:.3f}); misses (gap, transformers sides with us): "
          f"{[(round(float(g), 3), mine == tf) for mine, _, tf, g in misses]}")
    bad = [(g, mine, lc, tf) for mine, lc, tf, g in misses if g > NEAR_TIE and mine != tf]
    assert not bad, f"disagreements with llama.cpp that are neither near-ties nor sided by transformers: {bad}"
    assert rate >= 0.97       # measured 0.987 (3 misses of 224): room for 3 more near ties, not for a bug


def test_greedy_decode_matches_prefill(qwen):
    ids = qwen.tokenize("def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n")
    full = qwen.forward(ids)
    qwen.forward(ids[:5])
    steps = [qwen.forward(ids[i:i + 1], start_pos=i)[0] for i in range(5, len(ids))]
    np.testing.assert_allclose(np.stack(steps), full[5:], rtol=0, atol=2e-3 * np.abs(full).max())


def test_run_gguf_directly_converts_once(qwen_gguf, tmp_path):
    """`powerlow run -m qwen.gguf` on a fresh $POWERLOW_HOME converts, answers; the second run reuses the dir."""
    env = {"POWERLOW_HOME": str(tmp_path)}
    r1 = run_cli("run", "-m", qwen_gguf, "-p", "The capital of France is", "-n", "6", env=env)
    assert r1.returncode == 0, r1.stderr
    assert "converting" in r1.stderr and "Paris" in r1.stdout
    r2 = run_cli("run", "-m", qwen_gguf, "-p", "The capital of France is", "-n", "6", env=env)
    assert r2.returncode == 0 and "converting" not in r2.stderr and r2.stdout == r1.stdout


def test_offloaded_run_gives_the_resident_tokens(qwen, qwen_dir):
    """Under a budget about half the model (bundles of two sizes: Q6_K and Q4_K downs), the same greedy tokens."""
    import powerlow
    prompt = qwen.tokenize("def fibonacci(n):")
    resident = [t.id for t in qwen.generate(prompt, 8)]
    with powerlow.load(qwen_dir, powerlow.RuntimeConfig(budget_bytes=600 << 20, max_context=64)) as m:
        assert [t.id for t in m.generate(prompt, 8)] == resident
