"""`powerlow eval`: perplexity on held-out text, with the speed and FFN density it ran at.

Tokens are fed one at a time (the decode path, where a predictor chooses clusters per token; a batched
prefill would compute the union of its tokens' clusters), in windows of --window tokens that each start a
fresh sequence. Default text: the held-out part of CPython's pydoc topics (`powerlow profile` calibrates on
the rest; see powerlow.profile.default_texts). ``density`` is the share of FFN clusters actually computed.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .errors import PowerlowError

DEFAULT_TOKENS = 1024
DEFAULT_WINDOW = 512


def _log_softmax_at(logits: np.ndarray, idx: int) -> float:
    z = logits.astype(np.float64)
    m = z.max()
    return float(z[idx] - m - np.log(np.exp(z - m).sum()))


def evaluate(tf, text: str | None = None, *, n_tokens: int = DEFAULT_TOKENS, window: int = DEFAULT_WINDOW) -> dict:
    """Perplexity of ``tf`` (an engine.Transformer) on ``text``; a dict of figures."""
    from .profile import default_texts, token_windows

    if n_tokens < 2:
        raise PowerlowError(f"--tokens {n_tokens}: evaluate at least 2 tokens")
    if window < 2:
        raise PowerlowError(f"--window {window}: must be >= 2")
    if text is None:
        text = default_texts()[1]
    windows = token_windows(tf.tokenizer, text, n_tokens, min(window, tf.kv.limit), "evaluation")
    nll, scored, fed = 0.0, 0, 0
    used0, total0 = tf.ffn.clusters_used, tf.ffn.clusters_total
    t0 = time.perf_counter()
    for w in windows:
        for i in range(len(w)):
            logits = tf.forward(w[i: i + 1], start_pos=i, last_only=True)[0]
            fed += 1
            if i + 1 < len(w):
                nll -= _log_softmax_at(logits, int(w[i + 1]))
                scored += 1
    seconds = time.perf_counter() - t0
    if scored == 0:
        raise PowerlowError("no token to score; give more text or raise --tokens")
    used, total = tf.ffn.clusters_used - used0, tf.ffn.clusters_total - total0
    pred = tf.predictor
    out = {"mode": tf.runtime.mode, "target_density": tf.runtime.density,
           "density": round(used / max(1, total), 4), "ppl": round(float(np.exp(nll / scored)), 4),
           "nll_per_token": round(nll / scored, 5), "tokens": scored, "tok_s": round(fed / seconds, 2),
           "threads": tf.runtime.n_threads, "ffn_fmt": tf.store_info.layout.fmt,
           "ffn_down_fmt": tf.store_info.layout.down_fmt}
    if pred is not None and hasattr(pred, "describe"):
        out.update(pred.describe())
    counters = getattr(tf.ffn_source, "counters", None)       # offloaded runs: cache hits, bytes read
    if counters is not None:
        out.update({k: v for k, v in counters().items() if k not in out})
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", default=None, metavar="FILE", help="text to score (default: held-out pydoc topics)")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens to feed (default -n, else {DEFAULT_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"tokens per sequence (default {DEFAULT_WINDOW})")
    p.add_argument("--predictor", default=None, help="run this predictor of powerlow.predictors.PREDICTORS "
                   "(e.g. static) instead of the mode's, at --density")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args) -> int:
    from .default_model import resolve_model
    from .engine import Transformer
    from .profile import read_texts

    from .config import RuntimeConfig
    rt = RuntimeConfig.from_args(args)
    model_dir = resolve_model(args.model)
    text = read_texts([args.text]) if args.text else None
    n = args.tokens or args.n_tokens or DEFAULT_TOKENS
    tf = Transformer(model_dir, rt)
    if args.predictor:
        from .predictors import make_predictor
        tf.predictor = tf.ffn.predictor = make_predictor(tf, args.predictor)
    r = evaluate(tf, text, n_tokens=n, window=args.window)
    tf.close()
    r = {"model": str(model_dir), **r}
    _record_quality(model_dir, rt, args, text, n, r)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens; mode {r['mode']}, FFN density {r['density']:.3f}, "
              f"{r['tok_s']:.1f} tok/s ({r['threads']} threads)"
              + (f"; x{r['ppl_vs_dense']:.3f} of dense ({r['dense_ppl']:.3f})" if "ppl_vs_dense" in r else ""))
    return 0


def _record_quality(model_dir, rt, args, text, n, r) -> None:
    """Keep the figure in the model dir's quality.json (what `run` prints in a lossy mode), with the dense
    perplexity of the same tokens (measured now if it is not there yet); adds ppl_vs_dense to r."""
    import hashlib
    import sys
    from . import quality
    from .engine import Transformer
    key = hashlib.sha256(f"{n}:{args.window}:".encode() + (text or "<default>").encode()).hexdigest()[:16]
    name = args.text or "the held-out pydoc topics"
    dense = r["ppl"] if r["mode"] == "dense" else quality.dense_ppl(model_dir, key)
    if dense is None:
        print("powerlow: measuring the dense perplexity of the same tokens, to give the mode's cost ...", file=sys.stderr)
        d = Transformer(model_dir, rt.replace(mode="dense", density=1.0))
        try:
            dense = evaluate(d, text, n_tokens=n, window=args.window)["ppl"]
        finally:
            d.close()
    r["dense_ppl"], r["ppl_vs_dense"] = dense, round(r["ppl"] / dense, 4)
    try:
        if r["mode"] != "dense":
            quality.record(model_dir, {"mode": "dense", "target_density": 1.0, "predictor": None, "text": key,
                                       "text_name": name, "tokens": r["tokens"], "ppl": dense, "dense_ppl": dense})
        quality.record(model_dir, {"mode": r["mode"], "target_density": r["target_density"],
                                   "predictor": args.predictor, "text": key, "text_name": name, "tokens": r["tokens"],
                                   "density": r["density"], "ppl": r["ppl"], "dense_ppl": dense})
    except OSError as e:
        print(f"powerlow: note: cannot keep the figure in {model_dir}/quality.json ({e.strerror}); `run` will not "
              "know this mode's measured cost", file=sys.stderr)
