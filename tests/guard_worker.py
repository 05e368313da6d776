"""Run by test_kernels.test_kernels_read_nothing_past_the_planes: every format's matmul on every ISA variant with
each plane ending at a PROT_NONE page, so a read past a plane's end faults (faulthandler names the case)."""
import ctypes
import faulthandler
import mmap
import sys

import numpy as np

from powerlow import formats as F
from powerlow import kernels as K

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_keep = []


def guarded(a: np.ndarray) -> np.ndarray:
    """A copy of a whose last byte is the last byte before an inaccessible page."""
    n = a.nbytes
    pages = -(-n // PAGE) + 1
    mm = mmap.mmap(-1, pages * PAGE)
    raw = np.frombuffer(mm, np.uint8)
    guard = raw.ctypes.data + (pages - 1) * PAGE
    if _libc.mprotect(ctypes.c_void_p(guard), ctypes.c_size_t(PAGE), 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    _keep.append(mm)
    out = raw[(pages - 1) * PAGE - n: (pages - 1) * PAGE].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def main() -> int:
    faulthandler.enable()
    rng = np.random.default_rng(0)
    cases = 0
    for fmt, sp in F.FORMATS.items():
        ks = [256, 512] if sp.act != "q8" else [1, 3, 31, 33, 255, 257]
        for k in ks:
            for rows in (1, 13):
                q = F.quantize(rng.standard_normal((rows, k)).astype(np.float32), fmt)
                g = F.QMatrix(q.fmt, q.rows, q.cols, {name: guarded(p) for name, p in q.planes.items()})
                for t in (1, 3):
                    x = rng.standard_normal((t, k)).astype(np.float32)
                    ref = K.matmul(q, x, isa="generic")
                    for isa in K.supported_isas:
                        print(f"{fmt} k={k} rows={rows} T={t} {isa}", file=sys.stderr, flush=True)
                        y = K.matmul(g, x, isa=isa)
                        np.testing.assert_allclose(y, K.matmul(q, x, isa=isa), rtol=0, atol=0)
                        cases += 1
                    assert np.isfinite(ref).all()
    print(cases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
