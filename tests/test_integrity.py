"""Per-bundle / per-tensor CRC32C checksums: written at convert, checked at load and at every read from storage,
rewritten by profile's re-layouts, and all of them hashed by `powerlow verify`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import powerlow
import powerlow.manifest
from powerlow import integrity
from powerlow.config import RuntimeConfig
from powerlow.errors import PowerlowError
from powerlow.manifest import load_manifest
from powerlow.plan import make_plan, minimum_budget
from powerlow.store import StoreInfo
from powerlow.stream import TensorFile
from powerlow.verify import verify_dir

from conftest import make_converted, run_cli

PROMPT = [5, 17, 33, 9, 100, 7]
LAYER, CLUSTER = 1, 5


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A ReLU model with 16 clusters per layer (most of the FFN stays on disk under a small budget)."""
    return make_converted(tmp_path_factory.mktemp("integrity"), act="relu", seed=3, hidden=64, intermediate=512,
                          layers=3, heads=4, kv_heads=2, vocab=300, max_positions=128)[1]


@pytest.fixture
def model(base_dir, tmp_path, monkeypatch):
    """A fresh copy, with every file treated as too big to hash at load (as a real model's ffn.bin is)."""
    monkeypatch.setattr(powerlow.manifest, "HASH_AT_LOAD_MAX_BYTES", 0)
    d = tmp_path / "m"
    shutil.copytree(base_dir, d)
    return d


def _info(d) -> StoreInfo:
    return StoreInfo.from_json(load_manifest(d, check_files=False)["ffn"])


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def corrupt_bundle(d: Path, layer: int = LAYER, cluster: int = CLUSTER) -> None:
    info = _info(d)
    _flip(d / "ffn.bin", info.bundle_offset(layer, cluster) + info.layouts[layer].gate_off + 3)


def corrupt_tensor(d: Path, prefix: str) -> str:
    tf = TensorFile(d / "resident.safetensors")
    key = next(k for k in tf.meta if k.startswith(prefix))
    off, n = tf.span(key)
    tf.close()
    _flip(d / "resident.safetensors", off + n // 2)
    return key


def _generate(d, cfg, n=4):
    m = powerlow.load(d, cfg)
    try:
        return [t.id for t in m.generate(PROMPT, n)]
    finally:
        m.tf.close()


BUNDLE_MSG = rf"ffn\.bin: the bundle of layer {LAYER}, cluster {CLUSTER} .*does not match its checksum.*re-convert"


def test_crc32c_known_value_and_portable_path():
    from powerlow import _kernels
    assert _kernels.crc32c(b"123456789") == 0xE3069283          # the CRC32C check value
    assert _kernels.crc32c(b"123456789", portable=True) == 0xE3069283
    a = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    whole = _kernels.crc32c(a)
    assert _kernels.crc32c(a[50_001:], _kernels.crc32c(a[:50_001])) == whole       # continues
    ptrs = a.ctypes.data + np.array([0, 1, 7, 100, 333], np.uint64)
    got = _kernels.crc32c_many(ptrs, 9999)
    assert [int(x) for x in got] == [_kernels.crc32c(a[o: o + 9999], portable=True) for o in (0, 1, 7, 100, 333)]


def test_convert_writes_checksums_and_clean_model_verifies(model):
    m = load_manifest(model)
    assert m["checksums"]["file"] == integrity.SUMS_FILE and integrity.SUMS_FILE not in m["files"]
    sums = integrity.load_sums(model)
    info = _info(model)
    assert len(sums.bundles) == info.n_layers and all(len(b) == info.n_clusters for b in sums.bundles)
    assert set(sums.tensors) == set(TensorFile(model / "resident.safetensors").meta)
    done, bad = verify_dir(model)
    assert not bad
    assert any("bundles" in x and "ok" in x for x in done) and any("tensors" in x and "ok" in x for x in done)
    r = run_cli("verify", model, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "everything checked matches" in r.stdout
    _generate(model, RuntimeConfig())                         # loads and runs with the checks on


def test_resident_run_catches_a_corrupt_bundle_at_load(model):
    corrupt_bundle(model)
    with pytest.raises(PowerlowError, match=BUNDLE_MSG):
        powerlow.load(model)


def test_checks_can_be_switched_off_for_measurements(model, monkeypatch):
    corrupt_bundle(model)
    monkeypatch.setenv("POWERLOW_CHECKSUMS", "0")
    _generate(model, RuntimeConfig())


def test_offloaded_dense_run_catches_a_corrupt_bundle(model):
    corrupt_bundle(model)
    cfg = RuntimeConfig(budget_bytes=minimum_budget(model, load_manifest(model), RuntimeConfig()))
    with pytest.raises(PowerlowError, match=BUNDLE_MSG):
        _generate(model, cfg)


def test_offloaded_sparse_run_catches_a_corrupt_bundle(model):
    corrupt_bundle(model)
    rt = dict(mode="gate", hot_fraction=0.0)
    cfg = RuntimeConfig(budget_bytes=minimum_budget(model, load_manifest(model), RuntimeConfig(**rt)), **rt)
    with pytest.raises(PowerlowError, match=BUNDLE_MSG):
        _generate(model, cfg)


def test_sparse_store_fails_on_the_first_read_of_the_bad_bundle(model):
    """OffloadedStore directly: other bundles read fine; the first read of the bad one raises."""
    from powerlow.cache import OffloadedStore
    corrupt_bundle(model)
    m = load_manifest(model)
    info = StoreInfo.from_json(m["ffn"])
    rt = dict(mode="threshold", density=0.3, hot_fraction=0.0)
    budget = minimum_budget(model, m, RuntimeConfig(**rt)) + 4 * info.layout.stride
    runtime = RuntimeConfig(budget_bytes=budget, **rt)
    src = OffloadedStore(model, info, make_plan(model, m, runtime), runtime)
    try:
        src.ptrs(LAYER, np.array([CLUSTER - 1, CLUSTER + 1]))
        src.ptrs(0, np.array([CLUSTER]))
        with pytest.raises(PowerlowError, match=BUNDLE_MSG):
            src.ptrs(LAYER, np.array([CLUSTER]))
    finally:
        src.close()


@pytest.mark.parametrize("prefix", ["blk.0.attn_q", "blk.1.ffn_norm", "token_embd"])
def test_corrupt_resident_tensor_is_caught_at_load(model, prefix):
    key = corrupt_tensor(model, prefix)
    with pytest.raises(PowerlowError, match=rf"resident\.safetensors: tensor '{key}' does not match its checksum"):
        powerlow.load(model)


@pytest.fixture(scope="module")
def stream_base(tmp_path_factory):
    """Untied embeddings, vocabulary big enough to stream (as in test_stream)."""
    return make_converted(tmp_path_factory.mktemp("integrity_stream"), bits="4", act="silu", seed=5, hidden=64,
                          intermediate=256, layers=4, heads=4, kv_heads=2, vocab=3000, max_positions=128)[1]


def test_corrupt_streamed_attention_is_caught_at_its_first_read(stream_base, tmp_path, monkeypatch):
    import powerlow.plan as plan_mod
    monkeypatch.setattr(plan_mod, "tokenizer_load_peak", lambda path: 0)     # the tiny model can stream then
    monkeypatch.setattr(powerlow.manifest, "HASH_AT_LOAD_MAX_BYTES", 0)
    model = tmp_path / "m"
    shutil.copytree(stream_base, model)
    cfg = RuntimeConfig(budget_bytes=minimum_budget(model, load_manifest(model), RuntimeConfig()))
    m = powerlow.load(model, cfg)
    streamed = sorted(m.tf._ring_of_layer)
    m.tf.close()
    assert streamed, "no attention layer is streamed at the minimum budget"
    key = corrupt_tensor(model, f"blk.{streamed[-1]}.attn_v")
    m = powerlow.load(model, cfg)                       # streamed units are not read at load...
    try:
        with pytest.raises(PowerlowError, match=rf"tensor '{key}' does not match its checksum"):
            [t.id for t in m.generate(PROMPT, 2)]       # ...but checked at their first read through the ring
    finally:
        m.tf.close()


def test_verify_names_every_bad_bundle_and_tensor(model):
    corrupt_bundle(model)
    corrupt_bundle(model, 2, 0)
    key = corrupt_tensor(model, "blk.0.attn_k")
    done, bad = verify_dir(model)
    text = "\n".join(bad)
    assert f"layer {LAYER}, cluster {CLUSTER}" in text and "layer 2, cluster 0" in text
    assert f"tensor {key!r}: checksum mismatch" in text
    assert "ffn.bin: sha256 does not match" in text and "resident.safetensors: sha256 does not match" in text
    r = run_cli("verify", model, timeout=120)
    assert r.returncode == 2
    assert f"layer {LAYER}, cluster {CLUSTER}" in r.stdout and key in r.stdout and "re-convert" in r.stdout


def test_verify_with_a_corrupt_sidecar(model):
    p = model / integrity.SUMS_FILE
    p.write_text(p.read_text().replace("[", "[1,", 2))
    r = run_cli("verify", model, timeout=120)
    assert r.returncode == 2 and "checksums.json does not match its sha256" in r.stdout
    with pytest.raises(PowerlowError, match=r"checksums\.json does not match its sha256 .*re-convert"):
        powerlow.load(model)


def test_old_model_without_checksums_loads_and_verify_says_so(model):
    m = json.loads((model / "manifest.json").read_text())
    del m["checksums"]
    (model / "manifest.json").write_text(json.dumps(m))
    (model / integrity.SUMS_FILE).unlink()
    _generate(model, RuntimeConfig())
    r = run_cli("verify", model, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no per-bundle/per-tensor checksums" in r.stdout and "older powerlow" in r.stdout


def test_cluster_relayout_moves_the_checksums(model):
    from powerlow.profile import relayout_clusters
    corrupt_bundle(model)
    info = _info(model)
    rng = np.random.default_rng(1)
    perms = [rng.permutation(info.n_clusters) for _ in range(info.n_layers)]
    relayout_clusters(model, load_manifest(model, check_files=False), perms)
    new_pos = int(np.flatnonzero(perms[LAYER] == CLUSTER)[0])
    _, bad = verify_dir(model)
    assert [b for b in bad if "checksum mismatch" in b] == [
        f"ffn.bin: layer {LAYER}, cluster {new_pos} (bytes at {info.bundle_offset(LAYER, new_pos)}): checksum mismatch"]


def test_neuron_relayout_rewrites_the_checksums(model):
    from powerlow.profile import relayout_store
    info = _info(model)
    rng = np.random.default_rng(2)
    perms = [rng.permutation(info.n_neurons) for _ in range(info.n_layers)]
    relayout_store(model, load_manifest(model, check_files=False), perms)
    done, bad = verify_dir(model)
    assert not bad, bad
    _generate(model, RuntimeConfig())
    corrupt_bundle(model)                                  # the new checksums catch a new corruption
    with pytest.raises(PowerlowError, match=BUNDLE_MSG):
        powerlow.load(model)


def test_neuron_relayout_refuses_a_corrupt_source(model):
    from powerlow.profile import relayout_store
    corrupt_bundle(model)
    info = _info(model)
    perms = [np.random.default_rng(3).permutation(info.n_neurons) for _ in range(info.n_layers)]
    with pytest.raises(PowerlowError, match=BUNDLE_MSG):
        relayout_store(model, load_manifest(model, check_files=False), perms)


@pytest.mark.parametrize("mode", ["first", "every"])
def test_offloaded_run_checks_each_bundle_once_unless_every_read(model, monkeypatch, mode):
    """A dense offloaded run re-reads every unpinned bundle every token: by default each is checked at its first
    read of the run (what the check is for: the bytes on disk), with POWERLOW_CHECKSUMS=every at each read."""
    if mode == "every":
        monkeypatch.setenv("POWERLOW_CHECKSUMS", "every")
    cfg = RuntimeConfig(budget_bytes=minimum_budget(model, load_manifest(model), RuntimeConfig()))
    m = powerlow.load(model, cfg)
    try:
        [t.id for t in m.generate(PROMPT, 6)]
        src = m.tf.ffn_source
        checked = src.counters()["bundle_checks"]          # CRC32Cs the reader threads computed
        distinct = int(src.t["verified"].sum())              # bundles checked at least once
        passes = src.counters()["forward_passes"]
    finally:
        m.close()
    assert distinct > 0 and passes >= 6
    if mode == "first":
        assert checked == distinct                           # no bundle checked twice
    else:
        assert checked >= 3 * distinct                 # re-read and re-checked every token
