"""Dense weights that do not fit the budget: attention and lm_head read from storage every token, in a ring.

The FFN is sparse and goes through the segmented cache (powerlow.cache). Attention and the lm_head are used
by every token, so a byte of them pinned saves a byte read per token: the plan (powerlow.plan) pins as many
of them as the budget holds, before any FFN cluster. When a budget is too small even for that (a 25% budget
on a Llama-shaped model: attention is a third of a layer), the rest streams through this ring:

    units    one per streamed layer (fused wqkv + wo) and one per lm_head row chunk, in the order a forward
             pass uses them: layer 0 .. L-1, then the lm_head chunks
    ring     ``n_slots`` unit-sized aligned buffers; while the compute thread uses unit j, the I/O threads
             read units j+1 .. j+n_slots-1 (across the token boundary too: after the last lm_head chunk
             comes layer 0 of the next token)

All weights are read with plain preads from resident.safetensors (TensorFile: offsets from its header, no
mmap), straight into the planes the kernels use; q, k and v land in one fused wqkv without a copy. The page
cache is dropped behind every read (POSIX_FADV_DONTNEED), so a cgroup memory limit holds.
Token embeddings need one row a token: with a budget they are read per token (EmbeddingRows).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import formats
from .errors import PowerlowError
from .st_header import read_header

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": None, "I8": np.int8, "U8": np.uint8,
           "I16": np.int16, "U16": np.uint16, "I32": np.int32, "U32": np.uint32, "BOOL": np.bool_,
           "I64": np.int64}
PLANE_ALIGN = 64
ROW_TILE = 64                  # lm_head chunks are whole multiples of this many rows
READ_CHUNK = 1 << 20           # one request of a unit read (several in flight over the I/O threads)


def ring_reader_threads(queue_depth: int) -> int:
    """Reader threads of the weight ring (each holds one bounce buffer under O_DIRECT)."""
    return max(1, min(8, queue_depth))


_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _DTYPES.items() if v is not None}, "BF16": 2}


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_header_entry(key: str, v, data_size: int) -> None:
    """One safetensors header entry: a known dtype, a shape of counts whose bytes are exactly its data span, and a
    span inside the file -- all checked before anything is allocated or read (a shape of [2**40] is refused here)."""
    if not isinstance(v, dict):
        raise ValueError(f"tensor {key}: entry is {type(v).__name__}, not an object")
    offs, shape, dtype = v["data_offsets"], v["shape"], v["dtype"]
    if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_count, offs))):
        raise ValueError(f"tensor {key}: data_offsets {offs!r} are not two byte offsets")
    a, b = offs
    if not a <= b <= data_size:
        raise ValueError(f"tensor {key} lies past the end of the file")
    if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
        raise ValueError(f"tensor {key}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        raise ValueError(f"tensor {key}: shape {shape!r} is not a list of counts")
    n = _ITEMSIZE[dtype]
    for s in shape:
        n *= s
    if n != b - a:
        raise ValueError(f"tensor {key}: shape {shape} of {dtype} is {n} bytes, its data span {b - a}")


def check_tensors(tensors, cfg, tfile: "TensorFile") -> None:
    """The manifest's tensor table against the config (shapes) and resident.safetensors (every plane's bytes),
    before any weight is allocated: a corrupt or edited entry is one PowerlowError, not a crash or wrong logits."""
    from .models.common import check_shapes
    where = f"{tfile.path.parent}/manifest.json"
    if not isinstance(tensors, dict):
        raise PowerlowError(f"{where}: the tensors section is not a table; re-convert the model")
    for name, meta in tensors.items():
        ok = (isinstance(meta, dict) and isinstance(meta.get("fmt"), str)
              and (meta["fmt"] == "f32" or meta["fmt"] in formats.FORMATS)
              and isinstance(meta.get("shape"), list) and len(meta["shape"]) in (1, 2)
              and all(_is_count(s) and s > 0 for s in meta["shape"]) and (len(meta["shape"]) == 2 or meta["fmt"] == "f32"))
        if not ok:
            raise PowerlowError(f"{where}: the entry of tensor {name!r} is corrupt ({json.dumps(meta)[:100]}); "
                                "re-convert the model")
    need = ["token_embd", "output_norm"] + [f"blk.{l}.{n}" for l in range(cfg.n_layers)
                                            for n in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output")]
    if not cfg.tie_embeddings:
        need.append("output")
    missing = [n for n in need if n not in tensors]
    if missing:
        raise PowerlowError(f"{where} lacks tensor {missing[0]!r}; re-convert the model")
    try:
        check_shapes(cfg, lambda n: tensors[n]["shape"], where, [n for n in tensors if not n.startswith("blk.")
                     or (n.split(".", 2)[1].isdigit() and int(n.split(".", 2)[1]) < cfg.n_layers)])
    except KeyError as e:
        raise PowerlowError(f"{where}: tensor {e} is not one this powerlow knows; re-convert the model") from None
    for name, meta in tensors.items():
        shape = meta["shape"]
        rows, cols = (shape[0], 1) if len(shape) == 1 else shape
        try:
            planes = matrix_planes(meta["fmt"], rows, cols)
        except ValueError as e:
            raise PowerlowError(f"{where}: tensor {name!r}: {e}; re-convert the model") from None
        for plane, dt, pshape in planes:
            key = _key(name, plane)
            _, n = tfile.span(key)
            want = dt.itemsize * int(np.prod(pshape, dtype=np.int64))
            if n != want or (meta["fmt"] == "f32" and tfile.meta[key]["shape"] != shape):
                raise PowerlowError(f"{tfile.path}: tensor {key!r} has {n} bytes (shape {tfile.meta[key]['shape']}), "
                                    f"the manifest's {meta['fmt']} {shape} needs {want}; re-convert the model")


class TensorFile:
    """Tensors of a safetensors file by pread: ``span(key)`` -> (file offset, nbytes), ``read(key)`` -> array."""

    def __init__(self, path, *, check: bool = False):
        """``check``: tensors read whole are checked against the model dir's CRC32C (powerlow.integrity)."""
        self.path = Path(path)
        self.sums = None
        self._key_at: dict[tuple[int, int], str] = {}
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):      # no read-ahead past what is asked for (it would stay cached)
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        except OSError as e:
            raise PowerlowError(f"cannot open {self.path}: {e.strerror}; re-convert the model") from None
        try:
            size = os.fstat(self.fd).st_size
            header, self.base = read_header(self.path, fd=self.fd)
            self.meta = {k: v for k, v in header.items() if k != "__metadata__"}
            self.header_metadata = header.get("__metadata__") or {}
            for k, v in self.meta.items():
                _check_header_entry(k, v, size - self.base)
                a, b = v["data_offsets"]
                self._key_at[(self.base + a, b - a)] = k
        except PowerlowError:
            os.close(self.fd)
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            os.close(self.fd)
            raise PowerlowError(f"{self.path} is not a readable safetensors file ({e}); re-convert the model") from None
        if check:
            from .integrity import run_sums
            sums = run_sums(self.path.parent)
            self.sums = sums.tensors if sums is not None else None

    def check_read(self, offset: int, nbytes: int, buf) -> None:
        """If [offset, offset + nbytes) is one whole tensor with a stored checksum, the bytes read into ``buf``
        must match it (row ranges of a tensor, such as lm_head chunks or embedding rows, are not checked)."""
        if self.sums is None:
            return
        key = self._key_at.get((offset, nbytes))
        want = self.sums.get(key) if key is not None else None
        if want is not None:
            from .integrity import crc32c, tensor_error
            if crc32c(np.ascontiguousarray(buf).reshape(-1).view(np.uint8)) != want:
                raise PowerlowError(tensor_error(self.path, key))

    def span(self, key: str) -> tuple[int, int]:
        try:
            a, b = self.meta[key]["data_offsets"]
        except KeyError:
            raise PowerlowError(f"{self.path}: tensor {key!r} is missing; re-convert the model") from None
        return self.base + a, b - a

    READ_STEP = 4 << 20

    def read_into(self, offset: int, dest: np.ndarray) -> None:
        """Read len(dest) bytes at offset, READ_STEP at a time, each step dropped from the page cache right after
        (a cgroup limit counts the cache: a 70 MiB lm_head read whole would hold 70 MiB of it for a moment)."""
        view = memoryview(dest.reshape(-1).view(np.uint8))
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done: done + self.READ_STEP]], offset + done)
            except OSError as e:
                raise PowerlowError(f"{self.path}: read error ({e.strerror or e}); check the disk and the file "
                                    "(re-convert the model if it is damaged)") from None
            if n <= 0:
                raise PowerlowError(f"{self.path}: unexpected end of file; re-convert the model")
            if n >= 1 << 16:
                self._drop(offset + done, n)
            done += n
        self._drop(offset, done)          # the pages at the steps' edges

    def _drop(self, offset: int, n: int) -> None:
        try:
            os.posix_fadvise(self.fd, offset, n, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):
            pass

    def read(self, key: str) -> np.ndarray:
        m = self.meta.get(key)
        if m is None:
            raise PowerlowError(f"{self.path}: tensor {key!r} is missing; re-convert the model")
        dt = _DTYPES.get(m["dtype"])
        if dt is None:
            raise PowerlowError(f"{self.path}: tensor {key!r} has dtype {m['dtype']}; re-convert the model")
        off, n = self.span(key)
        a = np.empty(m["shape"], dt)
        if a.nbytes != n:
            raise PowerlowError(f"{self.path}: tensor {key!r} has {n} bytes for shape {m['shape']}; re-convert the model")
        self.read_into(off, a)
        self.check_read(off, n, a)
        return a

    def drop_cache(self) -> None:
        self._drop(0, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def matrix_planes(fmt: str, rows: int, cols: int) -> list[tuple[str, np.dtype, tuple]]:
    """(plane suffix, dtype, shape) of a stored matrix; an "f32" matrix is one float32 plane without suffix."""
    if fmt == "f32":
        return [("", np.dtype(np.float32), (rows, cols))]
    return formats._plane_shapes(fmt, rows, cols)


def _key(name: str, plane: str) -> str:
    return f"{name}.{plane}" if plane else name


@dataclass
class Part:
    """Rows [src_row, src_row + n_rows) of stored matrix ``name`` placed at row ``dst_row`` of a unit matrix."""
    name: str
    src_row: int
    n_rows: int
    dst_row: int


class Unit:
    """A set of matrices built from rows of stored ones, laid out in one buffer (each plane 64-byte aligned).

    ``reads`` are (file offset, nbytes, offset in the buffer); ``build(buf)`` gives the matrices as views."""

    def __init__(self, label: str, matrices: list[tuple[str, str, int, int, list[Part]]], tfile: TensorFile):
        self.label = label
        self.tfile = tfile            # its checksums (check_reads)
        self.matrices = []            # (key, fmt, rows, cols, [(plane, dtype, shape, offset)])
        self.reads: list[tuple[int, int, int]] = []
        off = 0
        for key, fmt, rows, cols, parts in matrices:
            planes = []
            for plane, dt, shape in matrix_planes(fmt, rows, cols):
                row_bytes = dt.itemsize * int(np.prod(shape[1:]))
                for p in parts:
                    src, n = tfile.span(_key(p.name, plane))
                    src_rows = n // row_bytes if row_bytes else 0
                    if p.src_row + p.n_rows > src_rows:
                        raise PowerlowError(f"{tfile.path}: {_key(p.name, plane)} has {src_rows} rows, "
                                            f"expected at least {p.src_row + p.n_rows}; re-convert the model")
                    self.reads.append((src + p.src_row * row_bytes, p.n_rows * row_bytes, off + p.dst_row * row_bytes))
                planes.append((plane, dt, shape, off))
                off += -(-row_bytes * rows // PLANE_ALIGN) * PLANE_ALIGN
            self.matrices.append((key, fmt, rows, cols, planes))
        self.nbytes = off

    def build(self, buf: np.ndarray) -> dict:
        out = {}
        for key, fmt, rows, cols, planes in self.matrices:
            arrs = {}
            for plane, dt, shape, off in planes:
                n = int(np.prod(shape))
                arrs[plane] = np.frombuffer(buf, dtype=dt, count=n, offset=off).reshape(shape)
            out[key] = arrs[""] if fmt == "f32" else formats.QMatrix(fmt, rows, cols, arrs)
        if "wqkv.0" in out:     # q, k, v kept apart (attention_unit): the parts tuple
            out["wqkv"] = tuple(out.pop(f"wqkv.{i}") for i in range(3))
        return out

    def load(self, tfile: TensorFile) -> dict:
        """Read the unit now into its own buffer (a resident unit)."""
        from .io import aligned_buffer
        buf = aligned_buffer(max(self.nbytes, PLANE_ALIGN))
        for src, n, dst in self.reads:
            tfile.read_into(src, buf[dst: dst + n])
        self.check_reads(buf)
        return self.build(buf)

    def check_reads(self, buf: np.ndarray) -> None:
        """The whole tensors this unit holds in ``buf`` against their checksums (PowerlowError on a mismatch)."""
        for src, n, dst in self.reads:
            self.tfile.check_read(src, n, buf[dst: dst + n])


def read_matrix(tensors: dict, tfile: TensorFile, name: str):
    """A stored matrix (or an f32 tensor of any shape) read whole into its own aligned buffer."""
    meta = tensors[name]
    if meta["fmt"] == "f32" and len(meta["shape"]) != 2:
        return tfile.read(name)
    rows, cols = meta["shape"]
    return Unit(name, [(name, meta["fmt"], rows, cols, [Part(name, 0, rows, 0)])], tfile).load(tfile)[name]


def attention_unit(tensors: dict, tfile: TensorFile, layer: int) -> Unit:
    """Layer ``layer``'s wqkv (q, k, v rows fused; or, when their formats differ, the three matrices, which
    Unit.build hands out as the tuple wqkv = (q, k, v)) and wo."""
    p = f"blk.{layer}."
    q, k, v, o = (tensors[p + n] for n in ("attn_q", "attn_k", "attn_v", "attn_output"))
    if not (q["shape"][1] == k["shape"][1] == v["shape"][1]):
        raise PowerlowError(f"{tfile.path.parent}: layer {layer} has q/k/v of different widths; re-convert the model")
    rq, rk, rv = q["shape"][0], k["shape"][0], v["shape"][0]
    wo = ("wo", o["fmt"], *o["shape"], [Part(p + "attn_output", 0, o["shape"][0], 0)])
    if not (q["fmt"] == k["fmt"] == v["fmt"]):
        mats = [(f"wqkv.{i}", t["fmt"], r, t["shape"][1], [Part(p + n, 0, r, 0)])
                for i, (n, t, r) in enumerate((("attn_q", q, rq), ("attn_k", k, rk), ("attn_v", v, rv)))]
        return Unit(f"layer {layer} attention", mats + [wo], tfile)
    parts = [Part(p + "attn_q", 0, rq, 0), Part(p + "attn_k", 0, rk, rq), Part(p + "attn_v", 0, rv, rq + rk)]
    return Unit(f"layer {layer} attention", [("wqkv", q["fmt"], rq + rk + rv, q["shape"][1], parts), wo], tfile)


def lm_head_units(tensors: dict, tfile: TensorFile, name: str, max_bytes: int | None) -> list[tuple[int, Unit]]:
    """The lm_head as row chunks of at most ``max_bytes`` (None: one unit) -> [(first row, unit)]."""
    meta = tensors[name]
    rows, cols = meta["shape"]
    per_row = sum(dt.itemsize * int(np.prod(s[1:])) for _, dt, s in matrix_planes(meta["fmt"], 1, cols))
    # chunks start on multiples of ROW_TILE rows: the kernels group rows in tiles, and a row computed in the
    # tail of a chunk would round differently from the same row inside a tile of the whole matrix
    # (measured: 1-ulp differences); aligned, chunked logits are bit-identical to the whole matmul (a test)
    step = rows if max_bytes is None else max(ROW_TILE, (max_bytes - PLANE_ALIGN * 4) // per_row // ROW_TILE * ROW_TILE)
    out = []
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        out.append((r0, Unit(f"lm_head rows {r0}..{r0 + n}", [("w", meta["fmt"], n, cols, [Part(name, r0, n, 0)])], tfile)))
    return out


class EmbeddingRows:
    """Token embeddings read a row at a time from resident.safetensors (with a budget: one row a token)."""

    def __init__(self, tfile: TensorFile, name: str, meta: dict):
        self.tfile, self.fmt = tfile, meta["fmt"]
        self.rows, self.cols = meta["shape"]
        self.planes = []
        for plane, dt, shape in matrix_planes(self.fmt, 1, self.cols):
            off, _ = tfile.span(_key(name, plane))
            self.planes.append((plane, dt, shape[1:], off, dt.itemsize * int(np.prod(shape[1:]))))

    def rows_f32(self, ids: np.ndarray) -> np.ndarray:
        T = len(ids)
        arrs = {}
        for plane, dt, rest, off, rb in self.planes:
            a = np.empty((T, *rest), dt)
            for i, t in enumerate(ids):
                self.tfile.read_into(off + int(t) * rb, a[i])
            arrs[plane] = a
        if self.fmt == "f32":
            return arrs[""].astype(np.float32)
        return formats.dequantize(formats.QMatrix(self.fmt, T, self.cols, arrs))


class WeightRing:
    """Streamed units through ``n_slots`` unit-sized buffers, read ahead in consumption order (cyclic)."""

    def __init__(self, path, units: list[Unit], n_slots: int, *, queue_depth: int = 4, o_direct: bool = True,
                 clock=None):
        from .io import RangeReader, aligned_buffer
        self.units = units
        self.n = len(units)
        self.n_slots = max(1, min(n_slots, self.n))
        self.slot_bytes = -(-max(u.nbytes for u in units) // 4096) * 4096
        self.bufs = [aligned_buffer(self.slot_bytes) for _ in range(self.n_slots)]
        # tensor offsets in the file are not 4 KiB-aligned: O_DIRECT reads go through each reader thread's
        # bounce buffer (one copy); where O_DIRECT is refused, buffered reads with the page cache dropped behind.
        # The readers are the streaming core's C threads (no GIL); each slot is one completion group
        per_unit = max(sum(-(-n // READ_CHUNK) for _, n, _ in u.reads) for u in units)
        self.reader = RangeReader(path, depth=queue_depth, o_direct=o_direct, groups=self.n_slots,
                                  ranges=self.n_slots * per_unit, clock=clock)
        self._queue: list[tuple[int, int]] = []      # (unit, slot) in consumption order
        self._free = list(range(self.n_slots))
        self._next = 0
        self._current: tuple[int, int] | None = None
        self._views: dict[tuple[int, int], dict] = {}
        self.wait_seconds = 0.0
        self.reads = 0
        self._checked: set[int] = set()       # units whose tensors were checked (at their first read)
        self._fill()

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def _fill(self) -> None:
        while self._free:
            slot = self._free.pop(0)
            j = self._next
            self._next = (j + 1) % self.n
            buf = self.bufs[slot]
            for src, n, dst in self.units[j].reads:
                for a in range(0, n, READ_CHUNK):
                    self.reader.read(src + a, buf, dst + a, min(READ_CHUNK, n - a), slot)
            self._queue.append((j, slot))
            self.reads += 1

    def acquire(self, j: int) -> dict:
        """Unit j's matrices (waits for its read). Units are asked for in order; anything else restarts the ring."""
        if self._current is not None:
            self.release()
        if not self._queue or self._queue[0][0] != j:
            self._restart(j)
        unit, slot = self._queue.pop(0)
        t = time.perf_counter()
        self.reader.wait(slot)
        self.wait_seconds += time.perf_counter() - t
        if unit not in self._checked:       # once per unit: later reads of the same bytes are not re-checked
            self.units[unit].check_reads(self.bufs[slot])
            self._checked.add(unit)
        self._current = (unit, slot)
        key = (unit, slot)               # the views of a unit in a slot are made once, not every token
        if key not in self._views:
            self._views[key] = self.units[unit].build(self.bufs[slot])
        return self._views[key]

    def release(self) -> None:
        """The current unit is no longer used: its slot reads the next unit in order."""
        if self._current is None:
            return
        self._free.append(self._current[1])
        self._current = None
        self._fill()

    def _restart(self, j: int) -> None:
        for _, slot in self._queue:             # let reads in flight land before their buffers are reused
            try:
                self.reader.wait(slot)
            except PowerlowError:
                pass                            # those bytes are not used; a read the ring needs fails again
            self._free.append(slot)
        self._queue.clear()
        self._next = j
        self._fill()

    def close(self) -> None:
        self.reader.close()
