"""Soak test: a long generation under a memory budget, RSS recorded every 100 tokens.

    python scripts/soak.py [-m MODEL] [--budget 90MiB] [-n 2000] [--chat] [-p TEXT] [--temp 0.8] [-s 1] [--ignore-eos] [--json OUT]

The interpreter's own baseline (Python with the code a run executes imported: powerlow.util.import_runtime,
nothing loaded) is measured in this process
before the model loads; the budget holds if peak RSS <= budget + baseline. Prints one line per 100 tokens and a
summary; exits 1 if the budget was not held."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--budget", default="90MiB")
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-p", "--prompt", default="Write a long story about a lighthouse keeper and a storm.")
    ap.add_argument("--chat", action="store_true", default=True)
    ap.add_argument("--no-chat", dest="chat", action="store_false")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-s", "--seed", type=int, default=1)
    ap.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens until -n")
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args(argv)

    import powerlow
    from powerlow.util import import_runtime
    from powerlow.config import parse_size
    from powerlow.default_model import resolve_model
    from powerlow.run import _prompt_tokens

    model_dir = resolve_model(a.model)       # a source is converted first (not part of the measured run)
    import_runtime()                          # the program's code, not the model: the baseline
    baseline = rss_mib()
    budget = parse_size(a.budget)
    n_prompt, _ = _prompt_tokens(model_dir, a.prompt, a.chat)
    cfg = powerlow.RuntimeConfig(budget_bytes=budget, max_context=n_prompt + a.n, seed=a.seed)
    t0 = time.perf_counter()
    model = powerlow.load(model_dir, cfg)
    rows = [(0, rss_mib(), peak_mib())]
    print(f"baseline {baseline:.1f} MiB; budget {budget / 2**20:.1f} MiB; loaded: RSS {rows[0][1]:.1f} MiB "
          f"(peak {rows[0][2]:.1f})", flush=True)
    n = 0
    for _ in model.generate(a.prompt, a.n, temperature=a.temp, seed=a.seed, chat=a.chat,
                                ignore_eos=a.ignore_eos):
        n += 1
        if n % a.every == 0:
            rows.append((n, rss_mib(), peak_mib()))
            print(f"token {n:5d}: RSS {rows[-1][1]:7.1f} MiB  peak {rows[-1][2]:7.1f} MiB", flush=True)
    rows.append((n, rss_mib(), peak_mib()))
    peak = max(r[2] for r in rows)
    limit = budget / 2**20 + baseline
    held = peak <= limit
    print(f"generated {n} tokens in {time.perf_counter() - t0:.0f} s; peak RSS {peak:.1f} MiB vs budget + baseline "
          f"{limit:.1f} MiB: {'held' if held else 'NOT held'} (RSS growth from token {rows[1][0] if len(rows) > 1 else 0}"
          f" to the end: {rows[-1][1] - rows[min(1, len(rows) - 1)][1]:+.1f} MiB)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"baseline_mib": baseline, "budget_mib": budget / 2**20, "peak_mib": peak, "held": held,
                       "tokens": n, "rows": rows}, f, indent=1)
    model.close()
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
