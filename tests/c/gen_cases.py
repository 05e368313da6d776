"""Cases for the C kernel harness (tests/c/plk_harness.c): weights of every format packed by powerlow.formats,
activations, and the numpy reference outputs (formats.matmul_ref / quantize_act / quantize_act_k,
reference.act_fn), written to one binary file. The shapes follow tests/test_kernels.py and tests/test_kquants.py
(awkward K, odd row counts, T = 1, 2, 3, 8, 17, GEMV and GEMM), at sizes an emulated CPU runs in seconds.

File: b"PLKCASES" then records; a record is int32 kind, int32 nint, nint int32, int32 nblob, then per blob
int64 nbytes + the bytes (little-endian; the harness reads it back on aarch64, also little-endian).
    kind 1 MATMUL  ints fmt N K T exact nthreads   blobs name qs d m x ref scale
                   (exact: the reference is met bit for bit, else |y - ref| / scale <= REL; scale = |x| @ |W|^T)
    kind 2 QACT    ints T K Kp                     blobs x qs d s isum          (formats.quantize_act)
    kind 3 QACTK   ints T K                        blobs x qs d bsums           (formats.quantize_act_k)
    kind 4 GATED   ints n act                      blobs g u ref                (reference.act_fn(g) * u)
    kind 5 FFN     ints fmt down_fmt C K n T act atol_milli   blobs arena stride offs h base ref
                   (bundles at arena + i * stride; ref = base + reference.ffn_bundles)
Usage: python tests/c/gen_cases.py OUT"""
from __future__ import annotations

import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from powerlow import formats as F          # noqa: E402
from powerlow import reference as R        # noqa: E402
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kernel_cases                        # noqa: E402

FMT_ID = {"q8": 0, "q4_0": 1, "q4_1": 2, "q2": 3, "tern": 4, "q1": 5,
          "q5_0": 6, "q5_1": 7, "q4_k": 8, "q5_k": 9, "q6_k": 10}   # plk.h order
ACT_ID = {"silu": 0, "relu": 1, "gelu_tanh": 2}
Q8A = ["q8", "q4_0", "q4_1", "q2", "tern", "q1", "q5_0", "q5_1"]
KQ = kernel_cases.KQ
GGML_NAME = {"q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}


class Writer:
    def __init__(self, path):
        self.f = open(path, "wb")
        self.f.write(b"PLKCASES")
        self.counts = {}

    def rec(self, kind, ints, blobs):
        self.f.write(struct.pack("<ii", kind, len(ints)) + struct.pack(f"<{len(ints)}i", *ints))
        self.f.write(struct.pack("<i", len(blobs)))
        for b in blobs:
            raw = b.encode() if isinstance(b, str) else (b"" if b is None else np.ascontiguousarray(b).tobytes())
            self.f.write(struct.pack("<q", len(raw)) + raw)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def close(self):
        self.f.close()


def matmul_case(w: Writer, name, q: F.QMatrix, x, nthreads=1):
    x = np.ascontiguousarray(x, np.float32)
    ref = F.matmul_ref(q, x)
    exact = q.fmt in KQ            # the K-quant reference is bit-exact on every variant (tests/test_kquants.py)
    scale = (np.abs(x).astype(np.float64) @ np.abs(F.dequantize(q)).T.astype(np.float64) + 1e-6).astype(np.float32)
    p = q.planes
    w.rec(1, [FMT_ID[q.fmt], q.rows, q.cols, x.shape[0], int(exact), nthreads],
          [name, p["qs"], p.get("d"), p.get("m"), x, ref, scale])


def exact_case(w: Writer, name, q: F.QMatrix, x, nthreads=1):
    """inputs where every float step is exact: the reference must be met bit for bit"""
    x = np.ascontiguousarray(x, np.float32)
    ref = F.matmul_ref(q, x)
    assert np.abs(ref).max() > 1000
    p = q.planes
    w.rec(1, [FMT_ID[q.fmt], q.rows, q.cols, x.shape[0], 1, nthreads],
          [name, p["qs"], p.get("d"), p.get("m"), x, ref, np.ones_like(ref)])


def random_blocks(fmt, rows, nblk, rng):
    """random GGML block bytes with sane fp16 scales (tests/kernel_cases.py) as a QMatrix"""
    sp = F.FORMATS[fmt]
    return F.from_gguf(kernel_cases.random_blocks(fmt, rows, nblk, rng), GGML_NAME[fmt], rows, nblk * sp.group)


def main(out):
    w = Writer(out)
    rng = np.random.default_rng(2024)
    Ts = (1, 2, 3, 8, 17)
    # ---- q8-activation formats: awkward K (zero-padded), odd row counts, GEMV and GEMM
    for fmt in Q8A:
        for n, k, ts in ((13, 1, (1, 3)), (13, 33, (1, 3)), (5, 257, (2, 17)), (67, 320, Ts), (9, 1000, (1, 8)),
                         (3, 64, (1, 2)), (1, 32, (1, 3))):
            q = F.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
            for t in ts:
                x = (rng.standard_normal((t, k)) * 3).astype(np.float32)
                if t > 2:
                    x[1] = 0.0                          # a zero token
                matmul_case(w, f"{fmt} {n}x{k} T={t}", q, x)
        # the row-split driver with 2 threads (the pool), rows not a multiple of the tile
        q = F.quantize(rng.standard_normal((301, 576)).astype(np.float32), fmt)
        matmul_case(w, f"{fmt} 301x576 T=3 threads=2", q, rng.standard_normal((3, 576)).astype(np.float32), nthreads=2)
        if fmt in ("q5_0", "q5_1"):                     # every code value and scale byte
            q = random_blocks(fmt, 7, 5, rng)
            x = rng.standard_normal((3, q.cols)).astype(np.float32)
            x[1] = np.sign(x[1]) * 3.0
            matmul_case(w, f"{fmt} random blocks 7x{q.cols} T=3", q, x)
    # q8 with -128 codes (the plain-NEON products must not overflow int16 pairs)
    qs = rng.integers(-128, 128, (6, 64), dtype=np.int8)
    qs[:, :8] = -128
    q = F.QMatrix("q8", 6, 64, {"qs": qs, "d": rng.uniform(0.01, 1, (6, 2)).astype(np.float16)})
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[:, ::32] = -5.0                                   # -> -127 in each block
    matmul_case(w, "q8 codes -128 6x64 T=4", q, x)
    # fp16 subnormal scales and mins (the NEON kernels convert by FCVTL, the portable C by plk_h2f)
    for fmt in ("q4_1", "q1", "q8"):
        q = F.quantize(rng.standard_normal((7, 192)).astype(np.float32), fmt)
        for name in ("d", "m"):
            if name in q.planes:
                sign = rng.integers(0, 2, q.planes[name].shape) << 15 if name == "m" else 0
                q.planes[name].view(np.uint16)[:] = rng.integers(1, 1024, q.planes[name].shape) | sign
        matmul_case(w, f"{fmt} subnormal scales 7x192 T=3", q, (rng.standard_normal((3, 192)) * 1e3).astype(np.float32))
    for fmt in ("q5_1", "q4_k", "q6_k"):
        sp = F.FORMATS[fmt]
        q = random_blocks(fmt, 5, 2, rng)
        raw = q.planes["qs"].reshape(5, 2, sp.qbytes)
        sub = rng.integers(1, 1024, (5, 2)).astype(np.uint16)
        off = 208 if fmt == "q6_k" else 0
        raw[..., off:off + 2] = sub.view(np.uint8).reshape(5, 2, 2)
        if fmt != "q6_k":
            raw[..., 2:4] = rng.integers(1, 1024, (5, 2)).astype(np.uint16).view(np.uint8).reshape(5, 2, 2)
        matmul_case(w, f"{fmt} subnormal scales 5x{q.cols} T=3", q, rng.standard_normal((3, q.cols)).astype(np.float32))
    # exact inputs: power-of-two scales, integer activations with a +-127 per block (tests/test_kernels.py)
    for fmt in ("q1", "tern", "q2"):
        for k in (64 * 3, 64 * 7):
            q = kernel_cases.exact_lowbit(fmt, 69, k, rng)
            for t in (1, 5):
                x = kernel_cases.exact_activations(t, k, rng)
                exact_case(w, f"{fmt} exact 69x{k} T={t}", q, x)
    # ---- K-quants (Q8_K activations): bit-exact with the reference
    for fmt in KQ:
        for n, k, ts in ((1, 256, (1, 2)), (3, 512, (3, 8)), (7, 1536, (5, 17)), (33, 256, (1, 2, 3)), (6, 768, (8,))):
            q = F.quantize((rng.standard_normal((n, k)) * 0.2).astype(np.float32), fmt)
            for t in ts:
                matmul_case(w, f"{fmt} {n}x{k} T={t}", q, (rng.standard_normal((t, k)) * 2).astype(np.float32))
        q = random_blocks(fmt, 9, 3, rng)
        x = rng.standard_normal((4, 768)).astype(np.float32)
        x[1] = np.sign(x[1]) * 3.0           # every activation at |q| = 127
        x[2, :256] = 5.0
        x[3, 256:512] = -5.0
        matmul_case(w, f"{fmt} random blocks 9x768 T=4", q, x)
        q = F.quantize(rng.standard_normal((37, 512)).astype(np.float32), fmt)
        matmul_case(w, f"{fmt} 37x512 T=13 threads=2", q, rng.standard_normal((13, 512)).astype(np.float32), nthreads=2)
    # ---- activation quantizers, bit-exact (tests/test_kernels.py test_quantize_act_exact and the ties)
    for k in (1, 3, 31, 33, 255, 257, 320):
        x = (rng.standard_normal((3, k)) * rng.uniform(0.01, 100)).astype(np.float32)
        x[0, : min(k, 5)] = 0.0
        if k > 2:
            x[1] = 0.0
        kp = -(-k // 32) * 32
        a = F.quantize_act(x, kp)
        w.rec(2, [3, k, kp], [x, a.qs, a.d, a.s, a.isum])
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 127.0
    x[0, 1:6] = [0.5, 1.5, -2.5, np.nextafter(np.float32(0.5), np.float32(0)), -0.5]
    a = F.quantize_act(x, 64)                                   # and a padded all-zero block
    w.rec(2, [1, 32, 64], [x, a.qs, a.d, a.s, a.isum])
    x = (rng.standard_normal((5, 768)) * rng.uniform(0.01, 100)).astype(np.float32)   # test_quantize_act_k_exact
    x[1] = 0.0
    x[2, 256:512] = 0.0
    x[3, 10] = -1e3
    x[3, 256:512] *= 1e-3
    x[3, 300], x[3, 301] = 7.0, -7.0
    x[4, :256] = np.round(rng.standard_normal(256) * 4) / 8 * 127 / 4
    x[4, 0] = 127.0 / 4
    a = F.quantize_act_k(x)
    w.rec(3, [5, 768], [x, a.qs, a.d, a.bsums.astype(np.int16)])
    x = (rng.standard_normal((3, 256)) * 2).astype(np.float32)
    a = F.quantize_act_k(x)
    w.rec(3, [3, 256], [x, a.qs, a.d, a.bsums.astype(np.int16)])
    # ---- gated activations (tests/test_kernels.py test_gated tolerance: rtol 1e-5, atol 1e-6)
    for act in ("silu", "relu", "gelu_tanh"):
        n = 1003
        g = (rng.standard_normal(n) * 4).astype(np.float32)
        g[:4] = [0.0, -0.0, 30.0, -30.0]
        u = rng.standard_normal(n).astype(np.float32)
        ref = (R.act_fn(g, act) * u).astype(np.float32)
        w.rec(4, [n, ACT_ID[act]], [g, u, ref])
    # ---- sparse-FFN bundles (tests/test_kernels.py / test_kquants.py test_ffn_bundles): gate/up, act, down
    for fmt, down, C, Kd, atol in (("q4_1", "q4_1", 64, 100, 1), ("q8", "q8", 64, 100, 1), ("tern", "q8", 64, 100, 1),
                                   ("q1", "q1", 64, 100, 1), ("q5_0", "q5_1", 256, 512, 2), ("q4_k", "q6_k", 256, 512, 2)):
        lay = F.BundleLayout.make(fmt, down, C, Kd)
        n = 5
        arena = np.zeros(lay.stride * n, np.uint8)
        for i in range(n):
            mats = (F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt),
                    F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt),
                    F.quantize(rng.standard_normal((Kd, C)).astype(np.float32) * 0.5, down))
            for o, m in zip((lay.gate_off, lay.up_off, lay.down_off), mats):
                b = np.frombuffer(m.to_bytes(), np.uint8)
                arena[i * lay.stride + o: i * lay.stride + o + b.size] = b
        ptrs = np.array([arena.ctypes.data + i * lay.stride for i in range(n)], np.uint64)
        offs = []
        for which in ("gate", "up", "down"):
            po = lay.plane_offsets(which)
            offs += [po["qs"], po.get("d", -1), po.get("m", -1)]
        for act in ("relu", "silu"):
            for t in (1, 3, 9):
                h = rng.standard_normal((t, Kd)).astype(np.float32)
                base = rng.standard_normal((t, Kd)).astype(np.float32)
                ref = base.copy()
                R.ffn_bundles(ptrs, lay, h, act, ref)
                w.rec(5, [FMT_ID[fmt], FMT_ID[down], C, Kd, n, t, ACT_ID[act], atol],
                      [arena, np.array([lay.stride], np.int64), np.array(offs, np.int64), h, base, ref])
    w.close()
    print(f"wrote {out}: {w.counts.get(1, 0)} matmul, {w.counts.get(2, 0)} + {w.counts.get(3, 0)} quantizer, "
          f"{w.counts.get(4, 0)} gated, {w.counts.get(5, 0)} ffn cases")


if __name__ == "__main__":
    main(sys.argv[1])
