"""`powerlow run`: generate text, streamed to stdout; stats on stderr."""
from __future__ import annotations

import sys


def add_arguments(p) -> None:
    p.add_argument("-p", "--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="format the prompt with the model's chat template")
    p.add_argument("--temp", type=float, default=0.0, help="temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--plan", action="store_true", help="print how the memory budget is spent, then exit")


def main(args) -> int:
    if args.plan:
        from .plan import print_plan
        return print_plan(args)
    from .cli import runtime_config
    from .model import load

    cfg = runtime_config(args)
    model = load(args.model, cfg)
    n = 64 if args.n_tokens is None else args.n_tokens
    out = sys.stdout
    for tok in model.generate(args.prompt, n, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                              seed=cfg.seed, chat=args.chat):
        out.write(tok.text)
        out.flush()
    out.write("\n")
    s = model.stats
    print(f"powerlow: prompt {s.prompt_tokens} tok at {s.prefill_tok_s:.1f} tok/s, generated {s.generated_tokens} tok "
          f"at {s.decode_tok_s:.1f} tok/s, peak RSS {s.as_dict()['peak_rss_bytes'] / 2**20:.0f} MiB, "
          f"threads {cfg.n_threads}, kernels {getattr(model.tf.ops, 'isa', model.tf.ops.name if hasattr(model.tf.ops, 'name') else '?')}",
          file=sys.stderr)
    return 0
