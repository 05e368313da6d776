"""The Python time of a decode step, from CPU samples of the compute thread (Linux perf, no pausing profiler).

    sudo python scripts/python_overhead.py MODEL_DIR --budget 50% --mode predict -n 128

Runs scripts/decode_loop.py under ``perf record -k mono -e cpu-clock --call-graph dwarf`` and keeps the samples of
its main thread taken inside the decode loop (decode_loop.py prints the loop's CLOCK_MONOTONIC window; perf's clock
is the same). Each sample is classed by its call stack: one that passes through powerlow's compiled code
(_kernels, _iocore, libgomp) is kernel or streaming-core time, whatever its leaf (malloc, memset or expf called by
a kernel included); otherwise a leaf in the interpreter (libpython), numpy, libc or libm is Python time, and one in
the OS kernel is the thread's own system calls and page faults. Waiting (a condition variable, the GIL) is off the
CPU and takes no samples. Printed per token and per layer, with decode tok/s of the same run. perf samples at a
fixed rate with little overhead; a pausing stack sampler (py-spy) slowed the Python-thread I/O of the old store 30x
and counted the interpreter's share wrong.
"""
from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = ("libpython", "python3")
NUMPY = ("_multiarray_umath", "_umath", "numpy", "libc.so", "libm.so", "ld-linux")
OURS = ("_kernels", "_iocore", "libgomp")


def classify(dsos: list[str]) -> str:
    """A sample's class from the DSOs of its call stack, leaf first."""
    names = [Path(d.strip("()")).name for d in dsos]
    if any(k in n for n in names for k in OURS):
        return "compiled"
    leaf = names[0] if names else ""
    if leaf == "[kernel.kallsyms]":
        return "os"
    if any(k in leaf for k in PY + NUMPY):
        return "python"          # the interpreter, numpy's small steps and the allocator: Python overhead
    return "other"


def tally(script: str, tid: int, window: tuple[float, float]) -> collections.Counter:
    """perf script output ('tid time:' then one 'ip sym (dso)' line per frame) -> samples per class inside the
    window, for one thread."""
    c = collections.Counter()
    head, frames = None, []

    def flush():
        if head is not None and head[0] == tid and window[0] <= head[1] <= window[1]:
            c[classify(frames)] += 1

    for line in script.splitlines():
        p = line.split()
        if not line.startswith("\t") and len(p) == 2 and p[0].isdigit() and p[1].endswith(":"):
            flush()
            head, frames = (int(p[0]), float(p[1].rstrip(":"))), []
        elif p and head is not None:
            frames.append(p[-1])
    flush()
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget")
    ap.add_argument("--mode")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--freq", type=int, default=999, help="perf samples a second")
    a = ap.parse_args()
    loop = [sys.executable, str(HERE / "decode_loop.py"), a.model, "-n", str(a.n)]
    loop += ["--budget", a.budget] if a.budget else []
    loop += ["--mode", a.mode] if a.mode else []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "perf.data"
        r = subprocess.run(["perf", "record", "-q", "-k", "mono", "-F", str(a.freq), "-e", "cpu-clock",
                            "--call-graph", "dwarf,16384", "-o", str(data),
                            "--"] + loop, capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr)
            return 1
        info = json.loads([ln for ln in r.stderr.splitlines() if ln.startswith("{")][-1])
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,time,ip,dso"], capture_output=True,
                                text=True).stdout
    c = tally(script, info["pid"], tuple(info["window"]))
    secs = {k: v / a.freq / a.n for k, v in c.items()}      # seconds a token
    L = info["layers"]
    res = {"model": a.model, "budget": a.budget, "mode": a.mode, "n": a.n, "decode_tok_s": info["decode_tok_s"],
           "token_ms": round(1e3 / info["decode_tok_s"], 3),
           **{f"{k}_ms_per_token": round(v * 1e3, 3) for k, v in sorted(secs.items())},
           "python_us_per_layer": round(secs.get("python", 0.0) * 1e6 / L, 1),
           "samples": dict(c)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
