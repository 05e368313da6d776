"""Decode N tokens of a model under a budget, for a profiler to watch (scripts/python_overhead.py: py-spy).

    python scripts/decode_loop.py MODEL_DIR --budget 50% --mode dense -n 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

import powerlow
from powerlow.config import RuntimeConfig, parse_size


def decode_steps(tf, text: list[int], n: int):
    """n decode steps after a 16-token prefill -> (seconds, last logits). Varied inputs: the text's next token,
    not the argmax (a small random model's greedy output repeats one token, which a cache serves too well)."""
    t = time.perf_counter()
    for i in range(n):
        logits = tf.forward([text[16 + i % (len(text) - 17)]], start_pos=16 + i, last_only=True)
    return time.perf_counter() - t, logits


def monotonic() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--budget", help="SIZE, or P%% of the model's ffn.bin + resident.safetensors")
    ap.add_argument("--mode", default=None)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    kw = {"threads": a.threads, "max_context": 256}
    if a.mode:
        kw["mode"] = a.mode
    if a.budget:
        if a.budget.endswith("%"):
            from pathlib import Path
            size = sum((Path(a.model) / f).stat().st_size for f in ("ffn.bin", "resident.safetensors"))
            kw["budget_bytes"] = int(size * float(a.budget[:-1]) / 100)
        else:
            kw["budget_bytes"] = parse_size(a.budget)
    with powerlow.load(a.model, RuntimeConfig(**kw)) as m:
        tf = m.tf
        text = m.tokenize("def fibonacci(n):\n    '''Return the n-th Fibonacci number.'''\n" * 8, add_special=False)
        tf.forward(text[:16], start_pos=0, last_only=True)
        t0 = monotonic()
        dt, logits = decode_steps(tf, text, a.n)
        t1 = monotonic()
        print(json.dumps({"decode_tok_s": round(a.n / dt, 2), "n": a.n, "layers": tf.config.n_layers,
                          "window": [t0, t1], "pid": os.getpid(),
                          "argmax": int(np.argmax(logits[-1]))}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
