"""The raw GGML block formats (q5_0, q5_1, q4_k, q5_k, q6_k): their numpy reference -- block fields, quantizers,
dequantization, GGML's Q8_K activations and the K-quant reference matmul. The layouts are in powerlow.formats's
docstring; powerlow.formats dispatches here for these formats, and ``formats.quantize_act_k`` / ``ActQK`` /
``kquant_sums`` are these."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .formats import FORMATS, QK_K, QMatrix, _f16, _roundf

_Q5_OFF = {"q5_0": 2, "q5_1": 4}   # byte offset of qh in a block (d [, m] before it)


def _q5_fields(q: QMatrix):
    """q5_0 / q5_1 blocks -> codes (N, G, 32) uint8 in 0..31, d (N, G) float32, m (N, G) float32 or None."""
    n, o = q.rows, _Q5_OFF[q.fmt]
    b = q.planes["qs"].reshape(n, -1, q.spec.qbytes)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16)[..., 0].astype(np.float32) if q.fmt == "q5_1" else None
    qh = np.ascontiguousarray(b[:, :, o:o + 4]).view("<u4")[..., 0]
    ql = b[:, :, o + 4:o + 20]
    hi = ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4
    codes = np.concatenate([ql & 15, ql >> 4], axis=2) | hi
    return codes, d, m


def _kq_blocks(q: QMatrix) -> np.ndarray:
    return q.planes["qs"].reshape(q.rows, -1, q.spec.qbytes)


def _k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed scale bytes (..., 12) -> 6-bit sub-block scales and mins (..., 8) uint8."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _k_fields(q: QMatrix):
    """K-quant super-blocks -> dict: codes (N, S, nsub, sublen) uint8 (unsigned), sc, and d (N, S) float32;
    q4_k/q5_k also mn (N, S, 8) and dmin; q6_k sc is int8 per 16."""
    b = _kq_blocks(q)
    n, S = b.shape[:2]
    f16 = lambda a: np.ascontiguousarray(a).view(np.float16)[..., 0].astype(np.float32)
    if q.fmt in ("q4_k", "q5_k"):
        sc, mn = _k_scale_min(b[..., 4:16])
        qs = b[..., 16:144] if q.fmt == "q4_k" else b[..., 48:176]
        qs = qs.reshape(n, S, 4, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(n, S, 8, 32)
        if q.fmt == "q5_k":
            qh = b[..., 16:48]
            codes = codes | ((((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1)) << 4)
        return {"codes": codes, "sc": sc, "mn": mn, "d": f16(b[..., 0:2]), "dmin": f16(b[..., 2:4])}
    ql, qh = b[..., 0:128], b[..., 128:192]
    parts = []
    for h in range(2):
        l0, l1, hh = ql[..., 64 * h:64 * h + 32], ql[..., 64 * h + 32:64 * h + 64], qh[..., 32 * h:32 * h + 32]
        parts += [(l0 & 15) | ((hh & 3) << 4), (l1 & 15) | (((hh >> 2) & 3) << 4),
                  (l0 >> 4) | (((hh >> 4) & 3) << 4), (l1 >> 4) | (((hh >> 6) & 3) << 4)]
    codes = np.stack(parts, axis=2).reshape(n, S, 16, 16)
    return {"codes": codes, "sc": np.ascontiguousarray(b[..., 192:208]).view(np.int8), "d": f16(b[..., 208:210])}


def _dequantize_k(q: QMatrix) -> np.ndarray:
    f = _k_fields(q)
    n = q.rows
    c = f["codes"].astype(np.float32)
    if q.fmt == "q6_k":
        dd = f["d"][..., None] * f["sc"].astype(np.float32)            # (N, S, 16)
        w = dd[..., None] * (f["codes"].astype(np.int8) - np.int8(32)).astype(np.float32)
    else:
        dd = f["d"][..., None] * f["sc"].astype(np.float32)            # (N, S, 8)
        dm = f["dmin"][..., None] * f["mn"].astype(np.float32)
        w = dd[..., None] * c - dm[..., None]
    return np.ascontiguousarray(w.reshape(n, -1).astype(np.float32))


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """inverse of _k_scale_min: (..., 8) 6-bit values -> (..., 12) bytes"""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    a = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([a, b, c], axis=-1)


def _f16b(x: np.ndarray) -> np.ndarray:
    """float32 (...) -> its fp16 bytes (..., 2)"""
    return np.ascontiguousarray(_f16(x)).view(np.uint8).reshape(*np.shape(x), 2)


def _quantize_raw(w: np.ndarray, fmt: str) -> QMatrix:
    """A simple quantizer for the raw GGML formats (q5_0/q5_1 as GGML's reference; K-quants: min-max per
    sub-block, scales quantized to 6 / 8 bits, codes computed against the stored scales)."""
    sp = FORMATS[fmt]
    n, k = w.shape
    if sp.group == QK_K and k % QK_K:
        raise ValueError(f"{fmt} needs a column count that is a multiple of {QK_K}, got {k}")
    g = -(-k // sp.group)
    x = np.zeros((n, g * sp.group), np.float32)
    x[:, :k] = w
    x = x.reshape(n, g, sp.group)
    with np.errstate(divide="ignore", invalid="ignore"):
        if fmt in ("q5_0", "q5_1"):
            if fmt == "q5_0":
                imax = np.abs(x).argmax(axis=2)[..., None]
                d = np.take_along_axis(x, imax, axis=2)[..., 0] / np.float32(-16)
                idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
                codes = np.clip(np.trunc(x * idv[..., None] + np.float32(16.5)), 0, 31).astype(np.uint8)
                head = [_f16b(d)]
            else:
                mn, mx = x.min(axis=2), x.max(axis=2)
                d = (mx - mn) / np.float32(31)
                idv = np.where(d == 0, 0, 1 / d).astype(np.float32)
                codes = np.clip(np.trunc((x - mn[..., None]) * idv[..., None] + np.float32(0.5)), 0, 31).astype(np.uint8)
                head = [_f16b(d), _f16b(mn)]
            qh = np.packbits(codes >> 4, axis=2, bitorder="little")           # (n, g, 4): bit e = element e
            qs = codes[..., :16] & 15 | ((codes[..., 16:] & 15) << 4)
            blocks = np.concatenate(head + [qh, qs], axis=2)
        elif fmt in ("q4_k", "q5_k"):
            lv = 15 if fmt == "q4_k" else 31
            xs = x.reshape(n, g, 8, 32)
            lo = np.minimum(xs.min(axis=3), 0)
            hi = xs.max(axis=3)
            scale, mins = (hi - lo) / np.float32(lv), -lo
            d = scale.max(axis=2) / np.float32(63)
            dmin = mins.max(axis=2) / np.float32(63)
            d16, dm16 = _f16(d).astype(np.float32), _f16(dmin).astype(np.float32)
            sc = np.clip(_roundf(np.where(d16[..., None] > 0, scale / d16[..., None], 0)), 0, 63).astype(np.uint8)
            mn = np.clip(_roundf(np.where(dm16[..., None] > 0, mins / dm16[..., None], 0)), 0, 63).astype(np.uint8)
            ds = d16[..., None] * sc.astype(np.float32)
            off = dm16[..., None] * mn.astype(np.float32)
            codes = np.where(ds[..., None] > 0, _roundf((xs + off[..., None]) / ds[..., None]), 0)
            codes = np.clip(np.nan_to_num(codes), 0, lv).astype(np.uint8)     # (n, g, 8, 32)
            c4 = codes.reshape(n, g, 4, 2, 32)
            qs = ((c4[:, :, :, 0] & 15) | ((c4[:, :, :, 1] & 15) << 4)).reshape(n, g, 128)
            parts = [_f16b(d), _f16b(dmin), _pack_k_scales(sc, mn)]
            if fmt == "q5_k":
                qh = np.zeros((n, g, 32), np.uint8)
                for j in range(8):
                    qh |= ((codes[:, :, j] >> 4) & 1) << j
                parts.append(qh)
            blocks = np.concatenate(parts + [qs], axis=2)
        else:  # q6_k
            xs = x.reshape(n, g, 16, 16)
            amax = np.abs(xs).max(axis=3)
            scale = amax / np.float32(31)
            d = scale.max(axis=2) / np.float32(127)
            d16 = _f16(d).astype(np.float32)
            sc = np.clip(_roundf(np.where(d16[..., None] > 0, scale / d16[..., None], 0)), -128, 127).astype(np.int8)
            ds = d16[..., None] * sc.astype(np.float32)
            qv = np.where(ds[..., None] != 0, _roundf(xs / ds[..., None]), 0)
            codes = (np.clip(np.nan_to_num(qv), -32, 31) + 32).astype(np.uint8).reshape(n, g, 2, 4, 32)
            ql = np.zeros((n, g, 2, 64), np.uint8)
            qh = np.zeros((n, g, 2, 32), np.uint8)
            for kk in range(4):
                c = codes[:, :, :, kk]
                ql[..., 32 * (kk % 2):32 * (kk % 2) + 32] |= (c & 15) << (4 * (kk // 2))
                qh |= (c >> 4) << (2 * kk)
            blocks = np.concatenate([ql.reshape(n, g, 128), qh.reshape(n, g, 64),
                                     sc.view(np.uint8), _f16b(d)], axis=2)
    assert blocks.shape[2] == sp.qbytes, (fmt, blocks.shape)
    return QMatrix(fmt, n, k, {"qs": np.ascontiguousarray(blocks.reshape(n, -1), dtype=np.uint8)})


@dataclass(frozen=True)
class ActQK:
    """K-quant activations (GGML Q8_K): per token and 256-block, qs int8 (T, K), d float32 (T, K/256),
    bsums int16 (T, K/16) = sums of qs per 16."""
    qs: np.ndarray
    d: np.ndarray
    bsums: np.ndarray


def quantize_act_k(x: np.ndarray) -> ActQK:
    """float32 (T, K), K a multiple of 256 -> ActQK with llama.cpp's quantize_row_q8_K_ref numerics: per block
    the first element of largest |x| (max, signed), iscale = -127/max, q = min(127, round-half-even(iscale*x)),
    d = 1/iscale (float32); an all-zero block gives d = 0, q = 0."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"quantize_act_k expects (T, K) with K a multiple of {QK_K}, got shape {x.shape}")
    t, k = x.shape
    xb = x.reshape(t, k // QK_K, QK_K)
    imax = np.abs(xb).argmax(axis=2)[..., None]
    mx = np.take_along_axis(xb, imax, axis=2)[..., 0]
    zero = mx == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, 0, np.float32(-127) / np.where(zero, 1, mx)).astype(np.float32)
        q = np.minimum(np.rint(iscale[..., None] * xb), 127).astype(np.int8)
        d = np.where(zero, 0, np.float32(1) / np.where(zero, 1, iscale)).astype(np.float32)
    bs = q.reshape(t, -1, 16).astype(np.int16).sum(axis=2, dtype=np.int16)
    return ActQK(np.ascontiguousarray(q.reshape(t, k)), np.ascontiguousarray(d), np.ascontiguousarray(bs))


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c) (one rounding): the float64 product of two float32 is exact; the float64 sum is
    then rounded twice (f64, f32), which differs from one rounding only on a float32 tie (~2^-29 chance)."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def kquant_sums(q: QMatrix, a: ActQK) -> tuple[np.ndarray, np.ndarray | None]:
    """The exact integer parts of the K-quant reference: isum (T, N, S) and imin (T, N, S) int64 (None for q6_k)."""
    f = _k_fields(q)
    n, S = q.rows, q.cols // QK_K
    t = a.qs.shape[0]
    c = f["codes"].astype(np.int32)
    if q.fmt == "q6_k":
        qx = a.qs.reshape(t, S, 16, 16).astype(np.int32)
        dot = np.einsum("nsji,tsji->tnsj", c, qx, optimize=True).astype(np.int64)
        bs = a.bsums.reshape(t, S, 16).astype(np.int64)
        isum = (f["sc"].astype(np.int64)[None] * (dot - 32 * bs[:, None])).sum(axis=3)
        return isum, None
    qx = a.qs.reshape(t, S, 8, 32).astype(np.int32)
    dot = np.einsum("nsji,tsji->tnsj", c, qx, optimize=True).astype(np.int64)
    isum = (f["sc"].astype(np.int64)[None] * dot).sum(axis=3)
    bs = a.bsums.reshape(t, S, 8, 2).astype(np.int64).sum(axis=3)            # per 32
    imin = (f["mn"].astype(np.int64)[None] * bs[:, None]).sum(axis=3)
    return isum, imin


def _matmul_ref_k(q: QMatrix, x: np.ndarray) -> np.ndarray:
    a = quantize_act_k(x)
    isum, imin = kquant_sums(q, a)
    f = _k_fields(q)
    t, n, S = isum.shape[0], q.rows, isum.shape[2]
    y = np.zeros((t, n), np.float32)
    for b in range(S):
        dx = a.d[:, b][:, None]                                     # (T, 1)
        dd = (f["d"][:, b][None] * dx).astype(np.float32)           # (T, N)
        y = _fma(isum[:, :, b].astype(np.float32), dd, y)
        if imin is not None:
            dm = -(f["dmin"][:, b][None] * dx).astype(np.float32)
            y = _fma(imin[:, :, b].astype(np.float32), dm, y)
    return np.ascontiguousarray(y)
