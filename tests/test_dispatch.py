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
    assert dispatch.pick({"avx2": 1.0, "avx512": 1.08}, "avx512") == "avx512"     # within 10%: the default
    assert dispatch.pick({"avx2": 2.0, "avx512": 1.0}, "avx512") == "avx512"
    assert dispatch.pick({}, "avx2") == "avx2"


class Timer:
    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, fmt, cls, variants):
        self.calls.append((fmt, cls))
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
    assert dispatch.machine_key(str(ext)) != b


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
