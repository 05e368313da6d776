"""The safetensors header, parsed in one place: an 8-byte little-endian length, then that many bytes of JSON
(tensor name -> {dtype, shape, data_offsets} and an optional ``__metadata__`` of strings). The tensor data
starts right after it. Used by the model's reader (powerlow.stream), the HF loader, the planner and tune."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from .errors import PowerlowError


def read_header(path, *, fd: int | None = None, fix: str = "re-convert the model") -> tuple[dict, int]:
    """(the header dict, ``__metadata__`` included; the offset of the data section). ``fd``: read through this
    open descriptor instead of opening ``path``. A truncated or corrupt header raises PowerlowError naming the
    file and ``fix``."""
    path = Path(path)
    if fd is None:
        try:
            with open(path, "rb") as f:
                return _parse(path, os.fstat(f.fileno()).st_size, f.read(8), lambda n: f.read(n), fix)
        except OSError as e:
            raise PowerlowError(f"cannot read {path}: {e.strerror}; {fix}") from None
    return _parse(path, os.fstat(fd).st_size, os.pread(fd, 8, 0), lambda n: os.pread(fd, n, 8), fix)


def _parse(path: Path, size: int, head: bytes, read, fix: str) -> tuple[dict, int]:
    if len(head) < 8:
        raise PowerlowError(f"{path}: truncated safetensors file (no header); {fix}")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise PowerlowError(f"{path}: corrupt safetensors header (length {n} > file size); {fix}")
    try:
        header = json.loads(read(n))
    except (ValueError, RecursionError) as e:
        raise PowerlowError(f"{path}: corrupt safetensors header ({e}); {fix}") from None
    if not isinstance(header, dict):
        raise PowerlowError(f"{path}: corrupt safetensors header (a {type(header).__name__}, not an object); {fix}")
    return header, 8 + n


def tensor_bytes(path) -> int:
    """Sum of the tensors' data sizes (what loading the file allocates), from the header only."""
    header, _ = read_header(path)
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
