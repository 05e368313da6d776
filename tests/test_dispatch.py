"""Measured dispatch (powerlow/dispatch.py): the choice logic with injected timings, the per-machine cache and
its invalidation, the environment switches, and the premise: every variant gives the same bits."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from powerlow import dispatch, formats, kernels as K

FMTS = ["q8", "q4_0", "q4_1", "q2", "tern", "q1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("fmt", FMTS)
def test_variants_give_the_same_bits(fmt):
    """What makes a timing-based choice safe: every variant the dispatcher chooses among (the SIMD ones; the
    portable C, which sums floats in another order on x86, runs only where there is no SIMD) gives the bits of
    the widest, for GEMV and GEMM, so runs agree whichever variant the cache picked."""
    rng = np.random.default_rng(3)
    # (97, 416): a lone last row of the GEMM's 4-row pass and 13 groups (one chunk of 8 + a 5-group tail);
    # (99, 2336): 3 rows left over and 73 groups (an odd count of chunks: the VNNI tile's zero partner + a tail);
    # T = 4, 7, 65: the GEMM's full and partial token tiles and its 64-token blocks
    for n, k, ts in ((96, 512, (1, 3, 32)), (97, 416, (4, 7, 65)), (99, 2336, (4, 33))):
        if fmt.endswith("_k") and k % 256:
            k = 512
        q = formats.quantize(rng.standard_normal((n, k), dtype=np.float32), fmt)
        K.prepare_resident(q)
        for T in ts:
            x = rng.standard_normal((T, k), dtype=np.float32)
            ref = K.matmul(q, x, isa=K.isa)
            for v in K.dispatcher().variants:
                np.testing.assert_array_equal(K.matmul(q, x, isa=v), ref, err_msg=f"{fmt} {v} {n}x{k} T={T}")


def test_pick():
    assert dispatch.pick({"avx2": 1.0, "avx512": 1.5}, "avx512") == "avx2"
    assert dispatch.pick({"avx2": 1.0, "avx512": 1.04}, "avx512") == "avx512"     # within 5%: the default
    assert dispatch.pick({"avx2": 1.0, "avx512": 1.08}, "avx512") == "avx2"       # the bench's check would name it
    assert dispatch.pick({"avx2": 2.0, "avx512": 1.0}, "avx512") == "avx512"
    assert dispatch.pick({}, "avx2") == "avx2"


class Timer:
    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, fmt, cls, variants, default=None, K=None):
        self.calls.append((fmt, cls))
        self.default, self.K = default, K
        return {v: self.table[(fmt, cls)][v] for v in variants}


TIMES = {("q4_1", "gemv"): {"avx2": 1.0, "avx512": 0.9}, ("q4_1", "gemm"): {"avx2": 1.0, "avx512": 1.5},
         ("q4_k", "gemm"): {"avx2": 1.2, "avx512": 1.0}}


def test_dispatcher_measures_once_and_caches(tmp_path):
    f = tmp_path / "kernels" / "key.json"
    t = Timer(TIMES)
    d = dispatch.Dispatcher(("generic", "avx2", "avx512"), "avx512", cache_file=f, timer=t)
    assert d.variants == ("avx2", "avx512")            # the portable C is not timed where SIMD exists
    assert d.choice("q4_1", 1) == "avx512" and d.choice("q4_1", 32) == "avx2" and d.choice("q4_1", 7) == "avx2"
    assert d.choice("q4_k", 64) == "avx512"
    assert t.calls == [("q4_1", "gemv"), ("q4_1", "gemm"), ("q4_k", "gemm")]
    assert t.default == "avx512"                        # the timer pairs the rounds against the default
    saved = json.loads(f.read_text())
    assert saved["choices"] == {"q4_1/gemv": "avx512", "q4_1/gemm": "avx2", "q4_k/gemm": "avx512"}
    t2 = Timer(TIMES)                                   # a new process on the same machine: no measuring
    d2 = dispatch.Dispatcher(("generic", "avx2", "avx512"), "avx512", cache_file=f, timer=t2)
    assert d2.choice("q4_1", 32) == "avx2" and t2.calls == []
    # a cached variant this CPU does not run (the file copied from another machine) is measured again
    d3 = dispatch.Dispatcher(("generic", "avx512"), "avx512", cache_file=f, timer=Timer(TIMES))
    assert d3.choice("q4_1", 32) == "avx512"
    # a damaged cache file is measured again, not an error
    f.write_text("{not json")
    t4 = Timer(TIMES)
    assert dispatch.Dispatcher(("avx2", "avx512"), "avx512", cache_file=f, timer=t4).choice("q4_1", 32) == "avx2"
    assert t4.calls == [("q4_1", "gemm")]


def test_dispatcher_off_and_unwritable_home(tmp_path):
    t = Timer(TIMES)
    d = dispatch.Dispatcher(("avx2", "avx512"), "avx512", measure=False, cache_file=tmp_path / "k.json", timer=t)
    assert d.choice("q4_1", 32) == "avx512" and t.calls == []
    one = dispatch.Dispatcher(("generic",), "generic", cache_file=tmp_path / "k.json", timer=t)
    assert one.choice("q4_1", 32) == "generic" and t.calls == []          # nothing to choose from
    home = tmp_path / "file-not-dir"
    home.write_text("x")
    d = dispatch.Dispatcher(("avx2", "avx512"), "avx512", cache_file=home / "kernels" / "k.json", timer=t)
    assert d.choice("q4_1", 32) == "avx2"                                  # measured, cache not written, no error


def test_gemv_class_by_row_length(tmp_path):
    """Which variant streams fastest changes with the row length, so T = 1 is a class per power-of-two bucket of K,
    timed with rows of the K that first asked for it."""
    assert [dispatch.shape_class(1, k) for k in (64, 576, 1536, 2048, 2049, 8960, 65536)] == \
        ["gemv-k512", "gemv-k1024", "gemv-k2048", "gemv-k2048", "gemv-k4096", "gemv-k16384", "gemv-k16384"]
    assert dispatch.shape_class(1) == "gemv" and dispatch.shape_class(5, 1536) == "gemm"
    table = {("q4_k", "gemv-k2048"): {"avx2": 1.0, "avx512": 0.9}, ("q4_k", "gemv-k16384"): {"avx2": 1.0, "avx512": 1.2}}
    t = Timer(table)
    d = dispatch.Dispatcher(("avx2", "avx512"), "avx512", cache_file=tmp_path / "k.json", timer=t)
    assert d.choice("q4_k", 1, 1536) == "avx512" and t.K == 1536
    assert d.choice("q4_k", 1, 8960) == "avx2" and t.K == 8960
    assert d.choice("q4_k", 1, 2048) == "avx512" and len(t.calls) == 2     # the same bucket: not timed again
    assert json.loads((tmp_path / "k.json").read_text())["choices"] == {"q4_k/gemv-k2048": "avx512",
                                                                          "q4_k/gemv-k16384": "avx2"}


def test_paired_timings_follow_the_ratios_not_the_medians():
    """The host changes phase between rounds: a's medians fall in the fast rounds and b's in the slow ones, so the
    medians say b is 3x slower; per round b is 10% slower, and that is what the choice goes by."""
    res = {"a": [1.0, 1.0, 1.0, 3.0, 3.0], "b": [1.1, 1.1, 3.3, 3.3, 3.3]}
    got = dispatch.paired(res, "a")
    assert got["a"] == 1.0 and got["b"] == pytest.approx(1.1)
    assert dispatch.pick(got, "b") == "a"


def test_last_level_cache_from_sysfs(tmp_path):
    for i, (level, size) in enumerate(((1, "48K"), (1, "32K"), (2, "1024K"), (3, "32768K"))):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert dispatch.llc_bytes(str(tmp_path)) == 32 << 20
    assert dispatch.llc_bytes(str(tmp_path / "none")) == 16 << 20          # not listed: a guess, not an error
    assert dispatch.gemv_set_bytes(32 << 20, None) == 128 << 20             # four times the cache
    assert dispatch.gemv_set_bytes(1 << 20, None) == 16 << 20               # a phone's small cache: at least 16 MB
    assert dispatch.gemv_set_bytes(256 << 20, None) == 256 << 20            # a server's: at most 256 MB
    assert dispatch.gemv_set_bytes(32 << 20, 100 << 20) == 25 << 20         # a tight memory limit: a quarter of it


def test_free_memory_under_a_cgroup_limit(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text("MemTotal: 24000000 kB\nMemAvailable: 20000000 kB\n")
    (proc / "self" / "cgroup").write_text("12:memory:/bench\n0::/user.slice\n")
    assert dispatch.free_memory_bytes(str(proc), str(cg)) == 20000000 * 1024   # no limit files: MemAvailable
    v1 = cg / "memory" / "bench"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{300 << 20}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{250 << 20}\n")
    assert dispatch.free_memory_bytes(str(proc), str(cg)) == 50 << 20          # cgroup v1: limit - usage
    v2 = cg / "user.slice"
    v2.mkdir(parents=True)
    (v2 / "memory.max").write_text("max\n")                                   # v2 without a limit: ignored
    (v2 / "memory.current").write_text("1\n")
    assert dispatch.free_memory_bytes(str(proc), str(cg)) == 50 << 20
    (v2 / "memory.max").write_text(f"{40 << 20}\n")
    assert dispatch.free_memory_bytes(str(proc), str(cg)) == (40 << 20) - 1
    assert dispatch.free_memory_bytes(str(tmp_path / "none"), str(cg)) is None


def test_gemv_timing_streams_a_set_larger_than_the_cache(monkeypatch):
    """The gemv class is timed on distinct matrices that together exceed the set size (four times the last-level cache),
    every round calling each of them, so the weights come from memory as in decode; gemm on one matrix."""
    monkeypatch.setattr(dispatch, "GEMV_MATRIX", 256 << 10)
    monkeypatch.setattr(dispatch, "SECONDS", {"gemv": 0.0, "gemm": 0.0})   # the minimum rounds, countable
    monkeypatch.setattr(dispatch, "gemv_set_bytes", lambda llc=None: 2 << 20)
    calls = []

    def matmul(q, x, out, isa=None):
        calls.append((id(q.planes["qs"]), q.nbytes, isa, x.shape[0], q.cols))
        out[...] = 0
        return out

    monkeypatch.setattr(K, "matmul", matmul)
    t = dispatch._time_variants("q4_1", "gemv-k2048", ("avx2", "avx512"), "avx512", 1536)
    assert set(t) == {"avx2", "avx512"} and all(v > 0 for v in t.values())
    mats = {}
    for qid, nbytes, _, T, cols in calls:
        assert T == 1 and cols == 1536                                      # rows of the K that asked
        mats[qid] = nbytes
    assert len(mats) >= 2 and sum(mats.values()) >= 2 << 20
    timed = [c for c in calls[2:] if c[2] == "avx2"]                        # after one warm-up call each
    assert len(timed) == dispatch.ROUNDS["gemv"] * len(mats)                # every matrix, every round
    mats = dispatch.gemv_matrices("q8", np.random.default_rng(0), 1 << 20)
    assert len(mats) >= 2 and not np.shares_memory(mats[0].planes["qs"], mats[1].planes["qs"])
    assert all(q.planes["qs"].ctypes.data % formats.ALIGN == 0 for q in mats)
    calls.clear()
    dispatch._time_variants("q4_1", "gemm", ("avx2", "avx512"), "avx512")
    assert len({c[0] for c in calls}) == 1 and calls[0][3] == dispatch.GEMM_T


def test_machine_key_changes_with_build_and_version(tmp_path, monkeypatch):
    ext = tmp_path / "_kernels.so"
    ext.write_bytes(b"x" * 10)
    a = dispatch.machine_key(str(ext))
    assert dispatch.machine_key(str(ext)) == a
    ext.write_bytes(b"x" * 11)                          # a rebuilt extension
    b = dispatch.machine_key(str(ext))
    assert b != a
    import powerlow
    monkeypatch.setattr(powerlow, "__version__", "9.9.9")
    c = dispatch.machine_key(str(ext))
    assert c != b
    monkeypatch.setattr(dispatch, "METHOD", dispatch.METHOD + "x")        # a new way of timing
    assert dispatch.machine_key(str(ext)) != c


def _child(code, **env):
    e = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=120)


def test_environment_switches(tmp_path):
    code = ("import numpy as np; from powerlow import kernels as K, formats as F\n"
            "q = F.quantize(np.ones((64, 256), np.float32), 'q4_1'); K.matmul(q, np.ones((4, 256), np.float32))\n"
            "d = K.dispatcher(); print(d.measure, sorted(d.table))")
    home = str(tmp_path / "home")
    r = _child(code, POWERLOW_HOME=home, POWERLOW_DISPATCH="static")
    assert r.returncode == 0 and r.stdout.split() == ["False", "[]"], r.stderr
    r = _child(code, POWERLOW_HOME=home, POWERLOW_ISA="generic")
    assert r.returncode == 0 and r.stdout.split()[0] == "False", r.stderr
    r = _child(code, POWERLOW_HOME=home, POWERLOW_DISPATCH="fastest")
    assert r.returncode != 0 and "POWERLOW_DISPATCH='fastest'" in r.stderr
    if len([v for v in K.supported_isas if v != "generic"]) > 1:
        r = _child(code, POWERLOW_HOME=home)
        assert r.returncode == 0 and r.stdout.split()[0] == "True" and "'q4_1/gemm']" in r.stdout, r.stderr
        files = os.listdir(os.path.join(home, "kernels"))
        assert len(files) == 1 and files[0].endswith(".json")
