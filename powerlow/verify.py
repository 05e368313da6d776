"""`powerlow verify DIR`: hash everything the model dir's manifest and checksums describe.

Every file's size and sha256 (as the manifest lists them), then every ffn.bin bundle's and every resident
tensor's CRC32C (checksums.json). Prints what was checked; exit 0 when all match, else every bad file,
bundle and tensor is named and the exit code is 2.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import integrity
from .errors import PowerlowError
from .manifest import load_manifest, safe_member, sha256_file
from .store import StoreInfo

MAX_LISTED = 50          # bad bundles named one by one; past that, counted


def verify_dir(model_dir) -> tuple[list[str], list[str]]:
    """-> (lines saying what was checked, problems). Raises PowerlowError only for an unreadable manifest."""
    d = Path(model_dir)
    m = load_manifest(d, check_files=False)
    done, bad = [], []
    present = set()
    for name, entry in m["files"].items():
        p = safe_member(d, name)
        if not p.exists():
            bad.append(f"{name}: missing")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            bad.append(f"{name}: {size} bytes, the manifest says {entry['size']} (truncated or replaced)")
            continue
        if sha256_file(p) != entry["sha256"]:
            bad.append(f"{name}: sha256 does not match the manifest (corrupt)")
        else:
            done.append(f"{name}: {size} bytes, sha256 ok")
        present.add(name)
    if m.get("checksums") is None:
        done.append(f"no per-bundle/per-tensor checksums ({integrity.SUMS_FILE}): converted by an older powerlow; "
                    "only the files' sha256 were checked (re-convert to add them)")
        return done, bad
    try:
        sums = integrity.load_sums(d)       # checks the sidecar's own sha256 against the manifest
        done.append(f"{integrity.SUMS_FILE}: {(d / integrity.SUMS_FILE).stat().st_size} bytes, sha256 ok")
        info = StoreInfo.from_json(m["ffn"])
        integrity.check_layout(sums, info, d / "ffn.bin")
    except PowerlowError as e:
        return done, bad + [str(e)]
    if "ffn.bin" in present:
        done.append(_check_bundles(d, info, sums, bad))
    if "resident.safetensors" in present:
        done.append(_check_tensors(d, sums, bad))
    return done, bad


def _check_bundles(d: Path, info, sums, bad: list) -> str:
    n_bad = 0
    for l, got in enumerate(integrity.file_bundle_sums(d / "ffn.bin", info)):
        for c in np.flatnonzero(got != sums.bundles[l]):
            n_bad += 1
            if n_bad <= MAX_LISTED:
                bad.append(f"ffn.bin: layer {l}, cluster {int(c)} (bytes at {info.bundle_offset(l, int(c))}): "
                           "checksum mismatch")
    if n_bad > MAX_LISTED:
        bad.append(f"ffn.bin: {n_bad - MAX_LISTED} more bad bundles")
    n = info.n_layers * info.n_clusters
    return f"ffn.bin: {n} bundles ({info.n_layers} layers x {info.n_clusters}), CRC32C " + (
        "ok" if not n_bad else f"{n_bad} bad")


def _check_tensors(d: Path, sums, bad: list) -> str:
    got = integrity.file_tensor_sums(d / "resident.safetensors")
    n_bad = 0
    for key, want in sums.tensors.items():
        if key not in got:
            bad.append(f"resident.safetensors: tensor {key!r} is missing")
            n_bad += 1
        elif got[key] != want:
            bad.append(f"resident.safetensors: tensor {key!r}: checksum mismatch")
            n_bad += 1
    return f"resident.safetensors: {len(sums.tensors)} tensors, CRC32C " + ("ok" if not n_bad else f"{n_bad} bad")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="a powerlow model dir")


def main(args) -> int:
    t0 = time.perf_counter()
    done, bad = verify_dir(args.model_dir)
    for line in done:
        print(line)
    if bad:
        print(f"{args.model_dir}: {len(bad)} problem(s):")
        for line in bad:
            print(f"  BAD {line}")
        print(f"fix: {integrity.FIX}")
        return 2
    print(f"{args.model_dir}: everything checked matches ({time.perf_counter() - t0:.1f} s)")
    return 0
