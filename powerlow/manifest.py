"""The model directory's manifest: format/version, config, files with sizes and sha256; atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import PowerlowError

FORMAT_NAME = "powerlow-model"
FORMAT_VERSION = 1
# Files larger than this are checked by size at every load and by sha256 only on `verify=True`
# (hashing a multi-GB ffn.bin at every start would read the whole model through the page cache).
HASH_AT_LOAD_MAX_BYTES = 256 << 20
MODEL_FILES = ("tokenizer.json", "resident.safetensors", "ffn.bin")     # every model dir has them


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; rename it into place only if the block succeeds."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp makes 0600, and a writer may have replaced the file (safetensors does): the finished file gets
        # the usual permissions, whatever wrote it
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
        try:  # do not leave the model in the page cache just because we hashed it
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def safe_member(model_dir: Path, name: str) -> Path:
    """The path of a file the manifest names, refusing anything outside the model dir."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name:
        raise PowerlowError(f"{model_dir}/manifest.json names {name!r}, a file outside the model dir; "
                            "the manifest is corrupt or malicious — re-convert the model")
    full = (model_dir / p).resolve()
    if model_dir.resolve() not in full.parents:
        raise PowerlowError(f"{model_dir}/manifest.json names {name!r}, which resolves outside the model dir; re-convert the model")
    return full


def _plain(x):
    """json.dumps fallback: the numpy arrays load_manifest keeps (neuron_order) go back to lists."""
    import numpy as np
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def write_manifest(model_dir: Path, manifest: dict) -> None:
    atomic_write_text(Path(model_dir) / "manifest.json", json.dumps(manifest, indent=1, default=_plain))


def load_manifest(model_dir, *, verify: bool = False, check_files: bool = True) -> dict:
    """Read and check a model dir's manifest: format, version, every file's place (inside the dir) and size (and sha256
    where cheap or asked; ``check_files=False``: places only, for a caller that only needs the manifest before the
    engine loads)."""
    d = Path(model_dir)
    mpath = d / "manifest.json"
    if not d.exists():
        raise PowerlowError(f"{d}: no such model dir; create one with `powerlow convert SRC -o {d}`")
    if not mpath.exists():
        raise PowerlowError(f"{d} is not a powerlow model dir (no manifest.json); create one with `powerlow convert SRC -o DIR`")
    try:
        m = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PowerlowError(f"{mpath} is corrupt ({e}); re-convert the model") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise PowerlowError(f"{mpath} is not a powerlow manifest; re-convert the model")
    if m.get("version") != FORMAT_VERSION:
        raise PowerlowError(f"{mpath} has format version {m.get('version')}, this powerlow reads version {FORMAT_VERSION}; "
                            "re-convert the model with this version")
    files = m.get("files")
    if not isinstance(files, dict):
        raise PowerlowError(f"{mpath} lists no files; re-convert the model")
    for name, entry in files.items():
        if (not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool)
                or not isinstance(entry.get("sha256"), str)):
            raise PowerlowError(f"{mpath}: the entry of {name!r} needs an integer size and a sha256 string (corrupt or "
                                "edited manifest); re-convert the model")
    missing = [n for n in MODEL_FILES if n not in files]
    if missing:      # the engine opens these by name: each must be listed, so its size and place are checked
        raise PowerlowError(f"{mpath} does not list {', '.join(missing)} (corrupt or edited manifest); re-convert the model")
    for key in ("config", "ffn", "tensors"):
        if not isinstance(m.get(key), dict):
            raise PowerlowError(f"{mpath} has no {key!r} section (corrupt or edited manifest); re-convert the model")
    order = m.get("neuron_order")
    if order is not None:
        # a profiled model's neuron permutation, one id per FFN neuron and layer: as Python lists it holds
        # ~36 bytes per id (9 MiB at 16 x 16384), more than the plan's budget slack; int32 arrays hold 4
        import numpy as np
        try:
            m["neuron_order"] = [np.asarray(o, dtype=np.int32) for o in order]
        except (TypeError, ValueError):
            raise PowerlowError(f"{mpath}: neuron_order is not a list of integer lists (corrupt); re-run "
                                f"`powerlow profile {d}` or re-convert the model") from None
        del order
    for name, entry in files.items():
        p = safe_member(d, name)            # always: nothing outside the dir is ever opened
        if not check_files:
            continue
        if not p.exists():
            raise PowerlowError(f"{d}: {name} is missing; re-convert the model (or restore the file)")
        size = p.stat().st_size
        if size != entry["size"]:
            raise PowerlowError(f"{d}: {name} has {size} bytes, the manifest says {entry['size']} (truncated or replaced); "
                                "re-convert the model")
        if verify or size <= HASH_AT_LOAD_MAX_BYTES:
            if sha256_file(p) != entry["sha256"]:
                raise PowerlowError(f"{d}: {name} does not match its sha256 in the manifest (corrupt); re-convert the model")
    return m
