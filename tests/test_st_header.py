"""powerlow.st_header: the one safetensors header parser (reader, HF loader, planner, tune)."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from powerlow.errors import PowerlowError
from powerlow.st_header import read_header, tensor_bytes


def test_header_of_a_real_file_by_path_and_by_fd(tmp_path):
    p = tmp_path / "a.safetensors"
    save_file({"x": np.zeros((3, 5), np.float32), "y": np.ones(7, np.int8)}, str(p), metadata={"k": "v"})
    h, start = read_header(p)
    assert h["x"]["shape"] == [3, 5] and h["__metadata__"] == {"k": "v"}
    (n,) = struct.unpack("<Q", p.read_bytes()[:8])
    assert start == 8 + n
    fd = os.open(p, os.O_RDONLY)
    try:
        assert read_header(p, fd=fd) == (h, start)
    finally:
        os.close(fd)
    assert tensor_bytes(p) == 3 * 5 * 4 + 7


@pytest.mark.parametrize("raw, what", [
    (b"\x01\x02", "truncated"),
    (struct.pack("<Q", 1 << 40) + b"{}", "length"),
    (struct.pack("<Q", 5) + b"{nope", "corrupt safetensors header"),
    (struct.pack("<Q", 2) + b"[]", "not an object"),
])
def test_bad_headers_name_the_file_and_the_fix(tmp_path, raw, what):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(raw)
    with pytest.raises(PowerlowError, match=what) as e:
        read_header(p, fix="re-download it")
    assert str(p) in str(e.value) and "re-download it" in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(PowerlowError, match="cannot read .*missing.safetensors"):
        read_header(tmp_path / "missing.safetensors")
