"""Predictors: exact gate mode on ReLU, threshold density, lowrank recall on the planted model, bad files."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import powerlow
from powerlow.config import RuntimeConfig
from powerlow.errors import PowerlowError
from powerlow.predictors import PREDICTORS, make_predictor
from powerlow.predictors.train import train_predictors
from powerlow.profile import profile_model
from powerlow.store import StoreInfo
from conftest import TINY, make_converted, run_cli

PROMPT = list(range(3, 60, 3))


def _make(root, act: str, **over):
    return make_converted(root, act=act, seed=5, hot_alpha=1.0, **{**TINY, **over})[1]


@pytest.fixture(scope="module")
def relu_dir(tmp_path_factory):
    """Planted ReLU model, profiled (4096 tokens) and with lowrank predictors (seed 0). Its neurons fire
    independently, so the re-layout is per neuron (hot neurons share clusters, some clusters stay idle)."""
    d = _make(tmp_path_factory.mktemp("pred_relu"), "relu")
    profile_model(d, n_tokens=4096, n_samples=4096, threads=1, progress=False, relayout="neurons")
    rep = train_predictors(d, rank=128, target_recall=0.95, seed=0, progress=False)
    return d, rep


@pytest.fixture(scope="module")
def silu_dir(tmp_path_factory):
    d = _make(tmp_path_factory.mktemp("pred_silu"), "silu")
    profile_model(d, n_tokens=1024, n_samples=256, threads=1, progress=False, relayout="neurons")
    return d


def _load(d, mode, density=1.0):
    return powerlow.load(d, RuntimeConfig(threads=1, mode=mode, density=density))


def test_lowrank_reaches_recall_on_the_planted_model(relu_dir):
    """Cluster targets (the default): recall of active neurons >= 0.95 at <= 1.3x the true cluster density."""
    _, rep = relu_dir
    assert rep["summary"]["targets"] == "clusters"
    for r in rep["layers"]:
        assert r["recall"] >= 0.95, r
        assert r["cluster_density"] <= 1.3 * r["true_cluster_density"], r
        assert r["density_ratio"] == pytest.approx(r["cluster_density"] / r["true_cluster_density"], abs=1e-3)


def test_lowrank_neuron_targets(relu_dir, tmp_path):
    """Neuron targets: recall >= 0.95 at <= 1.3x the true neuron density; the engine runs them too."""
    d, _ = relu_dir
    dn = tmp_path / "m"
    shutil.copytree(d, dn)
    rep = train_predictors(dn, rank=128, target_recall=0.95, seed=0, targets="neurons", progress=False)
    for r in rep["layers"]:
        assert r["recall"] >= 0.95, r
        assert r["density"] <= 1.3 * r["true_density"], r
    m = _load(dn, "predict")
    assert not m.tf.predictor.by_cluster and m.tf.predictor.B[0].rows == m.tf.predictor.Fp
    list(m.generate(PROMPT[:4], 4))
    with pytest.raises(PowerlowError, match="--targets"):
        train_predictors(dn, targets="bogus", progress=False)


def _numpy_pick(p, layer, h):
    """The numpy steps of LowRankPredictor._pick (what kernels.lowrank_pick must reproduce)."""
    fast, p._fast = p._fast, None
    try:
        return p._pick(layer, h)
    finally:
        p._fast = fast


@pytest.mark.parametrize("targets", ["clusters", "neurons"])
def test_lowrank_compiled_pick_is_the_numpy_pick(relu_dir, tmp_path, targets):
    """kernels.lowrank_pick (one call a layer) picks exactly the clusters of the numpy steps, by cluster and by
    recall, for 1 and several tokens, with the same logits bit for bit, at the calibrated thresholds and at thresholds inside the score range (many
    near-ties); a NaN in the activations selects nothing from its clusters, as numpy's max does."""
    d, _ = relu_dir
    if targets == "neurons":
        dn = tmp_path / "m"
        shutil.copytree(d, dn)
        train_predictors(dn, rank=32, target_recall=0.95, seed=0, targets="neurons", progress=False)
        d = dn
    m = _load(d, "predict")
    p = m.tf.predictor
    assert p._fast is not None and p.by_cluster == (targets == "clusters")
    rng = np.random.default_rng(7)
    K = m.tf.store_info.layout.K
    shifts = 0
    for layer in range(p.L):
        for T in (1, 3):
            h = rng.standard_normal((T, K)).astype(np.float32)
            np.testing.assert_array_equal(p._pick(layer, h), _numpy_pick(p, layer, h))
            np.testing.assert_array_equal(p._scratch[1][:T], p.logits(layer, h))     # the same floats, bit for bit
            y = p.logits(layer, h).max(axis=0)
            keep = p.thr[layer]
            for q in (0.3, 0.5, 0.9):           # thresholds at the score's quantiles: some clusters in, some out
                p.thr[layer] = float(np.quantile(y, q))
                got, want = p._pick(layer, h), _numpy_pick(p, layer, h)
                np.testing.assert_array_equal(got, want)
                shifts += 0 < len(want) < p.nC
            p.thr[layer] = keep
    assert shifts > 0
    for layer in range(p.L - 1):          # select + the next layer's lookahead in one call == the two numpy ones
        h = rng.standard_normal((2, K)).astype(np.float32)
        ids, ahead = p.select_ahead(layer, h, layer + 1)
        fast, p._fast = p._fast, None
        try:
            want_ids, want_ahead = p.select(layer, h), p.lookahead(layer + 1, h)
        finally:
            p._fast = fast
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(ahead, want_ahead)
        np.testing.assert_array_equal(p.last[layer], want_ids)
    h = rng.standard_normal((2, K)).astype(np.float32)
    h[1, 3] = np.nan
    np.testing.assert_array_equal(p._pick(0, h), _numpy_pick(p, 0, h))
    m.close()


def test_gate_mode_is_exact_for_relu(relu_dir):
    d, _ = relu_dir
    dense, gate = _load(d, "dense"), _load(d, "gate")
    np.testing.assert_array_equal(dense.forward(PROMPT), gate.forward(PROMPT))
    a = [t.id for t in dense.generate(PROMPT, 16)]
    assert [t.id for t in gate.generate(PROMPT, 16)] == a
    assert gate.stats.ffn_density < 1.0


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_threshold_mode_runs_near_its_target_density(silu_dir, density):
    m = _load(silu_dir, "threshold", density)
    list(m.generate(PROMPT[:2], 60))
    ffn = m.tf.ffn
    assert abs(ffn.clusters_used / ffn.clusters_total - density) < 0.15


@pytest.mark.parametrize("mode,density", [("threshold", 0.5), ("gate", 0.3), ("predict", 1.0), ("predict", 0.4)])
def test_select_and_lookahead_give_sorted_int32_ids(relu_dir, mode, density):
    d, _ = relu_dir
    tf = _load(d, mode, density).tf
    p = tf.predictor
    nC = tf.store_info.n_clusters
    h = np.random.default_rng(0).standard_normal((1, TINY["hidden"])).astype(np.float32)
    for l in range(TINY["layers"]):
        ids = p.select(l, h)
        assert ids.dtype == np.int32 and np.all(np.diff(ids) > 0) and (ids.size == 0 or 0 <= ids.min() and ids.max() < nC)
    ahead = p.lookahead(1, h)
    assert ahead.dtype == np.int32 and np.all(np.diff(ahead) > 0)
    np.testing.assert_array_equal(p.lookahead(0, h), p.select(0, h))   # next token's layer 0: last choice


def test_predict_mode_keeps_most_of_the_output(relu_dir):
    d, _ = relu_dir
    ids = PROMPT[:1]
    dense, pred = _load(d, "dense"), _load(d, "predict")
    xs = [dense.forward(ids)]
    ys = [pred.forward(ids)]
    for i, t in enumerate(PROMPT[1:12], start=1):
        xs.append(dense.forward([t], start_pos=i))
        ys.append(pred.forward([t], start_pos=i))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.1
    assert pred.tf.ffn.clusters_used < pred.tf.ffn.clusters_total


def test_registry_and_unknown_name(relu_dir):
    d, _ = relu_dir
    assert set(PREDICTORS) == {"threshold", "gate", "lowrank", "static"}
    tf = _load(d, "threshold", 0.5).tf
    with pytest.raises(PowerlowError, match="unknown predictor"):
        make_predictor(tf, "oracle")
    static = make_predictor(tf, "static")                 # the hottest half of the clusters, every token
    h = np.ones((1, TINY["hidden"]), np.float32)
    ids = static.select(0, h)
    assert len(ids) == tf.store_info.n_clusters // 2 and ids.dtype == np.int32
    np.testing.assert_array_equal(ids, static.select(0, -h))


def test_train_without_profile_is_a_clear_error(tmp_path):
    d = _make(tmp_path, "relu")
    with pytest.raises(PowerlowError, match="no profile.safetensors; run `powerlow profile"):
        train_predictors(d, progress=False)
    with pytest.raises(PowerlowError, match="no profile.safetensors"):
        _load(d, "threshold", 0.5)
    r = run_cli("train-predictor", d)
    assert r.returncode == 2 and "powerlow profile" in r.stderr


def test_predictor_file_from_another_model_is_refused(relu_dir, tmp_path):
    d, _ = relu_dir
    other = _make(tmp_path, "relu", intermediate=256)
    shutil.copy(d / "predictors.safetensors", other / "predictors.safetensors")
    with pytest.raises(PowerlowError, match="another model.*train-predictor"):
        _load(other, "predict")
    # same shapes, but made before a re-layout of this dir: stale
    same = tmp_path / "same"
    shutil.copytree(d, same)
    profile_model(same, n_tokens=256, n_samples=64, threads=1, progress=False, seed=9, relayout="neurons")
    assert not (same / "predictors.safetensors").exists()          # re-layout voids old predictors
    shutil.copy(d / "predictors.safetensors", same / "predictors.safetensors")
    with pytest.raises(PowerlowError, match="stale.*train-predictor"):
        _load(same, "predict")


def _decode(d, cfg, python_path: bool, n=10):
    """Logits of a prompt and n greedy steps, the FFN's density counters, and the cache's counters."""
    m = powerlow.load(d, cfg)
    try:
        ffn = m.tf.ffn
        if python_path:
            ffn.compiled = False                       # SparseFFN.forward's Python steps, layer by layer
        x = m.tf.forward([5, 17, 33, 9, 100, 7])
        logits = [x]
        pos = 6
        for _ in range(n):
            x = m.tf.forward([int(x[-1].argmax())], start_pos=pos, last_only=True)
            logits.append(x)
            pos += 1
        assert (ffn.compiled_step() is None) == python_path and (m.tf._loop is None) == python_path
        src = m.tf.ffn_source
        c = src.core.stats() if hasattr(src, "core") else {}
        c.pop("wait_seconds", None), c.pop("busy_seconds", None)
        return logits, (ffn.clusters_used, ffn.clusters_total), c
    finally:
        m.close()


@pytest.fixture(scope="module")
def relaid_dir(tmp_path_factory):
    """A planted SiLU model (every cluster adds something: the summing order shows) of 16 clusters a layer with whole
    clusters re-laid out hot-first (cluster_order), and
    low-rank predictors: the offloaded predict mode's full path."""
    d = _make(tmp_path_factory.mktemp("pred_relaid"), "silu", intermediate=512, layers=3)
    profile_model(d, n_tokens=1024, n_samples=1024, threads=1, progress=False, relayout="clusters")
    train_predictors(d, rank=32, target_recall=0.95, seed=0, progress=False)
    return d


@pytest.mark.parametrize("offloaded", [False, True])
def test_compiled_layer_step_is_the_python_path(relaid_dir, offloaded):
    """steps.SparseStep (predictor, fetch, prefetch, converted summing order and FFN of a layer in one call)
    gives the Python path's logits bit for bit, computes the same clusters, and under a budget asks the core for
    the same bundles (hits + misses; which of them were still in the cache depends on when the reader threads
    finished, so those two and the bytes read differ from run to run by a read or so)."""
    from powerlow.manifest import load_manifest
    from powerlow.plan import minimum_budget
    d = relaid_dir
    man = load_manifest(d)
    assert any(o != sorted(o) for o in man["cluster_order"])
    cfg = RuntimeConfig(threads=1, mode="predict")
    if offloaded:     # the staging minimum and 8 more bundles of the 48: most of the FFN on disk
        cfg = cfg.replace(budget_bytes=minimum_budget(d, man, cfg) + 8 * StoreInfo.from_json(man["ffn"]).layout.stride)
    got, got_n, got_c = _decode(d, cfg, python_path=False)
    want, want_n, want_c = _decode(d, cfg, python_path=True)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert got_n == want_n and 0 < got_n[0] < got_n[1]
    if offloaded:
        for c in (got_c, want_c):
            assert c["misses"] > 0 and c["bytes_read"] > 0 and c["requests"] > 0
        assert got_c["hits"] + got_c["misses"] == want_c["hits"] + want_c["misses"] == got_n[0]
        assert got_c["passes"] == want_c["passes"] == 11
    # layer by layer on the run's FFN inputs: the FFN outputs themselves (the logits can hide a last-bit change)
    _ffn_outputs_match(powerlow.load(d, cfg), decode=True)


def _ffn_outputs_match(m, decode: bool) -> None:
    """On the FFN inputs of a prefill (and a decode step), the compiled layer step's outputs equal the Python
    steps' bit for bit, layer by layer. Closes m."""
    try:
        ffn, hs = m.tf.ffn, []
        ffn.observer = lambda l, h: hs.append((l, h.copy()))
        m.tf.forward([5, 17, 33, 9, 100, 7])
        if decode:
            m.tf.forward([40], start_pos=6)
        ffn.observer = None
        for l, h in hs:
            a = ffn.forward(l, h)
            ffn.compiled = False
            b = ffn.forward(l, h)
            ffn.compiled = True
            np.testing.assert_array_equal(a, b)
        assert ffn.compiled_step() is not None and len(hs) == (1 + decode) * m.tf.config.n_layers
    finally:
        m.close()


def test_compiled_layer_loop_stops_on_a_nan_layer_and_a_disk_error(relaid_dir, tmp_path, monkeypatch):
    """The predict mode's one-call pass (steps.LayerLoop) stops as the Python loop does: a layer whose bundles
    hold NaN scales is named, and a disk error in a reader thread under a budget is one PowerlowError naming
    ffn.bin and the read."""
    import errno
    from powerlow.manifest import load_manifest
    from powerlow.plan import minimum_budget
    d = tmp_path / "m"
    shutil.copytree(relaid_dir, d)
    man = load_manifest(d)
    cfg = RuntimeConfig(threads=1, mode="predict")
    with powerlow.load(d, cfg.replace(budget_bytes=minimum_budget(d, man, cfg) + 8 * StoreInfo.from_json(man["ffn"]).layout.stride)) as m:
        list(m.generate([5, 17, 33], 2))
        assert m.tf._loop is not None
        m.tf.ffn_source.core.inject_failure(0, errno.EIO)
        with pytest.raises(PowerlowError, match=r"ffn\.bin.*(read|failed).*Input/output error"):
            list(m.generate([5, 17, 33, 40], 20))
    info = StoreInfo.from_json(man["ffn"])
    with open(d / "ffn.bin", "r+b") as f:            # every bundle of layer 1: whatever the predictor picks
        f.seek(info.bundle_offset(1, 0))
        f.write(b"\xff" * (info.bundle_offset(2, 0) - info.bundle_offset(1, 0)))
    monkeypatch.setattr("powerlow.manifest.HASH_AT_LOAD_MAX_BYTES", 0)
    monkeypatch.setenv("POWERLOW_CHECKSUMS", "0")
    with powerlow.load(d, cfg) as m:
        with pytest.raises(PowerlowError, match="layer 1 produced non-finite"):
            m.tf.forward([5, 17, 33])
        assert m.tf._loop is not None


def test_a_predictor_is_built_from_model_parts_without_a_transformer(relaid_dir):
    """Predictors take what they use (ModelParts: dir, manifest, FFN layout, activation, norms; the ops; the
    density), not the Transformer: one built from the model's files alone picks what the engine's picks."""
    from safetensors.numpy import load_file
    from powerlow import kernels
    from powerlow.manifest import load_manifest
    from powerlow.predictors import LowRankPredictor
    from powerlow.predictors.common import ModelParts
    d = relaid_dir
    man = load_manifest(d)
    info = StoreInfo.from_json(man["ffn"])
    w = load_file(str(d / "resident.safetensors"))
    parts = ModelParts(d, man, info, "silu", [w[f"blk.{l}.ffn_norm"].astype(np.float32) for l in range(info.n_layers)])
    alone = LowRankPredictor(parts, kernels, 1.0)
    m = _load(d, "predict")
    try:
        hs = []
        m.tf.ffn.observer = lambda l, h: hs.append((l, h.copy()))      # the FFN inputs of a real pass
        m.tf.forward([5, 17, 33, 9, 100, 7])
        picked = 0
        for l, h in hs:
            got = alone.select(l, h)
            np.testing.assert_array_equal(got, m.tf.predictor.select(l, h))
            picked += len(got)
        assert len(hs) == info.n_layers and 0 < picked
    finally:
        m.close()


def test_ffn_density_is_the_calls_own(relu_dir):
    """Model.stats after generate() describes that call: its FFN density is not averaged with earlier calls."""
    d, _ = relu_dir
    a, b = _load(d, "gate"), _load(d, "gate")
    try:
        list(a.generate(PROMPT, 16))
        list(a.generate(PROMPT[:2], 2))
        list(b.generate(PROMPT[:2], 2))
        assert a.stats.ffn_density == b.stats.ffn_density < 1.0
    finally:
        a.close()
        b.close()


def test_resident_dense_pass_in_one_call_is_the_python_path(relaid_dir):
    """Dense mode without a budget: steps.AllStep under steps.LayerLoop (the pass in one call) gives the Python
    layer loop's logits bit for bit, the cluster re-layout's summing order included."""
    got, want = [], []
    for out, python_path in ((got, False), (want, True)):
        m = _load(relaid_dir, "dense")
        try:
            if python_path:
                m.tf.ffn.compiled = False
            x = m.tf.forward([5, 17, 33, 9, 100, 7])
            out.append(x)
            for i in range(4):
                x = m.tf.forward([int(x[-1].argmax())], start_pos=6 + i, last_only=True)
                out.append(x)
            assert (m.tf._loop is None) == python_path
        finally:
            m.close()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    _ffn_outputs_match(_load(relaid_dir, "dense"), decode=False)     # layer by layer: the FFN outputs themselves
