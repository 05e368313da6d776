"""Measured kernel dispatch: which ISA variant runs each (format, shape class), chosen by timing them here.

Every SIMD variant of a row kernel gives the same bits (tests/test_dispatch.py::test_variants_give_the_same_bits),
so the choice is only speed, and the best variant is not always the widest: on a Zen 4 guest with AVX-512, the AVX2
GEMM tile ran q4_0/q4_1/q8 prefill (T = 32) 1.3-1.5x faster than the AVX-512 one until the latter got its VNNI tile
(now AVX-512 wins every case the bench measures there, README). So at the first matmul of a (format, class) -- class
"gemv" (T = 1) or "gemm" (T > 1) -- the variants this CPU runs (the portable C only where nothing else is) are timed
on a 1024 x 2048 matrix of that format, alternating, the best of 15 rounds (GEMV; 7 for GEMM; ~5-30 ms a class: the
best, since what a shared host adds to a 20-60 us call only slows it: a median of 7 once had AVX2 24% / 10% ahead
for q1 / q4_0 on a Zen 4 guest where the best of 200 in one process puts AVX-512 level or ahead on this matrix and
the bench streams them up to 30% faster with it, never slower by more than the noise), and the fastest is kept
unless the widest variant is within 10% (then the widest, the static default: a GEMV difference is a few %, within
the noise of a short timing, while the GEMM differences this is for are 30-50%). Choices are cached per machine in
$POWERLOW_HOME/kernels/<key>.json, key = CPU model, flags, the package version and the kernels' build, so a new CPU,
a new release or a rebuilt extension measures again.

    POWERLOW_DISPATCH=static   no measuring: the widest variant everywhere (kernels.isa), as before
    POWERLOW_ISA=avx2          one variant everywhere (forced; no measuring)
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

CLASSES = ("gemv", "gemm")
GEMM_T = 32
MARGIN = 1.10        # the widest variant keeps its place unless another is this much faster (timing noise here: ~5%)
ROUNDS = {"gemv": 15, "gemm": 7}


def shape_class(T: int) -> str:
    return "gemv" if T <= 1 else "gemm"


def pick(timings: dict[str, float], default: str) -> str:
    """The variant to run from measured seconds per call: the fastest, unless the default is within MARGIN of it."""
    if not timings:
        return default
    best = min(timings, key=timings.get)
    if default in timings and timings[default] <= timings[best] * MARGIN:
        return default
    return best


def machine_key(extension_path: str | None = None) -> str:
    """CPU model + flags + package version + the compiled extension's size and mtime, hashed."""
    from . import __version__
    model, flags = platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "Hardware", "CPU part") and not model.endswith(v.strip()):
                    model += " " + v.strip()
                elif k in ("flags", "Features"):
                    flags = " ".join(sorted(v.split()))
                    break
    except OSError:
        pass
    build = ""
    if extension_path:
        try:
            st = os.stat(extension_path)
            build = f"{st.st_size}:{int(st.st_mtime)}"
        except OSError:
            pass
    h = hashlib.sha256(f"{model}|{flags}|{__version__}|{build}".encode()).hexdigest()[:16]
    return h


class Dispatcher:
    """choice(fmt, T) -> the ISA name to run; measures a (format, class) at its first use (timer injectable)."""

    def __init__(self, variants: tuple[str, ...], default: str, *, measure: bool = True, cache_file: Path | None,
                 timer=None):
        simd = tuple(v for v in variants if v != "generic")
        self.variants = simd or tuple(variants)
        self.default = default
        self.measure = measure and len(self.variants) > 1
        self.cache_file = cache_file
        self.timer = timer or _time_variants
        self.table: dict[str, str] = {}          # "fmt/class" -> variant, as cached on disk
        self._hot: dict[tuple[str, bool], str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        if self.measure and cache_file is not None:
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(data, dict) or not isinstance(data.get("choices"), dict):
            return
        for k, v in data["choices"].items():
            if isinstance(k, str) and v in self.variants:
                self.table[k] = v
        t = data.get("timings")
        if isinstance(t, dict):
            self.timings = {k: v for k, v in t.items() if isinstance(v, dict)}

    def _save(self) -> None:
        if self.cache_file is None:
            return
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"choices": self.table, "timings": self.timings}, indent=1, sort_keys=True))
            os.replace(tmp, self.cache_file)
        except OSError:
            pass              # a read-only home: measure again next time, never fail a run over a cache

    def choice(self, fmt: str, T: int) -> str:
        """Runs for every matmul call: one dict lookup once the class is known."""
        got = self._hot.get((fmt, T > 1))
        if got is None:
            got = self._hot[(fmt, T > 1)] = self._decide(fmt, shape_class(T))
        return got

    def _decide(self, fmt: str, cls: str) -> str:
        if not self.measure:
            return self.default
        key = f"{fmt}/{cls}"
        got = self.table.get(key)
        if got is None:
            t = self.timer(fmt, cls, self.variants)
            self.timings[key] = {k: round(float(v), 9) for k, v in t.items()}
            got = self.table[key] = pick(t, self.default)
            self._save()
        return got


def _time_variants(fmt: str, cls: str, variants: tuple[str, ...]) -> dict[str, float]:
    """Seconds per matmul of each variant on a 1024 x 2048 matrix of fmt (T = 1 or GEMM_T), alternating."""
    import numpy as np
    from . import formats, kernels
    rng = np.random.default_rng(0)
    q = formats.random_qmatrix(fmt, 1024, 2048, rng)      # ~1-2 MB, no float matrix: a run under a budget
    kernels.prepare_resident(q)
    x = rng.standard_normal((1 if cls == "gemv" else GEMM_T, 2048), dtype=np.float32)
    out = np.empty((x.shape[0], q.rows), np.float32)
    reps = 8 if cls == "gemv" else 2
    for v in variants:                                   # warm up each once
        kernels.matmul(q, x, out, isa=v)
    res: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(ROUNDS[cls]):
        for v in variants:
            t0 = time.perf_counter()
            for _ in range(reps):
                kernels.matmul(q, x, out, isa=v)
            res[v].append((time.perf_counter() - t0) / reps)
    return {v: float(min(ts)) for v, ts in res.items()}
