"""`powerlow convert SRC -o DIR`: a Hugging Face folder or GGUF file -> a powerlow model dir."""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from . import formats
from .errors import PowerlowError
from .integrity import write_sums
from .loaders import Source, open_source
from .manifest import FORMAT_NAME, FORMAT_VERSION, atomic_path, file_entry, write_manifest
from .store import StoreInfo, write_layer

BITS = {"8": "q8", "4": "q4_1", "4sym": "q4_0", "2": "q2", "ternary": "tern", "1": "q1"}
RESIDENT_FILES = ("tokenizer.json", "resident.safetensors", "ffn.bin")


def pick_cluster_size(F: int, group: int, requested: int | None) -> int:
    """Neurons per bundle: a multiple of the down format's group; by default 32 rounded up to the group
    and, if possible, dividing F (so no cluster is padded).

    Why the down format decides: a bundle holds its neurons' gate and up *rows* (whole rows: any C keeps them in
    their stored blocks) and their down *columns*, ``ffn_down[:, cluster]``, and ffn_down is quantized along the
    neurons. Only a C that is a multiple of the down format's block keeps every row's slice whole stored blocks,
    so the bytes are copied, never re-quantized. K-quants (Q4_K, Q6_K, ...) have 256-wide super-blocks, hence
    C = 256 for a Q4_K_M model (Qwen2.5-1.5B: F = 8960 = 35 x 256, 35 bundles a layer)."""
    if requested is not None:
        if requested <= 0 or requested % group:
            raise PowerlowError(f"--cluster-size {requested}: must be a positive multiple of {group} (the format's group size)")
        return requested
    base = max(32, group)
    base = base * math.ceil(32 / base)
    for c in range(base, min(F, 256) + 1, group):
        if F % c == 0:
            return c
    return base


def pick_expert_cluster_size(F: int, group: int, row_bytes: float, requested: int | None) -> int:
    """Neurons per bundle of a MoE layer: a multiple of the down format's group that divides the expert's F (an
    expert is whole bundles, so the router's choice is a set of bundles), the largest whose bundle (gate, up and
    down of C neurons: ``3 * C * row_bytes``) stays within 1 MiB -- big sequential reads, and still a few bundles
    an expert for the kernel threads to share -- or the group itself if none does."""
    if requested is not None:
        if requested <= 0 or requested % group or F % requested:
            raise PowerlowError(f"--cluster-size {requested}: for this mixture-of-experts model it must be a positive "
                                f"multiple of {group} (the format's group) dividing the expert size {F}")
        return requested
    if F % group:
        raise PowerlowError(f"expert FFN size {F} is not a multiple of the down format's block ({group}); the "
                            "checkpoint cannot be laid out as whole bundles per expert")
    fits = [c for c in range(group, F + 1, group) if F % c == 0 and 3 * c * row_bytes <= 1 << 20]
    return max(fits) if fits else group


def convert(src, out_dir, *, bits: str = "auto", cluster_size: int | None = None, force: bool = False,
            progress: bool = True) -> Path:
    """Convert ``src`` into a model dir at ``out_dir`` (written to a temp dir, renamed into place at the end)."""
    out_dir = Path(out_dir)
    if bits != "auto" and bits not in BITS:
        raise PowerlowError(f"--bits {bits!r}: choose one of auto, {', '.join(BITS)}")
    _check_target(out_dir, force)
    source = src if isinstance(src, Source) else open_source(src)
    fmt_for = _format_chooser(BITS.get(bits))
    tmp = _make_tmp(out_dir)
    try:
        t0 = time.time()
        (tmp / "tokenizer.json").write_text(source.tokenizer_json)
        tmeta = _write_resident(source, tmp, fmt_for, progress)
        info, ffn_fmt, down_fmt = _write_ffn(source, tmp, fmt_for, cluster_size, progress)
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "source": source.description,
            "config": source.config.to_json(),
            "chat_template": source.chat_template,
            "tensors": tmeta,
            "formats": {"ffn": ffn_fmt, "ffn_down": down_fmt,
                        "attn": tmeta["blk.0.attn_q"]["fmt"], "embed": tmeta["token_embd"]["fmt"]},
            "ffn": info.to_json(),
            "neuron_order": None,
            "files": {n: file_entry(tmp / n) for n in RESIDENT_FILES},
            "checksums": write_sums(tmp, info),      # the sidecar of per-bundle/per-tensor CRC32C (integrity)
            "convert_seconds": round(time.time() - t0, 2),
        }
        write_manifest(tmp, manifest)
        _publish_permissions(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):    # disk full, a read error of the source, permissions: nothing is left behind
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise PowerlowError(f"converting into {out_dir} failed: {e.strerror or e}{where}; the partial output was "
                                "removed (free some space or choose another -o, and check the source file)") from None
        raise
    return out_dir


def _format_chooser(target: str | None):
    """name, tensor (or its stored format) -> the format to store it in; None keeps float32 (norms, biases)."""
    def fmt_for(name: str, w) -> str | None:
        """``w``: the tensor, or its stored format (Source.stored_format: a powerlow format name, "f32" for float
        matrices, None for vectors)."""
        stored = w if isinstance(w, str) or w is None else (
            w.fmt if isinstance(w, formats.QMatrix) else ("f32" if w.ndim > 1 else None))
        if stored is None or name.endswith(".ffn_gate_inp"):     # vectors; the MoE router stays float32
            return None
        lossless = stored != "f32" and target in (None, stored)
        if name in ("token_embd", "output"):
            # kept as imported; else 8-bit (--bits applies to the layers' matrices, not the vocabulary)
            return stored if lossless and stored not in formats.LOW_BIT else "q8"
        return stored if lossless else (target or "q8")
    return fmt_for


def _make_tmp(out_dir: Path) -> Path:
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_stale(out_dir)
        return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", suffix=".converting", dir=out_dir.parent))
    except OSError as e:
        raise PowerlowError(f"cannot write into {out_dir.parent} ({e.strerror}); choose an output dir you can write to") from None


def _write_resident(source: Source, tmp: Path, fmt_for, progress: bool) -> dict[str, dict]:
    """Every tensor but the layers' FFN matrices into resident.safetensors; returns their manifest entries."""
    from safetensors.numpy import save_file
    tensors: dict[str, np.ndarray] = {}
    tmeta: dict[str, dict] = {}
    streamed = ("ffn_gate", "ffn_up", "ffn_down")          # into ffn.bin; everything else is resident
    resident = [n for n in source.names() if not (n.startswith("blk.") and n.split(".", 2)[2] in streamed)]
    for name in _progress(resident, "resident", progress):
        w = source.get(name)
        fmt = fmt_for(name, w)
        if fmt is None:
            tensors[name] = np.ascontiguousarray(w, dtype=np.float32)
            tmeta[name] = {"fmt": "f32", "shape": list(w.shape)}
            continue
        q = w if isinstance(w, formats.QMatrix) and w.fmt == fmt else formats.quantize(_float(w), fmt)
        tensors.update(q.tensors(name))
        tmeta[name] = {"fmt": fmt, "shape": [q.rows, q.cols]}
    with atomic_path(tmp / "resident.safetensors") as p:
        save_file(tensors, str(p))
    return tmeta


def _write_ffn(source: Source, tmp: Path, fmt_for, cluster_size: int | None, progress: bool):
    """Every layer's FFN into ffn.bin as bundles, each layer in its source formats (a GGUF quant mix keeps ffn_down
    in Q6_K in some layers and Q4_K in others: both stay as they are); returns (StoreInfo, layer 0's gate/up
    format, its down format)."""
    cfg = source.config
    ffn_fmts = [fmt_for(f"blk.{l}.ffn_gate", source.stored_format(f"blk.{l}.ffn_gate")) for l in range(cfg.n_layers)]
    down_fmts = [fmt_for(f"blk.{l}.ffn_down", source.stored_format(f"blk.{l}.ffn_down")) for l in range(cfg.n_layers)]
    group = max([formats.FORMATS[f].group for f in down_fmts] + [32])
    if cfg.moe:
        row = max(formats.packed_nbytes(f, 256, cfg.hidden_size) for f in ffn_fmts + down_fmts) / 256
        C = pick_expert_cluster_size(cfg.expert_ffn, group, row, cluster_size)
    else:
        C = pick_cluster_size(cfg.intermediate_size, group, cluster_size)
    info = StoreInfo.plan(ffn_fmts, down_fmts, C, cfg.hidden_size, cfg.ffn_neurons, cfg.n_layers)
    with atomic_path(tmp / "ffn.bin") as p, open(p, "wb") as f:
        for l in _progress(range(cfg.n_layers), "ffn.bin", progress):
            write_layer(f, info, l, source.get(f"blk.{l}.ffn_gate"), source.get(f"blk.{l}.ffn_up"),
                        source.get(f"blk.{l}.ffn_down"))
    return info, ffn_fmts[0], down_fmts[0]


def _float(w) -> np.ndarray:
    return formats.dequantize(w) if isinstance(w, formats.QMatrix) else np.ascontiguousarray(w, dtype=np.float32)


def _publish_permissions(d: Path) -> None:
    """mkdtemp makes a private (0700) dir; the finished model dir gets the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)


def _check_target(out_dir: Path, force: bool) -> None:
    """Refuse an output that is not ours to replace: only a powerlow model dir is replaced, and only with --force."""
    if out_dir.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise PowerlowError(f"-o {out_dir} is the current directory (or holds it); give the name of a new model dir")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not force:
        raise PowerlowError(f"{out_dir} already exists; delete it or pass --force to replace it")
    if out_dir.is_symlink() or not out_dir.is_dir() or not _is_model_dir(out_dir):
        raise PowerlowError(f"{out_dir} exists and is not a powerlow model dir (no manifest.json of ours): --force "
                            "replaces only model dirs; choose another -o, or move it away yourself")


def _is_model_dir(d: Path) -> bool:
    try:
        return json.loads((d / "manifest.json").read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(dst: Path) -> None:
    """Clean up after a convert of ``dst`` that was killed: its temp dirs (.NAME.PID.XXXX.converting) and the old
    copy a --force replacement set aside (.NAME.old-PID) are removed once their process is gone; if the kill fell
    between the two renames (dst missing), the old copy is put back (rolled back)."""
    for p in dst.parent.glob(f".{dst.name}.*"):
        rest = p.name[len(dst.name) + 2:]
        if rest.startswith("old-") and rest[4:].isdigit():
            pid = int(rest[4:])
        elif rest.endswith(".converting") and rest.split(".")[0].isdigit():
            pid = int(rest.split(".")[0])
        else:
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        if rest.startswith("old-") and not dst.exists() and _is_model_dir(p):
            os.replace(p, dst)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _replace_dir(new: Path, dst: Path) -> None:
    """Move the finished ``new`` dir to ``dst``; an old ``dst`` is set aside first and removed only after the new
    one is in place (a kill in between leaves it as .NAME.old-PID, which the next convert puts back)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(new, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dst)


def _progress(it, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, desc=desc, unit="tensor" if desc == "resident" else "layer", leave=False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
    p.add_argument("-o", "--out", required=True, help="output model dir")
    p.add_argument("--bits", default="auto", help="weight format: auto (GGUF Q4_0/Q4_1/Q8_0 kept without loss, "
                   "everything else 8-bit), 8, 4, 4sym, 2, ternary, 1")
    p.add_argument("--cluster-size", type=int, default=None, help="neurons per bundle (default: 32, or a nearby divisor of the FFN size)")
    p.add_argument("--force", action="store_true", help="replace an existing output dir")


def main(args) -> int:
    out = convert(args.src, args.out, bits=args.bits, cluster_size=args.cluster_size, force=args.force)
    m = json.loads((out / "manifest.json").read_text())
    sizes = {k: v["size"] for k, v in m["files"].items()}
    print(f"wrote {out}: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sizes.items())
          + f"; ffn {m['formats']['ffn']}, cluster {m['ffn']['cluster_size']} neurons, "
            f"bundle {m['ffn']['stride'] // 1024} KiB")
    return 0
