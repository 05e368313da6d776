#!/usr/bin/env python
"""Make a synthetic Llama-shaped model (HF folder, optionally a GGUF beside it).

    python scripts/make_synthetic.py --preset tiny --out /tmp/tiny                 # seconds
    python scripts/make_synthetic.py --preset 2gb --gguf Q4_0 --out /data/syn-2gb  # minutes
    python scripts/make_synthetic.py --preset moe-2gb --out /data/moe-2gb.gguf     # qwen3moe, ~3 minutes

Presets (scripts/synthetic.py PRESETS):
  tiny  hidden 128, ffn 352, 2 layers, 4 heads / 2 kv heads, vocab 512, float32
  2gb   Llama-2-7B shape cut to 16 layers: hidden 4096, ffn 11008, 32 heads, vocab 32000;
        3.50 G weights: 1.97e9 bytes (1.83 GiB) as Q4_0 GGUF, 7.0e9 bytes as the float16 HF folder
  2gb-gqa  Llama-3-8B / Mistral-7B shape cut to 15 layers: hidden 4096, ffn 14336, 32 heads / 8 kv heads,
        vocab 32000; 3.53 G weights, 1.99e9 bytes as Q4_0 GGUF (attention 19% of a layer instead of 33%)
Planted hotness is on by default (--hot-alpha 1.5: the hottest 20% of neurons take ~75% of the
firings, mean density 0.15); --hot-alpha none gives plain random gates.
The GGUF goes to <out>-<QTYPE>.gguf unless --gguf-out says otherwise.
Run from the repository root with powerlow importable (pip install -e . or PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from powerlow.errors import PowerlowError
from synthetic import ACTS, DTYPES, GGUF_QTYPES, PRESETS, SyntheticSpec, export_gguf, make_hf_model

GGUF_BITS_PER_WEIGHT = {"Q4_0": 4.5, "Q8_0": 8.5, "F16": 16.0}


def _alpha(text: str) -> float | None:
    if text.lower() in ("none", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hot-alpha takes a number or 'none', got {text!r}") from None


def _size(n: float) -> str:
    return f"{n / 1e9:.2f} GB ({n / 2**30:.2f} GiB)" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Make a synthetic Llama-shaped model with planted neuron hotness.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    from synthetic_moe import PRESETS as MOE_PRESETS
    ap.add_argument("--preset", choices=sorted(PRESETS) + sorted(MOE_PRESETS), default="tiny",
                    help="model shape (default tiny); moe-*: a qwen3moe GGUF with planted expert skew "
                         "(scripts/synthetic_moe.py), written straight to --out")
    ap.add_argument("--out", required=True, type=Path, help="HF folder to write (moe-*: the .gguf file)")
    ap.add_argument("--act", choices=ACTS, default="relu", help="FFN activation (default relu)")
    ap.add_argument("--hot-alpha", type=_alpha, default=1.5, help="power-law exponent of neuron hotness, or 'none'")
    ap.add_argument("--hot-density", type=float, default=0.15, help="mean planted firing probability (default 0.15)")
    ap.add_argument("--dtype", choices=DTYPES, help="HF weight dtype (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tie-embeddings", action="store_true", help="share embeddings and lm_head")
    ap.add_argument("--coact-group", type=int, default=1,
                    help="neurons per co-activating group (1: neurons fire independently; see scripts/synthetic.py)")
    ap.add_argument("--coact-rho", type=float, default=0.9, help="gate correlation within a group (default 0.9)")
    for name in ("hidden", "intermediate", "layers", "heads", "kv-heads", "vocab"):
        ap.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    ap.add_argument("--gguf", choices=GGUF_QTYPES, help="also export a GGUF of this type")
    ap.add_argument("--gguf-out", type=Path, help="GGUF path (default <out>-<QTYPE>.gguf)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return ap


def main_moe(args) -> int:
    from synthetic_moe import spec_of, write_moe_gguf
    try:
        spec = spec_of(args.preset, seed=args.seed)
        print(f"{args.preset}: qwen3moe hidden {spec.hidden}, {spec.layers} layers, {spec.experts} experts of "
              f"{spec.expert_ffn}, top {spec.top_k}, {spec.qtype}: {_size(spec.file_bytes())}", file=sys.stderr)
        if args.out.exists() and not args.overwrite:
            raise PowerlowError(f"{args.out} already exists; pass --overwrite to replace it")
        t0 = time.perf_counter()
        out = write_moe_gguf(args.out, spec, progress=True)
        print(f"wrote {out} ({_size(out.stat().st_size)}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    except PowerlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.preset.startswith("moe-"):
        return main_moe(args)
    shape = dict(PRESETS[args.preset])
    for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "dtype"):
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    opts = dict(shape, act=args.act, seed=args.seed, hot_alpha=args.hot_alpha, hot_density=args.hot_density,
                tie_embeddings=args.tie_embeddings, coact_group=args.coact_group, coact_rho=args.coact_rho)
    try:
        spec = SyntheticSpec(**opts)
        n = spec.n_weights
        print(f"{args.preset}: {n / 1e9:.3f} G weights; hidden {spec.hidden}, ffn {spec.intermediate}, "
              f"{spec.layers} layers, {spec.heads}/{spec.kv_heads} heads, vocab {spec.vocab}, {spec.act}, "
              f"hot_alpha {spec.hot_alpha}", file=sys.stderr)
        if args.gguf:
            est = n * GGUF_BITS_PER_WEIGHT[args.gguf] / 8
            print(f"expected {args.gguf} GGUF: ~{_size(est)}", file=sys.stderr)
        t0 = time.perf_counter()
        out = make_hf_model(args.out, **opts, overwrite=args.overwrite, progress=True)
        print(f"wrote {out} ({_size(_folder_bytes(out))}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.gguf:
            gguf_out = args.gguf_out or out.with_name(f"{out.name}-{args.gguf}.gguf")
            t0 = time.perf_counter()
            export_gguf(out, gguf_out, args.gguf, progress=True)
            print(f"wrote {gguf_out} ({_size(gguf_out.stat().st_size)}) in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
            if spec.act == "relu":
                print("note: llama.cpp's llama graph always uses SiLU, so it runs this ReLU model as a SiLU one "
                      "(same cost, different outputs); the GGUF records powerlow.hidden_act = relu", file=sys.stderr)
    except PowerlowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
