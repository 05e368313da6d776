"""Numpy reference formats: round trips, packing, GGUF parity, slicing, reference matmul."""

import numpy as np
import pytest

from powerlow import formats as F

SIZES = [1, 3, 31, 33, 63, 65, 255, 257]
# relative RMS round-trip error on standard-normal weights, per format (measured, with margin)
RT_BOUND = {"q8": 0.008, "q4_0": 0.11, "q4_1": 0.10, "q2": 0.36, "tern": 0.46, "q1": 0.62,
            "q5_0": 0.055, "q5_1": 0.05, "q4_k": 0.10, "q5_k": 0.05, "q6_k": 0.025}
# K-quants take K a multiple of 256 only (GGML super-blocks): their sizes
KQ_SIZES = [256, 512, 768]


def _sizes(fmt, sizes):
    return sizes if F.FORMATS[fmt].group < 256 else KQ_SIZES


@pytest.mark.parametrize("fmt", list(F.FORMATS))
def test_round_trip_error_bounded(fmt):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    q = F.quantize(w, fmt)
    err = np.sqrt(((F.dequantize(q) - w) ** 2).mean() / (w ** 2).mean())
    assert err < RT_BOUND[fmt], (fmt, err)
    assert q.nbytes * 8 / w.size == pytest.approx(F.FORMATS[fmt].bits_per_weight)


@pytest.mark.parametrize("fmt", list(F.FORMATS))
@pytest.mark.parametrize("ki", range(len(SIZES)))
def test_awkward_sizes_pack_and_buffers(fmt, ki):
    sizes = _sizes(fmt, SIZES)
    if ki >= len(sizes):
        return
    k = sizes[ki]
    rng = np.random.default_rng(k)
    w = rng.standard_normal((3, k)).astype(np.float32)
    q = F.quantize(w, fmt)
    dq = F.dequantize(q)
    assert dq.shape == (3, k)
    # the zero padding of K must not leak: a constant row reconstructs close to the constant
    b = q.to_bytes()
    assert len(b) == F.packed_nbytes(fmt, 3, k) and len(b) % 64 == 0
    buf = b"\x55" * 64 + b  # non-zero offset
    q2 = F.QMatrix.from_buffer(fmt, 3, k, buf, offset=64)
    np.testing.assert_array_equal(F.dequantize(q2), dq)
    q3 = F.QMatrix.from_tensors(fmt, 3, k, q.tensors("blk.0.w"), "blk.0.w")
    np.testing.assert_array_equal(F.dequantize(q3), dq)
    # a quantized-dequantized matrix is a fixed point for the exact-grid formats
    if fmt in ("q8", "q4_1"):
        np.testing.assert_allclose(F.dequantize(F.quantize(dq, fmt)), dq, rtol=2e-3, atol=2e-3)


def test_pack_bit_order_documented():
    # q2: byte i holds element 16*s + i in bits 2s..2s+1
    codes = np.arange(64) % 4
    w = np.zeros((1, 64), np.float32)
    q = F.quantize(w, "q2")
    qs = F._pack("q2", codes.reshape(1, 1, 64).astype(np.uint8))
    assert qs.shape == (1, 16)
    for i in range(16):
        for s in range(4):
            assert (qs[0, i] >> (2 * s)) & 3 == codes[16 * s + i]
    qs1 = F._pack("q1", (np.arange(64) % 3 == 0).reshape(1, 1, 64).astype(np.uint8))
    for i in range(8):
        for s in range(8):
            assert (qs1[0, i] >> s) & 1 == ((8 * s + i) % 3 == 0)
    assert q.planes["qs"].shape == (1, 16)


def test_gguf_block_parity_synthetic():
    import gguf.quants as gq
    import gguf
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((7, 96)) * 0.05).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1"):
        qt = getattr(gguf.GGMLQuantizationType, name)
        raw = gq.quantize(w, qt)
        q = F.from_gguf(raw, name, 7, 96)
        np.testing.assert_array_equal(F.dequantize(q), gq.dequantize(raw, qt).reshape(7, 96))
        # our quantizer reproduces GGML's codes and scales bit for bit
        ours = F.quantize(w, q.fmt)
        for p in q.planes:
            np.testing.assert_array_equal(ours.planes[p], q.planes[p], err_msg=f"{name} {p}")


def test_gguf_parity_real_model(smol_gguf):
    import gguf
    from gguf.quants import dequantize as gdq
    r = gguf.GGUFReader(str(smol_gguf))
    seen = set()
    for t in r.tensors:
        name = t.tensor_type.name
        if name not in ("Q8_0", "Q4_1", "Q4_0") or (name, t.name.split(".")[-2]) in seen:
            continue
        seen.add((name, t.name.split(".")[-2]))
        cols, rows = int(t.shape[0]), int(t.shape[1])
        data = t.data[:256] if rows > 256 else t.data  # token_embd: a slice is enough
        q = F.from_gguf(data, name, data.shape[0], cols)
        ref = gdq(data, t.tensor_type).reshape(data.shape[0], cols)
        np.testing.assert_array_equal(F.dequantize(q), ref, err_msg=t.name)
    assert ("Q4_1", "ffn_down") in seen and ("Q8_0", "token_embd") in seen


@pytest.mark.parametrize("fmt", list(F.FORMATS))
def test_select_rows_and_cols(fmt):
    rng = np.random.default_rng(3)
    kk = 200 if F.FORMATS[fmt].group < 256 else 1024
    w = rng.standard_normal((10, kk)).astype(np.float32)
    q = F.quantize(w, fmt)
    dq = F.dequantize(q)
    idx = np.array([9, 0, 3, 3])
    np.testing.assert_array_equal(F.dequantize(F.select_rows(q, idx)), dq[idx])
    g = F.FORMATS[fmt].group
    s = F.select_cols_blocks(q, g, 2 * g)
    assert s.cols == g
    np.testing.assert_array_equal(F.dequantize(s), dq[:, g:2 * g])
    tail = F.select_cols_blocks(q, 3 * g, kk)
    np.testing.assert_array_equal(F.dequantize(tail), dq[:, 3 * g:])
    with pytest.raises(ValueError):
        F.select_cols_blocks(q, 1, g)


def test_quantize_act_matches_q8_1_rules():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 70)).astype(np.float32)
    a = F.quantize_act(x)
    assert a.qs.shape == (3, 96) and a.d.shape == (3, 3)
    assert np.abs(a.qs).max() <= 127
    np.testing.assert_array_equal(a.qs[:, 70:], 0)
    np.testing.assert_array_equal(a.isum, a.qs.reshape(3, 3, 32).astype(np.int32).sum(2))
    # fp16-rounded scales, as llama.cpp stores them
    np.testing.assert_array_equal(a.d, a.d.astype(np.float16).astype(np.float32))
    rec = (a.qs.reshape(3, 3, 32) * a.d[..., None]).reshape(3, 96)[:, :70]
    assert np.abs(rec - x).max() < 0.02 * np.abs(x).max()
    z = F.quantize_act(np.zeros((1, 5), np.float32))
    assert not z.qs.any() and not z.d.any()


@pytest.mark.parametrize("fmt", list(F.FORMATS))
@pytest.mark.parametrize("ki", range(3))
def test_matmul_ref_close_to_float(fmt, ki):
    k = _sizes(fmt, [1, 33, 257])[ki]
    rng = np.random.default_rng(5)
    w = rng.standard_normal((9, k)).astype(np.float32)
    x = rng.standard_normal((4, k)).astype(np.float32)
    q = F.quantize(w, fmt)
    y = F.matmul_ref(q, x)
    yf = x.astype(np.float64) @ F.dequantize(q).astype(np.float64).T
    # only the activation quantization separates the two: |err| <~ |x|max/254 * sum|w|
    bound = np.abs(x).max() / 127 * np.abs(F.dequantize(q)).sum(1)[None] + 1e-5
    assert np.all(np.abs(y - yf) <= bound), fmt


def test_bad_arguments():
    with pytest.raises(ValueError):
        F.quantize(np.zeros(5, np.float32), "q4_1")
    with pytest.raises(ValueError):
        F.quantize(np.zeros((2, 5), np.float32), "q3")
    with pytest.raises(ValueError):
        F.from_gguf(np.zeros((2, 10), np.uint8), "Q4_1", 2, 32)
    q = F.quantize(np.ones((2, 32), np.float32), "q8")
    with pytest.raises(ValueError):
        F.matmul_ref(q, np.ones((1, 31), np.float32))
    with pytest.raises(ValueError):
        F.QMatrix("q8", 2, 32, {"qs": q.planes["qs"]})


@pytest.mark.parametrize("fmt", sorted(F.FORMATS))
def test_random_qmatrix_planes_are_aligned_like_a_loaded_model(fmt):
    """Benchmarks and the dispatcher time random_qmatrix's planes: they must sit on 64-byte boundaries as a loaded
    model's do (numpy alone puts a large array 16 bytes past a page), hold the values they were built from, and
    be ordinary C-contiguous arrays of the plane's dtype and shape."""
    q = F.random_qmatrix(fmt, 300, 1024, np.random.default_rng(3))
    q2 = F.random_qmatrix(fmt, 300, 1024, np.random.default_rng(3))
    for name, a in q.planes.items():
        assert a.ctypes.data % F.ALIGN == 0, (fmt, name, a.ctypes.data % F.ALIGN)
        assert a.flags.c_contiguous and a.flags.writeable
        np.testing.assert_array_equal(a, q2.planes[name])
    assert q.planes["qs"].any()
