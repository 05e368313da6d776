"""Regenerate the llama.cpp reference data of the real-model tests: llama.cpp's token ids, greedy continuations
and top-5 log-probs for a few prompts. Run with any Python; it re-runs itself in the llama.cpp venv.

    python scripts/gen_llamacpp_reference.py              # tests/data/llamacpp_smollm2.json (the default model)
    python scripts/gen_llamacpp_reference.py --qwen       # tests/data/llamacpp_qwen.json (scripts/fetch_qwen.py's GGUF)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "tests" / "data"
PROMPTS = [
    {"text": "The capital of France is", "chat": False},
    {"text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "chat": False},
    {"text": "Once upon a time, in a small village by the sea, there lived", "chat": False},
    {"text": "What is the boiling point of water at sea level?", "chat": True},
    {"text": "Write a haiku about autumn leaves.", "chat": True},
    {"text": "List three prime numbers greater than 10: 11, 13,", "chat": False},
]
# the real test model is a coder: plain, chat and code prompts
QWEN_PROMPTS = [
    {"text": "The capital of France is", "chat": False},
    {"text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "chat": False},
    {"text": "import numpy as np\n\n\ndef softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:\n", "chat": False},
    {"text": "What is the boiling point of water at sea level?", "chat": True},
    {"text": "Write a Python function that checks whether a string is a palindrome.", "chat": True},
    {"text": "Rename the variable x to count in this code:\n\nx = 0\nfor item in items:\n    x += item.size\nprint(x)",
     "chat": True},
    {"text": "SELECT name, COUNT(*) FROM orders WHERE total > 100 GROUP BY", "chat": False},
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
    import gguf as gguf_py
    from llamacpp_env import bench_python
    from powerlow.default_model import default_gguf
    from powerlow.tokenizer import Tokenizer, tokenizer_json_from_gguf

    if "--qwen" in sys.argv:
        from fetch_qwen import default_path
        gguf, out, prompt_set = default_path(), DATA / "llamacpp_qwen.json", QWEN_PROMPTS
    else:
        gguf, out, prompt_set = default_gguf(), DATA / "llamacpp_smollm2.json", PROMPTS
    r = gguf_py.GGUFReader(str(gguf), "r")

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()
    eos = field("tokenizer.ggml.eos_token_id")
    tok = Tokenizer(tokenizer_json_from_gguf(r, gguf), chat_template=field("tokenizer.chat_template"),
                    bos_id=field("tokenizer.ggml.bos_token_id"), eos_ids=(eos,) if eos is not None else ())
    del r
    prompts = [dict(p, formatted=tok.apply_chat(p["text"]) if p["chat"] else p["text"]) for p in prompt_set]
    OUT = out
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
