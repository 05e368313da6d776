"""Weight generators shared by the Python kernel tests and the C harness's case writer (tests/c/gen_cases.py)."""
from __future__ import annotations

import numpy as np

from powerlow import formats as F

KQ = ["q4_k", "q5_k", "q6_k"]


def random_blocks(fmt, rows, nblk, rng):
    """random GGML block bytes (every code value and scale byte) with sane fp16 scales (d, dmin / m in [-1, 1];
    no inf / nan): (rows, nblk * block bytes) uint8"""
    sp = F.FORMATS[fmt]
    b = rng.integers(0, 256, (rows, nblk, sp.qbytes), dtype=np.uint8)

    def f16(lo=-1.0):
        return np.ascontiguousarray(rng.uniform(lo, 1, (rows, nblk)).astype(np.float16)).view(np.uint8).reshape(rows, nblk, 2)
    if fmt == "q6_k":
        b[..., 208:210] = f16()
    else:
        b[..., 0:2] = f16()
        if fmt != "q5_0":
            b[..., 2:4] = f16(0.0 if fmt in KQ else -1.0)
    return b.reshape(rows, -1)


def exact_lowbit(fmt, n, k, rng):
    """A q2 / tern / q1 matrix with power-of-two scales and mins: with exact_activations every float step of
    the matmul is exact, so every kernel must meet the reference bit for bit."""
    sp = F.FORMATS[fmt]
    ng = k // sp.group
    if fmt == "q1":
        qs = rng.integers(0, 256, (n, ng * sp.qbytes), dtype=np.uint8)
    else:   # four 2-bit codes per byte; ternary codes stop at 2
        c = rng.integers(0, 3 if fmt == "tern" else 4, (n, ng * sp.qbytes, 4))
        qs = (c[..., 0] | c[..., 1] << 2 | c[..., 2] << 4 | c[..., 3] << 6).astype(np.uint8)
    planes = {"qs": qs, "d": (2.0 ** -rng.integers(0, 5, (n, ng))).astype(np.float16)}
    if sp.has_min:
        planes["m"] = (-(2.0 ** -rng.integers(0, 5, (n, ng)))).astype(np.float16)
    return F.QMatrix(fmt, n, k, planes)


def exact_activations(t, k, rng):
    """integer activations with a +-127 in each 32-block (so d_x = 1): exact with exact_lowbit"""
    x = rng.integers(-127, 128, (t, k)).astype(np.float32)
    x[:, ::32] = np.where(rng.random((t, k // 32)) < 0.5, -127.0, 127.0)
    return x
