"""The Python time of a decode step, from CPU samples of the compute thread (Linux perf, no pausing profiler).

    sudo python scripts/python_overhead.py MODEL_DIR --budget 50% --mode predict -n 128

Runs scripts/decode_loop.py under ``perf record -k mono -e cpu-clock`` and keeps the samples of its main thread
taken inside the decode loop (decode_loop.py prints the loop's CLOCK_MONOTONIC window; perf's clock is the same).
A sample in the interpreter (libpython), numpy or libc (malloc, memcpy of small arrays) is Python time; one in
powerlow's compiled code (_kernels, _iocore, libgomp) is kernel or streaming-core time; one in the OS kernel is
the thread's own system calls and page faults. Waiting (a condition variable, the GIL) is off the CPU and takes no
samples. Printed per token and per layer, with decode tok/s of the same run. perf samples at a fixed rate with
little overhead, so the run is as fast as an unprofiled one; a pausing stack sampler (py-spy) slowed the
Python-thread I/O of the old store 30x and counted the interpreter's share wrong.
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


def classify(dso: str) -> str:
    name = Path(dso.strip("()")).name
    if name == "[kernel.kallsyms]":
        return "os"
    if any(k in name for k in OURS):
        return "compiled"
    if any(k in name for k in PY):
        return "python"
    if any(k in name for k in NUMPY):
        return "python"          # numpy's small steps and the allocator: Python overhead too
    return "other"


def tally(script: str, tid: int, window: tuple[float, float]) -> collections.Counter:
    """'tid time: ip (dso)' lines -> samples per class inside the window, for one thread."""
    c = collections.Counter()
    for line in script.splitlines():
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit() or int(parts[0]) != tid:
            continue
        t = float(parts[1].rstrip(":"))
        if window[0] <= t <= window[1]:
            c[classify(parts[-1]) if parts[-1].startswith("(") else "other"] += 1
    return c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget")
    ap.add_argument("--mode")
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--freq", type=int, default=1999, help="perf samples a second")
    a = ap.parse_args()
    loop = [sys.executable, str(HERE / "decode_loop.py"), a.model, "-n", str(a.n)]
    loop += ["--budget", a.budget] if a.budget else []
    loop += ["--mode", a.mode] if a.mode else []
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "perf.data"
        r = subprocess.run(["perf", "record", "-q", "-k", "mono", "-F", str(a.freq), "-e", "cpu-clock", "-o", str(data),
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
