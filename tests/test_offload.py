"""The offloaded run: budget plan, segmented cache, I/O reader; same tokens as the resident run where exact."""
from __future__ import annotations

import ctypes
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import powerlow
from powerlow.config import RuntimeConfig
from powerlow.errors import PowerlowError
from powerlow.io import aligned_buffer, probe_random_read
from powerlow.manifest import load_manifest
from powerlow.plan import make_plan, minimum_budget
from powerlow.store import StoreInfo
from conftest import make_converted, run_cli

PROMPT = [5, 17, 33, 9, 100, 7]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A ReLU model with 16 clusters per layer, so small budgets leave most of the FFN on disk."""
    return make_converted(tmp_path_factory.mktemp("offload"), act="relu", seed=3, hidden=64, intermediate=512,
                          layers=3, heads=4, kv_heads=2, vocab=300, max_positions=128)[1]


def _min(d, dense_resident=False, **kw) -> int:
    return minimum_budget(d, load_manifest(d), RuntimeConfig(**kw), dense_resident=dense_resident)


def _generate(d, cfg, n=12, prompt=PROMPT):
    model = powerlow.load(d, cfg)
    try:
        ids = [t.id for t in model.generate(prompt, n)]
        src = model.tf.ffn_source
        counters = src.counters() if hasattr(src, "counters") else {}
        return ids, counters, model
    finally:
        model.tf.close()


@pytest.fixture(scope="module")
def resident_tokens(tiny_dir):
    return _generate(tiny_dir, RuntimeConfig())[0]


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("extra_slots", [0, 7, 20, 1000])
def test_offloaded_dense_same_tokens(tiny_dir, resident_tokens, policy, extra_slots):
    info = StoreInfo.from_json(load_manifest(tiny_dir)["ffn"])
    budget = _min(tiny_dir) + extra_slots * info.layout.stride
    ids, c, model = _generate(tiny_dir, RuntimeConfig(budget_bytes=budget, cache_policy=policy))
    assert ids == resident_tokens
    # counters: every cluster of every layer was computed once per forward pass
    passes = c["forward_passes"]
    assert c["hits"] + c["misses"] == passes * info.n_layers * info.n_clusters
    assert c["bytes_read"] % info.layout.stride == 0 and c["bytes_read"] >= c["misses"] * info.layout.stride
    if extra_slots == 1000:      # everything fits: pinned at start, nothing read afterwards
        assert c["bytes_read"] == 0 and c["cache_hit_rate"] == 1.0
    else:
        assert c["read_bytes_per_token"] > 0 and c["misses"] > 0
    assert c["plan_planned_bytes"] <= budget


def test_buffered_fallback_same_tokens(tiny_dir, resident_tokens):
    ids, c, _ = _generate(tiny_dir, RuntimeConfig(budget_bytes=_min(tiny_dir), o_direct=False))
    assert ids == resident_tokens and c["o_direct"] is False


def test_budget_below_minimum_is_refused(tiny_dir):
    need = _min(tiny_dir)
    with pytest.raises(PowerlowError, match=r"below the minimum .*raise --budget to at least"):
        powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=need - 1))
    powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=need)).tf.close()


def test_plan_accounting(tiny_dir):
    m = load_manifest(tiny_dir)
    info = StoreInfo.from_json(m["ffn"])
    for extra in (0, 5, 17, 40):
        budget = _min(tiny_dir) + extra * info.layout.stride
        plan = make_plan(tiny_dir, m, RuntimeConfig(budget_bytes=budget))
        assert plan.total_bytes <= budget < plan.total_bytes + info.layout.stride
        assert plan.n_slots * info.layout.stride == plan.hot_bytes + plan.dynamic_bytes + plan.staging_bytes
        assert [len(h) for h in plan.hot_clusters] == plan.hot_per_layer
        # the pool that is not pinned always holds one layer's misses
        assert plan.n_dynamic + plan.n_staging >= info.n_clusters - min(plan.hot_per_layer)
        model = powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=budget))
        src = model.tf.ffn_source
        assert src.arena.nbytes == plan.n_slots * info.layout.stride
        assert model.tf.kv.limit == plan.context          # the KV cache is capped at what the plan paid for
        text = plan.render()
        for word in ("resident", "kv cache", "hot (pinned clusters)", "dynamic", "I/O staging", "planned total"):
            assert word in text
        src.close()


def test_hot_clusters_from_profile(tiny_dir, tmp_path):
    from safetensors.numpy import save_file
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    m = load_manifest(d)
    info = StoreInfo.from_json(m["ffn"])
    rng = np.random.default_rng(0)
    counts = {f"blk.{l}.cluster_counts": rng.permutation(info.n_clusters).astype(np.float32) * (l + 1)
              for l in range(info.n_layers)}
    save_file(counts, str(d / "profile.safetensors"))
    budget = _min(d, mode="threshold") + 10 * info.layout.stride
    plan = make_plan(d, m, RuntimeConfig(budget_bytes=budget, mode="threshold", density=0.25, hot_fraction=1.0))
    assert plan.hot_source == "profile" and plan.n_hot > 0
    allc = np.stack([counts[f"blk.{l}.cluster_counts"] for l in range(info.n_layers)])
    chosen = np.concatenate([allc[l, plan.hot_clusters[l]] for l in range(info.n_layers)])
    # the pinned clusters are the ones with the most activations over all layers
    assert chosen.min() >= np.sort(allc.reshape(-1))[::-1][plan.n_hot - 1]


def _store(d, **kw):
    """An OffloadedStore of model dir d under RuntimeConfig(**kw), without the weights (mode != dense: the sparse
    path)."""
    from powerlow.cache import OffloadedStore
    m = load_manifest(d)
    rt = RuntimeConfig(**kw)
    return OffloadedStore(Path(d), StoreInfo.from_json(m["ffn"]), make_plan(Path(d), m, rt), rt)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_random_access_returns_the_right_bundles(tiny_dir, policy):
    """Random cluster subsets and prefetches under a tight budget: every address holds the file's bundle."""
    info = StoreInfo.from_json(load_manifest(tiny_dir)["ffn"])
    S = info.layout.stride
    data = (tiny_dir / "ffn.bin").read_bytes()
    src = _store(tiny_dir, budget_bytes=_min(tiny_dir, mode="threshold") + 6 * S, mode="threshold", density=0.3,
                 cache_policy=policy)
    rng = np.random.default_rng(1)
    try:
        for step in range(60):
            l = int(rng.integers(info.n_layers))
            k = int(rng.integers(1, info.n_clusters + 1))
            cl = np.sort(rng.choice(info.n_clusters, k, replace=False))
            ptrs = src.ptrs(l, cl)
            assert ptrs.dtype == np.uint64 and len(ptrs) == k and len(set(ptrs.tolist())) == k
            for c, p in zip(cl, ptrs):
                off = info.bundle_offset(l, int(c))
                assert ctypes.string_at(int(p), S) == data[off: off + S], (step, l, c)
            if step % 3 == 0:
                nxt = (l + 1) % info.n_layers
                src.prefetch(nxt, np.sort(rng.choice(info.n_clusters, 4, replace=False)))
        c = src.counters()
        assert c["evictions"] > 0 and c["misses"] > 0 and c["hits"] > 0
    finally:
        src.close()


@pytest.mark.parametrize("refuse_direct", [False, True])
def test_range_reader_and_fallback(tiny_dir, monkeypatch, refuse_direct):
    """The C range reader (the weight ring's and the probe's) puts the asked bytes where asked: aligned, and at
    unaligned offsets, lengths and destinations (bounced under O_DIRECT), a range ending in the file's last partial
    block included; where O_DIRECT is refused (EINVAL, as tmpfs or FUSE may answer) it reads buffered."""
    import errno
    from powerlow.io import RangeReader
    path = tiny_dir / "ffn.bin"
    data = path.read_bytes()
    if refuse_direct:
        real_open = os.open

        def fake_open(p, flags, *a):
            if flags & getattr(os, "O_DIRECT", 0):
                raise OSError(errno.EINVAL, "Invalid argument")
            return real_open(p, flags, *a)
        monkeypatch.setattr(os, "open", fake_open)
    r = RangeReader(path, depth=3, o_direct=True, groups=2, ranges=8)
    try:
        assert r.direct is (not refuse_direct)
        buf = aligned_buffer(16384)
        r.read(8192, buf, 0, 16384, 0)
        r.wait(0)
        assert buf.tobytes() == data[8192: 8192 + 16384]
        with pytest.raises(PowerlowError, match="past the end"):
            r.read(len(data), buf, 0, 4096, 0)
        rng = np.random.default_rng(1)
        cases = [(1, 5), (4095, 2), (4097, 12289), (len(data) - 777, 777), (123, len(data) - 123)]
        dsts = [np.zeros(n + 3, np.uint8) for _, n in cases]
        for (off, n), raw in zip(cases, dsts):          # all in flight at once, in two groups
            r.read(off, raw, 3, n, int(rng.integers(2)), priority=int(rng.integers(3)))   # an unaligned destination
        r.wait(0)
        r.wait(1)
        for (off, n), raw in zip(cases, dsts):
            assert raw[3:].tobytes() == data[off: off + n], (off, n)
        assert r.requests == 1 + len(cases) and r.bytes_read == 16384 + sum(n for _, n in cases)
    finally:
        r.close()
    res = tiny_dir / "resident.safetensors"
    rdata = res.read_bytes()
    assert len(rdata) % 4096, "the test wants a file whose size is not a multiple of the block"
    r = RangeReader(res, depth=2, o_direct=True)
    try:
        dst = np.zeros(1001, np.uint8)
        r.read(len(rdata) - 1001, dst, 0, 1001, 0)
        r.wait(0)
        assert dst.tobytes() == rdata[-1001:]
        r.inject_failure(0, errno.EIO)
        r.read(0, dst, 0, 1001, 0)
        with pytest.raises(PowerlowError, match=r"resident\.safetensors: read of 1001 bytes at 0 failed \(Input/output"):
            r.wait(0)
    finally:
        r.close()
    probe = probe_random_read(path, block_bytes=4096, depth=2, seconds=0.05)
    assert probe["gbps"] > 0 and probe["bytes"] % 4096 == 0


def test_run_plan_cli(tiny_dir):
    need = _min(tiny_dir)
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "--plan", "--budget", str(need + 100_000), timeout=120)
    assert r.returncode == 0, r.stderr
    for word in ("memory budget", "resident", "hot (pinned clusters)", "dynamic (cold cache)", "I/O staging"):
        assert word in r.stdout
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "--plan", "--budget", "1MiB", timeout=120)
    assert r.returncode == 2 and "minimum" in r.stderr


def test_gate_mode_offloaded_same_tokens(tiny_dir):
    ref = _generate(tiny_dir, RuntimeConfig(mode="gate"))[0]
    dense = _generate(tiny_dir, RuntimeConfig())[0]
    got = _generate(tiny_dir, RuntimeConfig(mode="gate", budget_bytes=_min(tiny_dir, mode="gate") + 8 * 4096))[0]
    assert got == ref == dense


def test_smollm2_half_ffn_budget_same_tokens(smol_dir):
    """The real model, dense, with about half its FFN on disk: the resident run's tokens."""
    m = load_manifest(smol_dir)
    info = StoreInfo.from_json(m["ffn"])
    ref = _generate(smol_dir, RuntimeConfig(), n=8, prompt=[1, 504, 3458, 282, 5457, 30])[0]
    budget = _min(smol_dir, dense_resident=True) + info.total_bytes // 2
    ids, c, _ = _generate(smol_dir, RuntimeConfig(budget_bytes=budget), n=8, prompt=[1, 504, 3458, 282, 5457, 30])
    assert ids == ref
    assert 0.2 < c["cache_hit_rate"] < 0.9 and c["read_bytes_per_token"] > 0


def test_layer_asking_for_everything_borrows_pinned_slots(tiny_dir):
    """Sparse plan with everything pinned that fits: a layer asking for all its clusters still gets them,
    by borrowing pinned slots of other layers, and the bundles are right."""
    info = StoreInfo.from_json(load_manifest(tiny_dir)["ffn"])
    S = info.layout.stride
    data = (tiny_dir / "ffn.bin").read_bytes()
    src = _store(tiny_dir, budget_bytes=_min(tiny_dir, mode="threshold") + 12 * S, mode="threshold", density=0.25,
                 hot_fraction=1.0)
    try:
        assert src.plan.n_dynamic + src.plan.n_staging < info.n_clusters      # the unpinned pool is too small
        for l in range(info.n_layers):
            ptrs = src.ptrs(l, np.arange(info.n_clusters))
            for c, p in enumerate(ptrs):
                off = info.bundle_offset(l, c)
                assert ctypes.string_at(int(p), S) == data[off: off + S]
        assert src.counters()["unpinned"] > 0
    finally:
        src.close()


def test_bench_oversized_table_takes_medians_per_configuration():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_oversized.py"
    spec = importlib.util.spec_from_file_location("bench_oversized", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = [{"limit": "50%", "engine": "llama.cpp", "decode_tok_s": x, "id": i} for i, x in enumerate([0.3, 0.6, 0.5])]
    runs += [{"limit": "50%", "engine": "powerlow", "mode": "dense", "density": 1.0, "decode_tok_s": x} for x in (1.0, 2.0)]
    runs += [{"limit": "25%", "engine": "powerlow", "mode": "dense", "density": 1.0, "refused": "no"}]
    rows = mod.median_rows(runs)
    assert len(rows) == 3
    llama = next(r for r in rows if r["engine"] == "llama.cpp")
    assert llama["decode_tok_s"] == 0.5 and llama["id"] == 2 and llama["runs"] == [0.3, 0.6, 0.5]
    assert next(r for r in rows if r.get("mode") == "dense" and r["limit"] == "50%")["decode_tok_s"] == 1.0  # lower median
    assert next(r for r in rows if r["limit"] == "25%")["refused"] == "no"


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_stream_in_pieces_gives_resident_logits(tiny_dir, monkeypatch, threads, compiled):
    """Dense mode streams the unpinned bundles through a small window and computes each layer piece by piece:
    the resident run's logits bit for bit, also after a pass broken off in the middle; the compiled layer
    (steps.DenseStep, and steps.LayerLoop where attention is resident) as SparseFFN's Python piece loop."""
    from powerlow import ffn as ffn_mod, plan as plan_mod
    from powerlow.engine import Transformer

    info = StoreInfo.from_json(load_manifest(tiny_dir)["ffn"])
    S, N, L = info.layout.stride, info.n_clusters, info.n_layers
    monkeypatch.setattr(plan_mod, "STREAM_PIECE_BYTES", 2 * S)
    monkeypatch.setattr(ffn_mod, "STREAM_PIECE_BYTES", 2 * S)

    def logits(tf):
        out = [tf.forward(PROMPT, start_pos=0)]
        tok = int(np.argmax(out[-1][-1]))
        for i in range(3):
            out.append(tf.forward([tok], start_pos=len(PROMPT) + i))
            tok = int(np.argmax(out[-1][-1]))
        return out

    ref_tf = Transformer(tiny_dir, RuntimeConfig(threads=threads))
    ref = logits(ref_tf)
    ref_tf.close()
    rt = RuntimeConfig(threads=threads, queue_depth=1, io_block_bytes=4096)
    budget = _min(tiny_dir, threads=threads, queue_depth=1, io_block_bytes=4096) + 20 * S
    tf = Transformer(tiny_dir, rt.replace(budget_bytes=budget))
    try:
        p = tf.plan
        assert p.stream_window and 0 < p.n_hot and p.n_staging < L * N - p.n_hot
        assert len(tf.ffn._pieces) > 1
        if not compiled:
            tf.ffn.compiled = False           # SparseFFN._forward_pieces, layer by layer
        got = logits(tf)
        assert (tf.ffn.compiled_step() is not None) == compiled
        assert (tf._loop is not None) == (compiled and all(lw is not None for lw in tf.layers))
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)
        c = tf.ffn_source.counters()
        assert c["hits"] == c["forward_passes"] * p.n_hot
        assert c["misses"] == c["forward_passes"] * (L * N - p.n_hot) and c["bytes_read"] >= c["misses"] * S
        h = np.ones((1, info.layout.K), np.float32)
        tf.ffn.forward(0, h)                  # a pass broken off after two layers
        tf.ffn.forward(1, h)
        np.testing.assert_array_equal(tf.forward(PROMPT, start_pos=0), ref[0])
    finally:
        tf.close()


def test_busy_clock_is_the_union_of_readers(tmp_path):
    """The FFN reader and the weight ring share a disk: their joint throughput is over the union of busy time."""
    from powerlow._iocore import Clock
    from powerlow.io import RangeReader
    f = tmp_path / "x.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
    clock = Clock()
    a, b = RangeReader(f, depth=2, clock=clock), RangeReader(f, depth=2, clock=clock)
    try:
        bufs = [aligned_buffer(1 << 20) for _ in range(8)]
        for i, r in enumerate([a, b] * 4):
            r.read(i << 20, bufs[i], 0, 1 << 20, 0)
        a.wait(0)
        b.wait(0)
        for i in range(8):
            assert bufs[i].tobytes() == f.read_bytes()[i << 20: (i + 1) << 20]
        assert clock.seconds > 0 and a.busy_seconds > 0 and b.busy_seconds > 0
        assert a.bytes_read + b.bytes_read == 8 << 20
        assert clock.seconds <= a.busy_seconds + b.busy_seconds + 1e-6     # overlaps count once
    finally:
        a.close()
        b.close()


def _released_after_readers_stop(make, fill):
    """make() -> (core object, array its reader threads write); fill(core, arr) queues a read that a reader takes and
    sleeps in. The core is then dropped unclosed: the live reader count when arr is released (-1 if it was
    released before the core was dropped), against the count before the core was made."""
    import gc
    import time
    import weakref
    from powerlow import _iocore
    base = _iocore.live_readers()
    core, arr = make()
    seen = []
    weakref.finalize(arr, lambda: seen.append(_iocore.live_readers()))
    core.inject_delay(150_000)
    fill(core, arr)
    del arr
    gc.collect()
    if seen:                       # released while its read is queued or in flight
        return -1, base
    time.sleep(0.03)               # a reader has taken the request and sleeps in it
    del core
    gc.collect()
    return seen[0], base


def test_dropped_range_reader_stops_its_threads_before_releasing_destinations(tiny_dir):
    """A reader dropped without close() or wait() joins its threads (each finishes the read it serves) before the
    destination arrays are released: they used to be the caller's to keep, and Cython releases a subclass's
    attributes before the base type's __dealloc__ stopped the threads, so a read in flight could land in freed
    memory (a CI run aborted in malloc, 7 Dec 2026)."""
    from powerlow import _iocore
    fd = os.open(tiny_dir / "ffn.bin", os.O_RDONLY)
    try:
        def make():
            return _iocore.RangeReader(fd, False, 1, 4, 2), np.zeros(4096, np.uint8)

        at_release, base = _released_after_readers_stop(make, lambda c, a: c.read(0, a, 0, 4096, 1))
        assert at_release == base
        r = _iocore.RangeReader(fd, False, 1, 4, 2)
        with pytest.raises(ValueError, match="group 2 is not in"):
            r.read(0, np.zeros(16, np.uint8), 0, 16, 2)
        r.close()
    finally:
        os.close(fd)


def test_dropped_offloaded_store_stops_its_threads_before_releasing_the_arena(tiny_dir):
    """The same for the slot core: an offloaded model dropped unclosed, prefetches in flight, releases its cache
    arena (what the reads land in) only once the reader threads are gone."""
    def make():
        model = powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=_min(tiny_dir) + 2000))
        store = model.tf.ffn_source
        return model, store.arena

    def fill(model, arena):
        core = model.tf.ffn_source.core
        for layer in range(model.config.n_layers):
            core.prefetch(layer, np.arange(16, dtype=np.int32), 1)

    class Holder:                  # the model, with the core's inject_delay at hand
        def __init__(self, m):
            self.m = m

        def inject_delay(self, us):
            self.m.tf.ffn_source.core.inject_delay(us)

    def make_held():
        m, a = make()
        return Holder(m), a

    at_release, base = _released_after_readers_stop(make_held, lambda h, a: fill(h.m, a))
    assert at_release == base


def test_run_sizes_the_kv_cache_to_the_prompt_and_n(tiny_dir, tmp_path, monkeypatch):
    """With a budget, `powerlow run` gives the KV cache exactly prompt + n positions (a small budget's automatic
    context is 64, so -n 100 used to fail); a config's max_context below that is an error that says what to change."""
    import powerlow.model
    from powerlow import cli
    from powerlow.tokenizer import Tokenizer

    need = _min(tiny_dir)
    seen = []
    real_load = powerlow.model.load
    monkeypatch.setattr(powerlow.model, "load", lambda d, cfg: seen.append(cfg) or real_load(d, cfg))
    assert cli.main(["run", "-m", str(tiny_dir), "-p", "hi there", "-n", "100", "--budget", str(need + 200_000)]) == 0
    n_prompt = len(Tokenizer.from_file(tiny_dir / "tokenizer.json").encode("hi there"))
    assert seen[-1].max_context == n_prompt + 100
    cfg = tmp_path / "c.toml"
    cfg.write_text("max_context = 16\n")
    r = run_cli("run", "-m", tiny_dir, "-p", "hi there", "-n", "100", "--budget", str(need + 200_000), "--config",
                str(cfg), timeout=120)
    assert r.returncode == 2 and "set max_context >= " in r.stderr


def test_long_prompt_under_a_budget_runs_in_pieces(tiny_dir, monkeypatch):
    """The plan pays for a 64-token prefill's activations; a longer prompt runs in 64-token pieces under a budget,
    with the resident run's logits (every position, and the last only)."""
    from powerlow.engine import Transformer
    ids = [int(i) for i in np.random.default_rng(4).integers(3, 300, 100)]
    ref_tf = Transformer(tiny_dir, RuntimeConfig())
    ref = ref_tf.forward(ids)
    ref_tf.close()
    tf = Transformer(tiny_dir, RuntimeConfig(budget_bytes=_min(tiny_dir) + 100_000, max_context=128))
    calls = []
    real = tf.embed_tokens                     # once per piece (the layers may run in one compiled call)
    monkeypatch.setattr(tf, "embed_tokens", lambda ids: calls.append(len(ids)) or real(ids))
    try:
        got = tf.forward(ids)
        np.testing.assert_array_equal(got, ref)
        assert max(calls) == 64 and got.shape == (100, ref.shape[1])
        np.testing.assert_array_equal(tf.forward(ids, last_only=True), ref[-1:])
    finally:
        tf.close()


def test_tune_table_plot_and_config(tiny_dir, tmp_path):
    """`powerlow tune`: one row per budget (a budget below the minimum is a refused row, not a failure), a PNG,
    and a suggested config that loads and names one of the measured budgets."""
    from powerlow.config import load_toml
    png, toml = tmp_path / "t.png", tmp_path / "t.toml"
    lo = -(-_min(tiny_dir) // (1 << 20)) + 1
    r = run_cli("tune", "-m", tiny_dir, "--budgets", f"1MiB,{lo}MiB,100%", "-n", "4", "--plot", str(png),
                "--write-config", str(toml), timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if l.strip().startswith(("1MiB", f"{lo}MiB", "100%"))}
    assert set(rows) == {"1MiB", f"{lo}MiB", "100%"} and "refused" in rows["1MiB"][3]
    measured = [rows[k] for k in (f"{lo}MiB", "100%")]
    assert all(float(x[3]) > 0 for x in measured)                  # "<label> <size> MiB <tok/s> ..."
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = load_toml(toml)
    assert any(abs(cfg["budget_bytes"] - float(x[1]) * (1 << 20)) <= (1 << 20) for x in measured)
    powerlow.load(tiny_dir, RuntimeConfig(**cfg)).tf.close()


def test_bench_under_a_budget_skips_the_dram_probe(tiny_dir, monkeypatch):
    """`powerlow bench` probes DRAM with a 256 MiB buffer; under a budget that would break the budget (and a cgroup
    limit set from it), so the probe is skipped there."""
    from powerlow import bench
    monkeypatch.setattr(bench, "read_probe_gbps", lambda *a, **k: pytest.fail("a 256 MiB probe under a budget"))
    model = powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=_min(tiny_dir) + 100_000))
    try:
        res = bench.run_bench(model, n_tokens=2, prompt_tokens=4, repeats=1)
    finally:
        model.tf.close()
    assert res["probe_gbps"] is None and res["decode_tok_s"] > 0 and res["read_bytes_per_token"] >= 0


def test_plan_shown_is_the_plan_run(tiny_dir):
    """`run --plan` sizes the KV cache as the same `run` command does (prompt + n), not the automatic guess."""
    budget = _min(tiny_dir, max_context=100) + (1 << 20)
    r = run_cli("run", "-m", tiny_dir, "-p", "hello there", "-n", "90", "--budget", budget, "--plan")
    assert r.returncode == 0, r.stderr
    import re
    positions = int(re.search(r"kv cache .*?(\d+) positions", r.stdout).group(1))
    with powerlow.load(tiny_dir) as m:
        n_prompt = len(m.tokenize("hello there"))
    assert positions == n_prompt + 90
    r = run_cli("run", "-m", tiny_dir, "-p", "hello there", "-n", "90", "--budget", budget)
    assert r.returncode == 0, r.stderr


def test_bench_oversized_variants_parse_and_stay_apart_in_the_medians():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_oversized.py"
    spec = importlib.util.spec_from_file_location("bench_oversized", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    v = mod.parse_variants("default;prefetch_depth=0;hot_fraction=0.5,cache_policy=lru")
    assert v == [("default", {}), ("prefetch_depth=0", {"prefetch_depth": 0}),
                 ("hot_fraction=0.5,cache_policy=lru", {"hot_fraction": 0.5, "cache_policy": "lru"})]
    assert mod.parse_variants(None) == [("", {})]
    with pytest.raises(SystemExit, match="not key=value"):
        mod.parse_variants("prefetch_depth")
    runs = [{"limit": "50%", "engine": "powerlow", "mode": "experts", "density": 1.0, "variant": name, "decode_tok_s": x}
            for name, x in (("default", 3.0), ("prefetch_depth=0", 1.0), ("default", 5.0), ("prefetch_depth=0", 2.0))]
    rows = mod.median_rows(runs)
    assert {r["variant"]: r["runs"] for r in rows} == {"default": [3.0, 5.0], "prefetch_depth=0": [1.0, 2.0]}


@pytest.mark.parametrize("dense_resident", [False, True])
def test_budget_too_small_carries_the_minimum(tiny_dir, dense_resident):
    """A refused budget raises BudgetTooSmall whose ``minimum`` is the smallest budget the planner accepts:
    one byte less is refused, that many bytes plan (with streaming allowed or not)."""
    from powerlow.errors import BudgetTooSmall
    m = load_manifest(tiny_dir)
    low = minimum_budget(tiny_dir, m, RuntimeConfig(), dense_resident=dense_resident)
    with pytest.raises(BudgetTooSmall) as e:
        make_plan(tiny_dir, m, RuntimeConfig(budget_bytes=low - 1), allow_stream=not dense_resident)
    assert e.value.minimum == low and isinstance(e.value, PowerlowError) and "raise --budget" in str(e.value)
    plan = make_plan(tiny_dir, m, RuntimeConfig(budget_bytes=low), allow_stream=not dense_resident)
    assert plan.budget_bytes == low and plan.n_hot + plan.n_staging + plan.n_dynamic >= plan.n_clusters


def test_busy_clock_counts_the_union():
    """Busy time is the union of the readers' in-flight intervals: overlaps once, gaps not at all. The sleeps
    bound it from both sides whatever the scheduler does: at least the 0.15 s spent inside intervals, and at most
    the elapsed time less the 0.1 s gap."""
    import time
    from powerlow._iocore import Clock
    clock = Clock()
    t0 = time.monotonic()
    clock.enter()
    time.sleep(0.05)
    clock.enter()                 # an overlapping read
    time.sleep(0.05)
    clock.leave()
    clock.leave()
    time.sleep(0.1)               # nothing in flight
    clock.enter()
    time.sleep(0.05)
    clock.leave()
    elapsed = time.monotonic() - t0
    assert 0.15 <= clock.seconds <= elapsed - 0.1
    clock.enter()
    time.sleep(0.02)
    assert clock.seconds >= 0.17  # a read in flight counts up to now


def test_short_ffn_bin_is_refused_at_load_and_mid_run(tiny_dir, tmp_path):
    """An ffn.bin shorter than its manifest says: refused at load (the manifest check); one that shrinks while a
    run is going (the reader threads' preadv hits the end of the file) stops the run with an error naming the read."""
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    ffn = d / "ffn.bin"
    size = ffn.stat().st_size
    budget = _min(d)
    os.truncate(ffn, size - 4096)
    rt = RuntimeConfig(budget_bytes=budget, mode="dense")
    with pytest.raises(PowerlowError, match=r"ffn\.bin has \d+ bytes, the manifest says \d+ .*re-convert"):
        powerlow.load(d, rt)
    os.truncate(ffn, size)
    with open(ffn, "r+b") as f:              # restore the cut bytes (zeros would fail the checksums instead)
        f.seek(size - 4096)
        f.write((tiny_dir / "ffn.bin").read_bytes()[size - 4096:])
    m = powerlow.load(d, RuntimeConfig(budget_bytes=budget, mode="dense", hot_fraction=0.0))
    try:
        list(m.generate(PROMPT, 2))
        os.truncate(ffn, 0)
        with pytest.raises(PowerlowError, match=r"ffn\.bin: read of \d+ bytes at \d+ is past the end of the file"):
            list(m.generate(PROMPT, 8))
    finally:
        m.close()


def test_python_overhead_classes_samples_by_their_call_stack():
    """scripts/python_overhead.py: a sample whose stack passes through powerlow's compiled code is compiled time
    (a kernel's malloc or expf too), one in the interpreter or numpy called from Python is Python time, an OS leaf
    outside our code is OS time; other threads and samples outside the decode window are not counted."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "scripts" / "python_overhead.py"
    spec = importlib.util.spec_from_file_location("python_overhead", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    script = "\n".join([
        " 100  10.5: ",
        "\t7f01 malloc (/usr/lib/x86_64-linux-gnu/libc.so.6)",
        "\t7f02 plk_ffn_bundles (/x/powerlow/_kernels.cpython-311-x86_64-linux-gnu.so)",
        "\t7f03 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "",
        " 100  10.6: ",
        "\t7f04 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "",
        " 100  10.7: ",
        "\t7f05 PyUFunc_GenericReduction (/x/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so)",
        "\t7f06 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "",
        " 100  10.8: ",
        "\tffff81 do_syscall_64 ([kernel.kallsyms])",
        "\t7f07 __GI___pthread_cond_wait (/usr/lib/x86_64-linux-gnu/libc.so.6)",
        "\t7f08 plk_io_fetch (/x/powerlow/_iocore.cpython-311-x86_64-linux-gnu.so)",
        "",
        " 100  10.9: ",
        "\tffff82 exc_page_fault ([kernel.kallsyms])",
        "\t7f09 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "",
        " 101  10.6: ",                                            # another thread
        "\t7f0a _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        "",
        " 100  12.0: ",                                            # after the window
        "\t7f0b _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
    ])
    c = mod.tally(script, 100, (10.0, 11.0))
    assert dict(c) == {"compiled": 2, "python": 2, "os": 1}


def test_the_planner_is_pure_over_gathered_facts(tiny_dir, tmp_path):
    """plan.gather_facts does the planner's reading; plan_budget over those facts needs no file (the model dir
    can be gone) and gives make_plan's plan, for several budgets and modes, and its refusals."""
    from powerlow.errors import BudgetTooSmall
    from powerlow.plan import gather_facts, plan_budget
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    man = load_manifest(d)
    lo = _min(d)
    cases = [RuntimeConfig(budget_bytes=b) for b in (lo, lo + 20 * 4096, lo + 10 ** 6)]
    cases += [RuntimeConfig(mode="gate", budget_bytes=lo + 10 ** 6)]
    want = [make_plan(d, man, rt).as_dict() for rt in cases]
    facts = [gather_facts(d, man, rt) for rt in cases]
    shutil.rmtree(d)
    for rt, f, w in zip(cases, facts, want):
        assert plan_budget(f, rt).as_dict() == w
    with pytest.raises(BudgetTooSmall) as e:
        plan_budget(facts[0], cases[0].replace(budget_bytes=lo - 1))
    assert e.value.minimum == lo
