"""Measured kernel dispatch: which ISA variant runs each (format, shape class), chosen by timing them here.

Every SIMD variant of a row kernel gives the same bits (tests/test_dispatch.py::test_variants_give_the_same_bits),
so the choice is only speed, and the best variant is not always the widest: on a Zen 4 guest with AVX-512, the AVX2
GEMM tile ran q4_0/q4_1/q8 prefill (T = 32) 1.3-1.5x faster than the AVX-512 one until the latter got its VNNI tile
(now AVX-512 wins every case the bench measures there, README). So at the first matmul of a (format, class) -- class
"gemv" (T = 1, by row length: shape_class) or "gemm" (T > 1) -- the variants this CPU runs (the portable C only
where nothing else is) are timed in the regime the class runs in, alternating, and compared paired: per round each
variant's time over the default's, the median of those ratios (this host's memory bandwidth changes phase within
seconds; a paired ratio keeps both variants in the same phase).
  gemv: the weights stream from memory, as they do in decode (a model's matrices together are far larger than the
        caches): a set of 16 MB matrices of that format with rows of the K that asked, four times the last-level
        cache in all (16-256 MB; 128 MB here: L3 32 MB; at most a quarter of the memory the process may still take,
        under a cgroup limit too; held only while timing, twice that for the table-lookup formats' re-laid copy),
        each call one matrix, rounds over the set for 0.4 s (at least 9; ~0.6 s a class with making the set). Timed in cache instead (1024 x 2048, as this did before), the AVX-512 variant won every format on
        a Zen 5 guest by 1.2-1.6x, while from memory it ran q8 12%, q4_k 13% and q6_k 25% slower than AVX2
        (bench-kernels, K = 8192, 7 Dec 2026): a choice made in cache was the wrong one for the case that matters.
  gemm: compute-bound (a weight row serves 32 tokens), timed in cache: 1024 x 2048, T = 32, 7 rounds.
The fastest is kept unless the widest variant is within MARGIN (5%, the bench's check) of it. Choices are cached per
machine in $POWERLOW_HOME/kernels/<key>.json, key = CPU model, flags, the package version, the kernels' build and
METHOD (how the timings are made), so a new CPU, a new release, a rebuilt extension or a new timing method measures
again.

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

GEMM_T = 32
MARGIN = 1.05        # the widest variant keeps its place unless another is this much faster (bench-kernels' check)
ROUNDS = {"gemv": 9, "gemm": 7}      # at least this many rounds ...
SECONDS = {"gemv": 0.4, "gemm": 0.0}   # ... and for at least this long (the host's phases last seconds)
MAX_ROUNDS = 400
METHOD = "4"          # how the timings are made: part of the cache key, so a cache of an older method is measured again
GEMV_MATRIX = 16 << 20                 # bytes of one matrix of the gemv timing set
GEMV_SET = (16 << 20, 256 << 20)       # the set's bytes: four times the last-level cache, within these bounds


def shape_class(T: int, K: int | None = None) -> str:
    """"gemm" (T > 1); "gemv" (T = 1), with K the row length bucket "gemv-k<2^n>" (n = ceil(log2 K), 512-16384):
    which variant streams fastest changes with the row length (7 Dec 2026, Zen 5 guest, from memory, slow phase:
    q4_k AVX-512 8% ahead at K = 1536, level at 2048, AVX2 8-19% ahead at 4096-8192)."""
    if T > 1:
        return "gemm"
    if K is None:
        return "gemv"
    return f"gemv-k{min(max(512, 1 << (int(K) - 1).bit_length()), 16384)}"


def pick(timings: dict[str, float], default: str) -> str:
    """The variant to run from measured seconds per call: the fastest, unless the default is within MARGIN of it."""
    if not timings:
        return default
    best = min(timings, key=timings.get)
    if default in timings and timings[default] <= timings[best] * MARGIN:
        return default
    return best


def machine_key(extension_path: str | None = None) -> str:
    """CPU model + flags + package version + the compiled extension's size and mtime + METHOD, hashed."""
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
    h = hashlib.sha256(f"{model}|{flags}|{__version__}|{build}|{METHOD}".encode()).hexdigest()[:16]
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

    def choice(self, fmt: str, T: int, K: int | None = None) -> str:
        """The variant for a T-token matmul of fmt with rows of K (None: a class without the row length): one
        dict lookup once the class is known (the kernels' callers keep the answer per matrix)."""
        got = self._hot.get((fmt, T > 1, K))
        if got is None:
            got = self._hot[(fmt, T > 1, K)] = self._decide(fmt, shape_class(T, K), K)
        return got

    def _decide(self, fmt: str, cls: str, K: int | None = None) -> str:
        if not self.measure:
            return self.default
        key = f"{fmt}/{cls}"
        got = self.table.get(key)
        if got is None:
            t = self.timer(fmt, cls, self.variants, self.default, K)
            self.timings[key] = {k: round(float(v), 9) for k, v in t.items()}
            got = self.table[key] = pick(t, self.default)
            self._save()
        return got


def llc_bytes(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The last-level cache's size in bytes from sysfs (the highest level listed), 16 MiB where it is not listed."""
    best = (0, 16 << 20)
    try:
        for d in sorted(Path(sysfs).glob("index*")):
            try:
                level = int((d / "level").read_text())
                txt = (d / "size").read_text().strip().upper()
            except (OSError, ValueError):
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:], 1)
            digits = txt.rstrip("KMG")
            if digits.isdigit() and level >= best[0]:
                best = (level, int(digits) * mult)
    except OSError:
        pass
    return best[1]


def _limit_less_usage(limit: Path, usage: Path) -> int | None:
    try:
        txt = limit.read_text().strip()
        if txt.isdigit() and int(txt) < 1 << 60:          # v2 "max" / v1's huge "no limit": none
            return max(0, int(txt) - int(usage.read_text().strip()))
    except (OSError, ValueError):
        pass
    return None


def free_memory_bytes(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """What this process may still allocate: MemAvailable, and under a cgroup memory limit (v2 memory.max, v1
    memory/memory.limit_in_bytes) the limit less the usage, whichever is less; None if neither can be read."""
    got = []
    try:
        for line in open(f"{proc}/meminfo"):
            if line.startswith("MemAvailable:"):
                got.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        lines = open(f"{proc}/self/cgroup").read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.strip().split(":", 2)
        if len(parts) == 3 and (parts[0] == "0" or "memory" in parts[1].split(",")):
            rel = parts[2].lstrip("/")
            got += [n for n in (_limit_less_usage(Path(cgroup, rel, "memory.max"), Path(cgroup, rel, "memory.current")),
                                _limit_less_usage(Path(cgroup, "memory", rel, "memory.limit_in_bytes"),
                                                  Path(cgroup, "memory", rel, "memory.usage_in_bytes")))
                    if n is not None]
    return min(got) if got else None


def gemv_set_bytes(llc: int | None = None, free: int | None = -1) -> int:
    """Four times the last-level cache within GEMV_SET, and at most a quarter of what the process may still allocate
    (a first run under a tight memory limit times a smaller set rather than be killed for it). Four, not two: on
    the Zen 5 guest (32 MB L3) a 64 MB set still left part of each call in cache, where the AVX-512 variants are
    faster: AVX2 / AVX-512 time ratio, paired, 3 runs, 8 Dec 2026: q4_0 1.08-1.12 at 64 MB, 1.05 at 128, 0.99-1.02
    at 256; q4_k 0.99-1.33 / 1.00-1.22 / 1.15-1.20; the bench's 75-142 MB matrices read like the larger sets."""
    llc = llc_bytes() if llc is None else llc
    free = free_memory_bytes() if free == -1 else free
    n = min(max(4 * llc, GEMV_SET[0]), GEMV_SET[1])
    if free is not None:
        n = min(n, max(free // 4, 1 << 20))
    return n


def gemv_matrices(fmt: str, rng, total: int, cols: int = 4096) -> list:
    """Distinct matrices of fmt, ~GEMV_MATRIX bytes each, >= total bytes together: called in turn, each call reads
    its weights from memory, not from a cache the previous call of the same matrix filled."""
    from . import formats
    sp = formats.FORMATS[fmt]
    row_bytes = max(1, int(cols * sp.bits_per_weight / 8))
    rows = max(64, GEMV_MATRIX // row_bytes // 64 * 64)
    base = formats.random_qmatrix(fmt, rows, cols, rng)
    out = [base]
    while sum(q.nbytes for q in out) < total:
        out.append(formats.QMatrix(fmt, rows, cols, {k: formats._aligned_copy(v) for k, v in base.planes.items()}))
    return out


def paired(res: dict[str, list[float]], ref: str) -> dict[str, float]:
    """Seconds per call of each variant from per-round times: the median of its per-round ratio to ref, times
    ref's median (the ratios decide, the scale is ref's)."""
    import statistics
    base = statistics.median(res[ref])
    return {v: float(base * statistics.median(a / b for a, b in zip(ts, res[ref]))) for v, ts in res.items()}


def _time_variants(fmt: str, cls: str, variants: tuple[str, ...], default: str | None = None,
                   K: int | None = None) -> dict[str, float]:
    """Seconds per matmul of each variant (paired against the default, else the first), alternating: gemv over a
    set of matrices of rows of K (4096 if None) larger than the last-level cache (T = 1), gemm on a 1024 x 2048
    matrix (T = GEMM_T)."""
    import numpy as np
    from . import formats, kernels
    rng = np.random.default_rng(0)
    cls = "gemv" if cls.startswith("gemv") else "gemm"    # a gemv-k<n> class is timed as gemv, with rows of K
    if cls == "gemv":
        qs = gemv_matrices(fmt, rng, gemv_set_bytes(), cols=int(K) if K else 4096)
        reps = 1
    else:
        qs = [formats.random_qmatrix(fmt, 1024, 2048, rng)]   # ~1-2 MB, no float matrix: a run under a budget
        reps = 2
    for q in qs:
        kernels.prepare_resident(q)
    x = rng.standard_normal((1 if cls == "gemv" else GEMM_T, qs[0].cols), dtype=np.float32)
    out = np.empty((x.shape[0], qs[0].rows), np.float32)
    for v in variants:                                   # warm up each once
        kernels.matmul(qs[0], x, out, isa=v)
    res: dict[str, list[float]] = {v: [] for v in variants}
    t_end = time.perf_counter() + SECONDS[cls]
    r = 0
    while r < ROUNDS[cls] or (time.perf_counter() < t_end and r < MAX_ROUNDS):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                for q in qs:
                    kernels.matmul(q, x, out, isa=v)
            res[v].append((time.perf_counter() - t0) / reps)
        r += 1
    return paired(res, default if default in res else variants[0])
