"""The C kernels' Python face: format names, QMatrix planes, thread count and ISA choice.

    dispatcher()             which variant runs each (format, T = 1 | T > 1): measured here (powerlow/dispatch.py)
    isa                      x86-64: "avx512" | "avx2" | "generic"; aarch64: "i8mm" | "dotprod" | "neon" | "generic":
                             the best this CPU runs, or the one POWERLOW_ISA names (supported_isas: all it runs)
    set_threads(n) / get_threads()
    matmul(q, x, out=None)   y (T, N) = x (T, K) @ W^T in formats.matmul_ref numerics (GEMV if T == 1)
    prepare_tl(q)            q.tl = the AVX2 / AVX-512 table-lookup layout of a q2/tern/q1 matrix (once, resident weights)
    ffn_bundles(ptrs, layout, h, act, out)   out (T, K) += sum_c down_c @ (act(gate_c h) * up_c h)
    quantize_act(x)          formats.ActQ, bit-exact with formats.quantize_act
    read_probe(buf)          plain read of a uint8 buffer with all threads (bandwidth probe)
Hot-path helpers (float32, C-contiguous; each returns `out`):
    rmsnorm(x (T, K), w (K,), eps, out=None)       x / sqrt(mean(x^2) + eps) * w
    rope(x (T, n_heads, hd), positions int64 (T,), theta)   in place, HF rotate_half pairs (i, i + hd/2)
    silu_mul(g, u, out=None) / relu_mul / gelu_tanh_mul     act(g) * u, any matching shapes
    attention(q (T, nh, hd), k_cache, v_cache (n_kv, max_pos, hd), start, out=None, window=0, scale=0) -> (T, nh*hd)
        causal grouped-query attention for positions start..start+T-1 (cache already holds them);
        the cache may be float32 or float16 (both caches the same dtype); window > 0: keys in
        (pos - window, pos] only (sliding-window layers); scale: softmax scale (0 = 1/sqrt(hd)), both fp16 only
Threads: matmul rows, ffn_bundles chunks and attention jobs run on one work-claiming pool (plk_common.c,
not OpenMP): the caller works too and returns when every item is done, so a thread preempted by another
process does not stall a call for a time slice (with OpenMP regions, 2 threads on this shared 2-core VM
at load 4-6 took 130-290 ms per SmolLM2 token instead of ~9 ms).
Batch invariance: a token's matmul / ffn_bundles output is bit-identical whether it is computed alone
(decode) or inside a batch (prefill), at a given thread count and ISA (tests/test_kernels.py).
Numerics note: with int8 activation quantization the model is chaotic at the ulp level: perturbing
one rmsnorm output by 1 ulp moves SmolLM2 logits by up to ~1.4 in the numpy reference itself, so
kernel-vs-reference logit comparisons need that slack; kernel-vs-kernel ones can be exact.
Every function takes a keyword `isa=` override (used by the tests to run every variant in one process).

GGML block formats: q5_0 / q5_1 (q8 activations) and the K-quants q4_k / q5_k / q6_k (Q8_K activations,
quantize_act_k; K a multiple of 256), raw GGML blocks (formats.py). K-quant kernels are bit-exact with
formats.matmul_ref on every variant: decode runs 8 rows in lanes (AVX-512: 512-bit dots), T >= 8 tokens
the 2-row x 4-token tiles on re-laid codes (cython_ext/plk_kq.h).
attn_block takes lw.wqkv as one QMatrix or a tuple of up to 3 parts (q, k, v rows) of different formats.

Table-lookup kernels (T-MAC style) exist for q2, tern and q1: portable C (cython_ext/plk_generic.c) and
AVX2 vpshufb / AVX-512 vpermw (cython_ext/plk_tl.h, on a matrix given its layout by prepare_tl(q)); the dispatcher uses
them where they measured faster (TL_PREFERRED, figures in the notes above it).
"""
from __future__ import annotations

import os

import numpy as np

from . import formats
from .errors import PowerlowError, extension

_k = extension("_kernels")

_ISA_NAMES = ("generic", "avx2", "avx512", "neon", "dotprod", "i8mm")   # plk.h ids
_FMT_ID = {"q8": 0, "q4_0": 1, "q4_1": 2, "q2": 3, "tern": 4, "q1": 5,
           "q5_0": 6, "q5_1": 7, "q4_k": 8, "q5_k": 9, "q6_k": 10}   # plk.h order
_ACT_ID = {"silu": 0, "relu": 1, "gelu_tanh": 2}

_BEST = _k.detect_isa()
# every variant this CPU can run: generic and its architecture's variants up to the best (each a superset)
supported_isas = _ISA_NAMES[: _BEST + 1] if _BEST <= 2 else ("generic",) + _ISA_NAMES[3: _BEST + 1]


def _pick_isa() -> str:
    want = os.environ.get("POWERLOW_ISA", "").strip().lower()
    if not want:
        return supported_isas[-1]
    if want not in _ISA_NAMES:
        raise PowerlowError(f"POWERLOW_ISA={want!r} is not one of {', '.join(_ISA_NAMES)}; unset it or pick one")
    if want not in supported_isas:
        raise PowerlowError(f"POWERLOW_ISA={want} but this CPU supports only {', '.join(supported_isas)}")
    return want


isa: str = _pick_isa()
_PICKED = isa          # assigning another name to kernels.isa forces that variant, as POWERLOW_ISA does

# Table lookup (TL, T-MAC style) against multiply-add (MAD) for the 1/1.58/2-bit formats, measured on this
# machine: AMD EPYC (Zen 4) KVM guest, AVX-512 hidden by the hypervisor, 2 vCPUs shared with other jobs.
# GEMV 4096x4096, 1 thread, ms per call (median of 41 alternating calls; four runs, load 1.6-3.7,
# 13:55-14:08 UTC):
#   fmt   generic MA  generic TL   avx2 MA      avx2 TL (vpshufb, cython_ext/plk_tl.h)
#   q2       41.6        11.4      0.68-1.04    0.41-0.50
#   tern     63.0        10.4      0.59-0.95    0.35-0.49
#   q1       30.1         4.8      0.48-0.73    0.21-0.30
#   (q4_1 MAD, the control: 0.45-0.59; the generic columns are from the session that wrote plk_generic.c)
# GEMV 16384x8192, "2 threads", ratio to the read probe (bench-kernels --only dense, medians of 8 runs):
#   load 1.5-1.8 (14:05 UTC): q2 0.38 MAD -> 0.61 TL, tern 0.32 -> 0.53, q1 0.25 -> 0.52 (q4_1 0.83)
#   load 3.2-5.2 (13:53 UTC): q2 0.36 -> 0.67,        tern 0.39 -> 0.58, q1 0.27 -> 0.48 (q4_1 0.86)
# In those runs the process got one core (process CPU time / wall = 1.00 for 2-thread matmul calls),
# the other vCPU being busy with another job: the TL figures are one core's compute rate (q1 ~2 ms for
# 134M weights), against a probe that one core nearly saturates. Calls filtered for two cores (process
# CPU / wall >= 1.8; 3 rounds, 14:24 UTC): TL q2 0.61-0.67, tern 0.50-0.86, q1 0.63-0.68; MAD q2 0.34-0.38,
# tern 0.33-0.52, q1 0.27-0.31; q4_1 0.83-0.91.
# Fourth session (per-block TL tile; MAD = rows_lane8 with the same float steps), bench-kernels -t 2 at
# 32768 (q2/tern) / 65536 (q1) x 8192 rows, three runs, 16:15 UTC: TL q2 0.65/0.77/0.64, tern
# 0.74/0.79/0.63, q1 0.63/0.74/0.75 of the probe; MAD q2 0.31-0.33, tern 0.39-0.42, q1 0.23-0.25.
# TL wins wherever the codes have to be unpacked bit by bit: one vpshufb does 32 lookups of 4 (q1) or 2
# (q2/tern) weights each, against shift + mask + vpmaddubsw per 32 codes. On AVX2 it needs the
# row-interleaved layout (prepare_tl) and gives the same bits as MAD, so an unprepared matrix (or its
# last rows % 32, or rows of <= 4 groups) simply runs MAD. TL also won at 2..64 tokens per call (e.g. q1
# 0.45 vs 0.93 ms at 2, 20 vs 34 ms at 64), so it is used for every batch size (tables in chunks of 64).
# AVX-512 (fifth session, an Intel Xeon guest that exposes it; bench-kernels -t 2, dense rows, ratio to the
# probe): its vpdpbusd MAD q2 0.52-0.53, tern 0.52, q1 0.38 against the AVX2 vpshufb TL 0.55-0.56 / 0.55 / 0.63, with
# the same bits (AVX2 MAD == AVX-512 MAD == AVX2 TL, tests/test_kernels.py): an AVX-512 CPU runs the AVX2 TL kernels
# for these formats (thirteenth session: the same TL code compiled for AVX-512, 32 registers, +7-25% from DRAM on a
# Zen 4 guest, plk_tl.h; still the same bits). The portable TL wins only where
# there is no SIMD MAD (generic).
TL_PREFERRED: dict[tuple[str, str], bool] = {("q2", "generic"): True, ("tern", "generic"): True,
                                             ("q1", "generic"): True,
                                             ("q2", "avx2"): True, ("tern", "avx2"): True, ("q1", "avx2"): True,
                                             ("q2", "avx512"): True, ("tern", "avx512"): True, ("q1", "avx512"): True}


def _use_tl(fmt: str, which: str) -> int:
    return int(TL_PREFERRED.get((fmt, which), False))


def _isa_id(which: str | None) -> int:
    which = isa if which is None else which
    if which not in supported_isas:
        raise ValueError(f"isa {which!r} not available here (have {', '.join(supported_isas)})")
    return _ISA_NAMES.index(which)


_dispatcher = None


def dispatcher():
    """The measured dispatcher (powerlow/dispatch.py): which variant runs each (format, T = 1 | T > 1)."""
    global _dispatcher
    if _dispatcher is None:
        from . import dispatch
        from .default_model import powerlow_home
        mode = os.environ.get("POWERLOW_DISPATCH", "").strip().lower() or "measure"
        if mode not in ("measure", "static"):
            raise PowerlowError(f"POWERLOW_DISPATCH={mode!r}: use measure (the default) or static")
        forced = bool(os.environ.get("POWERLOW_ISA", "").strip())
        cache = powerlow_home() / "kernels" / f"{dispatch.machine_key(getattr(_k, '__file__', None))}.json"
        _dispatcher = dispatch.Dispatcher(supported_isas, isa, measure=mode == "measure" and not forced,
                                          cache_file=cache)
    return _dispatcher


def _which(which: str | None, fmt: str, T: int, K: int | None = None) -> int:
    """The variant id for one call: the caller's isa= override, else the dispatcher's choice for (fmt, T)."""
    if which is not None:
        return _isa_id(which)
    if isa != _PICKED:
        return _isa_id(isa)
    return _isa_id(dispatcher().choice(fmt, T, K))


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise PowerlowError(f"OMP_NUM_THREADS={env!r} is not an integer") from None
        if n > 0:
            return n
    n = os.cpu_count() or 1
    try:  # count physical cores: SMT siblings add nothing to memory-bound kernels
        cores = set()
        for cpu in os.sched_getaffinity(0):
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        n = len(cores) or n
    except OSError:
        pass
    return n


_threads = _default_threads()


def set_threads(n: int) -> None:
    """Threads for every kernel: n > 0; n < 0 means all but |n| cores; 0 is an error."""
    global _threads
    n = int(n)
    if n == 0:
        raise ValueError("thread count 0: use n > 0, or n < 0 for all but |n| cores")
    if n < 0:
        n = max(1, _default_threads() + n)
    _threads = n


def get_threads() -> int:
    return _threads


def prepare_tl(q: formats.QMatrix) -> formats.QMatrix:
    """Give q its AVX2 / AVX-512 table-lookup layout (q.tl; q2, tern and q1 only; no-op for other formats) and
    return q. Call it once for a matrix whose planes no longer change (resident weights): the layout is a
    re-laid copy of the codes and scales of q's whole 32-row tiles, read instead of the planes by the TL
    kernel (the planes stay: the reference, the stored form and multiply-add for the last rows % 32
    rows and for rows of <= 4 groups use them; a prepared matrix holds both, ~2x its bytes).
    Not for buffers that are refilled (the weight ring of powerlow.stream): q.tl would go stale."""
    if q.fmt in _TL_FMTS and q.tl is None and q.rows >= 32:
        p = q.planes
        q.tl = _k.tl_pack(_FMT_ID[q.fmt], p["qs"], p["d"], p.get("m"), q.rows, q.cols)
    return q


_TL_FMTS = ("q2", "tern", "q1")


def prepare_resident(q: formats.QMatrix) -> formats.QMatrix:
    """prepare_tl(q) where the dispatcher runs table lookup on q's format with this CPU's variant (the AVX2 and
    AVX-512 TL read the layout; the portable TL does not), else q unchanged."""
    if isa in ("avx2", "avx512") and _use_tl(q.fmt, isa):
        prepare_tl(q)
    return q


def _tl_args(q: formats.QMatrix, which: int, tl: bool | None) -> tuple[int, np.ndarray | None]:
    """(table-lookup flag, layout) for one matmul: TL where preferred (or forced by tl=True); on AVX2 it
    runs only on a prepared matrix (prepare_tl), else multiply-add (the same bits, see TL_PREFERRED)."""
    name = _ISA_NAMES[which]
    use = _use_tl(q.fmt, name) if tl is None else int(bool(tl))
    layout = getattr(q, "tl", None)
    if tl and name in ("avx2", "avx512") and q.fmt in _TL_FMTS and layout is None and q.rows >= 32:
        raise ValueError(f"tl=True on {name} needs the table-lookup layout: call kernels.prepare_tl(q) first")
    return use, layout


def _mm_args(q: formats.QMatrix, T: int, K: int | None = None) -> tuple:
    """The kernel arguments of a T-token matmul of q (variant, format, TL flag, planes, layout, shape), worked
    out once per (q, T = 1 | T > 1) and kept on q while the dispatcher, kernels.isa and q.tl stay what they were:
    a call on the per-token path is then one tuple lookup, not a dispatch in Python. K: the row length the
    dispatcher's class goes by (default q.cols; the low-rank predictor's B takes its A's, so both run one variant)."""
    calls = getattr(q, "calls", None)
    if calls is None:
        calls = q.calls = [None, None]
    tl = getattr(q, "tl", None)
    K = q.cols if K is None else int(K)
    e = calls[T > 1]
    if e is not None and e[0] is _dispatcher and e[1] is isa and e[2] is tl and e[3] == K:
        return e[4]
    which = _which(None, q.fmt, T, K)
    use_tl, layout = _tl_args(q, which, None)
    p = q.planes
    args = (which, _FMT_ID[q.fmt], use_tl, p["qs"], p.get("d"), p.get("m"), layout, q.rows, q.cols)
    calls[T > 1] = (_dispatcher, isa, tl, K, args)
    return args


def matmul(q: formats.QMatrix, x: np.ndarray, out: np.ndarray | None = None, *, isa: str | None = None,
           tl: bool | None = None) -> np.ndarray:
    """y (T, N) = x (T, K) @ W^T. x float32 C-contiguous (T, K); out float32 (T, N) or None.
    tl: None = the dispatcher's choice (TL_PREFERRED), True / False = force table lookup / multiply-add."""
    if x.ndim == 1:
        x = x[None]
    if out is None:
        out = np.empty((x.shape[0], q.rows), np.float32)
    if isa is None and tl is None:
        _k.matmul(*_mm_args(q, x.shape[0]), x, out, _threads)
        return out
    which = _which(isa, q.fmt, x.shape[0], q.cols)
    use_tl, layout = _tl_args(q, which, tl)
    p = q.planes
    _k.matmul(which, _FMT_ID[q.fmt], use_tl, p["qs"], p.get("d"), p.get("m"), layout, q.rows, q.cols, x, out, _threads)
    return out


def _ffn_args(layout: "formats.BundleLayout", T: int, isa_: str | None) -> tuple:
    """(variant, gate/up format, down format, TL flag, C, K, plane offsets) of an FFN kernel call, worked out once
    per (layout, T = 1 | T > 1) while the dispatcher and kernels.isa stay (kept in a dict on the frozen layout)."""
    if isa_ is not None:
        which = _which(isa_, layout.fmt, T, layout.K)
        return (which, _FMT_ID[layout.fmt], _FMT_ID[layout.down_fmt], _use_tl(layout.fmt, _ISA_NAMES[which]),
                layout.C, layout.K, _bundle_offsets(layout))
    memo = layout.__dict__.get("_plk_calls")
    if memo is None:
        memo = {}
        object.__setattr__(layout, "_plk_calls", memo)
    e = memo.get(T > 1)
    if e is not None and e[0] is _dispatcher and e[1] is isa:
        return e[2]
    which = _which(None, layout.fmt, T, layout.K)
    args = (which, _FMT_ID[layout.fmt], _FMT_ID[layout.down_fmt], _use_tl(layout.fmt, _ISA_NAMES[which]),
            layout.C, layout.K, _bundle_offsets(layout))
    memo[T > 1] = (_dispatcher, isa, args)
    return args


def lowrank_pick(jobs: list, group: int, h: np.ndarray, z: np.ndarray, y: np.ndarray, hs: np.ndarray) -> list[int]:
    """Low-rank predictor decisions in one call. jobs: (A, a, B, b, thr, scale or None, ids) with A, B q8 QMatrix,
    a (1, r), b (1, n_out), scale (1, K) float32; for each, ids[:n] <- the clusters whose max over the tokens and
    their ``group`` outputs of B relu(A x + a) + b is above thr, x = h or h * scale (into hs (>= T, K)); z, y scratch
    (>= T, r), (>= T, n_out). Returns the n's. The numpy steps of predictors.LowRankPredictor (the same clusters and
    logits: tests/test_predictors.py)."""
    T = h.shape[0]
    A0, B0 = jobs[0][0], jobs[0][2]
    wa, wb = _mm_args(A0, T), _mm_args(B0, T, A0.cols)
    if wa[0] != wb[0] or wa[2] or wb[2]:
        raise ValueError("lowrank_pick: A and B must run the same multiply-add variant")
    packed = []
    for A, a, B, b, thr, scale, ids in jobs:
        if A.fmt != A0.fmt or B.fmt != B0.fmt:
            raise ValueError("lowrank_pick: every job's A (B) must have one format")
        packed.append((A.planes["qs"], A.planes.get("d"), a, B.planes["qs"], B.planes.get("d"), b, thr, scale, ids))
    return _k.lowrank_pick(wa[0], wa[1], wb[1], group, h, z, y, hs, packed, _threads)


def _bundle_offsets(layout) -> np.ndarray:
    offs = getattr(layout, "_plk_offs", None)
    if offs is None:
        offs = []
        for which in ("gate", "up", "down"):
            po = layout.plane_offsets(which)
            offs += [po["qs"], po.get("d", -1), po.get("m", -1)]
        offs = np.array(offs, np.int64)
        object.__setattr__(layout, "_plk_offs", offs) if hasattr(layout, "__dict__") else None
    return offs


def ffn_bundles(ptrs: np.ndarray, layout: "formats.BundleLayout", h: np.ndarray, act: str, out: np.ndarray,
                *, isa: str | None = None) -> None:
    """out (T, K) += sum over the bundles at addresses ptrs (uint64) of down_c @ (act(gate_c h) * up_c h).

    h and out float32 C-contiguous (T, K); act "silu" or "relu". Bundles are split over threads."""
    a = _ACT_ID.get(act)
    if a is None:
        raise ValueError(f"act must be one of {', '.join(_ACT_ID)}, got {act!r}")
    which, f, df, tl, C, K, offs = _ffn_args(layout, h.shape[0], isa)
    _k.ffn_bundles(which, f, df, tl, ptrs, C, K, offs, h, a, out, _threads)


def moe_ffn(ptrs: np.ndarray, layout: "formats.BundleLayout", h: np.ndarray, act: str, out: np.ndarray,
            gs: np.ndarray, tok: np.ndarray, wt: np.ndarray, cpe: int, *, isa: str | None = None) -> None:
    """A mixture-of-experts layer in one call: out (T, K) += for each group g (an expert: the cpe bundles at
    ptrs[g*cpe:(g+1)*cpe]) and each j in gs[g]..gs[g+1]-1, wt[j] * expert(h[tok[j]]). Groups are added in order,
    and what a token gets does not depend on the other tokens (reference.moe_ffn; tests/test_moe.py)."""
    if act not in _ACT_ID:
        raise ValueError(f"act must be one of {', '.join(_ACT_ID)}, got {act!r}")
    which = _which(isa, layout.fmt, h.shape[0], layout.K)
    _k.moe_ffn(which, _FMT_ID[layout.fmt], _FMT_ID[layout.down_fmt], _use_tl(layout.fmt, _ISA_NAMES[which]),
               ptrs, int(cpe), layout.C, layout.K, _bundle_offsets(layout), h, gs, tok, wt, _ACT_ID[act], out, _threads)


def ffn_nchunks(n: int) -> int:
    """How many chunks ffn_bundles splits ``n`` bundles into at the current thread count."""
    return _k.ffn_nchunks(int(n), _threads)


def ffn_bundles_part(ptrs: np.ndarray, layout: "formats.BundleLayout", h: np.ndarray, act: str, out: np.ndarray,
                     priv: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, isa: str | None = None) -> None:
    """A piece of ffn_bundles: bundles lo[c]..hi[c]-1 (int32, one range per chunk of ffn_nchunks(len(ptrs)))
    added into out (chunk 0) or priv[c - 1] (float32 (nch-1, T, K), zeroed by the caller before the first piece).
    Only those entries of ptrs are read. After the last piece, ``out += priv[0]; out += priv[1]; ...`` gives
    exactly ffn_bundles' floats (tests/test_kernels.py)."""
    a = _ACT_ID.get(act)
    if a is None:
        raise ValueError(f"act must be one of {', '.join(_ACT_ID)}, got {act!r}")
    which, f, df, tl, C, K, offs = _ffn_args(layout, h.shape[0], isa)
    _k.ffn_bundles_part(which, f, df, tl, ptrs, C, K, offs, h, a, out, priv, lo, hi, _threads)


def quantize_act(x: np.ndarray, kp: int | None = None, *, isa: str | None = None) -> formats.ActQ:
    x = np.asarray(x)
    kp = -(-x.shape[-1] // 32) * 32 if kp is None else kp
    qs, d, s, isum = _k.quantize_act(_isa_id(isa), x, kp)
    return formats.ActQ(qs, d, s, isum)


def quantize_act_k(x: np.ndarray, *, isa: str | None = None) -> formats.ActQK:
    """Q8_K activations (K-quants), bit-exact with formats.quantize_act_k."""
    qs, d, bs = _k.quantize_act_k(_isa_id(isa), np.asarray(x))
    return formats.ActQK(qs, d, bs)


def read_probe(buf: np.ndarray, *, isa: str | None = None, threads: int | None = None) -> float:
    """Read every byte of buf (uint8, contiguous) with the kernel threads; returns a checksum."""
    return _k.read_probe(_isa_id(isa), buf.reshape(-1), threads or _threads)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    if out is None:
        out = np.empty_like(x)
    _k.rmsnorm(x, w, eps, out)
    return out


def rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    _k.rope(x, positions, theta)
    return x


def _gated_mul(act: str):
    a = _ACT_ID[act]

    def mul(g: np.ndarray, u: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """act(g) * u into out (a new array if None)."""
        if out is None:
            out = np.empty_like(g)
        _k.gated(g, u, out, a)
        return out
    mul.__name__ = f"{act}_mul"
    return mul


silu_mul, relu_mul, gelu_tanh_mul = _gated_mul("silu"), _gated_mul("relu"), _gated_mul("gelu_tanh")


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int,
              out: np.ndarray | None = None, *, window: int = 0, scale: float = 0.0) -> np.ndarray:
    if out is None:
        out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
    _k.attention(q, k_cache, v_cache, int(start), out, _threads, int(window), float(scale))
    return out


def all_finite(x: np.ndarray) -> bool:
    """No NaN or infinity in x (float32, C-contiguous)."""
    return _k.all_finite(x)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float, scale: float = 1.0, factors=None):
    """cos, sin (T, head_dim/2) float32 for positions (int64 (T,)); scale: linear RoPE scaling (1 = none);
    factors: per-pair frequency divisors (llama3 RoPE), or None.
    The values of reference.rope_tables (double angles (p / scale) * theta^(-2i/hd) / factor_i, rounded once)."""
    if factors is not None and len(factors):
        from . import reference
        return reference.rope_tables(head_dim, theta, positions, scale, factors)
    positions = np.ascontiguousarray(positions, dtype=np.int64).reshape(-1)
    c = np.empty((len(positions), head_dim // 2), np.float32)
    s = np.empty_like(c)
    _k.rope_tables(positions, int(head_dim), float(theta), float(scale), c, s)
    return c, s


def attn_scratch(T: int, n_heads: int, n_kv: int, head_dim: int, K: int) -> np.ndarray:
    """A float32 scratch buffer big enough for attn_block on T tokens."""
    return np.empty(T * ((2 * n_heads + 2 * n_kv) * head_dim + K), np.float32)


def _mat_args(q: formats.QMatrix, which: int):
    if not isinstance(q, formats.QMatrix):
        raise ValueError(f"attn_block needs quantized (QMatrix) projections, got {type(q).__name__}")
    p = q.planes
    use_tl, layout = _tl_args(q, which, None)
    return _FMT_ID[q.fmt], use_tl, p["qs"], p.get("d"), p.get("m"), layout


def _attn_args(lw, x: np.ndarray, isa_: str | None) -> tuple:
    """attn_block's matrix arguments for lw and x's token count, worked out once per (lw, T = 1 | T > 1) while the
    dispatcher, kernels.isa and the matrices' TL layouts stay (kept on the frozen LayerWeights)."""
    T = x.shape[0]
    first = lw.wqkv[0] if isinstance(lw.wqkv, (tuple, list)) else lw.wqkv
    memo = None
    if isa_ is None and hasattr(lw, "__dict__"):
        memo = lw.__dict__.get("_plk_calls")
        if memo is None:
            memo = {}
            object.__setattr__(lw, "_plk_calls", memo)
        e = memo.get(T > 1)
        if e is not None and e[0] is _dispatcher and e[1] is isa and e[2] is getattr(first, "tl", None) \
                and e[3] is getattr(lw.wo, "tl", None):
            return e[4]
    which = _which(isa_, getattr(first, "fmt", "q8"), T, x.shape[1])
    parts = None
    if isinstance(lw.wqkv, (tuple, list)):
        # q, k, v as separate matrices (formats that differ, e.g. q4_k q/k and a q6_k v): each part into its
        # column slice, one activation quantization per activation type (plk_attn_block)
        parts = []
        for i, part in enumerate(lw.wqkv):
            args = _mat_args(part, which)
            if part.cols != x.shape[1]:
                raise ValueError(f"qkv part {i} has {part.cols} columns, x has {x.shape[1]}")
            parts.append(args + (part.rows,))
        q_args = parts[0][:6]
    else:
        q_args = _mat_args(lw.wqkv, which)
    out = (which,) + q_args + _mat_args(lw.wo, which) + (parts,)
    if memo is not None:
        memo[T > 1] = (_dispatcher, isa, getattr(first, "tl", None), getattr(lw.wo, "tl", None), out)
    return out


def attn_extras(lw) -> tuple:
    """(q_norm, k_norm, post_attn_norm, window, attn_scale) of a layer's weights: what the block does beyond the
    llama one (None / 0 where the layer has not; duck-typed layers without the fields are plain)."""
    return (getattr(lw, "q_norm", None), getattr(lw, "k_norm", None), getattr(lw, "post_attn_norm", None),
            int(getattr(lw, "window", 0)), float(getattr(lw, "attn_scale", 0.0)))


def attn_block(lw, x: np.ndarray, h: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, rope,
               n_heads: int, n_kv: int, eps: float, scratch: np.ndarray, *, isa: str | None = None) -> np.ndarray:
    """One layer's attention block in one call; lw: engine.LayerWeights (attn_norm, wqkv, bqkv, wo, ffn_norm).

    x (T, K) float32 is updated in place: x += wo @ attention(rope(qknorm(wqkv @ rmsnorm(x, attn_norm) + bqkv)))
    (qknorm: each head of q and k RMS-normed with lw.q_norm / lw.k_norm where the layer has them, qwen3; the
    attention with lw.window / lw.attn_scale, and wo's product RMS-normed with lw.post_attn_norm before the add,
    where given: gemma3, sliding-window layers; rope: the layer's own tables, local or global);
    the K/V rows of positions start..start+T-1 are stored into the fp16 caches (n_kv, max_pos, hd);
    h (T, K) receives rmsnorm(x, ffn_norm) (the FFN input) and is returned. rope = rope_tables(...) of
    the T positions; scratch from attn_scratch(T, ...). Bit-identical to the unfused kernel sequence."""
    a = _attn_args(lw, x, isa)
    which, fq, tlq, qs, d, m, qtl, fo, tlo, oqs, od, om, otl, parts = a
    _k.attn_block(which, fq, tlq, qs, d, m, qtl, lw.bqkv, fo, tlo, oqs, od, om, otl, lw.attn_norm, lw.ffn_norm, eps,
                  x, h, k_cache, v_cache, int(start), n_heads, n_kv, rope[0], rope[1], scratch, _threads, parts,
                  *attn_extras(lw))
    return h

