"""Regenerate tests/data/llamacpp_smollm2.json: llama.cpp's token ids, greedy continuations and top-5 log-probs
for a few prompts on the default model's GGUF. Run with any Python; it re-runs itself in the llama.cpp venv.

    python scripts/gen_llamacpp_reference.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "tests" / "data" / "llamacpp_smollm2.json"
PROMPTS = [
    {"text": "The capital of France is", "chat": False},
    {"text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "chat": False},
    {"text": "Once upon a time, in a small village by the sea, there lived", "chat": False},
    {"text": "What is the boiling point of water at sea level?", "chat": True},
    {"text": "Write a haiku about autumn leaves.", "chat": True},
    {"text": "List three prime numbers greater than 10: 11, 13,", "chat": False},
]
N_CONT = 32


def in_llamacpp(gguf: str, prompts: list[dict]) -> list[dict]:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=512, n_threads=2, logits_all=True, verbose=False, seed=0)
    out = []
    for p in prompts:
        ids = llm.tokenize(p["formatted"].encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        cont = []
        for _ in range(N_CONT):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            cont.append(nxt)
            llm.eval([nxt])
        seq = ids + cont
        llm.reset()
        llm.eval(seq)
        scores = np.asarray(llm.scores[: len(seq)], dtype=np.float64)
        lp = scores - scores.max(axis=1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
        top = np.argsort(-lp, axis=1)[:, :5]
        out.append({**p, "ids": ids, "continuation": cont,
                    "top5_ids": top.tolist(),
                    "top5_logprobs": np.take_along_axis(lp, top, axis=1).round(5).tolist()})
    return out


def main() -> int:
    if "--inner" in sys.argv:
        gguf, path = sys.argv[2], sys.argv[3]
        prompts = json.loads(Path(path).read_text())
        Path(path).write_text(json.dumps(in_llamacpp(gguf, prompts)))
        return 0
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    from llamacpp_env import bench_python
    from powerlow.default_model import default_gguf
    from powerlow.loaders import open_source
    from powerlow.tokenizer import Tokenizer

    gguf = default_gguf()
    src = open_source(gguf)
    tok = Tokenizer(src.tokenizer_json, chat_template=src.chat_template)
    prompts = [dict(p, formatted=tok.apply_chat(p["text"]) if p["chat"] else p["text"]) for p in PROMPTS]
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(prompts))
    subprocess.run([str(bench_python()), __file__, "--inner", str(gguf), str(tmp)], check=True)
    data = {"gguf": gguf.name, "n_continuation": N_CONT, "llama_cpp_python": "0.3.36", "prompts": json.loads(tmp.read_text())}
    os.replace(tmp, OUT)
    OUT.write_text(json.dumps(data, indent=0))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
