"""`powerlow eval`: perplexity, density and speed as one JSON object; clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from powerlow.config import RuntimeConfig
from powerlow.engine import Transformer
from powerlow.errors import PowerlowError
from powerlow.eval import evaluate
from powerlow.profile import profile_model
from conftest import TINY, log_softmax, run_cli


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    from powerlow.convert import convert
    from synthetic import make_hf_model

    root = tmp_path_factory.mktemp("eval")
    hf = make_hf_model(root / "hf", act="relu", seed=2, hot_alpha=1.0, **TINY)
    d = convert(hf, root / "m", bits="8", progress=False)
    profile_model(d, n_tokens=512, n_samples=64, threads=1, progress=False)
    return d


def test_perplexity_matches_a_batched_forward(relu_dir):
    tf = Transformer(relu_dir, RuntimeConfig(threads=1))
    r = evaluate(tf, n_tokens=100, window=50)
    assert r["tokens"] == 98 and r["density"] == 1.0 and r["tok_s"] > 0
    # the same windows through one batched forward each
    from powerlow.profile import default_texts, token_windows
    nll = 0.0
    for w in token_windows(tf.tokenizer, default_texts()[1], 100, 50, "evaluation"):
        lp = log_softmax(tf.forward(w))
        nll -= lp[np.arange(len(w) - 1), w[1:]].sum()
    assert r["ppl"] == pytest.approx(np.exp(nll / 98), rel=1e-3)


def test_cli_eval_json_modes(relu_dir):
    out = {}
    for mode, extra in (("dense", ()), ("gate", ()), ("threshold", ("--density", "0.5"))):
        r = run_cli("eval", "-m", relu_dir, "--mode", mode, *extra, "--tokens", "64", "-t", "1", "--json")
        assert r.returncode == 0, r.stderr
        out[mode] = json.loads(r.stdout)
    assert out["gate"]["ppl"] == out["dense"]["ppl"]            # exact on a ReLU model
    assert out["gate"]["density"] < 1.0
    assert 0.3 < out["threshold"]["density"] < 0.7
    for o in out.values():
        assert {"ppl", "density", "tok_s", "tokens", "mode"} <= set(o)


def test_text_too_short(relu_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("hello world")
    r = run_cli("eval", "-m", relu_dir, "--text", f, "--tokens", "500", "--json")
    assert r.returncode == 2 and "fewer than the 500 requested" in r.stderr
    with pytest.raises(PowerlowError, match="at least 2"):
        evaluate(Transformer(relu_dir), "x", n_tokens=1)


def test_predict_mode_without_predictors(relu_dir):
    r = run_cli("eval", "-m", relu_dir, "--mode", "predict", "--tokens", "16", "--json")
    assert r.returncode == 2 and "powerlow train-predictor" in r.stderr


def test_lossy_mode_cost_is_kept_and_shown(relu_dir, tmp_path):
    """`eval` in a lossy mode keeps its perplexity against dense in quality.json; `run` in that mode prints it,
    and warns when it was never measured or costs more than 3%."""
    import shutil
    from powerlow import quality
    d = tmp_path / "m"
    shutil.copytree(relu_dir, d)
    (d / quality.FILE).unlink(missing_ok=True)        # what the other tests' evals kept
    r = run_cli("run", "-m", d, "--mode", "threshold", "--density", "0.3", "-p", "hi", "-n", "2", "-t", "1")
    assert r.returncode == 0 and "never measured" in r.stderr and "powerlow eval" in r.stderr
    r = run_cli("eval", "-m", d, "--mode", "threshold", "--density", "0.3", "--tokens", "64", "-t", "1", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    dense = json.loads(run_cli("eval", "-m", d, "--tokens", "64", "-t", "1", "--json").stdout)
    assert out["dense_ppl"] == dense["ppl"] and out["ppl_vs_dense"] == pytest.approx(out["ppl"] / dense["ppl"], 1e-3)
    msg, warn = quality.describe(d, "threshold", 0.3)
    assert f"x{out['ppl'] / dense['ppl']:.3f}" in msg and warn == (out["ppl"] / dense["ppl"] > quality.WARN_RATIO)
    r = run_cli("run", "-m", d, "--mode", "threshold", "--density", "0.3", "-p", "hi", "-n", "2", "-t", "1")
    assert r.returncode == 0 and f"x{out['ppl'] / dense['ppl']:.3f}" in r.stderr
    assert ("warning" in r.stderr) == warn
    # another density was not measured
    assert quality.describe(d, "threshold", 0.5)[1] is True
    assert quality.describe(d, "dense", 1.0) == (None, False)


def test_quality_warns_above_three_percent(tmp_path):
    from powerlow import quality
    quality.record(tmp_path, {"mode": "predict", "target_density": 0.25, "predictor": None, "text": "t",
                              "tokens": 100, "ppl": 10.2, "dense_ppl": 10.0})
    msg, warn = quality.describe(tmp_path, "predict", 0.25)
    assert not warn and "x1.020" in msg
    quality.record(tmp_path, {"mode": "predict", "target_density": 0.25, "predictor": None, "text": "t",
                              "tokens": 100, "ppl": 12.0, "dense_ppl": 10.0})      # replaces the entry
    msg, warn = quality.describe(tmp_path, "predict", 0.25)
    assert warn and "x1.200" in msg and len(quality.read(tmp_path)) == 1
