"""`powerlow run`: generate text, streamed to stdout; stats on stderr."""
from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="format the prompt with the model's chat template")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="go on past end-of-sequence tokens until -n")
    p.add_argument("--plan", action="store_true", help="print how the memory budget is spent, then exit")


def main(args) -> int:
    from .default_model import resolve_model
    from .model import load

    from .config import RuntimeConfig
    cfg = RuntimeConfig.from_args(args)
    n = 64 if args.n_tokens is None else args.n_tokens
    model_dir = resolve_model(args.model)
    if cfg.budget_bytes is not None and cfg.max_context is None:
        # a budget sizes the KV cache: give it exactly this run's sequence, not a guess (--plan shows the same)
        n_prompt, n_model = _prompt_tokens(model_dir, args.prompt, args.chat)
        if n_prompt + n > n_model:      # the model's own limit first: no budget or max_context lifts it
            from .errors import PowerlowError
            raise PowerlowError(f"prompt ({n_prompt} tokens) + -n {n} exceeds the context of {n_model} tokens the model "
                                "was made for; shorten the prompt or lower -n")
        cfg = cfg.replace(max_context=n_prompt + n)
    if args.plan:
        return print_plan(model_dir, cfg)
    from .quality import describe
    msg, _ = describe(model_dir, cfg.mode, cfg.density)
    if msg:
        print(f"powerlow: {msg}", file=sys.stderr)
    model = load(model_dir, cfg)
    out = sys.stdout
    for tok in model.generate(args.prompt, n, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                              seed=cfg.seed, chat=args.chat, ignore_eos=args.ignore_eos):
        out.write(tok.text)
        out.flush()
    out.write("\n")
    s = model.stats
    print(f"powerlow: prompt {s.prompt_tokens} tok at {s.prefill_tok_s:.1f} tok/s, generated {s.generated_tokens} tok "
          f"at {s.decode_tok_s:.1f} tok/s, peak RSS {s.as_dict()['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"threads {cfg.n_threads}, kernels {getattr(model.tf.ops, 'isa', model.tf.ops.name if hasattr(model.tf.ops, 'name') else '?')}",
          file=sys.stderr)
    router, src = model.tf.ffn.router, model.tf.ffn_source
    if router is not None and hasattr(src, "counters"):
        c, d = src.counters(), router.describe()
        la = d["lookahead_recall"]
        print(f"powerlow: experts: bundle hit rate {c['cache_hit_rate']:.1%}, {c['ffn_read_bytes_per_token'] / 2**20:.1f} "
              f"MiB of experts read a token, lookahead recall {'n/a' if la is None else f'{la:.1%}'}", file=sys.stderr)
    spec = s.extra.get("speculation")
    if spec is not None:
        d = spec.as_dict()
        print(f"powerlow: draft {d['drafter']}: {d['passes']} target passes, {d['tokens_per_pass']:.2f} tokens a pass, "
              f"{d['accepted']}/{d['proposed']} drafts accepted", file=sys.stderr)
    return 0


def _prompt_tokens(model_dir, prompt: str, chat: bool) -> tuple[int, int]:
    """How many tokens the prompt is, counted before the model loads (the tokenizer is let go again), and the
    model's context (max_positions)."""
    from pathlib import Path

    from .arch import ModelConfig
    from .manifest import load_manifest
    from .tokenizer import Tokenizer
    from .util import release_free_heap

    manifest = load_manifest(Path(model_dir), check_files=False)     # the engine checks the files right after
    cfg = ModelConfig.from_json(manifest["config"])
    tok = Tokenizer.of_model(model_dir, manifest, cfg)
    n = len(tok.encode(tok.apply_chat(prompt) if chat else prompt))
    del tok
    release_free_heap()
    return max(1, n), cfg.max_positions


def print_plan(model_dir, rt: RuntimeConfig) -> int:
    """Print how the budget of ``rt`` would be spent on ``model_dir``, without loading the weights (the plan the same
    `powerlow run` command runs: its caller sizes the KV cache as the run does)."""
    from .config import format_size
    from .manifest import load_manifest
    from .plan import make_plan
    from .st_header import tensor_bytes
    from .store import StoreInfo

    model_dir = Path(model_dir)
    manifest = load_manifest(model_dir)
    if rt.budget_bytes is None:
        R = tensor_bytes(model_dir / "resident.safetensors")
        ffn = StoreInfo.from_json(manifest["ffn"]).total_bytes
        print(f"no budget: everything resident, about {format_size(R + ffn)} (weights {format_size(R)}, "
              f"FFN store {format_size(ffn)}) plus KV cache and scratch; pass --budget SIZE to plan an offloaded run")
        return 0
    from .config import for_model
    rt = for_model(rt, manifest["config"])
    print(make_plan(model_dir, manifest, rt).render())
    print(draft_line(rt))
    return 0


def draft_line(rt: RuntimeConfig) -> str:
    """What the run drafts with (speculative decoding) and why, for --plan."""
    from .speculate import AUTO_DRAFT, K_MAX
    d = rt.draft
    k = f"{rt.draft_k} drafts a pass" if rt.draft_k else f"k adaptive 0..{K_MAX} from the measured acceptance and pass cost"
    if d == "none":
        return "speculative decoding: off (--draft none): one target pass per generated token"
    why = {"ngram": "prompt lookup from the context, no memory",
           "self": "the resident part of the model (pinned clusters; streamed layers skipped), no extra memory"}
    if d == "auto":
        return (f"speculative decoding: auto -> {AUTO_DRAFT} ({why[AUTO_DRAFT]}; a plain step where it finds nothing), "
                f"{k}; every target pass reads the streamed weights once for all the tokens it checks")
    return (f"speculative decoding: {d} ({why.get(d, 'a draft model, resident: its footprint is taken off the budget')}), "
            f"{k}; every target pass reads the streamed weights once for all the tokens it checks")
