"""Per-bundle and per-tensor checksums (CRC32C), kept in the sidecar ``checksums.json``.

    {"algo": "crc32c", "bundles": [[crc of bundle c of layer l, ...] per layer], "tensors": {key: crc}}

A bundle's checksum covers its whole stride in ffn.bin (padding included: what a read brings in); a
tensor's covers its bytes in resident.safetensors (one entry per safetensors key). The sidecar is listed in
the manifest under ``"checksums": {"file", "size", "sha256"}`` (beside ``files``, the model's payload), and its
sha256 is checked whenever it is read (it is small: ~11 bytes of JSON a bundle, ~1 MiB for the ~100k bundles
of a Llama-70B). It is a sidecar and not part of manifest.json so that every command that reads the manifest
(run, bench, plan, profile's rewrites) does not parse and rewrite 100k numbers.

Checked: each bundle an offloaded run reads, in the I/O thread right after its first read in the run (a dense
run re-reads every unpinned bundle every token: checking each re-read cost 17% of its decode speed, and the
bytes on disk are what the check is for); ``POWERLOW_CHECKSUMS=every`` checks every read. Every bundle once when
a resident run loads ffn.bin; every resident tensor read whole at load, and every streamed unit at its first
read. ``POWERLOW_CHECKSUMS=0`` turns the run-time checks off (only to measure what they cost).
A model dir converted before checksums existed has no sidecar: it loads without these checks, and
``powerlow verify`` says so.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import PowerlowError, extension

SUMS_FILE = "checksums.json"
ALGO = "crc32c"
FIX = "re-convert the model (`powerlow convert SRC -o DIR --force`) or restore the file from a good copy"


def crc32c(buf, crc: int = 0) -> int:
    return int(extension("_kernels").crc32c(memoryview(buf).cast("B"), crc))


def crc32c_many(ptrs: np.ndarray, nbytes: int) -> np.ndarray:
    return extension("_kernels").crc32c_many(np.ascontiguousarray(ptrs, dtype=np.uint64), nbytes)


def enabled() -> bool:
    """Run-time checks on (the default); POWERLOW_CHECKSUMS=0 turns them off for a cost measurement."""
    return os.environ.get("POWERLOW_CHECKSUMS", "1").strip().lower() not in ("0", "off", "no", "false")


class Sums:
    """The checksums of one model dir: ``bundles[l]`` uint32 per cluster, ``tensors`` {key: int}."""

    def __init__(self, bundles: list[np.ndarray], tensors: dict[str, int]):
        self.bundles = bundles
        self.tensors = tensors

    def to_json(self) -> dict:
        return {"algo": ALGO, "bundles": [[int(x) for x in b] for b in self.bundles],
                "tensors": {k: int(v) for k, v in self.tensors.items()}}


_CACHE: dict = {}


def sums_entry(model_dir) -> dict | None:
    """The manifest's entry of the sidecar, or None (a model converted before checksums existed)."""
    mpath = Path(model_dir) / "manifest.json"
    try:
        entry = json.loads(mpath.read_text()).get("checksums")
    except (OSError, ValueError, AttributeError) as e:
        raise PowerlowError(f"{mpath} is unreadable or corrupt ({e}); re-convert the model") from None
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("file") != SUMS_FILE or not isinstance(entry.get("sha256"), str):
        raise PowerlowError(f"{mpath}: the 'checksums' entry is corrupt (edited manifest); {FIX}")
    return entry


def load_sums(model_dir) -> Sums | None:
    """The dir's checksums (their file's sha256 checked against the manifest), or None for a model converted
    without them. Kept while neither file changes (a load asks for them from several places)."""
    from .manifest import sha256_file
    d = Path(model_dir)
    entry = sums_entry(d)
    if entry is None:
        return None
    p = d / SUMS_FILE
    try:
        st, mst = p.stat(), (d / "manifest.json").stat()
    except OSError:
        raise PowerlowError(f"{p} is missing (the manifest lists it); {FIX}") from None
    key = (str(d.resolve()), st.st_mtime_ns, st.st_size, mst.st_mtime_ns, mst.st_size)
    if key in _CACHE:
        return _CACHE[key]
    if sha256_file(p) != entry["sha256"]:
        raise PowerlowError(f"{p} does not match its sha256 in the manifest (corrupt); {FIX}")
    try:
        d = json.loads(p.read_text())
        if d.get("algo") != ALGO:
            raise ValueError(f"algorithm {d.get('algo')!r}, this powerlow knows {ALGO}")
        bundles = [np.asarray(b, dtype=np.uint32) for b in d["bundles"]]
        tensors = {str(k): int(v) for k, v in d["tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:
        raise PowerlowError(f"{p} is unreadable or corrupt ({e}); {FIX}") from None
    _CACHE.clear()
    _CACHE[key] = sums = Sums(bundles, tensors)
    return sums


def run_sums(model_dir) -> Sums | None:
    """What a run checks against: the dir's checksums, or None (none stored, or POWERLOW_CHECKSUMS=0)."""
    return load_sums(model_dir) if enabled() else None


def bundle_error(path, layer: int, cluster: int, offset: int) -> str:
    return (f"{path}: the bundle of layer {layer}, cluster {cluster} (bytes at {offset}) does not match its checksum "
            f"(corrupt on disk or misread); {FIX}")


def tensor_error(path, key: str) -> str:
    return f"{path}: tensor {key!r} does not match its checksum (corrupt on disk or misread); {FIX}"


def check_layout(sums: Sums, info, path) -> None:
    """The sidecar must describe this ffn.bin's bundles (one checksum per cluster and layer)."""
    if len(sums.bundles) != info.n_layers or any(len(b) != info.n_clusters for b in sums.bundles):
        raise PowerlowError(f"{Path(path).parent / SUMS_FILE} does not describe {info.n_layers} layers of "
                            f"{info.n_clusters} bundles (stale or edited); {FIX}")


def bad_bundles(sums: Sums, info, layer: int, ptrs: np.ndarray, clusters: np.ndarray | None = None) -> np.ndarray:
    """Cluster ids among ``clusters`` (None: all of the layer) whose bytes at ``ptrs`` do not match."""
    got = crc32c_many(ptrs, info.layouts[layer].stride)
    want = sums.bundles[layer] if clusters is None else sums.bundles[layer][clusters]
    ids = np.arange(info.n_clusters) if clusters is None else np.asarray(clusters)
    return ids[got != want]


def every_read() -> bool:
    """POWERLOW_CHECKSUMS=every: an offloaded run checks every read of a bundle, not only its first (the default)."""
    return os.environ.get("POWERLOW_CHECKSUMS", "").strip().lower() == "every"


# -- computing them (convert, profile's re-layouts, verify) --------------------------------------------------
def file_bundle_sums(path, info) -> list[np.ndarray]:
    """CRC32C of every bundle of ffn.bin, read a layer at a time."""
    from .io import aligned_buffer
    out = []
    buf = aligned_buffer(max(info.layer_bytes(l) for l in range(info.n_layers)))
    with open(path, "rb", buffering=0) as f:
        for l in range(info.n_layers):
            n = info.layer_bytes(l)
            view = memoryview(buf)[:n]
            f.seek(info.layer_offsets[l])
            done = 0
            while done < n:
                k = f.readinto(view[done:])
                if not k:
                    raise PowerlowError(f"{path}: unexpected end of file in layer {l}; {FIX}")
                done += k
            S = info.layouts[l].stride
            ptrs = buf.ctypes.data + np.arange(info.n_clusters, dtype=np.uint64) * np.uint64(S)
            out.append(crc32c_many(ptrs, S))
        _drop(f)
    return out


def file_tensor_sums(path) -> dict[str, int]:
    """CRC32C of every tensor's bytes in a safetensors file."""
    from .stream import TensorFile
    tf = TensorFile(path)
    try:
        out = {}
        for key in tf.meta:
            off, n = tf.span(key)
            buf = np.empty(n, np.uint8)
            tf.read_into(off, buf)
            out[key] = crc32c(buf)
        return out
    finally:
        tf.close()


def write_sums(model_dir, info, *, bundles: list[np.ndarray] | None = None,
               tensors: dict[str, int] | None = None) -> dict:
    """Write the sidecar (bundles / tensors computed from the files unless given) -> its manifest entry."""
    from .manifest import atomic_write_text, file_entry
    d = Path(model_dir)
    if bundles is None:
        bundles = file_bundle_sums(d / "ffn.bin", info)
    if tensors is None:
        tensors = file_tensor_sums(d / "resident.safetensors")
    atomic_write_text(d / SUMS_FILE, json.dumps(Sums(bundles, tensors).to_json(), separators=(",", ":")))
    return {"file": SUMS_FILE, **file_entry(d / SUMS_FILE)}


def rewrite_after_relayout(model_dir, info, cperms: list[np.ndarray] | None) -> dict | None:
    """After profile rewrote ffn.bin: the sidecar with the bundles' checksums moved with them (``cperms``:
    whole clusters moved, bytes unchanged, so a bundle corrupt before stays detectable) or computed anew
    (None: re-quantized bundles). Returns the manifest's new "checksums" entry (None for an old dir)."""
    old = load_sums(model_dir)
    if old is None:          # converted without checksums: a re-layout does not add them
        return None
    bundles = [old.bundles[l][np.asarray(p)] for l, p in enumerate(cperms)] if cperms is not None else None
    return write_sums(model_dir, info, bundles=bundles, tensors=old.tensors)


def require_good_bundles(model_dir, info) -> None:
    """Before bundles are rewritten from their bytes: each must match its stored checksum (if any)."""
    sums = load_sums(model_dir)
    if sums is None:
        return
    path = Path(model_dir) / "ffn.bin"
    check_layout(sums, info, path)
    for l, got in enumerate(file_bundle_sums(path, info)):
        bad = np.flatnonzero(got != sums.bundles[l])
        if len(bad):
            raise PowerlowError(bundle_error(path, l, int(bad[0]), info.bundle_offset(l, int(bad[0]))))


def _drop(f) -> None:
    try:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
