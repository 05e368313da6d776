"""The `powerlow` command: one subcommand per module, each with its own main(args)."""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import PowerlowError


def add_runtime_arguments(p: argparse.ArgumentParser) -> None:
    """The model and runtime flags shared by run, bench, eval and tune."""
    p.add_argument("-m", "--model", default=None, help="powerlow model dir (default: SmolLM2-135M-Instruct, converted on first use)")
    p.add_argument("-t", "--threads", type=int, default=0, help="threads (default: physical cores)")
    p.add_argument("-n", "--n-tokens", type=int, default=None, help="tokens to generate")
    p.add_argument("--budget", default=None, help="memory budget, e.g. 512MiB (default: everything resident)")
    p.add_argument("--config", default=None, help="TOML runtime config file")
    p.add_argument("--mode", default=None, choices=("dense", "gate", "threshold", "predict", "experts"),
                   help="FFN mode (a mixture-of-experts model runs in experts: its router picks the experts)")
    p.add_argument("--density", type=float, default=None, help="target FFN density for threshold/predict modes")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed")
    p.add_argument("--draft", default=None, help="speculative decoding's drafter: auto (default: ngram) | none | ngram (prompt lookup) | self "
                   "(the resident part of the model, under --budget) | a draft model (dir, GGUF or HF folder with the "
                   "same tokenizer); greedy output is the same tokens with any of them")
    p.add_argument("--draft-k", type=int, default=None, help="drafts per target pass (default 0: adaptive, up to 8)")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, convert, run

    ap = argparse.ArgumentParser(prog="powerlow", description="Run language models bigger than the memory you give them.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="HF folder or GGUF -> powerlow model dir")
    convert.add_arguments(p)
    p.set_defaults(func=convert.main)

    p = sub.add_parser("run", help="generate text")
    add_runtime_arguments(p)
    run.add_arguments(p)
    p.set_defaults(func=run.main)

    p = sub.add_parser("bench", help="measure prefill/decode speed; --json prints one object")
    add_runtime_arguments(p)
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)

    # offline steps and tools; each module has add_arguments(p) and main(args)
    for name, module, runtime, help_ in (
            ("profile", "powerlow.profile", False, "record neuron hotness + training samples; re-lay ffn.bin hot-first"),
            ("train-predictor", "powerlow.predictors.train", False, "train the low-rank activation predictors"),
            ("eval", "powerlow.eval", True, "perplexity on held-out text"),
            ("tune", "powerlow.tune", True, "speed against memory budget; suggests a config"),
            ("verify", "powerlow.verify", False, "check every file's sha256 and every bundle/tensor checksum")):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue          # a tool not in this build
        p = sub.add_parser(name, help=help_)
        if runtime:
            add_runtime_arguments(p)
        mod.add_arguments(p)
        p.set_defaults(func=mod.main)

    # its own argument parser (flags pass through untouched): dispatched in main()
    sub.add_parser("bench-kernels", help="kernel bandwidth against a read probe (see bench-kernels --help)", add_help=False)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench-kernels"]:
            from . import bench_kernels
            return int(bench_kernels.main(argv[1:]) or 0)
        ap = build_parser()          # imports the subcommands, hence the compiled extensions
        args = ap.parse_args(argv)
        return int(args.func(args) or 0)
    except PowerlowError as e:
        print(f"powerlow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
