#!/usr/bin/env python
"""A model bigger than the memory it may use: powerlow and llama.cpp inside the same cgroup memory limit.

    sudo python scripts/bench_oversized.py                      # 2 GB synthetic model, limits 50% and 25%
    python scripts/bench_oversized.py --limits 50 --modes dense,predict:0.25 -n 16 --json out.json
    sudo python scripts/bench_oversized.py --moe moe-2gb --repeats 3 --decode-input text --unlimited

What it does, per run (a fresh process each):
  * makes (or reuses) the synthetic model: ~/.cache/powerlow/synthetic/2gb-relu (scripts/make_synthetic.py,
    preset 2gb, ReLU, planted hotness), its Q4_0 GGUF, and the powerlow model dir converted from that GGUF;
    with --moe moe-2gb the synthetic qwen3moe GGUF with planted expert skew (scripts/synthetic_moe.py), its
    powerlow dir, profiled (expert frequencies), run in mode experts;
  * creates a cgroup v1 memory group with memory.limit_in_bytes = limit, drops the page cache
    (sync; echo 3 > /proc/sys/vm/drop_caches), starts the engine inside the group, 2 threads;
  * powerlow gets --budget = limit - the interpreter's own baseline (RSS after imports, measured here);
    llama.cpp (llama-cpp-python, scripts/llamacpp_env.py) runs the same GGUF memory-mapped, with its Q4_0
    repacking into anonymous memory turned off (use_extra_bufts = false: with it, a limited run thrashes);
  * reports decode tokens/s, bytes read from storage per token (/proc/self/io read_bytes over the decode
    loop), peak memory (cgroup memory.max_usage_in_bytes, which counts the page cache, and the peak RSS),
    whether the group hit OOM, and powerlow / llama.cpp ratios at the same limit;
  * probes random O_DIRECT reads of ffn.bin at powerlow's read size and depth in the same session, and
    compares powerlow's bundle-read throughput (bytes / time with reads in flight) against it.
The cgroups it makes are removed afterwards, also on failure. Needs root (cgroups, drop_caches).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and wool. Over the centuries it grew into a busy port with bridges, markets and schools. ") * 20


def _proc_read_bytes() -> int:
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# the interpreter's baseline: what a powerlow process has imported before it loads a model (measured after these
# imports in the engine's run, in interpreter_baseline and in interpreter_cgroup_baseline alike)
BASELINE_IMPORTS = ("numpy", "powerlow", "powerlow.engine", "powerlow.cache", "powerlow.kernels", "safetensors",
                    "tokenizers")


# -- the engines, each run in its own process inside the cgroup -------------------------------------------
def inner_powerlow(a: dict) -> dict:
    import importlib
    for m in BASELINE_IMPORTS:
        importlib.import_module(m)
    from powerlow.util import current_rss_bytes
    import numpy as np
    import powerlow
    from powerlow.config import RuntimeConfig
    baseline = current_rss_bytes()
    kw = dict(threads=a["threads"], mode=a["mode"], density=a["density"], max_context=a["context"])
    if a["budget"]:
        kw["budget_bytes"] = a["budget"]
    kw.update(a.get("extra", {}))
    t = time.perf_counter()
    model = powerlow.load(a["model"], RuntimeConfig(**kw))
    load_s = time.perf_counter() - t
    tf = model.tf
    text = model.tokenize(TEXT, add_special=False)
    prompt = text[: a["prompt_tokens"]]
    t = time.perf_counter()
    logits = tf.forward(prompt, start_pos=0, last_only=True)
    prefill = len(prompt) / (time.perf_counter() - t)
    forced = a.get("decode_input") == "text"
    tok = text[len(prompt)] if forced else int(np.argmax(logits[-1]))
    src = tf.ffn_source
    c0 = src.counters() if hasattr(src, "counters") else {}
    r0 = _proc_read_bytes()
    t = time.perf_counter()
    toks = []
    fed = []
    for i in range(a["n"]):
        fed.append(tok)
        logits = tf.forward([tok], start_pos=len(prompt) + i, last_only=True)
        toks.append(int(np.argmax(logits[-1])))
        tok = text[len(prompt) + i + 1] if forced else toks[-1]
    dt = time.perf_counter() - t
    r1 = _proc_read_bytes()
    c = src.counters() if hasattr(src, "counters") else {}
    out = {"engine": "powerlow", "mode": a["mode"], "density": a["density"], "budget_bytes": a["budget"],
           "load_s": round(load_s, 2), "prefill_tok_s": round(prefill, 2), "decode_tok_s": round(a["n"] / dt, 3),
           "read_bytes_per_token": int((r1 - r0) / a["n"]), "baseline_rss_bytes": baseline,
           "peak_rss_bytes": _peak_rss(), "tokens": toks, "decode_input": a.get("decode_input", "greedy"),
           "distinct_inputs": len(set(fed)),
           "ffn_density": round(tf.ffn.clusters_used / max(1, tf.ffn.clusters_total), 4)}
    if tf.ffn.router is not None:         # MoE: the next layer's router on this layer's state, against its choice
        d = tf.ffn.router.describe()
        out.update(expert_lookahead_recall=d["lookahead_recall"],
                   expert_lookahead_recall_per_layer=d["lookahead_recall_per_layer"])
    if c:
        busy = c["io_busy_s"] - c0.get("io_busy_s", 0)
        nbytes = c["bytes_read"] - c0.get("bytes_read", 0)
        all_busy = c["io_all_busy_s"] - c0.get("io_all_busy_s", 0)
        all_bytes = c["io_all_bytes"] - c0.get("io_all_bytes", 0)
        out.update({"all_read_gbps": round(all_bytes / all_busy / 1e9, 3) if all_busy else 0})
        out.update({"cache_hit_rate": c["cache_hit_rate"], "bundle_read_gbps": round(nbytes / busy / 1e9, 3) if busy else 0,
                    "io_wait_s": round(c["io_wait_s"] - c0.get("io_wait_s", 0), 3), "decode_s": round(dt, 3),
                    "bundle_bytes_per_token": int(nbytes / a["n"]), "o_direct": c["o_direct"],
                    "read_block_bytes": c.get("read_block_bytes"), "queue_depth": c.get("queue_depth"),
                    "evictions": c["evictions"], "hot_bytes": c.get("plan_hot_bytes"),
                    "planned_bytes": c.get("plan_planned_bytes")})
        src.close()
    return out


# -- generation from real prompts (--prompts): speculative decoding against llama.cpp's prompt lookup -------
CODE_PROMPT = '''import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Inventory:
    """Items in stock, by name, with their counts and unit prices."""
    counts: dict[str, int] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, count: int, price: float) -> None:
        """Add count items of name at price each."""
        self.counts[name] = self.counts.get(name, 0) + count
        self.prices[name] = price

    def remove(self, name: str, count: int) -> None:
        """Remove count items of name; raise KeyError if there are not enough."""
'''
EDIT_CODE = '''def total_price(items, tax_rate):
    total = 0.0
    for item in items:
        price = item["price"] * item["quantity"]
        if item.get("discount"):
            price = price * (1 - item["discount"])
        total = total + price
    total = total * (1 + tax_rate)
    return round(total, 2)


def cheapest_item(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
'''
PROMPT_KINDS = {
    "code": (CODE_PROMPT, False),
    "chat": ("Explain how a hash map works and when a sorted array is the better choice. Keep it short.", True),
    "edit": ("Rename the parameter `items` to `cart` everywhere in this code, and return the whole code:\n\n```python\n"
             + EDIT_CODE + "```", True),
}


def prompt_ids(model_dir: Path, kind: str) -> list[int]:
    """The prompt's token ids by powerlow's tokenizer (chat kinds through the model's chat template); both engines
    get the same ids."""
    from powerlow.arch import ModelConfig
    from powerlow.manifest import load_manifest
    from powerlow.tokenizer import Tokenizer
    m = load_manifest(model_dir, check_files=False)
    tok = Tokenizer.of_model(model_dir, m, ModelConfig.from_json(m["config"]))
    text, chat = PROMPT_KINDS[kind]
    return tok.encode(tok.apply_chat(text) if chat else text)


def inner_powerlow_generate(a: dict) -> dict:
    """Greedy generation of a["n"] tokens from a["prompt_ids"] with drafter a["draft"]."""
    import importlib
    for m in BASELINE_IMPORTS:
        importlib.import_module(m)
    from powerlow.util import current_rss_bytes
    import powerlow
    from powerlow.config import RuntimeConfig
    baseline = current_rss_bytes()
    kw = dict(threads=a["threads"], max_context=len(a["prompt_ids"]) + a["n"] + 1, draft=a["draft"],
              draft_k=a.get("draft_k", 0))
    if a["budget"]:
        kw["budget_bytes"] = a["budget"]
    kw.update(a.get("extra", {}))
    model = powerlow.load(a["model"], RuntimeConfig(**kw))
    toks = []
    r0 = t0 = None
    for t in model._generate(a["prompt_ids"], a["n"], powerlow.generate.SamplingParams(),
                             model.drafter(), model.tf.runtime.draft_k):
        toks.append(t.id)
        if r0 is None:
            r0, t0 = _proc_read_bytes(), time.perf_counter()
    dt = time.perf_counter() - t0
    r1 = _proc_read_bytes()
    s = model.stats.as_dict()
    spec = s.get("speculation") or {}
    model.close()
    n = max(1, len(toks) - 1)
    return {"engine": "powerlow", "mode": "dense", "density": 1.0, "draft": a["draft"], "kind": a["kind"],
            "budget_bytes": a["budget"], "prefill_tok_s": s["prefill_tok_s"], "decode_tok_s": round(n / dt, 3),
            "read_bytes_per_token": int((r1 - r0) / n), "baseline_rss_bytes": baseline, "peak_rss_bytes": _peak_rss(),
            "tokens": toks, "speculation": spec}


def _no_extra_bufts() -> None:
    """Keep llama.cpp's weights memory-mapped instead of repacked into anonymous memory (with the repacking, a run
    under a limit thrashes)."""
    import llama_cpp
    import llama_cpp.llama_cpp as lc
    default = lc.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    lc.llama_model_default_params = params
    llama_cpp.llama_model_default_params = params


def inner_llamacpp_generate(a: dict) -> dict:
    """Greedy generation with llama.cpp, plain or with its prompt lookup decoding (a["lookup"] drafts a pass)."""
    from llama_cpp import Llama
    if not a["extra_bufts"]:
        _no_extra_bufts()
    draft = None
    if a["lookup"]:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        draft = LlamaPromptLookupDecoding(num_pred_tokens=a["lookup"])
    ids = a["prompt_ids"]
    llm = Llama(model_path=a["gguf"], n_ctx=len(ids) + a["n"] + 16, n_threads=a["threads"],
                n_threads_batch=a["threads"], n_batch=512, verbose=False, draft_model=draft)
    toks = []
    r0 = t0 = None
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        toks.append(int(t))
        if r0 is None:
            r0, t0 = _proc_read_bytes(), time.perf_counter()
        if len(toks) == a["n"] or t == llm.token_eos():
            break
    dt = time.perf_counter() - t0
    r1 = _proc_read_bytes()
    n = max(1, len(toks) - 1)
    return {"engine": "llama.cpp", "extra_bufts": a["extra_bufts"], "lookup": a["lookup"], "kind": a["kind"],
            "decode_tok_s": round(n / dt, 3), "read_bytes_per_token": int((r1 - r0) / n),
            "peak_rss_bytes": _peak_rss(), "tokens": toks}


def inner_llamacpp(a: dict) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    if not a["extra_bufts"]:
        _no_extra_bufts()
    t = time.perf_counter()
    llm = Llama(model_path=a["gguf"], n_ctx=a["prompt_tokens"] + a["n"] + 8, n_threads=a["threads"],
                n_threads_batch=a["threads"], n_batch=max(a["prompt_tokens"], 8), verbose=False)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()
    prompt = llm.tokenize(TEXT.encode(), add_bos=False, special=False)[: a["prompt_tokens"]]

    def last():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t)
    forced = a.get("decode_input") == "text"
    text = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    tok = text[len(prompt)] if forced else int(np.argmax(last()))
    r0 = _proc_read_bytes()
    t = time.perf_counter()
    for i in range(a["n"]):
        llm.eval([tok])
        tok = text[len(prompt) + i + 1] if forced else int(np.argmax(last()))
    dt = time.perf_counter() - t
    r1 = _proc_read_bytes()
    return {"engine": "llama.cpp", "extra_bufts": a["extra_bufts"], "load_s": round(load_s, 2),
            "prefill_tok_s": round(prefill, 2), "decode_tok_s": round(a["n"] / dt, 3),
            "read_bytes_per_token": int((r1 - r0) / a["n"]), "peak_rss_bytes": _peak_rss()}


# -- cgroups ---------------------------------------------------------------------------------------------
def drop_caches() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        print(f"warning: cannot drop the page cache ({e}); runs are not cold", file=sys.stderr)


@contextlib.contextmanager
def memory_cgroup(limit: int | None):
    """A fresh cgroup v1 memory group (None: no limit, no group); removed on exit, also on failure."""
    if limit is None:
        yield None
        return
    if not CGROUP_ROOT.is_dir():
        raise SystemExit(f"{CGROUP_ROOT} is missing: this needs the cgroup v1 memory controller")
    g = CGROUP_ROOT / f"powerlow-bench-{os.getpid()}-{time.monotonic_ns()}"
    g.mkdir()
    try:
        (g / "memory.limit_in_bytes").write_text(str(limit))
        with contextlib.suppress(OSError):
            (g / "memory.memsw.limit_in_bytes").write_text(str(limit))    # no swap escape where swap exists
        yield g
    finally:
        for _ in range(50):
            try:
                g.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def run_in_cgroup(python: str, payload: dict, limit: int | None, timeout: float) -> dict:
    drop_caches()
    with memory_cgroup(limit) as g:
        procs = str(g / "cgroup.procs") if g else None

        def enter():
            if procs:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
        cmd = [python, __file__, "--inner", json.dumps(payload)]
        t = time.perf_counter()
        peaks = {"rss": 0, "cache": 0}
        stop = threading.Event()

        def sample():       # memory.stat split: anonymous memory (rss) vs page cache (cache) at their peaks
            while g is not None and not stop.wait(0.1):
                with contextlib.suppress(OSError, ValueError):
                    st = dict(l.split() for l in (g / "memory.stat").read_text().splitlines()[:20])
                    peaks["rss"] = max(peaks["rss"], int(st.get("rss", 0)) + int(st.get("mapped_file", 0)))
                    peaks["cache"] = max(peaks["cache"], int(st.get("cache", 0)))
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=enter,
                               env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", e.stderr or ""
            if isinstance(out, bytes):
                out, err = out.decode(), err.decode() if isinstance(err, bytes) else err
        wall = time.perf_counter() - t
        stop.set()
        sampler.join()
        res = {}
        lines = [l for l in (out or "").strip().splitlines() if l.startswith("{")]
        if rc == 0 and lines:
            res = json.loads(lines[-1])
        else:
            res = {"error": f"exit {rc}", "stderr": (err or "")[-600:]}
        res["wall_s"] = round(wall, 1)
        if g:
            res["cgroup_limit_bytes"] = limit
            res["cgroup_max_usage_bytes"] = int((g / "memory.max_usage_in_bytes").read_text())
            res["cgroup_peak_rss_mapped_bytes"] = peaks["rss"]      # sampled every 0.1 s
            res["cgroup_peak_cache_bytes"] = peaks["cache"]
            oom = (g / "memory.oom_control").read_text()
            res["oom_kills"] = int(next((l.split()[1] for l in oom.splitlines() if l.startswith("oom_kill ")), 0))
            res["failcnt"] = int((g / "memory.failcnt").read_text())
        return res


# -- setup -----------------------------------------------------------------------------------------------
def ensure_models(args) -> tuple[Path, Path]:
    from powerlow.default_model import powerlow_home
    syn = powerlow_home() / "synthetic"
    if args.moe:
        return ensure_moe(args, syn)
    hf = syn / "2gb-relu"
    gguf = Path(args.gguf) if args.gguf else syn / "2gb-relu-Q4_0.gguf"
    if not gguf.exists():
        print(f"making the synthetic 2 GB model in {hf} (minutes) ...", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--preset", "2gb", "--act", "relu",
                        "--gguf", "Q4_0", "--out", str(hf), "--gguf-out", str(gguf), "--overwrite"], check=True)
    model = Path(args.model) if args.model else gguf.with_suffix(".powerlow")
    if not (model / "manifest.json").exists():
        from powerlow.convert import convert
        print(f"converting {gguf} -> {model} ...", file=sys.stderr)
        convert(gguf, model, force=model.exists())
    return gguf, model


def ensure_moe(args, syn: Path) -> tuple[Path, Path]:
    """The synthetic qwen3moe GGUF of preset args.moe (scripts/synthetic_moe.py, made if missing), its powerlow
    model dir, and that dir profiled (expert frequencies: the plan pins the most chosen experts)."""
    gguf = Path(args.gguf) if args.gguf else syn / f"{args.moe}.gguf"
    if not gguf.exists():
        print(f"making the synthetic MoE model {gguf} (minutes) ...", file=sys.stderr)
        subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--preset", args.moe, "--out", str(gguf),
                        "--overwrite"], check=True)
    model = Path(args.model) if args.model else gguf.with_suffix(".powerlow")
    if not (model / "manifest.json").exists():
        from powerlow.convert import convert
        print(f"converting {gguf} -> {model} ...", file=sys.stderr)
        convert(gguf, model, force=model.exists())
    if not (model / "profile.safetensors").exists():
        print(f"profiling {model} (the router's expert choices on text) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "powerlow", "profile", str(model), "--tokens", "4096",
                        "-t", str(args.threads)], check=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    return gguf, model


def interpreter_baseline() -> int:
    """RSS of a Python that has imported powerlow (what the process costs before any model is loaded)."""
    code = (f"import {', '.join(BASELINE_IMPORTS)}\n"
            "from powerlow.util import current_rss_bytes\nprint(current_rss_bytes())")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=dict(os.environ, PYTHONPATH=str(HERE.parent))).stdout.strip())


def interpreter_cgroup_baseline() -> int:
    """What the same imports charge to a fresh memory cgroup after the page cache is dropped: their RSS and the
    page cache of every file they read (Python, numpy, tokenizers ...: ~100 MB here, ~87 MB of it cache that
    the kernel takes back under a limit). The engines' cgroup peaks compare with budget + this."""
    code = f"import {', '.join(BASELINE_IMPORTS)}"
    drop_caches()
    with memory_cgroup(8 << 30) as g:
        def enter():
            with open(g / "cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        subprocess.run([sys.executable, "-c", code], check=True, preexec_fn=enter,
                       env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
        return int((g / "memory.max_usage_in_bytes").read_text())


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--inner":
        a = json.loads(sys.argv[2])
        if a.get("kind"):
            res = inner_powerlow_generate(a) if a["engine"] == "powerlow" else inner_llamacpp_generate(a)
        else:
            res = inner_powerlow(a) if a["engine"] == "powerlow" else inner_llamacpp(a)
        print(json.dumps(res))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF (default: the 2 GB synthetic Q4_0, made if missing)")
    ap.add_argument("-m", "--model", help="powerlow model dir of that GGUF (default: converted next to it)")
    ap.add_argument("--moe", default=None, help="a synthetic mixture-of-experts preset (moe-2gb, moe-4gb: "
                    "scripts/synthetic_moe.py) instead of the dense 2 GB model; powerlow runs it in mode experts")
    ap.add_argument("--limits", default="50,25", help="memory limits in %% of the GGUF size (default 50,25)")
    ap.add_argument("--modes", default="dense", help="powerlow modes, e.g. dense,predict:0.25,threshold:0.25")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=16, help="decode tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--context", type=int, default=64, help="KV cache positions for powerlow (>= prompt + n)")
    ap.add_argument("--baseline", default=None, help="interpreter allowance subtracted from the limit for powerlow's "
                    "--budget (default: measured RSS after imports, rounded up to 16 MiB, + 16 MiB)")
    ap.add_argument("--config", help="TOML runtime config for powerlow (queue_depth, io_block, ...; not budget)")
    ap.add_argument("--variants", default=None, help="powerlow config variants run side by side in every round, "
                    "';'-separated sets of key=value (',' between keys; 'default' = none), e.g. "
                    "\"default;prefetch_depth=0;hot_fraction=0.5,cache_policy=lru\"")
    ap.add_argument("--unlimited", action="store_true", help="also run both engines without a limit")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--skip-probe", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all runs; the table shows medians")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", help="write all results to this file")
    ap.add_argument("--decode-input", choices=("greedy", "text"), default="greedy",
                    help="decode steps fed the previous argmax (greedy) or the text's next token (text: varied "
                         "inputs where a small random model's greedy output repeats one token)")
    ap.add_argument("--prompts", default=None, help="generate from real prompts instead of fixed decode inputs: "
                    "comma-separated kinds of " + ",".join(PROMPT_KINDS) + " (greedy, -n tokens each)")
    ap.add_argument("--drafts", default="none,ngram", help="powerlow drafters for --prompts (none,ngram,self,MODEL)")
    ap.add_argument("--lookup", type=int, default=10, help="llama.cpp prompt-lookup drafts a pass for --prompts "
                    "(LlamaPromptLookupDecoding num_pred_tokens; 0 = plain llama.cpp only)")
    ap.add_argument("--table", help="print the --prompts table of an earlier run's --json file and exit")
    args = ap.parse_args()
    if args.table:
        d = json.loads(Path(args.table).read_text())
        print_generate_table(d["results"], d.get("cgroup_baseline_bytes", 0))
        return 0
    if args.prompts:
        return main_generate(args)
    if os.geteuid() != 0:
        print("warning: not root: cgroups and drop_caches will fail", file=sys.stderr)
    from powerlow.config import format_size, parse_size
    if args.moe and args.modes == "dense":
        args.modes = "experts"
    gguf, model = ensure_models(args)
    size = gguf.stat().st_size
    base = parse_size(args.baseline) if args.baseline else (-(-interpreter_baseline() // (16 << 20)) + 1) * (16 << 20)
    from llamacpp_env import bench_python
    lpy = None if args.no_llamacpp else str(bench_python())
    common = {"threads": args.threads, "n": args.n, "prompt_tokens": args.prompt_tokens,
              "decode_input": args.decode_input}
    extra = {}
    if args.config:
        from powerlow.config import load_toml
        extra = {k: v for k, v in load_toml(args.config).items() if k not in ("budget_bytes", "threads", "mode",
                                                                               "density", "max_context")}
    modes = []
    for m in args.modes.split(","):
        name, _, d = m.partition(":")
        modes.append((name, float(d) if d else 1.0))
    variants = parse_variants(args.variants)
    cg_base = interpreter_cgroup_baseline()
    print(f"model {gguf.name}: {format_size(size)}; interpreter allowance {format_size(base)} (its cgroup charge "
          f"after imports, page cache included: {format_size(cg_base)}); "
          f"{args.threads} threads; decode {args.n} tokens after a {args.prompt_tokens}-token prompt", file=sys.stderr)
    results = []
    probe = [] if args.skip_probe else run_probe(model, [], "before")
    limits = ([None] if args.unlimited else []) + [int(size * float(p) / 100) for p in args.limits.split(",") if p.strip()]
    # with --repeats, every engine and mode runs once per round, rounds one after the other (the disk of a
    # shared VM drifts within minutes: alternating keeps each ratio side by side); the table shows medians
    for limit in [x for _ in range(args.repeats) for x in limits]:
        tag = "none" if limit is None else f"{100 * limit / size:.0f}%"
        if lpy:
            r = run_in_cgroup(lpy, {"engine": "llama.cpp", "gguf": str(gguf), "extra_bufts": limit is None, **common},
                              limit, args.timeout)
            r.update(limit=tag)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
        for (mode, dens), (vname, vextra) in [(m, v) for m in modes for v in variants]:
            budget = None if limit is None else limit - base
            cfg = {**extra, **vextra}
            refused = plan_refusal(model, budget, mode, dens, args.context, args.threads, cfg)
            if refused:
                r = {"engine": "powerlow", "mode": mode, "density": dens, "budget_bytes": budget, "limit": tag,
                     "refused": refused, "variant": vname}
                results.append(r)
                print(json.dumps(r), file=sys.stderr)
                continue
            r = run_in_cgroup(sys.executable, {"engine": "powerlow", "model": str(model), "budget": budget, "mode": mode,
                                               "density": dens, "context": args.context, "extra": cfg, **common},
                              limit, args.timeout)
            r.update(limit=tag, variant=vname)
            results.append(r)
            print(json.dumps(r), file=sys.stderr)
    if not args.skip_probe:
        probe += run_probe(model, results, "after")
    print_table(results, probe, size, cg_base)
    if args.json:
        Path(args.json).write_text(json.dumps({"gguf": str(gguf), "model": str(model), "size_bytes": size,
                                               "allowance_bytes": base, "cgroup_baseline_bytes": cg_base,
                                               "results": results, "probe": probe}, indent=1))
    return 0


def main_generate(args) -> int:
    """--prompts: each engine generates -n greedy tokens from each prompt kind inside each limit, rounds
    alternating; powerlow once per drafter, llama.cpp plain and with its prompt lookup."""
    from powerlow.config import format_size, parse_size
    if args.moe and args.modes == "dense":
        args.modes = "experts"
    gguf, model = ensure_models(args)
    size = gguf.stat().st_size
    base = parse_size(args.baseline) if args.baseline else (-(-interpreter_baseline() // (16 << 20)) + 1) * (16 << 20)
    from llamacpp_env import bench_python
    lpy = None if args.no_llamacpp else str(bench_python())
    kinds = [k.strip() for k in args.prompts.split(",") if k.strip()]
    bad = [k for k in kinds if k not in PROMPT_KINDS]
    if bad:
        raise SystemExit(f"--prompts: unknown kind {bad[0]!r}; choose from {', '.join(PROMPT_KINDS)}")
    ids = {k: prompt_ids(model, k) for k in kinds}
    drafts = [d.strip() for d in args.drafts.split(",") if d.strip()]
    extra = {}
    if args.config:
        from powerlow.config import load_toml
        extra = {k: v for k, v in load_toml(args.config).items() if k not in ("budget_bytes", "threads", "max_context",
                                                                               "draft")}
    cg_base = interpreter_cgroup_baseline()
    print(f"model {gguf.name}: {format_size(size)}; interpreter allowance {format_size(base)}; {args.threads} threads; "
          f"{args.n} greedy tokens from prompts " + ", ".join(f"{k} ({len(v)} tokens)" for k, v in ids.items()),
          file=sys.stderr)
    limits = ([None] if args.unlimited else []) + [int(size * float(p) / 100) for p in args.limits.split(",") if p.strip()]
    results = []
    for rnd in range(args.repeats):
        for limit in limits:
            tag = "none" if limit is None else f"{100 * limit / size:.0f}%"
            for kind in kinds:
                common = {"threads": args.threads, "n": args.n, "kind": kind, "prompt_ids": ids[kind]}
                runs = []
                if lpy:
                    for look in ([0, args.lookup] if args.lookup else [0]):
                        runs.append((lpy, {"engine": "llama.cpp", "gguf": str(gguf), "extra_bufts": limit is None,
                                           "lookup": look, **common}))
                for d in drafts:
                    budget = None if limit is None else limit - base
                    runs.append((sys.executable, {"engine": "powerlow", "model": str(model), "budget": budget,
                                                  "draft": d, "extra": extra, **common}))
                for py, payload in runs:
                    r = run_in_cgroup(py, payload, limit, args.timeout)
                    r.update(limit=tag, round=rnd, kind=kind, engine=payload["engine"])
                    for key in ("draft", "lookup"):
                        if key in payload:
                            r.setdefault(key, payload[key])
                    results.append(r)
                    short = {k: v for k, v in r.items() if k != "tokens"}
                    print(json.dumps(short), file=sys.stderr)
                    if args.json:        # after every run: a long benchmark broken off keeps what it measured
                        Path(args.json).write_text(json.dumps({
                            "gguf": str(gguf), "model": str(model), "size_bytes": size, "allowance_bytes": base,
                            "cgroup_baseline_bytes": cg_base, "prompt_ids": ids, "results": results}, indent=1))
    print_generate_table(results, cg_base)
    return 0


def _gen_label(r: dict) -> str:
    if r.get("engine") == "llama.cpp":
        return "llama.cpp " + (f"lookup {r['lookup']}" if r.get("lookup") else "plain")
    return f"powerlow {r.get('draft')}"


def print_generate_table(results: list, cg_base: int) -> None:
    """Per limit and prompt kind: the median run of each engine (over rounds), ratios against llama.cpp plain and
    llama.cpp with prompt lookup at the same limit, whether the tokens equal the engine's plain greedy ones."""
    import statistics
    MiB = 1 << 20
    groups: dict = {}
    for r in results:
        groups.setdefault((r["limit"], r["kind"], _gen_label(r)), []).append(r)
    med = {}
    for key, rows in groups.items():
        ok = [r for r in rows if "decode_tok_s" in r]
        if not ok:
            med[key] = rows[0]
            continue
        m = statistics.median_low([r["decode_tok_s"] for r in ok])
        row = dict(next(r for r in ok if r["decode_tok_s"] == m))
        row["runs"] = [r["decode_tok_s"] for r in ok]
        row["oom_any"] = sum(r.get("oom_kills", 0) for r in rows)
        med[key] = row
    print(f"{'limit':>6s} {'kind':5s} {'engine':22s} {'tok/s':>7s} {'x plain':>8s} {'x lookup':>8s} {'MB read/tok':>11s} "
          f"{'tok/pass':>8s} {'accept':>6s} {'RSS MiB':>8s} {'OOM':>3s} {'same':>5s}  runs")
    ratios: dict = {}
    for (limit, kind, label), r in med.items():
        if "decode_tok_s" not in r:
            print(f"{limit:>6s} {kind:5s} {label:22s} {'failed':>7s}  {r.get('error')} {r.get('stderr', '')[-200:]!r}")
            continue
        plain = med.get((limit, kind, "llama.cpp plain"), {}).get("decode_tok_s")
        look = next((v.get("decode_tok_s") for (l, k, lab), v in med.items()
                     if l == limit and k == kind and lab.startswith("llama.cpp lookup")), None)
        ref = med.get((limit, kind, "powerlow none" if r["engine"] == "powerlow" else "llama.cpp plain"), {})
        same = "-" if not ref.get("tokens") or ref is r else ("yes" if ref["tokens"] == r["tokens"] else "NO")
        spec = r.get("speculation") or {}
        x1 = r["decode_tok_s"] / plain if plain else float("nan")
        x2 = r["decode_tok_s"] / look if look else float("nan")
        ratios.setdefault((limit, label), []).append((x1, x2))
        print(f"{limit:>6s} {kind:5s} {label:22s} {r['decode_tok_s']:7.2f} {x1:8.2f} {x2:8.2f} "
              f"{r['read_bytes_per_token'] / 1e6:11.1f} {spec.get('tokens_per_pass', 1.0):8.2f} "
              f"{spec.get('acceptance', 0.0):6.2f} {r['peak_rss_bytes'] / MiB:8.0f} {r.get('oom_any', 0):>3d} {same:>5s}  "
              + "/".join(f"{x:.2f}" for x in r.get("runs", [])))
    print("median over prompt kinds of the per-kind ratios:")
    for (limit, label), xs in ratios.items():
        print(f"  {limit:>6s} {label:22s} x plain {statistics.median(x for x, _ in xs):.2f}, "
              f"x lookup {statistics.median(y for _, y in xs):.2f}")


def plan_refusal(model: Path, budget, mode: str, density: float, context: int, threads: int,
                 extra: dict | None = None) -> str | None:
    """The plan's refusal message if ``budget`` is below the minimum (checked here: the engine loads the resident
    weights before it plans, so inside a limit that small it would be OOM-killed instead of refusing)."""
    if budget is None:
        return None
    extra = extra or {}
    from powerlow.config import RuntimeConfig
    from powerlow.errors import PowerlowError
    from powerlow.manifest import load_manifest
    from powerlow.plan import make_plan
    try:
        make_plan(model, load_manifest(model), RuntimeConfig(budget_bytes=max(1, budget), mode=mode, density=density,
                                                             max_context=context, threads=threads, **extra))
    except PowerlowError as e:
        return str(e)
    return None


def run_probe(model: Path, results: list, when: str) -> list:
    """Random O_DIRECT reads of ffn.bin at powerlow's read sizes (merged and single bundles) and depth."""
    from powerlow.config import RuntimeConfig
    from powerlow.io import probe_random_read
    from powerlow.manifest import load_manifest
    from powerlow.store import StoreInfo
    rt = RuntimeConfig()
    stride = StoreInfo.from_json(load_manifest(model)["ffn"]).layout.stride
    # the merged read of dense mode (adjacent bundles up to io_block) and one bundle (sparse modes read
    # scattered single bundles)
    blocks = sorted({r["read_block_bytes"] for r in results if r.get("read_block_bytes")}
                    | {max(stride, rt.io_block_bytes // stride * stride), stride})
    depth = next((r["queue_depth"] for r in results if r.get("queue_depth")), rt.queue_depth)
    out = []
    for b in blocks:
        p = probe_random_read(model / "ffn.bin", block_bytes=b, depth=depth, seconds=3.0)
        p["when"] = when
        out.append(p)
        print(json.dumps(p), file=sys.stderr)
    return out


def parse_variants(text: str | None) -> list[tuple[str, dict]]:
    """``--variants`` -> [(label, config overrides)]: "default;prefetch_depth=0;hot_fraction=0.5,cache_policy=lru"."""
    if not text:
        return [("", {})]
    out = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        kv = {}
        if part != "default":
            for item in part.split(","):
                key, eq, val = (x.strip() for x in item.partition("="))
                if not eq or not key:
                    raise SystemExit(f"--variants: {item!r} is not key=value (e.g. prefetch_depth=0)")
                for conv in (int, float):
                    try:
                        kv[key] = conv(val)
                        break
                    except ValueError:
                        pass
                else:
                    kv[key] = val
        out.append((part, kv))
    return out or [("", {})]


def median_rows(results: list) -> list:
    """One row per (limit, engine, mode, density): the run with the median decode speed, with every run's
    speed in ``runs`` (a single run passes through)."""
    import statistics
    groups: dict = {}
    for r in results:
        groups.setdefault((r.get("limit"), r.get("engine"), r.get("mode"), r.get("density"), r.get("variant", "")),
                          []).append(r)
    out = []
    for rows in groups.values():
        ok = [r for r in rows if "decode_tok_s" in r]
        if not ok:
            out.append(rows[0])
            continue
        med = statistics.median_low([r["decode_tok_s"] for r in ok])
        r = dict(next(r for r in ok if r["decode_tok_s"] == med))
        r["runs"] = [x["decode_tok_s"] for x in ok]
        out.append(r)
    return out


def print_table(results: list, probe, size: int, cg_base: int = 0) -> None:
    from powerlow.bench import repeat_warning
    MiB = 1 << 20
    results = median_rows(results)
    print(f"{'limit':>6s} {'engine':10s} {'mode':14s} {'decode tok/s':>12s} {'x llama':>8s} {'read MB/tok':>11s} "
          f"{'cg peak MiB':>11s} {'RSS MiB':>8s} {'base MiB':>8s} {'OOM':>4s}  note")
    ref = {r["limit"]: r["decode_tok_s"] for r in results if r.get("engine") == "llama.cpp" and "decode_tok_s" in r}
    for r in results:
        eng = r.get("engine", "?")
        mode = (f"{r['mode']}" + (f" d={r['density']}" if r.get("density", 1) < 1 else "")) if eng == "powerlow" else \
            ("repacked" if r.get("extra_bufts") else "mmap")
        if r.get("variant"):
            mode += f" [{r['variant']}]"
        if r.get("refused"):
            import re
            m = re.search(r"minimum ([0-9.]+ [KMG]iB)", r["refused"])
            print(f"{r['limit']:>6s} {eng:10s} {mode:14s} {'refused':>12s}  budget {r['budget_bytes'] / MiB:.0f} MiB "
                  f"is below the plan's minimum {m.group(1) if m else '?'} (resident weights alone do not fit)")
            continue
        if "decode_tok_s" not in r:
            print(f"{r['limit']:>6s} {eng:10s} {mode:14s} {'failed':>12s}  {r.get('error')} {r.get('stderr', '')[-200:]!r}")
            continue
        x = r["decode_tok_s"] / ref[r["limit"]] if ref.get(r["limit"]) else float("nan")
        note = ""
        if "bundle_read_gbps" in r:
            note = f"bundle reads {r['bundle_read_gbps']:.2f} GB/s (all reads {r.get('all_read_gbps', 0):.2f}), hit {r['cache_hit_rate']:.2f}, io wait {r['io_wait_s']}s/{r['decode_s']}s"
        if eng == "powerlow" and r.get("budget_bytes") and "cgroup_max_usage_bytes" in r:
            over_rss = r["peak_rss_bytes"] - r["budget_bytes"] - r.get("baseline_rss_bytes", 0)
            over_cg = r["cgroup_max_usage_bytes"] - r["budget_bytes"] - cg_base
            note += (f"; RSS {'within' if over_rss <= 0 else f'{over_rss / MiB:.0f} MiB over'} budget + base, cg peak "
                     f"{'within' if over_cg <= 0 else f'{over_cg / MiB:.0f} MiB over'} budget + {cg_base / MiB:.0f} MiB cg base")
        if len(r.get("runs", [])) > 1:
            note += f" runs {'/'.join(f'{x:.2f}' for x in r['runs'])}"
        if eng == "powerlow" and "distinct_inputs" in r and repeat_warning(
                {"budget_bytes": r.get("budget_bytes"), "decode_input": r.get("decode_input"), "decode_tokens": len(r["tokens"]),
                 "distinct_decode_inputs": r["distinct_inputs"]}):
            note += f"; only {r['distinct_inputs']} distinct decode inputs (the model repeats itself: use --decode-input text)"
        print(f"{r['limit']:>6s} {eng:10s} {mode:14s} {r['decode_tok_s']:12.2f} {x:8.2f} {r['read_bytes_per_token'] / 1e6:11.1f} "
              f"{r.get('cgroup_max_usage_bytes', 0) / MiB:11.0f} {r['peak_rss_bytes'] / MiB:8.0f} "
              f"{r.get('baseline_rss_bytes', 0) / MiB:8.0f} {r.get('oom_kills', 0):>4d}  {note}")
    if probe:
        for p in probe:
            print(f"probe ({p['when']} the runs): random {'O_DIRECT ' if p['direct'] else ''}reads of "
                  f"{p['block_bytes'] // 1024} KiB, depth {p['depth']}: {p['gbps']:.2f} GB/s")


if __name__ == "__main__":
    sys.exit(main())
