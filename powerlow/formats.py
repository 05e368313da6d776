"""Quantized weight formats: the numpy reference (the source of truth for the C kernels).

A weight matrix is (N rows = outputs, K cols = inputs), quantized along K in groups. K that is not
a multiple of the group is zero-padded to Kp. Every format is a few *planes*: contiguous arrays with
one row per matrix row, so a row's codes stream linearly and its scales sit in a separate small
stream (two linear streams are what hardware prefetchers follow best; interleaving scales into the
code stream would break the 64-byte alignment of the code loads in the SIMD kernels).

| fmt  | group | planes (per row)                  | weight                      | bits/weight |
|------|-------|-----------------------------------|-----------------------------|-------------|
| q8   | 32    | qs int8 [Kp], d f16 [G]           | d*q, q in -128..127         | 8.5  (= GGUF Q8_0) |
| q4_0 | 32    | qs u8 [Kp/2], d f16 [G]           | d*(q-8), q in 0..15         | 4.5  (= GGUF Q4_0) |
| q4_1 | 32    | qs u8 [Kp/2], d f16, m f16 [G]    | d*q + m, q in 0..15         | 5.0  (= GGUF Q4_1) |
| q2   | 64    | qs u8 [Kp/4], d f16, m f16 [G]    | d*q + m, q in 0..3          | 2.5  |
| tern | 64    | qs u8 [Kp/4], d f16 [G]           | d*(c-1), c in 0..2          | 2.25 |
| q1   | 64    | qs u8 [Kp/8], d f16 [G]           | d*(2b-1), b in 0..1         | 1.25 |

Bit order inside one group (each group is self-contained, so a column slice on group boundaries is
a byte slice; this is what select_cols_blocks and the bundle down matrices rely on):
  * q4_0/q4_1 (16 bytes per 32): byte i holds element i in the low nibble, element i+16 in the high
    nibble (GGML's order, so GGUF imports are a byte copy). One shift+mask gives 16 consecutive
    elements, which is what a SIMD lane of activations wants.
  * q2/tern (16 bytes per 64): byte i holds element 16*s + i in bits 2s..2s+1 (s = 0..3). Shift by 2s
    and mask 3 -> elements 16s..16s+15 of the group, again consecutive.
  * q1 (8 bytes per 64): byte i holds element 8*s + i in bit s (s = 0..7).
Low-bit groups are 64, not 32, so the fp16 scale costs 0.25 bit instead of 0.5; 64 is still a
divisor of every cluster size we use (C = 64), so bundles' down matrices stay whole groups.

Activations (quantize_act) are quantized per token in blocks of 32 like GGUF Q8_1: d = amax/127,
q = roundf(x/d), d is kept as the fp16-rounded value (llama.cpp stores it in fp16), s = fp16(d*sum q).
matmul_ref defines the numerics every kernel must reproduce: per 32-block integer dot, scaled in
float32, plus m*s for formats with a min (q4_1, q2).

Raw GGML blocks (q5_0, q5_1, q4_k, q5_k, q6_k): the one plane qs (rows, n_blocks * block_bytes) holds
GGML's block bytes unchanged, scales included (fp16 d / dmin, the K-quants' packed 6-bit or int8 sub-block
scales), so a GGUF import is a byte copy, select_rows works, and a column slice on block (q5: 32, K-quants:
256-column super-block) boundaries is a byte slice of each row. Block layouts (element e of a block):
  * q5_0 (22 B): d f16 | qh u32 (bit e = bit 4 of e) | qs 16 B (byte i: e = i low nibble, e = i+16 high);
    w = d*(q-16). q5_1 (24 B): d f16 | m f16 | qh | qs; w = d*q + m. Activations: quantize_act (Q8_0/Q8_1).
  * q4_k (144 B): d f16 | dmin f16 | 12 B scales (6-bit sc_j, m_j of the 8 32-sub-blocks, packed as GGML)
    | qs 128 B (bytes 32p..32p+31: sub-block 2p in the low nibbles, 2p+1 in the high); w = d*sc_j*q - dmin*m_j.
  * q5_k (176 B): as q4_k with qh 32 B after the scales (bit j of byte l = bit 4 of element l of sub-block j).
  * q6_k (210 B): ql 128 | qh 64 | 16 int8 scales (per 16 elements) | d f16. Element 128h + 32k + l: low
    nibble of ql[64h + 32(k%2) + l] (high nibble if k >= 2), bits 2k..2k+1 of qh[32h + l] on top;
    w = d*sc*(q-32).
K-quants take K-quant activations (quantize_act_k, GGML's Q8_K: per 256 a float32 d, int8 q, int16 sums
per 16), and K must be a multiple of 256 (no padding). Their reference numerics (matmul_ref), per row and
token, super-block by super-block in order, fma = one rounding (float64 emulation in numpy):
  q4_k/q5_k: isum = sum_j sc_j * dot_j, imin = sum_j m_j * (bsum_2j + bsum_2j+1)    (int32, exact)
             y = fma(f32(isum), d_w*d_x, y); y = fma(f32(imin), -(dmin_w*d_x), y)
  q6_k:      isum = sum_j sc_j * (dot16_j - 32*bsum_j); y = fma(f32(isum), d_w*d_x, y)
Every kernel performs exactly these float operations, so it matches the reference bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACT_BLOCK = 32  # activation quantization block (int8, one float scale per block)
ALIGN = 64      # every plane of a packed matrix starts on a 64-byte boundary


@dataclass(frozen=True)
class FormatSpec:
    name: str
    bits_per_weight: float   # including scales and mins
    group: int               # weights per scale
    qbytes: int              # code bytes per group
    planes: tuple            # plane names in packed order; "qs" first
    has_min: bool            # True: w = d*q + m ; False: symmetric form
    raw: bool = False        # True: qs holds GGML's own block bytes (scales inside), no d/m planes
    act: str = "q8"          # activation type: "q8" (quantize_act, per 32) or "q8_k" (quantize_act_k, per 256)


FORMATS: dict[str, FormatSpec] = {
    "q8":   FormatSpec("q8", 8.5, 32, 32, ("qs", "d"), False),
    "q4_0": FormatSpec("q4_0", 4.5, 32, 16, ("qs", "d"), False),
    "q4_1": FormatSpec("q4_1", 5.0, 32, 16, ("qs", "d", "m"), True),
    "q2":   FormatSpec("q2", 2.5, 64, 16, ("qs", "d", "m"), True),
    "tern": FormatSpec("tern", 2.25, 64, 16, ("qs", "d"), False),
    "q1":   FormatSpec("q1", 1.25, 64, 8, ("qs", "d"), False),
    # GGML's block formats kept as their raw block bytes (see "Raw GGML blocks" above)
    "q5_0": FormatSpec("q5_0", 5.5, 32, 22, ("qs",), False, True),
    "q5_1": FormatSpec("q5_1", 6.0, 32, 24, ("qs",), True, True),
    "q4_k": FormatSpec("q4_k", 4.5, 256, 144, ("qs",), True, True, "q8_k"),
    "q5_k": FormatSpec("q5_k", 5.5, 256, 176, ("qs",), True, True, "q8_k"),
    "q6_k": FormatSpec("q6_k", 6.5625, 256, 210, ("qs",), False, True, "q8_k"),
}
KQUANTS = ("q4_k", "q5_k", "q6_k")
QK_K = 256      # K-quant super-block

_PLANE_DTYPE = {"d": np.float16, "m": np.float16}
LOW_BIT = ("q2", "tern", "q1")   # the 1/1.58/2-bit formats (no GGUF counterpart)


def _spec(fmt: str) -> FormatSpec:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r}; known: {', '.join(FORMATS)}") from None


def _plane_shapes(fmt: str, rows: int, cols: int) -> list[tuple[str, np.dtype, tuple]]:
    sp = _spec(fmt)
    if rows < 0 or cols < 1:
        raise ValueError(f"bad matrix shape ({rows}, {cols})")
    if sp.group == QK_K and cols % QK_K:
        raise ValueError(f"{fmt} needs a column count that is a multiple of {QK_K}, got {cols}")
    g = -(-cols // sp.group)
    out = []
    for name in sp.planes:
        if name == "qs":
            dt = np.dtype(np.int8) if fmt == "q8" else np.dtype(np.uint8)
            out.append((name, dt, (rows, g * sp.qbytes)))
        else:
            out.append((name, np.dtype(_PLANE_DTYPE[name]), (rows, g)))
    return out


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def packed_nbytes(fmt: str, rows: int, cols: int) -> int:
    """len(QMatrix.to_bytes()) for this format and shape (each plane padded to 64 bytes)."""
    return sum(_pad(dt.itemsize * int(np.prod(shape))) for _, dt, shape in _plane_shapes(fmt, rows, cols))


class QMatrix:
    """A packed quantized matrix (rows, cols) in format fmt; planes are C-contiguous arrays.

    tl: None, or the same matrix re-laid for the AVX2 / AVX-512 table-lookup kernels (kernels.prepare_tl): built
    once for a matrix whose planes no longer change; not part of the stored form (to_bytes, tensors)."""

    __slots__ = ("fmt", "rows", "cols", "planes", "tl", "calls")

    def __init__(self, fmt: str, rows: int, cols: int, planes: dict):
        shapes = _plane_shapes(fmt, rows, cols)
        if set(planes) != {n for n, _, _ in shapes}:
            raise ValueError(f"{fmt} needs planes {[n for n, _, _ in shapes]}, got {sorted(planes)}")
        for name, dt, shape in shapes:
            a = planes[name]
            if a.dtype != dt or a.shape != shape or not a.flags.c_contiguous:
                raise ValueError(f"{fmt} plane {name!r}: expected C-contiguous {dt} {shape}, "
                                 f"got {a.dtype} {a.shape} contiguous={a.flags.c_contiguous}")
        self.fmt, self.rows, self.cols = fmt, int(rows), int(cols)
        self.planes = {n: planes[n] for n, _, _ in shapes}
        self.tl = None
        self.calls = None           # powerlow.kernels' memoized kernel arguments (per T = 1 | T > 1)

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.fmt]

    @property
    def padded_cols(self) -> int:
        g = self.spec.group
        return -(-self.cols // g) * g

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.planes.values())

    def __repr__(self) -> str:
        return f"QMatrix({self.fmt}, {self.rows}x{self.cols}, {self.nbytes} bytes)"

    def to_bytes(self) -> bytes:
        parts = []
        for a in self.planes.values():
            b = a.tobytes()
            parts.append(b + b"\0" * (_pad(len(b)) - len(b)))
        return b"".join(parts)

    @classmethod
    def from_buffer(cls, fmt: str, rows: int, cols: int, buf, offset: int = 0) -> "QMatrix":
        """Zero-copy views into buf (bytes, bytearray, mmap, numpy uint8 array): inverse of to_bytes."""
        planes = {}
        off = int(offset)
        for name, dt, shape in _plane_shapes(fmt, rows, cols):
            n = int(np.prod(shape))
            planes[name] = np.frombuffer(buf, dtype=dt, count=n, offset=off).reshape(shape)
            off += _pad(n * dt.itemsize)
        return cls(fmt, rows, cols, planes)

    def tensors(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.{n}": a for n, a in self.planes.items()}

    @classmethod
    def from_tensors(cls, fmt: str, rows: int, cols: int, tensors: dict, prefix: str) -> "QMatrix":
        planes = {}
        for name, _, _ in _plane_shapes(fmt, rows, cols):
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise ValueError(f"missing tensor {key!r} for a {fmt} matrix")
            planes[name] = np.ascontiguousarray(tensors[key])
        return cls(fmt, rows, cols, planes)


# ---------------------------------------------------------------- packing helpers

def _pack(fmt: str, codes: np.ndarray) -> np.ndarray:
    """codes (N, G, group) uint8 -> qs (N, G*qbytes) in the format's bit order."""
    n, g, _ = codes.shape
    c = codes.astype(np.uint8)
    if fmt in ("q4_0", "q4_1"):
        qs = c[:, :, :16] | (c[:, :, 16:] << 4)
    elif fmt in ("q2", "tern"):
        c = c.reshape(n, g, 4, 16)
        qs = c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)
    elif fmt == "q1":
        c = c.reshape(n, g, 8, 8)
        qs = np.zeros((n, g, 8), np.uint8)
        for s in range(8):
            qs |= c[:, :, s] << s
    else:
        raise AssertionError(fmt)
    return np.ascontiguousarray(qs.reshape(n, -1), dtype=np.uint8)


def _unpack(q: QMatrix) -> np.ndarray:
    """QMatrix -> integer codes (N, G, group): int8 values for q8, else uint8 codes."""
    sp, qs = q.spec, q.planes["qs"]
    n = q.rows
    if q.fmt in ("q5_0", "q5_1"):
        from .formats_ggml import _q5_fields
        return _q5_fields(q)[0]
    if q.fmt == "q8":
        return qs.reshape(n, -1, 32)
    b = qs.reshape(n, -1, sp.qbytes)
    if q.fmt in ("q4_0", "q4_1"):
        return np.concatenate([b & 15, b >> 4], axis=2)
    if q.fmt in ("q2", "tern"):
        return np.concatenate([(b >> (2 * s)) & 3 for s in range(4)], axis=2)
    if q.fmt == "q1":
        return np.concatenate([(b >> s) & 1 for s in range(8)], axis=2)
    raise AssertionError(q.fmt)


def _int_weights(q: QMatrix) -> np.ndarray:
    """Signed integer weight codes (N, G, group) int16 such that w = d*iw (+ m for formats with a min)."""
    c = _unpack(q).astype(np.int16)
    if q.fmt == "q4_0":
        return c - 8
    if q.fmt == "q5_0":
        return c - 16
    if q.fmt == "tern":
        return c - 1
    if q.fmt == "q1":
        return 2 * c - 1
    return c


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf: half away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _f16(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float16)


# ---------------------------------------------------------------- quantize / dequantize

def quantize(w: np.ndarray, fmt: str) -> QMatrix:
    """float32 (N, K) -> QMatrix. q8/q4_0/q4_1 follow GGML's reference quantizers."""
    sp = _spec(fmt)
    w = np.asarray(w, np.float32)
    if w.ndim != 2 or w.shape[1] < 1:
        raise ValueError(f"quantize expects a 2-D (N, K) array, got shape {w.shape}")
    if sp.raw:
        from .formats_ggml import _quantize_raw
        return _quantize_raw(w, fmt)
    n, k = w.shape
    g = -(-k // sp.group)
    x = np.zeros((n, g * sp.group), np.float32)
    x[:, :k] = w
    x = x.reshape(n, g, sp.group)
    planes = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt == "q8":
            d = np.abs(x).max(axis=2) / np.float32(127)
            idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
            q = _roundf(x * idv[..., None]).astype(np.int8)
            planes = {"qs": np.ascontiguousarray(q.reshape(n, -1)), "d": _f16(d)}
        elif fmt == "q4_0":
            imax = np.abs(x).argmax(axis=2)[..., None]
            mx = np.take_along_axis(x, imax, axis=2)[..., 0]
            d = mx / np.float32(-8)
            idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
            q = np.clip(np.trunc(x * idv[..., None] + np.float32(8.5)), 0, 15)
            planes = {"qs": _pack(fmt, q), "d": _f16(d)}
        elif fmt in ("q4_1", "q2"):
            lv = 15 if fmt == "q4_1" else 3
            mn, mx = x.min(axis=2), x.max(axis=2)
            d = (mx - mn) / np.float32(lv)
            if fmt == "q4_1":  # GGML: codes from the float32 d and min
                idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
                q = np.clip(np.trunc((x - mn[..., None]) * idv[..., None] + np.float32(0.5)), 0, lv)
                planes = {"qs": _pack(fmt, q), "d": _f16(d), "m": _f16(mn)}
            else:  # 2 bits: shrink the range around its centre (clip outliers) where that lowers the
                # squared error; codes are computed against the stored fp16 d and m
                ctr, half = (mx + mn) / 2, (mx - mn) / 2
                best_err = np.full((n, g), np.inf, np.float32)
                best = None
                for f in (1.0, 0.9, 0.8, 0.7, 0.6):
                    m16 = _f16(ctr - half * np.float32(f)).astype(np.float32)
                    d16 = _f16(half * np.float32(2 * f / lv)).astype(np.float32)
                    idv = np.where(d16 == 0, 0, 1 / d16).astype(np.float32)
                    q = np.clip(_roundf((x - m16[..., None]) * idv[..., None]), 0, lv)
                    err = ((x - (d16[..., None] * q + m16[..., None])) ** 2).sum(axis=2)
                    better = err < best_err
                    best_err = np.where(better, err, best_err)
                    if best is None:
                        best = [q, d16, m16]
                    else:
                        best = [np.where(better[..., None], q, best[0]),
                                np.where(better, d16, best[1]), np.where(better, m16, best[2])]
                planes = {"qs": _pack(fmt, best[0]), "d": _f16(best[1]), "m": _f16(best[2])}
        elif fmt == "tern":
            # d chosen per group among a few fractions of amax to minimise squared error
            amax = np.abs(x).max(axis=2)
            best_err = np.full((n, g), np.inf, np.float32)
            best_d = np.zeros((n, g), np.float32)
            for f in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
                d = _f16(amax * np.float32(f)).astype(np.float32)
                idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
                c = np.clip(_roundf(x * idv[..., None]), -1, 1)
                # optimal scale for these codes, then its error
                nz = np.abs(c).sum(axis=2)
                dd = _f16(np.where(nz > 0, (np.abs(x) * np.abs(c)).sum(axis=2) / np.maximum(nz, 1), 0))
                dd = dd.astype(np.float32)
                err = ((x - dd[..., None] * c) ** 2).sum(axis=2)
                better = err < best_err
                best_err = np.where(better, err, best_err)
                best_d = np.where(better, dd, best_d)
            idv = np.where(best_d == 0, 0, 1 / best_d).astype(np.float32)
            c = np.clip(_roundf(x * idv[..., None]), -1, 1)
            planes = {"qs": _pack(fmt, c + 1), "d": _f16(best_d)}
        elif fmt == "q1":
            d = np.abs(x).mean(axis=2)  # least-squares scale for sign codes
            b = (x >= 0).astype(np.uint8)
            planes = {"qs": _pack(fmt, b), "d": _f16(d)}
    return QMatrix(fmt, n, k, planes)


def dequantize(q: QMatrix) -> np.ndarray:
    """QMatrix -> float32 (N, K). Raw GGML formats: the float operations of gguf.quants (bit-identical)."""
    if q.spec.group == QK_K:
        from .formats_ggml import _dequantize_k
        return _dequantize_k(q)
    iw = _int_weights(q).astype(np.float32)
    d, m = _scales(q)
    w = d[..., None] * iw
    if q.spec.has_min:
        w = w + m[..., None]
    return np.ascontiguousarray(w.reshape(q.rows, -1)[:, : q.cols])


_GGML_BLOCKS = {  # name -> (fmt, bytes per 32-block, d offset, m offset or None, qs offset)
    "Q8_0": ("q8", 34, 0, None, 2),
    "Q4_0": ("q4_0", 18, 0, None, 2),
    "Q4_1": ("q4_1", 20, 0, 2, 4),
}


_GGML_RAW = {"Q5_0": "q5_0", "Q5_1": "q5_1", "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}


def from_gguf(raw: np.ndarray, ggml_type_name: str, rows: int, cols: int) -> QMatrix:
    """GGML blocks (GGUFReader tensor.data, (rows, row_bytes) uint8) -> QMatrix, losslessly."""
    if ggml_type_name in _GGML_RAW:
        fmt = _GGML_RAW[ggml_type_name]
        sp = FORMATS[fmt]
        if cols % sp.group:
            raise ValueError(f"{ggml_type_name} tensor with {cols} columns: GGML needs a multiple of {sp.group}")
        raw = np.ascontiguousarray(raw).view(np.uint8)
        need = rows * (cols // sp.group) * sp.qbytes
        if raw.size != need:
            raise ValueError(f"{ggml_type_name} ({rows}, {cols}) needs {need} bytes, got {raw.size}")
        return QMatrix(fmt, rows, cols, {"qs": raw.reshape(rows, -1).copy()})
    if ggml_type_name not in _GGML_BLOCKS:
        raise ValueError(f"from_gguf supports {', '.join(list(_GGML_BLOCKS) + list(_GGML_RAW))}, not {ggml_type_name}")
    fmt, bs, doff, moff, qoff = _GGML_BLOCKS[ggml_type_name]
    if cols % 32:
        raise ValueError(f"{ggml_type_name} tensor with {cols} columns: GGML needs a multiple of 32")
    g = cols // 32
    raw = np.ascontiguousarray(raw).view(np.uint8)
    if raw.size != rows * g * bs:
        raise ValueError(f"{ggml_type_name} ({rows}, {cols}) needs {rows * g * bs} bytes, got {raw.size}")
    b = raw.reshape(rows, g, bs)
    planes = {"qs": np.ascontiguousarray(b[:, :, qoff:]).reshape(rows, -1),
              "d": np.ascontiguousarray(b[:, :, doff:doff + 2]).view(np.float16).reshape(rows, g)}
    if fmt == "q8":
        planes["qs"] = planes["qs"].view(np.int8)
    if moff is not None:
        planes["m"] = np.ascontiguousarray(b[:, :, moff:moff + 2]).view(np.float16).reshape(rows, g)
    return QMatrix(fmt, rows, cols, planes)


def select_rows(q: QMatrix, idx: np.ndarray) -> QMatrix:
    """Rows idx of q (a subset or a permutation), as a new contiguous QMatrix."""
    idx = np.asarray(idx, np.int64)
    if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= q.rows)):
        raise ValueError(f"row indices must be 1-D within [0, {q.rows})")
    planes = {n: np.ascontiguousarray(a[idx]) for n, a in q.planes.items()}
    return QMatrix(q.fmt, idx.size, q.cols, planes)


def select_cols_blocks(q: QMatrix, start: int, stop: int) -> QMatrix:
    """Columns [start, stop) of q; start must be a group boundary, stop a group boundary or q.cols."""
    sp = q.spec
    stop = min(stop, q.cols)
    if start % sp.group or (stop % sp.group and stop != q.cols) or not 0 <= start < stop:
        raise ValueError(f"{q.fmt} column slice [{start}, {stop}) must lie on {sp.group}-column groups")
    g0, g1 = start // sp.group, -(-stop // sp.group)
    planes = {}
    for n, a in q.planes.items():
        w = sp.qbytes if n == "qs" else 1
        planes[n] = np.ascontiguousarray(a[:, g0 * w:g1 * w])
    return QMatrix(q.fmt, q.rows, stop - start, planes)


# ---------------------------------------------------------------- activations and the reference matmul

@dataclass(frozen=True)
class ActQ:
    """Per-token int8 activations in blocks of 32 (GGUF Q8_1 style).

    qs int8 (T, Kp); d float32 (T, Kp//32) fp16-rounded scale; s float32 (T, Kp//32) = fp16(d*sum qs)
    (used by formats with a min); isum int32 (T, Kp//32) = sum qs (exact, used by the kernels).
    """
    qs: np.ndarray
    d: np.ndarray
    s: np.ndarray
    isum: np.ndarray


def quantize_act(x: np.ndarray, kp: int | None = None) -> ActQ:
    """float32 (T, K) -> ActQ, zero-padded to kp columns (default: K rounded up to 32)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize_act expects (T, K), got shape {x.shape}")
    t, k = x.shape
    kp = -(-k // ACT_BLOCK) * ACT_BLOCK if kp is None else kp
    if kp % ACT_BLOCK or kp < k:
        raise ValueError(f"padded width {kp} must be a multiple of {ACT_BLOCK} and >= {k}")
    xp = np.zeros((t, kp), np.float32)
    xp[:, :k] = x
    xb = xp.reshape(t, kp // ACT_BLOCK, ACT_BLOCK)
    d = np.abs(xb).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        idv = np.where(d == 0, 0, np.float32(1) / d).astype(np.float32)
    q = _roundf(xb * idv[..., None]).astype(np.int8)
    isum = q.astype(np.int32).sum(axis=2)
    d16 = _f16(d).astype(np.float32)
    s16 = _f16(d * isum.astype(np.float32)).astype(np.float32)
    return ActQ(np.ascontiguousarray(q.reshape(t, kp)), d16, s16, isum.astype(np.int32))


def matmul_ref(q: QMatrix, x: np.ndarray) -> np.ndarray:
    """THE reference numerics: y (T, N) = x (T, K) @ W.T with x quantized by quantize_act.

    y[t, n] = sum_b (d_w[n, g(b)] * d_x[t, b]) * sum_{i in b} iw[n, i] * qx[t, i]   (float32 products)
              + sum_b m[n, g(b)] * s_x[t, b]                                        (formats with a min)
    """
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != q.cols:
        raise ValueError(f"x must be (T, {q.cols}), got {x.shape}")
    sp = q.spec
    if sp.act == "q8_k":
        from .formats_ggml import _matmul_ref_k
        return _matmul_ref_k(q, x)
    a = quantize_act(x, q.padded_cols)
    t, kp = a.qs.shape
    nb = kp // ACT_BLOCK
    iw = _int_weights(q).reshape(q.rows, nb, ACT_BLOCK).astype(np.int32)
    qx = a.qs.reshape(t, nb, ACT_BLOCK).astype(np.int32)
    idot = np.einsum("nbi,tbi->tnb", iw, qx, optimize=True).astype(np.float32)  # exact small ints
    per = sp.group // ACT_BLOCK
    d, m = _scales(q)
    dw = np.repeat(d, per, axis=1)  # (N, nb)
    y = (idot * (dw[None] * a.d[:, None, :])).sum(axis=2, dtype=np.float32)
    if sp.has_min:
        mw = np.repeat(m, per, axis=1)
        y = y + (mw[None] * a.s[:, None, :]).sum(axis=2, dtype=np.float32)
    return np.ascontiguousarray(y, dtype=np.float32)


# ---------------------------------------------------------------- raw GGML blocks: powerlow.formats_ggml

def _scales(q: QMatrix) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group float32 scale d and min m (None without a min) of a 32/64-group format, (N, G)."""
    if q.fmt in ("q5_0", "q5_1"):
        from .formats_ggml import _q5_fields
        _, d, m = _q5_fields(q)
        return d, m
    m = q.planes["m"].astype(np.float32) if q.spec.has_min else None
    return q.planes["d"].astype(np.float32), m


# ---------------------------------------------------------------- bundle layout (the ffn.bin record)

BUNDLE_ALIGN = 4096


@dataclass(frozen=True)
class BundleLayout:
    """Byte layout of one bundle: gate (C, K), up (C, K) in fmt, down (K, C) in down_fmt, each a packed
    QMatrix (to_bytes form, planes 64-byte aligned) at its offset; stride = nbytes rounded up to 4 KiB."""
    fmt: str
    down_fmt: str
    C: int
    K: int
    gate_off: int
    up_off: int
    down_off: int
    nbytes: int
    stride: int

    @classmethod
    def make(cls, fmt: str, down_fmt: str, C: int, K: int) -> "BundleLayout":
        g = _spec(down_fmt).group
        if C < 1 or C % g:
            raise ValueError(f"cluster size {C} must be a positive multiple of the {down_fmt} group ({g})")
        mat = packed_nbytes(fmt, C, K)
        nbytes = 2 * mat + packed_nbytes(down_fmt, K, C)
        return cls(fmt, down_fmt, C, K, 0, mat, 2 * mat, nbytes, -(-nbytes // BUNDLE_ALIGN) * BUNDLE_ALIGN)

    def plane_offsets(self, which: str) -> dict[str, int]:
        """Byte offsets, from the bundle start, of the planes of 'gate', 'up' or 'down'."""
        fmt, rows, cols, off = {"gate": (self.fmt, self.C, self.K, self.gate_off),
                                "up": (self.fmt, self.C, self.K, self.up_off),
                                "down": (self.down_fmt, self.K, self.C, self.down_off)}[which]
        out = {}
        for name, dt, shape in _plane_shapes(fmt, rows, cols):
            out[name] = off
            off += _pad(dt.itemsize * int(np.prod(shape)))
        return out


def random_qmatrix(fmt: str, rows: int, cols: int, rng) -> "QMatrix":
    """A random packed matrix of fmt (random codes, small positive fp16 scales, negative mins) built straight
    in its planes: no float matrix, no quantizer (benchmarks and the dispatcher's timings)."""
    sp = FORMATS[fmt]
    g = -(-cols // sp.group)
    planes = {"qs": _aligned_copy(rng.integers(0, 256, (rows, g * sp.qbytes), dtype=np.uint8))}
    if sp.raw:   # GGML blocks: random codes, sane fp16 scales at their offsets inside each block
        b = planes["qs"].reshape(rows, g, sp.qbytes)
        for off in ((208,) if fmt == "q6_k" else (0,) if fmt == "q5_0" else (0, 2)):
            b[:, :, off:off + 2] = (rng.random((rows, g), np.float32) * 0.01 + 0.001).astype(np.float16)[..., None].view(np.uint8)
        return QMatrix(fmt, rows, cols, planes)
    if fmt == "q8":
        planes["qs"] = planes["qs"].view(np.int8)
    planes["d"] = _aligned_copy((rng.random((rows, g), np.float32) * 0.01 + 0.001).astype(np.float16))
    if sp.has_min:
        planes["m"] = _aligned_copy((-rng.random((rows, g), np.float32) * 0.05).astype(np.float16))
    return QMatrix(fmt, rows, cols, planes)


def _aligned_copy(a: np.ndarray, align: int = ALIGN) -> np.ndarray:
    """a copied to an align-byte-aligned buffer: the planes a model loads are (to_bytes, stream.py), while numpy
    puts a large array 16 bytes past a page start, and 512-bit code loads split across cache lines there run the
    q4 kernels ~25% slower out of L2 (a benchmark would time a layout the engine never runs)."""
    from .io import aligned_buffer
    out = aligned_buffer(a.nbytes, align)[:a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


_GGML_NAMES = ("ActQK", "quantize_act_k", "kquant_sums")


def __getattr__(name: str):
    """formats.quantize_act_k, formats.ActQK, formats.kquant_sums live in powerlow.formats_ggml (imported on use:
    it imports this module)."""
    if name in _GGML_NAMES:
        from . import formats_ggml
        return getattr(formats_ggml, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
