"""`powerlow profile`: hotness counts, training samples, hot-first re-layout that keeps the model's outputs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import powerlow
from powerlow.config import RuntimeConfig
from powerlow.errors import PowerlowError
from powerlow.profile import default_texts, profile_model
from conftest import TINY, make_converted, run_cli


def _tiny(tmp_path_factory, act: str, alpha: float | None = 1.0):
    return make_converted(tmp_path_factory.mktemp(f"prof_{act}"), act=act, seed=3, hot_alpha=alpha, **TINY)


@pytest.fixture(scope="module", params=["relu", "silu"])
def planted(request, tmp_path_factory):
    return _tiny(tmp_path_factory, request.param)


def _greedy(model_dir, prompt_ids, n=24):
    m = powerlow.load(model_dir, RuntimeConfig(threads=1))
    return [t.id for t in m.generate(prompt_ids, n)]


@pytest.mark.parametrize("relayout", ["clusters", "neurons"])
def test_relayout_keeps_greedy_tokens_and_orders_hot_first(planted, tmp_path, relayout):
    hf, src = planted
    d = tmp_path / "m"
    shutil.copytree(src, d)
    prompt = list(range(3, 40, 2))
    before = _greedy(d, prompt)
    s = profile_model(d, n_tokens=1024, n_samples=256, threads=1, progress=False, relayout=relayout)
    assert s["relaid"] and s["tokens"] == 1024
    m = json.loads((d / "manifest.json").read_text())
    F = TINY["intermediate"]
    for order in m["neuron_order"]:
        assert sorted(order) == list(range(F))
    assert m["ffn"]["down_fmt"] == "q8" and "profile.safetensors" in m["files"]
    assert (m["cluster_order"] is None) == (relayout == "neurons")
    powerlow.engine.load_manifest(d, verify=True)            # sizes and sha256 of every file match
    assert _greedy(d, prompt) == before

    from safetensors.numpy import load_file
    p = load_file(str(d / "profile.safetensors"))
    assert p["freq"].shape == (TINY["layers"], F)
    C = m["ffn"]["cluster_size"]
    if relayout == "neurons":
        assert np.all(np.diff(p["freq"], axis=1) <= 0)      # stored order is hot-first
    else:                                                   # whole clusters hot-first (the padded one last)
        full = F // C
        sums = p["freq"][:, : full * C].reshape(TINY["layers"], full, C).sum(axis=2)
        assert np.all(np.diff(sums, axis=1) <= 1e-6)
    assert p["samples.h"].shape == (TINY["layers"], 256, TINY["hidden"])
    assert p["samples.mask"].shape == (TINY["layers"], 256, F // 8)
    # the recorded masks agree with the recorded frequencies (same stored ids)
    masks = np.unpackbits(p["samples.mask"], axis=2, count=F).mean(axis=1)
    assert np.corrcoef(masks[0], p["freq"][0])[0, 1] > 0.9
    if m["config"]["hidden_act"] == "relu":
        # ReLU: measured firing frequency follows the planted one, through the stored -> original order
        planted_freq = load_file(str(hf / "planted_hotness.safetensors"))["freq"]
        for l, order in enumerate(m["neuron_order"]):
            assert np.corrcoef(p["freq"][l], planted_freq[l][order])[0, 1] > 0.9
    else:
        assert abs(s["mean_neuron_density"] - 0.3) < 0.05     # calibrated to the default density


def test_profile_twice_composes_the_order(tmp_path_factory, tmp_path):
    hf, src = _tiny(tmp_path_factory, "relu")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    from safetensors.numpy import load_file
    planted_freq = load_file(str(hf / "planted_hotness.safetensors"))["freq"]
    prompt = list(range(7, 30))
    before = _greedy(d, prompt)
    profile_model(d, n_tokens=512, n_samples=64, threads=1, progress=False, seed=1)
    profile_model(d, n_tokens=1024, n_samples=64, threads=1, progress=False, seed=2)
    m = json.loads((d / "manifest.json").read_text())
    p = load_file(str(d / "profile.safetensors"))
    for l, order in enumerate(m["neuron_order"]):
        assert np.corrcoef(p["freq"][l], planted_freq[l][order])[0, 1] > 0.9
    assert _greedy(d, prompt) == before


@pytest.mark.parametrize("budget", [None, "half"])
def test_cluster_relayout_is_bit_exact_on_smollm2(smol_dir, tmp_path, budget):
    """The default re-layout moves whole clusters and the engine sums them in their converted order: the
    logits after profiling equal those before, bit for bit (resident, and offloaded with half the FFN)."""
    d = tmp_path / "smol"
    shutil.copytree(smol_dir, d)
    prompt = list(range(100, 140))
    m = powerlow.load(d, RuntimeConfig(threads=2))
    before = m.forward(prompt)
    del m
    profile_model(d, n_tokens=256, n_samples=32, threads=2, progress=False)
    man = json.loads((d / "manifest.json").read_text())
    assert man["formats"]["ffn_down"] == "q4_1" and man["cluster_order"] is not None
    assert any(o != sorted(o) for o in man["cluster_order"])          # something moved
    rt = RuntimeConfig(threads=2)
    if budget:
        from powerlow.plan import minimum_budget
        from powerlow.store import StoreInfo
        info = StoreInfo.from_json(man["ffn"])
        rt = rt.replace(budget_bytes=minimum_budget(d, man, rt, dense_resident=True) + info.total_bytes // 2)
    m = powerlow.load(d, rt)
    np.testing.assert_array_equal(m.forward(prompt), before)
    m.tf.close()


def test_cluster_order_in_the_manifest_is_checked(smol_dir, tmp_path):
    d = tmp_path / "smol"
    shutil.copytree(smol_dir, d)
    from powerlow.manifest import write_manifest
    man = json.loads((d / "manifest.json").read_text())
    man["cluster_order"] = [[0] * 3] * man["ffn"]["n_layers"]
    write_manifest(d, man)
    with pytest.raises(PowerlowError, match="cluster_order"):
        powerlow.load(d, RuntimeConfig(threads=1))


def test_neuron_relayout_keeps_greedy_tokens_on_smollm2(smol_dir, tmp_path):
    """--relayout neurons: gate/up rows move exactly, but down is re-quantized to q8 (permuted columns mix
    GGUF groups): the logits move by about as much as between our kernels and the numpy reference (~1 at
    most). So greedy tokens must stay the same wherever the dense model's choice is not a near-tie
    (top-2 margin >= 0.5)."""
    d = tmp_path / "smol"
    shutil.copytree(smol_dir, d)
    m = powerlow.load(d, RuntimeConfig(threads=1))
    prompt = m.tokenize("The capital of France is")
    before = [t.id for t in m.generate(prompt, 16)]
    ids = prompt + before
    la = m.forward(ids)[len(prompt) - 1: -1]
    del m
    profile_model(d, n_tokens=256, n_samples=32, threads=1, progress=False, relayout="neurons")
    assert json.loads((d / "manifest.json").read_text())["ffn"]["down_fmt"] == "q8"
    m = powerlow.load(d, RuntimeConfig(threads=1))
    lb = m.forward(ids)[len(prompt) - 1: -1]
    top2 = np.sort(la, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    firm = margin >= 0.5
    assert firm.sum() >= 8
    np.testing.assert_array_equal(lb.argmax(axis=1)[firm], np.asarray(before)[firm])
    assert np.abs(la - lb).max() < 3.0
    after = [t.id for t in m.generate(prompt, 16)]
    if after != before:                      # greedy may only part where the dense choice was a near-tie
        i = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
        assert margin[i] < 0.5, (i, margin[i])


def test_default_texts_do_not_overlap():
    cal, ev = default_texts()
    assert len(cal) > 3 * len(ev) > 50_000
    paras = [p for p in ev.split("\n\n") if len(p) > 200]
    assert paras and not any(p in cal for p in paras[:50])


def test_text_too_short_is_a_clear_error(planted, tmp_path):
    _, src = planted
    with pytest.raises(PowerlowError, match="fewer than the 5000 requested.*--tokens"):
        profile_model(src, text="just a few words", n_tokens=5000, progress=False)


def test_cli_profile_with_plot(planted, tmp_path):
    _, src = planted
    d = tmp_path / "m"
    shutil.copytree(src, d)
    png = tmp_path / "cov.png"
    r = run_cli("profile", d, "--tokens", "300", "--samples", "50", "-t", "1", "--plot", png, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(s["hot20_coverage"]) == TINY["layers"] and 0.2 <= s["hot20_coverage_mean"] <= 1.0
    assert png.stat().st_size > 1000
    r = run_cli("profile", tmp_path / "nope")
    assert r.returncode == 2 and "no such model dir" in r.stderr
