"""`powerlow bench`: prefill and decode speed, memory and traffic figures; --json prints one object."""
from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np

BENCH_TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
              "grain, salt and wool. Over the centuries it grew into a busy port with bridges, markets and schools. ")


def add_arguments(p) -> None:
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length for the prefill measurement")
    p.add_argument("--repeats", type=int, default=3, help="repeats; medians are reported")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_decode_input(p)


DECODE_INPUTS = ("greedy", "text")


def add_decode_input(p) -> None:
    p.add_argument("--decode-input", choices=DECODE_INPUTS, default="greedy",
                   help="what each decode step is fed: greedy = the previous step's argmax (default); text = the "
                        "bench text's next token (teacher forcing: varied inputs where greedy decoding of a "
                        "random synthetic model repeats one token, which a neuron cache would serve for free)")


def weight_bytes_per_token(tf) -> int:
    """Bytes of weights one decode step touches in the mode's dense equivalent (attention + lm_head + FFN); a
    mixture of experts touches its chosen experts (k of E) and its shared expert."""
    cfg = tf.config
    if cfg.moe:
        shared = sum(getattr(w, "nbytes", 0) for n, w in tf.w.items() if "_shexp" in n)
        return tf.dense_weight_bytes + tf.store_info.total_bytes * cfg.n_experts_used // cfg.n_experts + shared
    return tf.dense_weight_bytes + tf.store_info.total_bytes


def read_probe_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Plain read bandwidth over a buffer larger than the caches (the C probe if the kernels have one)."""
    from .io import aligned_buffer
    buf = aligned_buffer(nbytes)
    buf[:] = 1
    try:
        from . import kernels
        probe = kernels.read_probe
    except (ImportError, AttributeError):
        probe = lambda b: int(b.view(np.uint64).sum())  # noqa: E731
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        probe(buf)
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def repeat_warning(res: dict) -> str | None:
    """A warning when a run under a budget was fed only a few distinct tokens by greedy decoding (a random
    synthetic model's output loops): the neuron cache then serves nearly every step and the figures flatter it."""
    n, k = res.get("decode_tokens") or 0, res.get("distinct_decode_inputs")
    if res.get("budget_bytes") is None or res.get("decode_input") != "greedy" or k is None or n < 8 or k * 2 > n:
        return None
    return (f"warning: greedy decoding fed only {k} distinct tokens in {n} steps (the model repeats itself); "
            "cached neurons serve repeated inputs for free, so these figures flatter the cache: "
            "use --decode-input text")


def run_bench(model, *, n_tokens: int, prompt_tokens: int, repeats: int, decode_input: str = "greedy") -> dict:
    """Prefill of prompt_tokens, then n_tokens decode steps, repeats times. decode_input: "greedy" feeds each
    step the previous step's argmax, "text" the bench text's next token (the same forward work, varied inputs)."""
    if decode_input not in DECODE_INPUTS:
        raise ValueError(f"decode_input must be one of {DECODE_INPUTS}, got {decode_input!r}")
    tf = model.tf
    base = model.tokenize(BENCH_TEXT * 40, add_special=False)
    if prompt_tokens + n_tokens >= len(base):
        base = base * ((prompt_tokens + n_tokens) // len(base) + 1)
    prompt = base[:prompt_tokens]
    forced = decode_input == "text"
    pre, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        tf.forward(prompt, start_pos=0, last_only=True)
        pre.append(prompt_tokens / (time.perf_counter() - t))
        tok = base[prompt_tokens] if forced else prompt[-1]
        fed = []
        t = time.perf_counter()
        for i in range(n_tokens):
            fed.append(tok)
            logits = tf.forward([tok], start_pos=prompt_tokens + i, last_only=True)
            tok = base[prompt_tokens + i + 1] if forced else int(np.argmax(logits[-1]))
        dec.append(n_tokens / (time.perf_counter() - t))
    decode = statistics.median(dec)
    wbytes = weight_bytes_per_token(tf)
    ffn = tf.ffn
    density = ffn.clusters_used / max(1, ffn.clusters_total)
    extra = getattr(tf.ffn_source, "counters", lambda: {})()
    from .util import peak_rss_bytes
    res = {
        "model": str(tf.dir),
        "format": tf.manifest["formats"]["ffn"],
        "threads": tf.runtime.n_threads,
        "budget_bytes": tf.runtime.budget_bytes,
        "mode": tf.runtime.mode,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": n_tokens,
        "decode_input": decode_input,
        "distinct_decode_inputs": len(set(fed)),
        "prefill_tok_s": round(statistics.median(pre), 2),
        "decode_tok_s": round(decode, 2),
        "decode_tok_s_all": [round(x, 2) for x in dec],
        "peak_rss_bytes": peak_rss_bytes(),
        "weight_bytes_per_token": wbytes,
        "effective_gbps": round(wbytes * decode / 1e9, 2),
        # a DRAM probe needs a buffer far larger than L3 (256 MiB): not under a budget, which it would break
        "probe_gbps": round(read_probe_gbps(), 2) if tf.runtime.budget_bytes is None else None,
        "read_bytes_per_token": 0,          # resident run: nothing streamed
        "cache_hit_rate": 1.0,
        "predictor_recall": None,
        "density": round(density, 4),
        "isa": getattr(tf.ops, "isa", "reference"),
    }
    res.update(extra)                        # the cluster source's counters (offloaded runs)
    if tf.runtime.draft not in ("none", "auto"):       # asked for: --draft ngram|self|MODEL
        res.update(speculative_bench(model, prompt, n_tokens, repeats))
    if tf.predictor is not None and hasattr(tf.predictor, "describe"):
        res["predictor_recall"] = tf.predictor.describe().get("recall")
    if tf.ffn.router is not None:            # MoE: the router is exact; the lookahead is what prefetching uses
        d = tf.ffn.router.describe()
        res.update(predictor_recall=d["recall"], experts=tf.config.n_experts, experts_per_token=tf.config.n_experts_used,
                   expert_lookahead_recall=d["lookahead_recall"],
                   expert_lookahead_recall_per_layer=d["lookahead_recall_per_layer"])
    return res


def speculative_bench(model, prompt: list[int], n_tokens: int, repeats: int) -> dict:
    """Greedy generation of n_tokens from the bench prompt with the config's drafter, and without one, in turns:
    decode speeds, acceptance, tokens per target pass, bytes read per generated token. The bench text repeats
    itself, which prompt lookup catches: a best case; `scripts/bench_oversized.py --prompts` has real prompts."""
    from .generate import SamplingParams
    from .util import read_bytes_so_far
    tf = model.tf
    src = tf.ffn_source
    runs = {"none": [], "draft": []}
    spec = None
    read = {}
    for _ in range(repeats):
        for which, drafter in (("none", None), ("draft", model.drafter())):
            r0 = read_bytes_so_far(src)
            toks = [t.id for t in model._generate(prompt, n_tokens, SamplingParams(), drafter, tf.runtime.draft_k)]
            runs[which].append(model.stats.decode_tok_s)
            read[which] = (read_bytes_so_far(src) - r0) / max(1, len(toks))
            if which == "draft":
                spec = model.stats.extra["speculation"].as_dict()
                same = toks == ref
            else:
                ref = toks
    plain, fast = statistics.median(runs["none"]), statistics.median(runs["draft"])
    return {"draft": tf.runtime.draft, "generate_tok_s_plain": round(plain, 2), "generate_tok_s_draft": round(fast, 2),
            "draft_speedup": round(fast / plain, 3) if plain else None, "draft_same_tokens": same,
            "draft_acceptance": spec["acceptance"], "draft_acceptance_per_position": spec["acceptance_per_position"],
            "draft_tokens_per_pass": spec["tokens_per_pass"],
            "read_bytes_per_generated_token_plain": int(read["none"]),
            "read_bytes_per_generated_token_draft": int(read["draft"])}


def main(args) -> int:
    from .model import load

    from .config import RuntimeConfig
    cfg = RuntimeConfig.from_args(args)
    n_tokens = args.n_tokens or 32
    if cfg.budget_bytes is not None and cfg.max_context is None:
        # the bench knows its sequence: a KV cache of exactly that many positions, the rest of the budget to weights
        cfg = cfg.replace(max_context=args.prompt_tokens + n_tokens)
    from .default_model import resolve_model
    from .quality import describe
    model_dir = resolve_model(args.model)
    msg, _ = describe(model_dir, cfg.mode, cfg.density)
    if msg:
        print(f"powerlow: {msg}", file=sys.stderr)
    model = load(model_dir, cfg)
    res = run_bench(model, n_tokens=n_tokens, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                    decode_input=args.decode_input)
    warn = repeat_warning(res)
    if warn:
        print(warn, file=sys.stderr)
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:24s} {v}")
    return 0
