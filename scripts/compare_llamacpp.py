"""Side-by-side speed: the same GGUF through llama.cpp (llama-cpp-python) and powerlow, same threads, one run.

    python scripts/compare_llamacpp.py [--gguf FILE] [-t 2] [-n 64] [--prompt-tokens 64] [--repeats 5] [--json]

Default GGUF: the default model (SmolLM2-135M-Instruct Q4_1); the real test model: `--gguf $(python
scripts/fetch_qwen.py)`. powerlow runs the model dir converted from that GGUF (in $POWERLOW_HOME, as `-m GGUF` does). llama.cpp runs in its own venv (scripts/llamacpp_env.py builds it once). Prints medians and
the ratios powerlow / llama.cpp.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def llamacpp_inner(gguf: str, threads: int, n: int, prompt_tokens: int, repeats: int, extra_bufts: bool) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    kw = {}
    try:
        import inspect
        if "use_extra_bufts" in inspect.signature(Llama.__init__).parameters:
            kw["use_extra_bufts"] = extra_bufts
    except (TypeError, ValueError):
        pass
    t = time.perf_counter()
    llm = Llama(model_path=gguf, n_ctx=prompt_tokens + n + 8, n_threads=threads, n_threads_batch=threads,
                n_batch=max(prompt_tokens, 8), verbose=False, **kw)
    load_s = time.perf_counter() - t
    text = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
            "grain, salt and wool. Over the centuries it grew into a busy port with bridges, markets and schools. ") * 40
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))

    prompt = llm.tokenize(text.encode(), add_bos=False, special=False)[:prompt_tokens]
    pre, dec = [], []
    for _ in range(repeats):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        pre.append(prompt_tokens / (time.perf_counter() - t))
        tok = int(np.argmax(last_logits()))
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
        dec.append(n / (time.perf_counter() - t))
    import resource
    return {"engine": "llama.cpp", "threads": threads, "load_s": round(load_s, 2),
            "prefill_tok_s": round(statistics.median(pre), 2), "decode_tok_s": round(statistics.median(dec), 2),
            "decode_tok_s_all": [round(x, 2) for x in dec],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_llamacpp(gguf: Path, args) -> dict:
    from llamacpp_env import bench_python
    cmd = [str(bench_python()), __file__, "--inner", str(gguf), str(args.threads), str(args.n),
           str(args.prompt_tokens), str(args.repeats), "1" if args.extra_bufts else "0"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_powerlow(model_dir: Path, args) -> dict:
    cmd = [sys.executable, "-m", "powerlow", "bench", "-m", str(model_dir), "-t", str(args.threads), "-n", str(args.n),
           "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--inner":
        g, t, n, p, r, eb = sys.argv[2:8]
        print(json.dumps(llamacpp_inner(g, int(t), int(n), int(p), int(r), eb == "1")))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the default model's)")
    ap.add_argument("-m", "--model", default=None, help="powerlow model dir of the same GGUF (default: convert it)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=64, help="decode tokens per repeat")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-bufts", action="store_true", help="let llama.cpp repack weights into its CPU buffers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from powerlow.default_model import default_gguf, default_model_dir, prepare_source
    if args.gguf is None:
        gguf, model_dir = default_gguf(), Path(args.model) if args.model else default_model_dir()
    else:       # the dir `powerlow run -m GGUF` converts into on first use
        gguf = Path(args.gguf)
        model_dir = Path(args.model) if args.model else prepare_source(gguf)
    lc = run_llamacpp(gguf, args)
    pl = run_powerlow(model_dir, args)
    ratio = {"decode_ratio": round(pl["decode_tok_s"] / lc["decode_tok_s"], 3),
             "prefill_ratio": round(pl["prefill_tok_s"] / lc["prefill_tok_s"], 3)}
    if args.json:
        print(json.dumps({"gguf": str(gguf), "llama.cpp": lc, "powerlow": pl, **ratio}))
    else:
        print(f"GGUF {gguf.name}, {args.threads} threads, prompt {args.prompt_tokens} tok, decode {args.n} tok, "
              f"medians of {args.repeats}")
        print(f"{'':12s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'peak RSS MiB':>13s}")
        for name, r in (("llama.cpp", lc), ("powerlow", pl)):
            print(f"{name:12s} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f} {r['peak_rss_bytes'] / 2**20:13.0f}")
        print(f"{'ratio':12s} {ratio['prefill_ratio']:14.2f} {ratio['decode_ratio']:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
