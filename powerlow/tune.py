"""`powerlow tune`: decode speed and bytes read per token against the memory budget; a plot; a suggested config.

    powerlow tune -m DIR --budgets 25%,50%,75%,100%      # or sizes: --budgets 900MiB,1.2GiB,2GiB

Percentages are of the model's full footprint: every weight in RAM plus the tokenizer, KV cache and scratch
the plan counts at the same context (so 100% needs no reads). Each budget loads the model with that budget and
runs `powerlow bench`'s measurement (prompt, then -n decode tokens, median of --repeats). Budgets below the
minimum are listed as refused, with the minimum. The suggested config is the smallest budget whose decode
speed is within --within (default 10%) of the fastest one measured; it is written as TOML for --config.
"""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--budgets", default="25%,50%,75%,100%",
                   help="comma-separated budgets: percentages of the full footprint or sizes (default 25%%,50%%,75%%,100%%)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length per measurement (default 16)")
    p.add_argument("--repeats", type=int, default=1, help="repeats per budget; medians are reported (default 1)")
    p.add_argument("--plot", default="powerlow-tune.png", help="PNG to draw (default powerlow-tune.png; '' for none)")
    p.add_argument("--write-config", default="powerlow-tune.toml", help="suggested config file (default powerlow-tune.toml)")
    p.add_argument("--within", type=float, default=0.10, help="speed tolerance for the suggestion (default 0.10)")
    from .bench import add_decode_input
    add_decode_input(p)


def full_footprint(model_dir: Path, manifest: dict, rt) -> tuple[int, int]:
    """(bytes with everything resident at the plan's context, KV positions) for the runtime ``rt``."""
    from .plan import ffn_nchunks
    from .sizes import auto_context, kv_bytes_per_position, scratch_bytes, tokenizer_bytes
    from .st_header import tensor_bytes
    from .store import StoreInfo
    cfg = manifest["config"]
    weights = tensor_bytes(model_dir / "resident.safetensors")
    info = StoreInfo.from_json(manifest["ffn"])
    ffn = info.total_bytes
    ctx = rt.max_context or auto_context(cfg, weights + ffn)
    ctx = min(ctx, cfg["max_positions"])
    extra = (ctx * kv_bytes_per_position(cfg) + scratch_bytes(cfg, ctx, ffn_nchunks(info.n_clusters, rt.n_threads))
             + tokenizer_bytes(model_dir / "tokenizer.json"))
    return weights + ffn + extra, ctx


def parse_budgets(text: str, full: int) -> list[tuple[str, int]]:
    from .config import parse_size
    from .errors import PowerlowError
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.endswith("%"):
            try:
                pct = float(item[:-1])
            except ValueError:
                raise PowerlowError(f"--budgets: {item!r} is not a percentage; write e.g. 50%") from None
            if not 0 < pct <= 1000:
                raise PowerlowError(f"--budgets: {item} must be between 0% and 1000%")
            out.append((item, int(full * pct / 100)))
        else:
            out.append((item, parse_size(item)))
    if not out:
        raise PowerlowError("--budgets is empty; give e.g. 25%,50%,100%")
    return out


def measure(model_dir: Path, rt, *, n_tokens: int, prompt_tokens: int, repeats: int,
            decode_input: str = "greedy") -> dict:
    import gc

    from .bench import run_bench
    from .util import release_free_heap
    from .model import load
    from .util import reset_peak_rss
    gc.collect()                 # the previous budget's model is gone before this one's peak is measured
    release_free_heap()
    reset_peak_rss()
    model = load(model_dir, rt)
    try:
        res = run_bench(model, n_tokens=n_tokens, prompt_tokens=prompt_tokens, repeats=repeats,
                        decode_input=decode_input)
        src = model.tf.ffn_source
        if hasattr(src, "counters"):
            res.update(src.counters())
        return res
    finally:
        model.tf.close()


def suggest(rows: list[dict], within: float) -> dict | None:
    ok = [r for r in rows if "decode_tok_s" in r]
    if not ok:
        return None
    best = max(r["decode_tok_s"] for r in ok)
    good = [r for r in ok if r["decode_tok_s"] >= (1 - within) * best]
    return min(good, key=lambda r: r["budget_bytes"])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in rows if "decode_tok_s" in r]
    x = [r["budget_bytes"] / 2**20 for r in ok]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [r["decode_tok_s"] for r in ok], "o-", color="tab:blue", label="decode tokens/s")
    ax.set_xlabel("memory budget (MiB)")
    ax.set_ylabel("decode tokens/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(x, [r.get("read_bytes_per_token", 0) / 2**20 for r in ok], "s--", color="tab:red", label="MiB read per token")
    ax2.set_ylabel("MiB read from storage per token", color="tab:red")
    for r in rows:
        if "decode_tok_s" not in r:
            ax.axvline(r["budget_bytes"] / 2**20, color="grey", ls=":", lw=1)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    from .bench import repeat_warning
    from .config import dump_toml, format_size
    from .default_model import resolve_model
    from .errors import PowerlowError
    from .manifest import load_manifest
    from .plan import minimum_budget

    from .config import RuntimeConfig
    base = RuntimeConfig.from_args(args)
    model_dir = Path(resolve_model(args.model))
    manifest = load_manifest(model_dir)
    full, ctx = full_footprint(model_dir, manifest, base)
    if base.max_context is None:
        base = base.replace(max_context=ctx)          # the same KV capacity at every budget
    budgets = parse_budgets(args.budgets, full)
    n = args.n_tokens or 16
    print(f"{model_dir}: full footprint {format_size(full)} (context {base.max_context}), mode {base.mode}, "
          f"{base.n_threads} threads, {n} decode tokens per run", file=sys.stderr)
    rows = []
    warn = None
    hdr = f"{'budget':>10s} {'bytes':>11s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'MiB read/tok':>12s} {'hit rate':>8s} {'peak RSS MiB':>12s}"
    print(hdr)
    for label, b in budgets:
        rt = base.replace(budget_bytes=b)
        row = {"label": label, "budget_bytes": b}
        try:
            res = measure(model_dir, rt, n_tokens=n, prompt_tokens=args.prompt_tokens, repeats=args.repeats,
                          decode_input=args.decode_input)
            warn = warn or repeat_warning(res)
            row.update({k: res.get(k) for k in ("decode_tok_s", "prefill_tok_s", "read_bytes_per_token",
                                                 "cache_hit_rate", "peak_rss_bytes")})
            print(f"{label:>10s} {format_size(b):>11s} {row['decode_tok_s']:12.2f} {row['prefill_tok_s']:13.2f} "
                  f"{row['read_bytes_per_token'] / 2**20:12.1f} {row['cache_hit_rate']:8.3f} {row['peak_rss_bytes'] / 2**20:12.0f}")
            if "draft_speedup" in res:          # --draft given: the speculative generate figures (powerlow.bench)
                row.update({k: v for k, v in res.items() if k.startswith(("draft", "generate_", "read_bytes_per_gen"))})
                print(f"{'':>10s} draft {res['draft']}: generate {res['generate_tok_s_plain']:.2f} -> "
                      f"{res['generate_tok_s_draft']:.2f} tok/s (x{res['draft_speedup']:.2f}), acceptance "
                      f"{res['draft_acceptance']:.2f}, {res['draft_tokens_per_pass']:.2f} tokens a pass, MiB read per "
                      f"generated token {res['read_bytes_per_generated_token_plain'] / 2**20:.1f} -> "
                      f"{res['read_bytes_per_generated_token_draft'] / 2**20:.1f}"
                      + ("" if res["draft_same_tokens"] else "  TOKENS DIFFER FROM PLAIN GREEDY"))
        except PowerlowError as e:
            need = minimum_budget(model_dir, manifest, rt)
            row["refused"] = str(e)
            print(f"{label:>10s} {format_size(b):>11s}   refused: below the minimum {format_size(need)}")
        sys.stdout.flush()
        rows.append(row)
    if warn:
        print(warn, file=sys.stderr)
    if args.plot:
        plot(rows, args.plot, f"{model_dir.name}: mode {base.mode}, {base.n_threads} threads")
        print(f"plot: {args.plot}")
    best = suggest(rows, args.within)
    if best is None:
        print("no budget ran; raise --budgets above the minimum")
        return 1
    kw = {"budget_bytes": -(-best["budget_bytes"] // (1 << 20)) << 20, "threads": base.threads or None,
          "mode": base.mode, "density": base.density if base.mode in ("threshold", "predict") else None,
          "max_context": base.max_context, "cache_policy": base.cache_policy, "queue_depth": base.queue_depth,
          "prefetch_depth": base.prefetch_depth, "o_direct": base.o_direct,
          "draft": None if base.draft == "auto" else base.draft, "draft_k": base.draft_k or None}
    text = (f"# powerlow tune suggestion for {model_dir}: the smallest budget within {args.within:.0%} of the fastest "
            f"({best['decode_tok_s']:.2f} decode tok/s)\n" + dump_toml({k: v for k, v in kw.items() if v is not None}))
    if args.write_config:
        Path(args.write_config).write_text(text)
        print(f"suggested config ({args.write_config}):")
    print(text, end="")
    return 0
