"""powerlow bench-kernels: kernel bandwidth against a plain read probe measured in the same run.

Rows (one JSON object per line with --json):
  dense   GEMV (T=1) N x 8192, every format, every ISA this CPU runs, N = 16384 (q8, q4_0, q4_1), 32768
          (q2, tern), 65536 (q1): every matrix 75-142 MB, far larger than L3 (at 16384 rows q1 is 21 MB and
          sits in a 32 MB L3, and so does part of the probe's equally large buffer); for q2/tern/q1 both kernels,
          "kernel": "mad" (multiply-add) and "tl" (table lookup: on AVX2 the vpshufb kernels, on AVX-512 the
          vpermw ones, on a prepared matrix, kernels.prepare_tl; elsewhere the portable ones), "default": the one
          kernels.matmul picks (TL_PREFERRED)
  sparse  ffn_bundles, hidden 4096, 11008 neurons, cluster 64, densities 0.1/0.25/0.5, random active
          clusters, bundles in DRAM (a fresh arena larger than the caches)
  gemm    prefill batch 32 vs 32 GEMV calls: tokens/s ratio (--gemm-formats, default q4_1 and q4_k)
Every row has "chosen": the variant the measured dispatcher (powerlow/dispatch.py) runs for that format and
batch class on this machine (marked "<- chosen" in the text output). The last line ("kind": "check" with --json)
says in how many cases the chosen variant is within 5% of every other one measured, and names the others. The
comparison is paired: the variants of a case run in the same rounds (below), so per round the chosen one's time is
divided by the other's, and the median of those ratios is the excess (rows carry "rounds_ms"). Medians of each
variant alone drift apart with the host between rounds: two runs of the same build gave tern's AVX2 and AVX-512
table-lookup kernels +7% one way and +6% the other. A case the check names is measured again with --confirm (3) x
the rounds (rows "remeasured": true) and the check is run over those; with --json its line keeps the first pass's
named cases as "first_pass_slow", the text output prints both.
gbps = weight bytes streamed per second (median of repeats); probe_gbps = read bandwidth over a buffer of
the same size with the same threads; ratio = gbps / probe_gbps. The variants of a case (every ISA, TL and MAD)
and its probe run in alternating rounds, so they are compared under the same machine state.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from . import formats as F
from . import kernels as K


def _interleaved(kernels: dict, nbytes: int, threads: int, repeats: int, min_probe: int = 1 << 20,
                 probe: bool = True) -> tuple[dict, float, dict]:
    """(median time of each kernel (name -> callable), the median probe GB/s, each kernel's time per round; the
    probe's GB/s per round under the key PROBE),
    measured in rounds: the probe, then every kernel once, the order rotated each round, so all variants of a case
    and the probe see the same machine state (this host's bandwidth moves by 2x within a minute: timed one after
    another, two runs of the same code differed by more than the 5% the chosen-variant check asks for)."""
    buf = np.ones(max(nbytes, min_probe), np.uint8) if probe else None
    names = list(kernels)
    for n in names:
        kernels[n]()
    ts: dict = {n: [] for n in names}
    pt = []
    for r in range(repeats):
        if probe:
            t = time.perf_counter()
            K.read_probe(buf, threads=threads)
            pt.append(time.perf_counter() - t)
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            kernels[n]()
            ts[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in ts.items()}
    if probe:
        ts[PROBE] = [buf.nbytes / t / 1e9 for t in pt]
    return med, (buf.nbytes / statistics.median(pt) / 1e9 if probe else 0.0), ts


def _fast_quantize(fmt: str, rows: int, cols: int, rng) -> F.QMatrix:
    """A random packed matrix without running the (slow) numpy quantizer on 134M weights."""
    return F.random_qmatrix(fmt, rows, cols, rng)


PROBE = "probe"   # _interleaved's key for the probe's GB/s per round


def _row(kind, fmt, isa, threads, shape, density, nbytes, dt, probe, rounds=(), probe_rounds=(), **extra):
    """rounds: the variant's time in each measuring round (seconds), kept as rounds_ms for the paired check;
    probe_rounds: the probe's GB/s in the same rounds. ratio = the median over the rounds of the round's kernel GB/s
    / the round's probe GB/s (paired: the host changes phase within a case, and two medians can fall on different
    phases), ratio_of_medians = gbps / probe_gbps."""
    gbps = nbytes / dt / 1e9
    ratio = gbps / probe
    if rounds and len(probe_rounds) == len(rounds):
        ratio = statistics.median(nbytes / t / 1e9 / p for t, p in zip(rounds, probe_rounds))
    r = {"kind": kind, "format": fmt, "isa": isa, "threads": threads, "shape": shape, "density": density,
         "ms": round(dt * 1e3, 3), "gbps": round(gbps, 2), "probe_gbps": round(probe, 2),
         "ratio": round(ratio, 3), "ratio_of_medians": round(gbps / probe, 3),
         "rounds_ms": [round(t * 1e3, 4) for t in rounds]}
    r.update(extra)
    return r


def _kernel_names(fmt: str) -> tuple[str, ...]:
    return ("mad", "tl") if fmt in ("q2", "tern", "q1") else ("mad",)


def dense_rows(fmt: str, base: int = 16384) -> int:
    """GEMV rows for fmt: base x 2 ** k, k such that the matrix has >= ~4.5 bits per base-row weight (so
    >= 75 MB at K = 8192): 16384 for q8/q4, 32768 for q2/tern, 65536 for q1."""
    n = base
    while F.FORMATS[fmt].bits_per_weight * n / base < 4.5 * 0.99 and n < base * 8:
        n *= 2
    return n


def bench_dense(fmts, isas, threads, repeats, rng, Kd=8192):
    rows = []
    x = rng.standard_normal((1, Kd)).astype(np.float32)
    for fmt in fmts:
        N = dense_rows(fmt)
        out = np.empty((1, N), np.float32)
        q = _fast_quantize(fmt, N, Kd, rng)
        if "avx2" in isas:
            K.prepare_tl(q)      # the x86 TL layout (a re-laid copy; gbps counts the matrix bytes once)
        variants = {(isa, kern): (lambda isa=isa, tl=kern == "tl": K.matmul(q, x, out, isa=isa, tl=tl))
                    for isa in isas for kern in _kernel_names(fmt)}
        dts, probe, rts = _interleaved(variants, q.nbytes, threads, repeats)
        for (isa, kern), dt in dts.items():
            default = (kern == "tl") == bool(K.TL_PREFERRED.get((fmt, isa), False))   # the kernel matmul runs here
            rows.append(_row("dense", fmt, isa, threads, [N, Kd], 1.0, q.nbytes, dt, probe, rts[(isa, kern)],
                             rts[PROBE], kernel=kern, default=default,
                             chosen=default and isa == K.dispatcher().choice(fmt, 1, Kd)))
    return rows


def bench_sparse(fmt, isas, threads, repeats, rng, Kd=4096, Fn=11008, C=64, densities=(0.1, 0.25, 0.5)):
    lay = F.BundleLayout.make(fmt, fmt, C, Kd)
    nc = -(-Fn // C)
    arena = np.zeros(lay.stride * nc, np.uint8)
    g = _fast_quantize(fmt, C, Kd, rng).to_bytes()
    d = _fast_quantize(fmt, Kd, C, rng).to_bytes()
    for c in range(nc):   # same contents everywhere is fine: every bundle is still read from DRAM
        o = c * lay.stride
        arena[o + lay.gate_off: o + lay.gate_off + len(g)] = np.frombuffer(g, np.uint8)
        arena[o + lay.up_off: o + lay.up_off + len(g)] = np.frombuffer(g, np.uint8)
        arena[o + lay.down_off: o + lay.down_off + len(d)] = np.frombuffer(d, np.uint8)
    base = arena.ctypes.data
    h = rng.standard_normal((1, Kd)).astype(np.float32)
    out = np.zeros((1, Kd), np.float32)
    rows = []
    for dens in densities:
        n = max(1, int(round(dens * nc)))
        # each call uses a different random active set; the arena (~ 3x L3 at d=0.25) defeats caching, and
        # the probe and the other variants run in between, evicting the previous call's bundles
        its = {}
        for isa in isas:
            sets = [np.sort(rng.choice(nc, n, replace=False)) for _ in range(repeats + 1)]
            its[isa] = iter([(base + s.astype(np.uint64) * np.uint64(lay.stride)).astype(np.uint64) for s in sets])
        nbytes = n * lay.nbytes
        dts, probe, rts = _interleaved(
            {isa: (lambda isa=isa: K.ffn_bundles(next(its[isa]), lay, h, "silu", out, isa=isa)) for isa in isas},
            nbytes, threads, repeats, min_probe=64 << 20)
        for isa, dt in dts.items():
            rows.append(_row("sparse", fmt, isa, threads, [Kd, Fn, C], dens, nbytes, dt, probe, rts[isa], rts[PROBE],
                             bundles=n,
                             chosen=isa == K.dispatcher().choice(fmt, 1, Kd)))
    return rows


def bench_gemm(fmt, isas, threads, repeats, rng, N=16384, Kd=8192, T=32):
    """Each variant's batch-T call and its single-token call run in the same rounds (with the probe), so the
    speedup is a paired median: T x the round's GEMV time / the round's GEMM time. (Timed in two separate
    windows, the two sides saw different host states: the GEMM is compute bound and the GEMV bandwidth bound, and
    this host moves each by up to 1.7x within a minute.)"""
    q = _fast_quantize(fmt, N, Kd, rng)
    x = rng.standard_normal((T, Kd)).astype(np.float32)
    out = np.empty((T, N), np.float32)
    out1 = np.empty((1, N), np.float32)
    calls = {}
    for isa in isas:
        calls[("gemm", isa)] = lambda isa=isa: K.matmul(q, x, out, isa=isa)
        calls[("gemv", isa)] = lambda isa=isa: K.matmul(q, x[:1], out1, isa=isa)
    med, probe, rts = _interleaved(calls, q.nbytes, threads, repeats)
    rows = []
    for isa in isas:
        g, v = rts[("gemm", isa)], rts[("gemv", isa)]
        r = _row("gemm", fmt, isa, threads, [N, Kd, T], 1.0, q.nbytes, med[("gemm", isa)], probe, g, rts[PROBE],
                 chosen=isa == K.dispatcher().choice(fmt, T))
        r.update(gemm_tok_s=round(T / med[("gemm", isa)], 1), gemv_tok_s=round(1 / med[("gemv", isa)], 1),
                 speedup=round(statistics.median(T * b / a for a, b in zip(g, v)), 2))
        rows.append(r)
    return rows


def _variant(r: dict) -> str:
    return r["isa"] + (f"/{r['kernel']}" if "kernel" in r else "")


def _excess(ch: dict, other: dict) -> float:
    """How much slower ch is than other: the median over the measuring rounds of ch's time / other's time - 1
    (paired, so a round where the host was slow for both cancels out); the ratio of the medians when the rows do
    not carry the same rounds."""
    a, b = ch.get("rounds_ms") or [], other.get("rounds_ms") or []
    if a and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b)) - 1
    return ch["ms"] / other["ms"] - 1


def _case(r: dict) -> tuple:
    """The case a row measures: (kind, format, shape, density); its variants are the rows with the same case."""
    return r["kind"], r["format"], tuple(r["shape"]), r["density"]


def check_chosen(rows: list[dict], tol: float = 0.05) -> dict:
    """Per case (kind, format, shape, density): the chosen row against every other variant measured for it (every
    ISA, TL and MAD), paired per round (_excess). {"cases": n, "slow": [{case, kind, format, chosen, ms, fastest,
    fastest_ms, excess, excess_of_medians}]} for the cases where the chosen one is more than tol slower than some variant
    ("fastest": the one it trails most); a case without a chosen row counts as slow (chosen None)."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault(_case(r), []).append(r)
    slow = []
    for key, rs in cases.items():
        ch = next((r for r in rs if r.get("chosen")), None)
        if ch is None:
            best, ex = min(rs, key=lambda r: r["ms"]), None
        else:
            best = max((r for r in rs if r is not ch), key=lambda r: _excess(ch, r), default=ch)
            ex = _excess(ch, best)
        if ch is None or ex > tol:
            slow.append({"case": f"{key[0]} {key[1]} {'x'.join(map(str, key[2]))} d={key[3]}",
                         "kind": key[0], "format": key[1],
                         "chosen": None if ch is None else _variant(ch), "ms": None if ch is None else ch["ms"],
                         "fastest": _variant(best), "fastest_ms": best["ms"],
                         "excess": None if ch is None else round(ex, 3),
                         "excess_of_medians": None if ch is None else round(ch["ms"] / best["ms"] - 1, 3)})
    return {"cases": len(cases), "slow": slow, "tol": tol}


def confirm_slow(rows: list[dict], chk: dict, rerun, tol: float = 0.05) -> tuple[list[dict], dict]:
    """A flagged case measured again: for every (kind, format) with a case check_chosen named slow, rerun(kind,
    fmt) -> that format's rows measured anew (with more rounds), which replace the first rows of its cases (each
    new row marked "remeasured"); the check is then run over the merged rows. Returns (the new rows, the check,
    which also lists the first pass's named cases as "first_pass_slow"). Why: a tie between two variants (this
    host: q4_k's AVX2 and AVX-512 GEMV, level within 1-5% at 2 threads) crosses 5% in one 9-round pass in
    three, either way; a real gap stays over it with three times the rounds, a tie does not."""
    redo = list(dict.fromkeys((w["kind"], w["format"]) for w in chk["slow"]))
    if not redo:
        return [], chk
    new = []
    for kind, fmt in redo:
        for r in rerun(kind, fmt):
            r["remeasured"] = True
            new.append(r)
    keys = {_case(r) for r in new}
    merged = [r for r in rows if _case(r) not in keys] + new
    out = check_chosen(merged, tol)
    out["first_pass_slow"] = chk["slow"]
    return new, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="powerlow bench-kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--formats", default=",".join(F.FORMATS))
    ap.add_argument("--isa", default=",".join(K.supported_isas[1:] or K.supported_isas),
                    help="comma list of variants (default: the SIMD ones this CPU runs)")
    ap.add_argument("--only", default="dense,sparse,gemm", help="comma list of dense,sparse,gemm")
    ap.add_argument("--sparse-format", default="q4_1")
    ap.add_argument("--gemm-formats", default="q4_1,q4_k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--confirm", type=int, default=3,
                    help="a case the check names is measured again with CONFIRM x the repeats (0: not)")
    a = ap.parse_args(argv)
    K.set_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    isas = [i for i in a.isa.split(",") if i]
    for i in isas:
        if i not in K.supported_isas:
            ap.error(f"isa {i} is not supported by this CPU (have {', '.join(K.supported_isas)})")
    fmts = [f for f in a.formats.split(",") if f]
    only = set(a.only.split(","))
    rows = []

    def emit(rs):
        for r in rs:
            rows.append(r)
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                extra = f" speedup {r['speedup']}x ({r['gemm_tok_s']} vs {r['gemv_tok_s']} tok/s)" if "speedup" in r else ""
                kern = f"{r['kernel']}{'*' if r.get('default') else ' '}" if "kernel" in r else "    "
                print(f"{r['kind']:6s} {r['format']:5s} {r['isa']:7s} {kern:4s} t{r['threads']} d={r['density']:<4} "
                      f"{r['ms']:8.2f} ms {r['gbps']:6.2f} GB/s probe {r['probe_gbps']:6.2f} ratio {r['ratio']:.2f}{extra}"
                      f"{'  <- chosen' if r.get('chosen') else ''}{'  (again)' if r.get('remeasured') else ''}",
                      flush=True)

    if "dense" in only:
        emit(bench_dense(fmts, isas, a.threads, a.repeats, rng))
    if "sparse" in only:
        emit(bench_sparse(a.sparse_format, isas, a.threads, a.repeats, rng))
    if "gemm" in only:
        for f in a.gemm_formats.split(","):
            if f:
                emit(bench_gemm(f, isas, a.threads, a.repeats, rng))
    def show(chk, what):
        print(f"{what}: the chosen variant is within {chk['tol']:.0%} of every other one measured (paired per round) "
              f"in {chk['cases'] - len(chk['slow'])} of {chk['cases']} cases" + ("" if not chk["slow"] else "; slower:"))
        for w in chk["slow"]:
            paired = ("" if w["excess"] is None
                      else f" ({w['excess']:+.0%} paired, {w['excess_of_medians']:+.0%} of the medians)")
            print(f"  {w['case']}: chosen {w['chosen']} {w['ms']} ms, {w['fastest']} {w['fastest_ms']} ms" + paired)

    def rerun(kind, fmt):
        reps = a.repeats * a.confirm
        if kind == "dense":
            return bench_dense([fmt], isas, a.threads, reps, rng)
        if kind == "sparse":
            return bench_sparse(fmt, isas, a.threads, reps, rng)
        return bench_gemm(fmt, isas, a.threads, reps, rng)

    chk = check_chosen(rows)
    if chk["slow"] and a.confirm > 0:
        if not a.json:
            show(chk, "first pass")
            print(f"measured again with {a.repeats * a.confirm} rounds:", flush=True)
        new, chk = confirm_slow(rows, chk, rerun)
        emit(new)
    if a.json:
        print(json.dumps({"kind": "check", **chk}), flush=True)
    else:
        show(chk, "check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
