"""Source-model loaders: a Hugging Face folder or a GGUF file, seen through one interface.

A loader yields tensors under canonical (GGUF-style) names in Hugging Face row order:
``token_embd``, ``output_norm``, ``output`` (absent when tied), and per layer
``blk.{i}.attn_norm``, ``attn_q``, ``attn_k``, ``attn_v``, ``attn_q.bias`` ..., ``attn_output``,
``ffn_norm``, ``ffn_gate``, ``ffn_up``, ``ffn_down``. Matrices are (out, in).
A tensor is either a float32 array or a :class:`powerlow.formats.QMatrix` (lossless import of
a quantized GGUF tensor).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import PowerlowError
from .base import Source


def open_source(path) -> Source:
    p = Path(path)
    if not p.exists():
        raise PowerlowError(f"{p}: no such file or folder; give a Hugging Face model folder or a .gguf file")
    if p.is_dir():
        if (p / "config.json").exists():
            from .hf import HFSource
            return HFSource(p)
        if (p / "manifest.json").exists():
            raise PowerlowError(f"{p} is already a powerlow model dir; run it with `powerlow run -m {p}`")
        raise PowerlowError(f"{p} is not a model folder: no config.json (Hugging Face) inside; give a HF folder or a .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from .gguf_file import GGUFSource
        return GGUFSource(p)
    raise PowerlowError(f"{p} is neither a GGUF file (no GGUF magic) nor a Hugging Face folder")


__all__ = ["open_source", "Source"]
