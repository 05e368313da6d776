"""GEMV variants of one or more source trees, alternated for a fixed time and split by the host's phase.

This host's memory bandwidth moves between a slow phase (the 2-thread read probe at 30-36 GB/s) and a fast one
(55-62) within seconds, and a kernel change can help in one and cost in the other. Each round reads the probe
once, then runs every variant on every format (order rotated round by round); at the end the rounds are split
by the probe's GB/s and each variant's median GB/s and paired time ratio to the first variant is printed per
phase.

    python scripts/phase_ab.py TREE:ISA[,TREE:ISA...] q4_0,q8 [--threads 2] [--seconds 300]

TREE is a built source tree (its powerlow/ with the compiled extensions; `git worktree add` + `python setup.py
build_ext --inplace`, with --force when the build/ folder was copied from another tree), each imported under its
own module name; ISA one of kernels' variants (avx2, avx512, generic, ...). Outputs are compared bit for bit.
"""
import argparse
import importlib
import importlib.util
import statistics
import sys
import time

import numpy as np


def load(name: str, root: str):
    spec = importlib.util.spec_from_file_location(name, f"{root}/powerlow/__init__.py",
                                                  submodule_search_locations=[f"{root}/powerlow"])
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    return importlib.import_module(name + ".kernels"), importlib.import_module(name + ".bench_kernels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variants", help="TREE:ISA,TREE:ISA,... (the first is the reference of the ratios)")
    ap.add_argument("formats", help="comma list, e.g. q4_0,q4_1,q8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--fast", type=float, default=48.0, help="a round is fast when its probe reads more (GB/s)")
    ap.add_argument("--slow", type=float, default=42.0, help="... and slow when it reads at most this")
    ap.add_argument("--tl", action="store_true", help="q2/tern/q1: the table-lookup kernels (prepare_tl, tl=True)")
    args = ap.parse_args()
    vs = [tuple(v.rsplit(":", 1)) for v in args.variants.split(",")]
    fmts = args.formats.split(",")
    mods: dict = {}
    for tree, _ in vs:
        if tree not in mods:
            mods[tree] = load(f"pl_tree{len(mods)}", tree)
    K0, B0 = next(iter(mods.values()))
    rng = np.random.default_rng(0)
    qs = {f: B0._fast_quantize(f, B0.dense_rows(f), 8192, rng) for f in fmts}
    if args.tl:
        for q in qs.values():
            K0.prepare_tl(q)
    tl = True if args.tl else None
    x = rng.standard_normal((1, 8192)).astype(np.float32)
    outs = {f: [np.empty((1, q.rows), np.float32) for _ in vs] for f, q in qs.items()}
    for K, _ in mods.values():
        K.set_threads(args.threads)
    buf = np.ones(max(q.nbytes for q in qs.values()), np.uint8)
    rounds = []
    t_end = time.time() + args.seconds
    r = 0
    while time.time() < t_end:
        t = time.perf_counter()
        K0.read_probe(buf, threads=args.threads)
        probe = buf.nbytes / (time.perf_counter() - t) / 1e9
        ts = {}
        order = list(range(len(vs)))
        order = order[r % len(order):] + order[:r % len(order)]
        for f in fmts:
            for i in order:
                tree, isa = vs[i]
                t = time.perf_counter()
                mods[tree][0].matmul(qs[f], x, outs[f][i], isa=isa, tl=tl)
                ts[f, i] = time.perf_counter() - t
        rounds.append((probe, ts))
        r += 1
    for f in fmts:
        for i in range(1, len(vs)):
            if not np.array_equal(outs[f][i], outs[f][0]):
                print(f"{f}: {vs[i]} differs from {vs[0]}")
    for name, sel in (("fast", lambda p: p > args.fast), ("slow", lambda p: p <= args.slow)):
        rs = [ts for p, ts in rounds if sel(p)]
        if not rs:
            print(f"{name}: no rounds")
            continue
        print(f"{name}: {len(rs)} rounds, probe {statistics.median(p for p, _ in rounds if sel(p)):.1f} GB/s")
        for f in fmts:
            cells = []
            for i, (tree, isa) in enumerate(vs):
                gbps = qs[f].nbytes / statistics.median(ts[f, i] for ts in rs) / 1e9
                ratio = statistics.median(ts[f, i] / ts[f, 0] for ts in rs)
                cells.append(f"{tree.rstrip('/').split('/')[-1]}:{isa} {gbps:.1f} GB/s ({ratio:.3f})")
            print(f"  {f}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
