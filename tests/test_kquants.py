"""The raw GGML block formats (q5_0, q5_1, q4_k, q5_k, q6_k): GGUF import and dequantize against gguf.quants
bit for bit, Q8_K activations, and every C variant against the numpy reference (K-quants: bit for bit)."""

import numpy as np
import pytest

import gguf
from gguf import quants as GQ

from powerlow import formats as F
from powerlow import reference as R

from powerlow import kernels as K      # a broken build fails here, it is not skipped

from kernel_cases import KQ, random_blocks

ISAS = list(K.supported_isas)
NEW = ["q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
GGML_NAME = {"q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K", "q5_k": "Q5_K", "q6_k": "Q6_K"}


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", NEW)
def test_dequantize_equals_ggufrandom_blocks(fmt):
    rng = np.random.default_rng(1)
    sp = F.FORMATS[fmt]
    for rows, nblk in ((1, 1), (3, 5), (9, 2)):
        raw = random_blocks(fmt, rows, nblk, rng)
        q = F.from_gguf(raw, GGML_NAME[fmt], rows, nblk * sp.group)
        ref = GQ.dequantize(raw, getattr(gguf.GGMLQuantizationType, GGML_NAME[fmt])).reshape(rows, -1)
        np.testing.assert_array_equal(_bits(F.dequantize(q)), _bits(ref))
        # the stored form round-trips and is what packed_nbytes says
        b = q.to_bytes()
        assert len(b) == F.packed_nbytes(fmt, rows, q.cols)
        q2 = F.QMatrix.from_buffer(fmt, rows, q.cols, b)
        np.testing.assert_array_equal(q2.planes["qs"], q.planes["qs"])


@pytest.mark.parametrize("fmt", NEW)
def test_quantize_roundtrip_and_slices(fmt):
    rng = np.random.default_rng(2)
    sp = F.FORMATS[fmt]
    k = sp.group * 4
    w = rng.standard_normal((6, k)).astype(np.float32)
    q = F.quantize(w, fmt)
    dq = F.dequantize(q)
    assert np.abs(dq - w).mean() < 0.1 * np.abs(w).mean()
    # the quantizer's blocks are valid GGML blocks
    ref = GQ.dequantize(q.planes["qs"], getattr(gguf.GGMLQuantizationType, GGML_NAME[fmt])).reshape(6, -1)
    np.testing.assert_array_equal(_bits(dq), _bits(ref))
    np.testing.assert_array_equal(F.dequantize(F.select_rows(q, [4, 1])), dq[[4, 1]])
    c = F.select_cols_blocks(q, sp.group, 3 * sp.group)
    np.testing.assert_array_equal(F.dequantize(c), dq[:, sp.group:3 * sp.group])
    with pytest.raises(ValueError):
        F.select_cols_blocks(q, sp.group // 2, 3 * sp.group)


def test_kquant_shape_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        F.quantize(np.zeros((2, 300), np.float32), "q4_k")
    with pytest.raises(ValueError, match="multiple of 256"):
        F.packed_nbytes("q6_k", 4, 320)
    with pytest.raises(ValueError):
        F.from_gguf(np.zeros(144 * 3, np.uint8), "Q4_K", 3, 320)
    with pytest.raises(ValueError, match="bytes"):
        F.from_gguf(np.zeros(144 * 3 - 1, np.uint8), "Q4_K", 3, 256)
    with pytest.raises(ValueError):
        F.BundleLayout.make("q4_1", "q4_k", 64, 512)   # down columns must be whole super-blocks
    lay = F.BundleLayout.make("q4_k", "q6_k", 256, 512)
    assert lay.plane_offsets("down") == {"qs": lay.down_off}
    with pytest.raises(ValueError, match="multiple of 256"):
        K.quantize_act_k(np.zeros((1, 300), np.float32))
    from powerlow import _kernels as _k
    with pytest.raises(ValueError, match="multiple of 256"):
        _k.matmul(0, K._FMT_ID["q4_k"], 0, np.zeros(144 * 2, np.uint8), None, None, None, 2, 300,
                  np.zeros((1, 300), np.float32), np.zeros((1, 2), np.float32), 1)
    q = F.quantize(np.ones((2, 256), np.float32), "q4_k")
    with pytest.raises(ValueError):
        K.matmul(q, np.zeros((1, 255), np.float32))
    # the bundle wrappers check the K-quant shapes too (a layout made by hand)
    offs = np.zeros(9, np.int64)
    h, out = np.zeros((1, 300), np.float32), np.zeros((1, 300), np.float32)
    with pytest.raises(ValueError, match="multiple of 256"):
        _k.ffn_bundles(0, K._FMT_ID["q4_k"], 0, 0, np.zeros(1, np.uint64), 32, 300, offs, h, 0, out, 1)
    h, out = np.zeros((1, 256), np.float32), np.zeros((1, 256), np.float32)
    with pytest.raises(ValueError, match="cluster size"):
        _k.ffn_bundles(0, 0, K._FMT_ID["q6_k"], 0, np.zeros(1, np.uint64), 64, 256, offs, h, 0, out, 1)


# ---------------------------------------------------------------- Q8_K activations

@pytest.mark.parametrize("isa", ISAS)
def test_quantize_act_k_exact(isa):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 768)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[1] = 0.0                           # an all-zero token
    x[2, 256:512] = 0.0                  # an all-zero block
    x[3, 10] = -1e3                      # a negative max
    x[3, 256:512] *= 1e-3
    x[3, 300], x[3, 301] = 7.0, -7.0     # equal |max|: the first one counts
    x[4, :256] = np.round(rng.standard_normal(256) * 4) / 8 * 127 / 4   # many exact .5 ties
    x[4, 0] = 127.0 / 4
    a, b = F.quantize_act_k(x), K.quantize_act_k(x, isa=isa)
    np.testing.assert_array_equal(b.qs, a.qs)
    np.testing.assert_array_equal(_bits(b.d), _bits(a.d))
    np.testing.assert_array_equal(b.bsums, a.bsums)
    assert a.qs[3, 10] == -127 and a.qs[3, 300] == -127 and a.qs[3, 301] == 127
    np.testing.assert_array_equal(a.bsums, a.qs.reshape(5, -1, 16).astype(np.int32).sum(2))


def test_quantize_act_k_matches_ggml_rule():
    """iscale = -127 / (signed max), q = round half to even, d = 1 / iscale, as quantize_row_q8_K_ref."""
    x = np.zeros((1, 256), np.float32)
    x[0, 0] = -2.0                       # max |x| is negative: iscale > 0
    x[0, 1:5] = [1.0, -1.0, 1.5, 0.25]
    a = F.quantize_act_k(x)
    assert a.qs[0, 0] == -127 and a.qs[0, 1] == 64 and a.qs[0, 2] == -64    # 63.5: ties to even
    iscale = np.float32(-127) / np.float32(-2.0)
    np.testing.assert_array_equal(a.qs[0, :5], np.minimum(np.rint(iscale * x[0, :5]), 127).astype(np.int8))
    assert a.d[0, 0] == np.float32(1) / iscale


# ---------------------------------------------------------------- matmul: every C variant against the reference

# (17, 8960, T = 1): q6_k's AVX-512 decode rows in address order (kq6_rows8_rm, K <= 20480); (9, 20736, T = 1):
# one super-block over that, the block-major rows
SHAPES_K = [(1, 256, (1, 2)), (3, 512, (3, 64)), (7, 1536, (5, 8)), (17, 8960, (1, 2)), (33, 256, (33,)),
            (65, 512, (1, 64)), (7, 8960, (3,)), (9, 20736, (1,))]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", KQ)
def test_kquant_matmul_bit_exact(isa, fmt):
    rng = np.random.default_rng(4)
    for n, k, ts in SHAPES_K:
        q = F.quantize((rng.standard_normal((n, k)) * 0.2).astype(np.float32), fmt)
        for t in ts:
            x = (rng.standard_normal((t, k)) * 2).astype(np.float32)
            out = np.full((t, n), np.nan, np.float32)
            K.matmul(q, x, out, isa=isa)
            np.testing.assert_array_equal(_bits(out), _bits(F.matmul_ref(q, x)), err_msg=f"{n}x{k} T={t}")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", KQ)
def test_kquant_random_blocks_extreme_codes(isa, fmt):
    """every code value and scale byte (random GGML blocks, not our quantizer's), activations at +-127"""
    rng = np.random.default_rng(5)
    raw = random_blocks(fmt, 9, 3, rng)
    q = F.from_gguf(raw, GGML_NAME[fmt], 9, 768)
    x = rng.standard_normal((4, 768)).astype(np.float32)
    x[1] = np.sign(x[1]) * 3.0           # every activation at |q| = 127
    x[2, :256] = 5.0
    x[3, 256:512] = -5.0
    np.testing.assert_array_equal(_bits(K.matmul(q, x, isa=isa)), _bits(F.matmul_ref(q, x)))


def test_kquant_reference_is_the_dequantized_product():
    """the reference numerics are a sensible float product: close to dequantize(W) @ dequantize(x)"""
    rng = np.random.default_rng(6)
    for fmt in KQ:
        q = F.quantize(rng.standard_normal((16, 512)).astype(np.float32), fmt)
        x = rng.standard_normal((3, 512)).astype(np.float32)
        a = F.quantize_act_k(x)
        xd = a.qs.reshape(3, 2, 256) * a.d[..., None]
        exact = xd.reshape(3, -1).astype(np.float64) @ F.dequantize(q).T.astype(np.float64)
        y = F.matmul_ref(q, x)
        assert np.abs(y - exact).max() <= 1e-4 * np.abs(exact).max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q5_0", "q5_1"])
def test_q5_matmul_close(isa, fmt):
    rng = np.random.default_rng(7)
    for n, k in ((1, 32), (3, 64), (7, 96), (17, 1000), (65, 320), (33, 8960)):
        q = F.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
        for t in (1, 2, 5, 33):
            x = rng.standard_normal((t, k)).astype(np.float32)
            y, ref = K.matmul(q, x, isa=isa), F.matmul_ref(q, x)
            scale = np.abs(x) @ np.abs(F.dequantize(q)).T + 1e-6
            assert (np.abs(y - ref) / scale).max() <= 2e-5, (n, k, t)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", NEW)
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariance(isa, fmt, threads):
    """a token's output is bit-identical alone (decode) or in any batch (prefill)"""
    rng = np.random.default_rng(8)
    k = 1536 if fmt in KQ else 576
    q = F.quantize(rng.standard_normal((300, k)).astype(np.float32), fmt)
    x = rng.standard_normal((37, k)).astype(np.float32)
    old = K.get_threads()
    try:
        K.set_threads(threads)
        full = K.matmul(q, x, isa=isa)
        for t in (0, 5, 36):
            np.testing.assert_array_equal(K.matmul(q, x[t:t + 1].copy(), isa=isa)[0], full[t])
        np.testing.assert_array_equal(K.matmul(q, x[3:9].copy(), isa=isa), full[3:9])
    finally:
        K.set_threads(old)


# ---------------------------------------------------------------- the real model's tensors

@pytest.fixture(scope="module")
def qwen(qwen_gguf):
    """{name: tensor} of the real Qwen2.5-1.5B Q4_K_M GGUF (parsing it takes gguf ~9 s: once per module)"""
    return {t.name: t for t in gguf.GGUFReader(str(qwen_gguf)).tensors}


def _qwen_matrix(t, rows=None):
    cols, nr = int(t.shape[0]), int(t.shape[1]) if rows is None else rows
    raw = np.asarray(t.data)[:nr]
    return F.from_gguf(raw, t.tensor_type.name, nr, cols), raw


# Q4_K (attn_q, ffn_gate, ffn_down of layer 2: K = 8960), Q6_K (attn_v, ffn_down of layer 0: K = 8960)
QWEN_TENSORS = ["blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.2.ffn_down.weight",
                "blk.0.ffn_gate.weight"]


def test_qwen_tensors_import_bit_exact(qwen):
    kinds = set()
    for name in QWEN_TENSORS:
        t = qwen[name]
        q, raw = _qwen_matrix(t, 40)
        kinds.add(t.tensor_type.name)
        ref = GQ.dequantize(raw, t.tensor_type).reshape(q.rows, q.cols)
        np.testing.assert_array_equal(_bits(F.dequantize(q)), _bits(ref), err_msg=name)
        x = np.random.default_rng(0).standard_normal((3, q.cols)).astype(np.float32)
        want = F.matmul_ref(q, x)
        for isa in ISAS:
            np.testing.assert_array_equal(_bits(K.matmul(q, x, isa=isa)), _bits(want), err_msg=f"{name} {isa}")
    assert kinds == {"Q4_K", "Q6_K"}


def test_qwen_layer0_attention_parts(qwen):
    """layer 0's q, k (Q4_K) and v (Q6_K) as attn_block parts == the unfused kernels, bit for bit"""
    from types import SimpleNamespace
    p = "blk.0."
    parts = tuple(_qwen_matrix(qwen[p + f"attn_{n}.weight"])[0] for n in ("q", "k", "v"))
    assert [q.fmt for q in parts] == ["q4_k", "q4_k", "q6_k"]
    bias = np.concatenate([np.asarray(qwen[p + f"attn_{n}.bias"].data, np.float32) for n in ("q", "k", "v")])
    Kd, nh, nkv, hd, eps, theta = 1536, 12, 2, 128, 1e-6, 1e6
    lw = SimpleNamespace(attn_norm=np.asarray(qwen[p + "attn_norm.weight"].data, np.float32), wqkv=parts, bqkv=bias,
                         wo=_qwen_matrix(qwen[p + "attn_output.weight"])[0],
                         ffn_norm=np.asarray(qwen[p + "ffn_norm.weight"].data, np.float32))
    x0 = np.random.default_rng(1).standard_normal((3, Kd)).astype(np.float32)
    pos = np.arange(3, dtype=np.int64)
    rope = K.rope_tables(pos, hd, theta)
    for isa in ISAS[1:]:
        kc, vc = np.zeros((nkv, 4, hd), np.float16), np.zeros((nkv, 4, hd), np.float16)
        x, h = x0.copy(), np.empty_like(x0)
        K.attn_block(lw, x, h, kc, vc, 0, rope, nh, nkv, eps, K.attn_scratch(3, nh, nkv, hd, Kd), isa=isa)
        old = K.isa
        try:
            K.isa = isa
            kc2, vc2 = np.zeros_like(kc), np.zeros_like(vc)
            x2, h2 = _unfused_attn(lw, x0.copy(), kc2, vc2, 0, rope, pos, nh, nkv, hd, eps, theta)
        finally:
            K.isa = old
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(h, h2)
        np.testing.assert_array_equal(kc, kc2)


# ---------------------------------------------------------------- bundles with K-quant matrices

def _bundles(fmt, down_fmt, C, Kd, n, rng):
    lay = F.BundleLayout.make(fmt, down_fmt, C, Kd)
    arena = np.zeros(lay.stride * n, np.uint8)
    base = arena.ctypes.data
    ptrs = []
    for i in range(n):
        mats = (F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt),
                F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt),
                F.quantize(rng.standard_normal((Kd, C)).astype(np.float32) * 0.5, down_fmt))
        for o, m in zip((lay.gate_off, lay.up_off, lay.down_off), mats):
            b = np.frombuffer(m.to_bytes(), np.uint8)
            arena[i * lay.stride + o: i * lay.stride + o + b.size] = b
        ptrs.append(base + i * lay.stride)
    return lay, arena, np.array(ptrs, np.uint64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,down_fmt", [("q4_k", "q6_k"), ("q5_k", "q4_k"), ("q4_k", "q4_1"), ("q5_0", "q5_1")])
def test_ffn_bundles_kquants(isa, fmt, down_fmt):
    rng = np.random.default_rng(9)
    Kd, C = 512, 256
    lay, arena, ptrs = _bundles(fmt, down_fmt, C, Kd, 3, rng)
    for t in (1, 3):
        h = rng.standard_normal((t, Kd)).astype(np.float32)
        ref = np.zeros((t, Kd), np.float32)
        R.ffn_bundles(ptrs, lay, h, "silu", ref)
        out = np.zeros((t, Kd), np.float32)
        K.ffn_bundles(ptrs, lay, h, "silu", out, isa=isa)
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=2e-3 * np.abs(ref).max())
    one = np.zeros((1, Kd), np.float32)
    full = np.zeros((3, Kd), np.float32)
    h = rng.standard_normal((3, Kd)).astype(np.float32)
    K.ffn_bundles(ptrs, lay, h, "silu", full, isa=isa)
    K.ffn_bundles(ptrs, lay, h[1:2].copy(), "silu", one, isa=isa)
    np.testing.assert_array_equal(one[0], full[1])


# ---------------------------------------------------------------- attention with q, k, v in different formats

def _unfused_attn(lw, x, kc, vc, start, rope, pos, nh, nkv, hd, eps, theta):
    """the engine's unfused kernel sequence (Transformer.forward with fused=False)"""
    from powerlow.engine import qkv_matmul
    T = x.shape[0]
    qkv = qkv_matmul(lw.wqkv, K.rmsnorm(x, lw.attn_norm, eps), K.matmul)
    if lw.bqkv is not None:
        qkv += lw.bqkv
    qd, kd = nh * hd, nkv * hd
    q = K.rope(np.ascontiguousarray(qkv[:, :qd].reshape(T, nh, hd)), pos, theta)
    k = K.rope(np.ascontiguousarray(qkv[:, qd: qd + kd].reshape(T, nkv, hd)), pos, theta)
    kc[:, start: start + T] = k.transpose(1, 0, 2)
    vc[:, start: start + T] = qkv[:, qd + kd:].reshape(T, nkv, hd).transpose(1, 0, 2)
    x += K.matmul(lw.wo, K.attention(q, kc, vc, start))
    return x, K.rmsnorm(x, lw.ffn_norm, eps)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmts,K_,bias", [(("q4_k", "q4_k", "q6_k"), 256, True), (("q4_0", "q4_1", "q8"), 96, False),
                                          (("q6_k", "q5_k", "q4_1"), 512, False)])
def test_attn_block_qkv_parts(isa, fmts, K_, bias):
    """attn_block with the qkv projection as 3 parts of different formats == the unfused kernel sequence, bit for
    bit, prefill then decode; close to the numpy composition (RefOps.attn_block with the same parts)."""
    from types import SimpleNamespace
    from powerlow.engine import RefOps
    rng = np.random.default_rng(40)
    nh, nkv, hd, maxP, eps, theta = 4, 2, 16, 16, 1e-5, 1e4
    rows = (nh * hd, nkv * hd, nkv * hd)
    parts = tuple(F.quantize((rng.standard_normal((r, K_)) * 0.1).astype(np.float32), f) for r, f in zip(rows, fmts))
    lw = SimpleNamespace(attn_norm=(1 + 0.1 * rng.standard_normal(K_)).astype(np.float32), wqkv=parts,
                         bqkv=(rng.standard_normal(sum(rows)) * 0.1).astype(np.float32) if bias else None,
                         wo=F.quantize((rng.standard_normal((K_, nh * hd)) * 0.1).astype(np.float32), "q8"),
                         ffn_norm=(1 + 0.1 * rng.standard_normal(K_)).astype(np.float32))
    x0 = rng.standard_normal((6, K_)).astype(np.float32)
    caches = [(np.zeros((nkv, maxP, hd), np.float16), np.zeros((nkv, maxP, hd), np.float16)) for _ in range(3)]
    old = K.isa
    for start, T in ((0, 4), (4, 1), (5, 1)):
        pos = np.arange(start, start + T, dtype=np.int64)
        rope = K.rope_tables(pos, hd, theta)
        x, h = x0[start: start + T].copy(), np.empty((T, K_), np.float32)
        K.attn_block(lw, x, h, *caches[0], start, rope, nh, nkv, eps, K.attn_scratch(T, nh, nkv, hd, K_), isa=isa)
        try:
            K.isa = isa          # the unfused kernels at the same variant
            x2, h2 = _unfused_attn(lw, x0[start: start + T].copy(), *caches[1], start, rope, pos, nh, nkv, hd, eps, theta)
        finally:
            K.isa = old
        np.testing.assert_array_equal(caches[0][0], caches[1][0])
        np.testing.assert_array_equal(caches[0][1], caches[1][1])
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(h, h2)
        x3, h3 = x0[start: start + T].copy(), np.empty((T, K_), np.float32)
        RefOps.attn_block(lw, x3, h3, *caches[2], start, RefOps.rope_tables(pos, hd, theta), nh, nkv, eps)
        np.testing.assert_allclose(x, x3, rtol=0, atol=0.05 * np.abs(x3).max())
    # the parts must cover the heads' rows, each with K columns
    bad = SimpleNamespace(**{**vars(lw), "wqkv": parts[:2]})
    with pytest.raises(ValueError, match="rows"):
        K.attn_block(bad, x0[:1].copy(), np.empty((1, K_), np.float32), *caches[0], 0, K.rope_tables(np.zeros(1, np.int64), hd, theta),
                     nh, nkv, eps, K.attn_scratch(1, nh, nkv, hd, K_))


def test_attn_block_parts_of_one_format_equal_fused():
    """q, k, v as parts of one format give the fused matrix's bits (the K-quant rows are independent)"""
    from types import SimpleNamespace
    rng = np.random.default_rng(41)
    K_, nh, nkv, hd, eps = 256, 4, 2, 16, 1e-5
    w = (rng.standard_normal((128, K_)) * 0.1).astype(np.float32)
    fused = F.quantize(w, "q4_k")
    parts = (F.select_rows(fused, np.arange(64)), F.select_rows(fused, np.arange(64, 96)),
             F.select_rows(fused, np.arange(96, 128)))
    base = dict(attn_norm=np.ones(K_, np.float32), bqkv=None, ffn_norm=np.ones(K_, np.float32),
                wo=F.quantize((rng.standard_normal((K_, nh * hd)) * 0.1).astype(np.float32), "q4_0"))
    x0 = rng.standard_normal((3, K_)).astype(np.float32)
    outs = []
    for wq in (fused, parts):
        kc, vc = np.zeros((nkv, 8, hd), np.float16), np.zeros((nkv, 8, hd), np.float16)
        x, h = x0.copy(), np.empty_like(x0)
        K.attn_block(SimpleNamespace(wqkv=wq, **base), x, h, kc, vc, 0, K.rope_tables(np.arange(3), hd, 1e4), nh, nkv,
                     eps, K.attn_scratch(3, nh, nkv, hd, K_))
        outs.append((x, h, kc, vc))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_stream_attention_unit_keeps_mixed_formats_apart(tmp_path):
    """stream.attention_unit: q/k/v in one format -> one fused wqkv (as before); in different formats -> the tuple
    of parts (q, k, v), each read into its own planes, equal to the stored matrices."""
    from safetensors.numpy import save_file
    from powerlow.stream import TensorFile, attention_unit
    rng = np.random.default_rng(42)
    K_ = 256
    mats = {"attn_q": F.quantize(rng.standard_normal((64, K_)).astype(np.float32), "q4_k"),
            "attn_k": F.quantize(rng.standard_normal((32, K_)).astype(np.float32), "q4_k"),
            "attn_v": F.quantize(rng.standard_normal((32, K_)).astype(np.float32), "q6_k"),
            "attn_output": F.quantize(rng.standard_normal((K_, 64)).astype(np.float32), "q8")}
    for mixed in (True, False):
        if not mixed:
            mats["attn_v"] = F.quantize(rng.standard_normal((32, K_)).astype(np.float32), "q4_k")
        tensors, meta = {}, {}
        for n, q in mats.items():
            tensors.update(q.tensors(f"blk.0.{n}"))
            meta[f"blk.0.{n}"] = {"fmt": q.fmt, "shape": [q.rows, q.cols]}
        path = tmp_path / f"r{int(mixed)}.safetensors"
        save_file(tensors, str(path))
        tf = TensorFile(path)
        try:
            m = attention_unit(meta, tf, 0).load(tf)
        finally:
            tf.close()
        want = [mats[n] for n in ("attn_q", "attn_k", "attn_v")]
        if mixed:
            assert isinstance(m["wqkv"], tuple) and [p.fmt for p in m["wqkv"]] == ["q4_k", "q4_k", "q6_k"]
            for got, ref in zip(m["wqkv"], want):
                np.testing.assert_array_equal(got.planes["qs"], ref.planes["qs"])
        else:
            assert isinstance(m["wqkv"], F.QMatrix) and m["wqkv"].rows == 128
            np.testing.assert_array_equal(m["wqkv"].planes["qs"], np.concatenate([p.planes["qs"] for p in want]))
        np.testing.assert_array_equal(m["wo"].planes["qs"], mats["attn_output"].planes["qs"])


@pytest.mark.parametrize("isa", ISAS)
def test_ffn_bundles_kquants_prefill_path(isa):
    """T >= 8 (the GEMM tiles, accumulating into out for the down matrices): close to the reference, and each
    token bit-identical to its decode (T = 1) result; the odd row count exercises the tile edges"""
    rng = np.random.default_rng(10)
    Kd, C = 512, 256
    lay, arena, ptrs = _bundles("q4_k", "q6_k", C, Kd, 3, rng)
    h = rng.standard_normal((11, Kd)).astype(np.float32)
    base = rng.standard_normal((11, Kd)).astype(np.float32)
    ref = base.copy()
    R.ffn_bundles(ptrs, lay, h, "silu", ref)
    out = base.copy()
    K.ffn_bundles(ptrs, lay, h, "silu", out, isa=isa)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=2e-3 * np.abs(ref - base).max())
    for t in (0, 7, 10):
        one = base[t:t + 1].copy()
        K.ffn_bundles(ptrs, lay, h[t:t + 1].copy(), "silu", one, isa=isa)
        np.testing.assert_array_equal(one[0], out[t])
    q = F.quantize(rng.standard_normal((37, 768)).astype(np.float32), "q5_k")
    x = rng.standard_normal((13, 768)).astype(np.float32)
    np.testing.assert_array_equal(_bits(K.matmul(q, x, isa=isa)), _bits(F.matmul_ref(q, x)))


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "generic"])
@pytest.mark.parametrize("fmt", KQ)
def test_gemm_scratch_failure_raises(isa, fmt):
    """the prefill tiles' scratch allocation failing raises MemoryError (not a half-written output)"""
    from powerlow import _kernels as _k
    rng = np.random.default_rng(12)
    q = F.quantize(rng.standard_normal((40, 512)).astype(np.float32), fmt)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    ref = K.matmul(q, x, isa=isa)
    old = K.get_threads()
    try:
        K.set_threads(1)
        _k._test_fail_allocs(1)
        with pytest.raises(MemoryError):
            K.matmul(q, x, isa=isa)
    finally:
        _k._test_fail_allocs(0)
        K.set_threads(old)
    np.testing.assert_array_equal(K.matmul(q, x, isa=isa), ref)
