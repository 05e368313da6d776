#!/usr/bin/env python
"""Tiny random MoE models (qwen3moe, qwen2moe, mixtral) through three engines: transformers (float32), llama.cpp
(the F32 GGUF tests/archs_util.write_gguf lays out as llama.cpp's converter does) and powerlow (that GGUF
converted, 8-bit weights and activations). Checks the GGUF semantics (router normalization per architecture,
Mixtral as llama with experts) against llama.cpp itself.

    python scripts/compare_moe_llamacpp.py            # needs the llama.cpp peer: scripts/llamacpp_env.py
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
IDS = list(range(3, 40))
LLAMA = """
import sys, numpy as np, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], logits_all=True, n_ctx=64, n_threads=1, verbose=False)
ids = [int(x) for x in sys.argv[3].split(",")]
m.eval(ids)
np.save(sys.argv[2], np.array(m.scores[:len(ids)], np.float32))
"""


def main() -> int:
    import powerlow
    from archs_util import MOE_KINDS, hf_logits, make_tiny, write_gguf
    from llamacpp_env import bench_python
    from powerlow.convert import convert
    py = bench_python()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in MOE_KINDS:
            root = Path(tmp) / kind
            hf = make_tiny(kind, root / "hf")
            g = write_gguf(hf, root / "m.gguf", "F32")
            subprocess.run([str(py), "-c", LLAMA, str(g), str(root / "lc.npy"), ",".join(map(str, IDS))], check=True)
            lc = np.load(root / "lc.npy")
            ref = hf_logits(hf, IDS)
            ours = powerlow.load(convert(g, root / "pl", bits="8", progress=False)).forward(IDS)

            def rel(a, b):
                return np.linalg.norm(a - b) / np.linalg.norm(b)
            print(f"{kind:9s} llama.cpp vs transformers {rel(lc, ref):.4f}   powerlow vs llama.cpp {rel(ours, lc):.4f}   "
                  f"powerlow vs transformers {rel(ours, ref):.4f}   greedy tokens agree (powerlow, llama.cpp) "
                  f"{np.mean(ours.argmax(1) == lc.argmax(1)):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
