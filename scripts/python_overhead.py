"""The Python time of a decode step: py-spy samples of the compute thread while it holds the GIL.

    python scripts/python_overhead.py MODEL_DIR --budget 50% --mode predict -n 128 [--rate 500]

Runs scripts/decode_loop.py under ``py-spy record --gil --threads -f raw`` and counts the samples of the main
thread inside ``decode_steps`` (the decode loop: no load, no prefill). The kernels and the I/O waits release the
GIL, so what is left is Python and numpy's small steps: printed per token and per layer, with the functions
(leaf frames) that take most of it, and decode tok/s of a separate run without the profiler. Needs py-spy
(pip install py-spy) and root or ptrace rights.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def samples(raw: str, thread_hint: str = "MainThread") -> tuple[int, collections.Counter]:
    """(samples of the decode loop on the main thread, leaf frame -> samples) from py-spy's raw format:
    one 'frame;frame;... count' line per distinct stack, the thread first with --threads."""
    total, leaves = 0, collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        if thread_hint not in frames[0] or not any(f.startswith("decode_steps ") for f in frames):
            continue
        total += int(n)
        leaves[frames[-1]] += int(n)
    return total, leaves


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget")
    ap.add_argument("--mode")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--rate", type=int, default=500, help="py-spy samples a second")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    loop = [sys.executable, str(HERE / "decode_loop.py"), a.model, "-n", str(a.n)]
    loop += ["--budget", a.budget] if a.budget else []
    loop += ["--mode", a.mode] if a.mode else []
    plain = subprocess.run(loop, capture_output=True, text=True)
    if plain.returncode:
        sys.stderr.write(plain.stderr)
        return 1
    info = json.loads(plain.stderr.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "raw.txt"
        r = subprocess.run(["py-spy", "record", "--gil", "--threads", "-r", str(a.rate), "-f", "raw", "-o", str(out),
                            "--"] + loop, capture_output=True, text=True)
        if r.returncode or not out.exists():
            sys.stderr.write(r.stderr)
            return 1
        total, leaves = samples(out.read_text())
    per_tok = total / a.rate / a.n
    res = {"model": a.model, "budget": a.budget, "mode": a.mode, "n": a.n, "decode_tok_s": info["decode_tok_s"],
           "python_ms_per_token": round(per_tok * 1e3, 3),
           "python_us_per_layer": round(per_tok * 1e6 / info["layers"], 1),
           "python_share": round(per_tok * info["decode_tok_s"], 3),
           "top": [(f, round(c / a.rate / a.n * 1e6 / info["layers"], 1)) for f, c in leaves.most_common(a.top)]}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
