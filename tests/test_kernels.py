"""C kernels against the numpy reference, every ISA variant this CPU runs (isa= override), awkward sizes.

Integer paths (activation quantization) must match exactly; float outputs within a tolerance relative
to sum |w| |x| (different summation order and FMA are the only differences)."""
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from powerlow import formats as F
from powerlow import reference as R

from powerlow import kernels as K      # a broken build fails here, it is not skipped
from kernel_cases import exact_activations, exact_lowbit

ISAS = list(K.supported_isas)
# formats on the q8 activations (any K, zero-padded): the K-quants (K a multiple of 256, Q8_K activations)
# have their own parametrized tests in tests/test_kquants.py
FMTS = [f for f, sp in F.FORMATS.items() if sp.act == "q8"]
REL = 2e-5


def _close(y, ref, q, x, rel=REL):
    scale = np.abs(x) @ np.abs(F.dequantize(q)).T + 1e-6
    err = np.abs(y - ref) / scale
    assert err.max() <= rel, f"max relative error {err.max():.3g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k", [1, 3, 31, 33, 255, 257])
def test_quantize_act_exact(isa, k):
    rng = np.random.default_rng(k)
    x = (rng.standard_normal((3, k)) * rng.uniform(0.01, 100)).astype(np.float32)
    x[0, : min(k, 5)] = 0.0
    if k > 2:
        x[1] = 0.0  # a zero token: d = 0
    a, b = F.quantize_act(x), K.quantize_act(x, isa=isa)
    for f in ("qs", "d", "s", "isum"):
        np.testing.assert_array_equal(getattr(b, f), getattr(a, f), err_msg=f)


def test_quantize_act_rounding_ties():
    # values that land exactly on .5 after scaling, and the largest float below .5
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 127.0
    x[0, 1:6] = [0.5, 1.5, -2.5, np.nextafter(np.float32(0.5), np.float32(0)), -0.5]
    for isa in ISAS:
        np.testing.assert_array_equal(K.quantize_act(x, isa=isa).qs, F.quantize_act(x).qs)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k", [1, 3, 31, 33, 255, 257])
def test_matmul_awkward_k(isa, fmt, k):
    rng = np.random.default_rng(k + 7)
    w = rng.standard_normal((13, k)).astype(np.float32)
    q = F.quantize(w, fmt)
    for t in (1, 3):
        x = rng.standard_normal((t, k)).astype(np.float32)
        _close(K.matmul(q, x, isa=isa), F.matmul_ref(q, x), q, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("t", [1, 3, 32, 64])
def test_matmul_tokens(isa, fmt, t):
    rng = np.random.default_rng(t)
    q = F.quantize(rng.standard_normal((67, 320)).astype(np.float32), fmt)
    x = (rng.standard_normal((t, 320)) * 3).astype(np.float32)
    out = np.full((t, 67), np.nan, np.float32)
    K.matmul(q, x, out, isa=isa)
    _close(out, F.matmul_ref(q, x), q, x)


@pytest.mark.parametrize("fmt", ["q2", "tern", "q1"])
def test_table_lookup_kernels(fmt):
    rng = np.random.default_rng(3)
    q = F.quantize(rng.standard_normal((9, 200)).astype(np.float32), fmt)
    x = rng.standard_normal((3, 200)).astype(np.float32)
    _close(K.matmul(q, x, isa="generic", tl=True), F.matmul_ref(q, x), q, x)


def test_matmul_multithreaded_large():
    rng = np.random.default_rng(9)
    q = F.quantize(rng.standard_normal((1000, 512)).astype(np.float32), "q4_1")
    x = rng.standard_normal((2, 512)).astype(np.float32)
    old = K.get_threads()
    try:
        K.set_threads(2)
        _close(K.matmul(q, x), F.matmul_ref(q, x), q, x)
    finally:
        K.set_threads(old)


def test_gguf_real_rows_match_reference(smol_gguf):
    import gguf
    r = gguf.GGUFReader(str(smol_gguf))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    q = F.from_gguf(t.data, "Q4_1", int(t.shape[1]), int(t.shape[0]))
    x = np.random.default_rng(0).standard_normal((2, q.cols)).astype(np.float32)
    for isa in ISAS:
        _close(K.matmul(q, x, isa=isa), F.matmul_ref(q, x), q, x)


def _bundles(fmt, down_fmt, C, Kd, n, rng):
    lay = F.BundleLayout.make(fmt, down_fmt, C, Kd)
    # bundles at arbitrary (4 KiB-aligned) places inside one arena, in shuffled order
    arena = np.zeros(lay.stride * (n + 2), np.uint8)
    slots = rng.permutation(n + 2)[:n]
    base = arena.ctypes.data
    ptrs = []
    for i, s in enumerate(slots):
        g = F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt)
        u = F.quantize(rng.standard_normal((C, Kd)).astype(np.float32) * 0.5, fmt)
        d = F.quantize(rng.standard_normal((Kd, C)).astype(np.float32) * 0.5, down_fmt)
        off = s * lay.stride
        for o, m in ((lay.gate_off, g), (lay.up_off, u), (lay.down_off, d)):
            b = np.frombuffer(m.to_bytes(), np.uint8)
            arena[off + o: off + o + b.size] = b
        ptrs.append(base + off)
    return lay, arena, np.array(ptrs, np.uint64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt,down_fmt", [("q4_1", "q4_1"), ("q8", "q8"), ("q4_0", "q4_0"),
                                          ("q2", "q2"), ("tern", "tern"), ("q1", "q1"), ("tern", "q8")])
@pytest.mark.parametrize("act", ["silu", "relu"])
def test_ffn_bundles(isa, fmt, down_fmt, act):
    rng = np.random.default_rng(11)
    Kd, C = 100, 64
    lay, arena, ptrs = _bundles(fmt, down_fmt, C, Kd, 5, rng)
    for t in (1, 3):
        h = rng.standard_normal((t, Kd)).astype(np.float32)
        base = rng.standard_normal((t, Kd)).astype(np.float32)
        ref = base.copy()
        R.ffn_bundles(ptrs, lay, h, act, ref)
        out = base.copy()
        K.ffn_bundles(ptrs, lay, h, act, out, isa=isa)
        # the intermediate is re-quantized; compare with a tolerance on the output magnitude
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref - base).max())
    # no bundles: out unchanged
    out = base.copy()
    K.ffn_bundles(ptrs[:0], lay, h, act, out, isa=isa)
    np.testing.assert_array_equal(out, base)


def test_ffn_bundles_threads_agree():
    rng = np.random.default_rng(12)
    lay, arena, ptrs = _bundles("q4_1", "q4_1", 64, 96, 7, rng)
    h = rng.standard_normal((2, 96)).astype(np.float32)
    outs = []
    old = K.get_threads()
    try:
        for n in (1, 2):
            K.set_threads(n)
            o = np.zeros((2, 96), np.float32)
            K.ffn_bundles(ptrs, lay, h, "silu", o)
            outs.append(o)
    finally:
        K.set_threads(old)
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ffn_bundles_in_pieces_is_bit_exact(isa, threads):
    """The dense offloaded run computes a layer piece by piece as bundles arrive: same floats as one call."""
    rng = np.random.default_rng(13)
    n = 23
    lay, arena, ptrs = _bundles("q4_1", "q8", 64, 96, n, rng)
    h = rng.standard_normal((3, 96)).astype(np.float32)
    base = rng.standard_normal((3, 96)).astype(np.float32)
    old = K.get_threads()
    try:
        K.set_threads(threads)
        whole = base.copy()
        K.ffn_bundles(ptrs, lay, h, "silu", whole, isa=isa)
        nch = K.ffn_nchunks(n)
        assert nch == (1 if threads == 1 else min(4 * threads, n))
        bounds = [n * c // nch for c in range(nch + 1)]
        out = base.copy()
        priv = np.zeros((nch - 1, 3, 96), np.float32)
        junk = ptrs.copy()
        for step in range(0, n, 2):          # two bundles of every chunk per piece; other ptrs are never read
            lo = np.array([min(bounds[c] + step, bounds[c + 1]) for c in range(nch)], np.int32)
            hi = np.array([min(bounds[c] + step + 2, bounds[c + 1]) for c in range(nch)], np.int32)
            cur = np.zeros_like(junk)
            for c in range(nch):
                cur[lo[c]:hi[c]] = ptrs[lo[c]:hi[c]]
            K.ffn_bundles_part(cur, lay, h, "silu", out, priv, lo, hi, isa=isa)
        for p in priv:
            out += p
        np.testing.assert_array_equal(out, whole)
        if nch > 1:                          # a wrong reduction order or a missing piece shows
            bad = out.copy() - priv[-1]
            assert not np.array_equal(bad, whole)
        with pytest.raises(ValueError, match="lo <= hi"):
            K.ffn_bundles_part(ptrs, lay, h, "silu", out, priv, np.full(nch, 2, np.int32), np.full(nch, 1, np.int32))
        with pytest.raises(ValueError, match="priv must be"):
            K.ffn_bundles_part(ptrs, lay, h, "silu", out, priv[:0, :1], np.zeros(nch, np.int32), np.zeros(nch, np.int32))
    finally:
        K.set_threads(old)


def test_bad_arguments_raise_valueerror():
    q = F.quantize(np.ones((4, 64), np.float32), "q4_1")
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match="x must"):
        K.matmul(q, np.ones((1, 63), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        K.matmul(q, x.astype(np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        K.matmul(q, np.ones((64, 2), np.float32).T[:1])
    with pytest.raises(ValueError, match="out must"):
        K.matmul(q, x, np.empty((1, 5), np.float32))
    bad = F.QMatrix.__new__(F.QMatrix)
    bad.fmt, bad.rows, bad.cols = "q4_1", 4, 64
    bad.planes = {"qs": q.planes["qs"][:2], "d": q.planes["d"], "m": q.planes["m"]}
    with pytest.raises(ValueError, match="qs has"):
        K.matmul(bad, x)
    lay = F.BundleLayout.make("q4_1", "q4_1", 64, 64)
    with pytest.raises(ValueError):
        K.ffn_bundles(np.zeros(1, np.int64), lay, x, "silu", x.copy())
    with pytest.raises(ValueError):
        K.ffn_bundles(np.zeros(1, np.uint64), lay, x, "gelu", x.copy())
    with pytest.raises(ValueError):
        K.set_threads(0)
    with pytest.raises(ValueError):
        K.rmsnorm(x, np.ones(3, np.float32), 1e-5)
    with pytest.raises(ValueError):
        K.attention(np.ones((1, 3, 8), np.float32), np.ones((2, 4, 8), np.float32), np.ones((2, 4, 8), np.float32), 0)


def test_isa_env_forces_variant():
    code = "import powerlow.kernels as k; print(k.isa)"
    for want in ISAS:
        env = dict(os.environ, POWERLOW_ISA=want)
        got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert got.stdout.strip() == want
    env = dict(os.environ, POWERLOW_ISA="sse9")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "POWERLOW_ISA" in bad.stderr


# ---------------------------------------------------------------- float helpers

def test_rmsnorm():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 577)).astype(np.float32)
    w = rng.standard_normal(577).astype(np.float32)
    np.testing.assert_allclose(K.rmsnorm(x, w, 1e-5), R.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_rope_matches_reference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 17, 1000], np.int64)
    cos, sin = R.rope_tables(64, 1e5, pos)
    ref = R.rope(x, cos, sin)
    np.testing.assert_allclose(K.rope(x.copy(), pos, 1e5), ref, rtol=1e-5, atol=1e-5)


def test_gated():
    rng = np.random.default_rng(3)
    g, u = rng.standard_normal((2, 300)).astype(np.float32) * 4, rng.standard_normal((2, 300)).astype(np.float32)
    np.testing.assert_allclose(K.silu_mul(g, u), R.act_fn(g, "silu") * u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(K.relu_mul(g, u), R.act_fn(g, "relu") * u, rtol=0, atol=0)


@pytest.mark.parametrize("T,start", [(1, 0), (1, 9), (5, 0), (5, 7), (64, 3)])
def test_attention_gqa_causal(T, start):
    rng = np.random.default_rng(T + start)
    nh, nkv, hd, maxP = 9, 3, 64, 80
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    kc = rng.standard_normal((nkv, maxP, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, maxP, hd)).astype(np.float32)
    np.testing.assert_allclose(K.attention(q, kc, vc, start), R.attention(q, kc, vc, start), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T,start", [(1, 12), (6, 4)])
def test_attention_fp16_cache(T, start):
    rng = np.random.default_rng(T)
    nh, nkv, hd, maxP = 9, 3, 64, 40
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    kc = rng.standard_normal((nkv, maxP, hd)).astype(np.float16)
    vc = rng.standard_normal((nkv, maxP, hd)).astype(np.float16)
    ref = R.attention(q, kc.astype(np.float32), vc.astype(np.float32), start)
    np.testing.assert_allclose(K.attention(q, kc, vc, start), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        K.attention(q, kc, vc.astype(np.float32), start)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8"])
def test_two_group_short_rows(isa, fmt):
    """C = 64 down matrices (two 32-groups per row): the 8-row path (q4: one row per load, scales of
    the two groups deinterleaved) plus a tail of rows, against the reference, groups of very different scale."""
    rng = np.random.default_rng(31)
    n = 8 * 9 + 3
    w = rng.standard_normal((n, 64)).astype(np.float32)
    w[:, 32:] *= rng.uniform(0.01, 10, (n, 1)).astype(np.float32)   # group 1 scaled apart from group 0
    w[::5, :32] += 2.0                                              # and shifted (mins of q4_1)
    q = F.quantize(w, fmt)
    for t in (1, 3, 5):
        x = rng.standard_normal((t, 64)).astype(np.float32)
        x[:, 32:] *= 7.0
        _close(K.matmul(q, x, isa=isa), F.matmul_ref(q, x), q, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q2", "tern", "q1"])
@pytest.mark.parametrize("k", [129, 320, 384, 1536, 1600, 1601])
def test_long_rows_two_groups(isa, fmt, k):
    """q2/tern long rows with an even count of 64-groups (two groups per 32-byte load against re-laid
    activations), q1 rows (two groups per 16-byte load, a last odd group in the per-block form): every
    bit / 2-bit field position and block half, groups of very different scale."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((19, k)).astype(np.float32)
    w *= np.repeat(rng.uniform(0.01, 10, (19, -(-k // 64))), 64, axis=1)[:, :k].astype(np.float32)
    q = F.quantize(w, fmt)
    for t in (1, 2, 3, 4, 5):
        x = rng.standard_normal((t, k)).astype(np.float32)
        x[:, 16:48] *= 9.0
        _close(K.matmul(q, x, isa=isa), F.matmul_ref(q, x), q, x)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", FMTS)
def test_batch_invariance_bit_exact(isa, fmt):
    """A token's output does not depend on the batch it is computed in (decode == prefill, bit for bit)."""
    rng = np.random.default_rng(21)
    # long rows (576: odd count of 64-groups, 384: even, the q2/tern two-group path), two groups (C = 64
    # down, 8-row path), one group (C = 32 down)
    for n, k in ((37, 576), (21, 384), (40, 64), (48, 32)):
        q = F.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt)
        x = rng.standard_normal((7, k)).astype(np.float32)
        full = K.matmul(q, x, isa=isa)
        for t in range(7):
            np.testing.assert_array_equal(K.matmul(q, x[t:t + 1].copy(), isa=isa)[0], full[t])


@pytest.mark.parametrize("isa", ISAS)
def test_ffn_bundles_batch_invariance(isa):
    rng = np.random.default_rng(22)
    lay, arena, ptrs = _bundles("q4_1", "q4_1", 64, 96, 5, rng)
    h = rng.standard_normal((3, 96)).astype(np.float32)
    full = np.zeros((3, 96), np.float32)
    K.ffn_bundles(ptrs, lay, h, "silu", full, isa=isa)
    for t in range(3):
        one = np.zeros((1, 96), np.float32)
        K.ffn_bundles(ptrs, lay, h[t:t + 1].copy(), "silu", one, isa=isa)
        np.testing.assert_array_equal(one[0], full[t])


# ---------------------------------------------------------------- the fused attention block

def _attn_layer(rng, fmt, K_, nh, nkv, hd, bias, qk_norm=False, gemma=False):
    from types import SimpleNamespace
    nq = (nh + 2 * nkv) * hd
    return SimpleNamespace(
        post_attn_norm=(1 + 0.3 * rng.standard_normal(K_)).astype(np.float32) if gemma else None,
        window=3 if gemma else 0, attn_scale=0.3 if gemma else 0.0,
        q_norm=(1 + 0.3 * rng.standard_normal(hd)).astype(np.float32) if qk_norm else None,
        k_norm=(1 + 0.3 * rng.standard_normal(hd)).astype(np.float32) if qk_norm else None,
        attn_norm=(1 + 0.1 * rng.standard_normal(K_)).astype(np.float32),
        wqkv=F.quantize((rng.standard_normal((nq, K_)) * 0.1).astype(np.float32), fmt),
        bqkv=(rng.standard_normal(nq) * 0.1).astype(np.float32) if bias else None,
        wo=F.quantize((rng.standard_normal((K_, nh * hd)) * 0.1).astype(np.float32), fmt),
        ffn_norm=(1 + 0.1 * rng.standard_normal(K_)).astype(np.float32))


@pytest.mark.parametrize("fmt,bias,scale,qk_norm,gemma", [("q4_1", False, 1.0, False, False), ("q8", True, 1.0, False, False),
                                                          ("q4_0", False, 4.0, False, False), ("q4_1", False, 1.0, True, False),
                                                          ("q8", True, 4.0, True, False), ("q4_1", False, 1.0, True, True)])
def test_attn_block_equals_unfused_kernels(fmt, bias, scale, qk_norm, gemma):
    """attn_block == the engine's unfused kernel sequence, bit for bit (prefill, then decode steps), with and
    without qwen3's QK-norm (each head of q and k RMS-normed before RoPE) and gemma3's extras (a sliding window of
    3, a score scale, the attention output RMS-normed before the add); and close to the same block composed from
    the numpy reference (engine.RefOps.attn_block)."""
    from powerlow.engine import RefOps
    rng = np.random.default_rng(31)
    K_, nh, nkv, hd, maxP, eps, theta = 96, 6, 2, 16, 24, 1e-5, 1e4
    lw = _attn_layer(rng, fmt, K_, nh, nkv, hd, bias, qk_norm, gemma)
    x0 = rng.standard_normal((9, K_)).astype(np.float32)
    kc, vc = np.zeros((nkv, maxP, hd), np.float16), np.zeros((nkv, maxP, hd), np.float16)
    kc2, vc2, kc3, vc3 = kc.copy(), vc.copy(), kc.copy(), vc.copy()
    for start, T in ((0, 6), (6, 1), (7, 2)):
        pos = np.arange(start, start + T, dtype=np.int64)
        rope = K.rope_tables(pos, hd, theta, scale)
        ref_tab = R.rope_tables(hd, theta, pos, scale)
        np.testing.assert_array_equal(rope[0], ref_tab[0])
        np.testing.assert_array_equal(rope[1], ref_tab[1])
        x, h = x0[start: start + T].copy(), np.empty((T, K_), np.float32)
        K.attn_block(lw, x, h, kc, vc, start, rope, nh, nkv, eps, K.attn_scratch(T, nh, nkv, hd, K_))
        # unfused, kernel by kernel (as Transformer.forward with fused=False)
        x2 = x0[start: start + T].copy()
        qkv = K.matmul(lw.wqkv, K.rmsnorm(x2, lw.attn_norm, eps))
        if bias:
            qkv += lw.bqkv
        qd, kd = nh * hd, nkv * hd
        q, k = qkv[:, :qd].reshape(T, nh, hd), qkv[:, qd: qd + kd].reshape(T, nkv, hd)
        if qk_norm:   # as Transformer._attention
            q = K.rmsnorm(np.ascontiguousarray(q).reshape(T * nh, hd), lw.q_norm, eps).reshape(T, nh, hd)
            k = K.rmsnorm(np.ascontiguousarray(k).reshape(T * nkv, hd), lw.k_norm, eps).reshape(T, nkv, hd)
        q = R.rope(q, *rope).astype(np.float32) if scale != 1 else K.rope(np.ascontiguousarray(q), pos, theta)
        k = R.rope(k, *rope) if scale != 1 else K.rope(np.ascontiguousarray(k), pos, theta)
        kc2[:, start: start + T] = k.transpose(1, 0, 2)
        vc2[:, start: start + T] = qkv[:, qd + kd:].reshape(T, nkv, hd).transpose(1, 0, 2)
        o = K.matmul(lw.wo, K.attention(np.ascontiguousarray(q), kc2, vc2, start, window=lw.window, scale=lw.attn_scale))
        x2 += o if lw.post_attn_norm is None else K.rmsnorm(o, lw.post_attn_norm, eps)
        np.testing.assert_array_equal(kc, kc2)
        np.testing.assert_array_equal(vc, vc2)
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(h, K.rmsnorm(x2, lw.ffn_norm, eps))
        # the numpy composition
        x3, h3 = x0[start: start + T].copy(), np.empty((T, K_), np.float32)
        RefOps.attn_block(lw, x3, h3, kc3, vc3, start, RefOps.rope_tables(pos, hd, theta, scale), nh, nkv, eps)
        np.testing.assert_allclose(x, x3, rtol=0, atol=0.05 * np.abs(x3).max())
        np.testing.assert_allclose(h, h3, rtol=0, atol=0.05 * np.abs(h3).max())
    with pytest.raises(ValueError):
        K.attn_block(lw, x0[:3].copy(), np.empty((3, K_), np.float32), kc, vc, maxP - 2, rope, nh, nkv, eps,
                     K.attn_scratch(3, nh, nkv, hd, K_))
    if qk_norm:   # a norm of the wrong length, or one of the two alone: refused, naming the problem
        from types import SimpleNamespace
        for change, msg in (({"q_norm": lw.q_norm[:-1]}, r"q_norm \(head_dim\) must have 16 values"),
                            ({"k_norm": None}, "go together"),
                            ({"post_attn_norm": np.ones(K_ - 1, np.float32)}, "post_norm must have 96"),
                            ({"window": -1}, "window must be >= 0"), ({"attn_scale": -0.5}, "attn_scale must be >= 0")):
            bad = SimpleNamespace(**{**vars(lw), **change})
            with pytest.raises(ValueError, match=msg):
                K.attn_block(bad, x0[:1].copy(), np.empty((1, K_), np.float32), kc, vc, 0, K.rope_tables(
                    np.zeros(1, np.int64), hd, theta), nh, nkv, eps, K.attn_scratch(1, nh, nkv, hd, K_))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q8", "q4_0", "q4_1"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_path_bit_exact(isa, fmt, threads):
    """Batches of >= 4 tokens take the GEMM path (codes and activations re-laid 8 blocks per vector,
    2 rows x 4 tokens per step): every token's output must equal, bit for bit, the one it gets alone,
    and the reference within tolerance. Awkward sizes: every ng % 8 tail (odd ones take the scalar-
    copy tail), one group short of a chunk, odd row counts (a last single row), token counts that
    leave 1..3 tokens in the last tile and cross the 64-token block, rows of very different scale."""
    rng = np.random.default_rng(41)
    old = K.get_threads()
    try:
        K.set_threads(threads)
        for n, k, t in ((1, 257, 4), (3, 255, 5), (31, 448, 7), (33, 416, 9), (257, 1056, 6),
                        (64, 737, 65), (9, 8 * 32 * 3 + 7 * 32, 33)):
            w = rng.standard_normal((n, k)).astype(np.float32)
            w *= rng.uniform(0.01, 10, (n, 1)).astype(np.float32)
            w[::3, :100] += 1.5
            q = F.quantize(w, fmt)
            x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 10, (t, 1))).astype(np.float32)
            full = K.matmul(q, x, isa=isa)
            _close(full, F.matmul_ref(q, x), q, x)
            for i in range(t):
                np.testing.assert_array_equal(K.matmul(q, x[i:i + 1].copy(), isa=isa)[0], full[i],
                                              err_msg=f"n={n} k={k} t={t} token {i}")
    finally:
        K.set_threads(old)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q4_1", "q8", "q4_0"])
def test_ffn_bundles_gemm_path_accumulates(isa, fmt):
    """Clusters of 288 neurons (9 groups: the down product takes the GEMM path with accumulate = 1 and a
    one-group tail) and K = 320 (gate/up: GEMM path, two-group tail), 5 tokens: against the reference,
    and each token alone gives the same bits."""
    rng = np.random.default_rng(23)
    Kd, C = 320, 288
    lay, arena, ptrs = _bundles(fmt, fmt, C, Kd, 3, rng)
    h = rng.standard_normal((5, Kd)).astype(np.float32)
    base = rng.standard_normal((5, Kd)).astype(np.float32)
    ref = base.copy()
    R.ffn_bundles(ptrs, lay, h, "silu", ref)
    out = base.copy()
    K.ffn_bundles(ptrs, lay, h, "silu", out, isa=isa)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref - base).max())
    for t in range(5):
        one = base[t:t + 1].copy()
        K.ffn_bundles(ptrs, lay, h[t:t + 1].copy(), "silu", one, isa=isa)
        np.testing.assert_array_equal(one[0], out[t])


# ---------------------------------------------------------------- AVX2 table-lookup kernels

needs_avx2 = pytest.mark.skipif("avx2" not in ISAS, reason="this CPU has no AVX2")
TL_ISAS = [i for i in ("avx2", "avx512") if i in ISAS]     # the vpshufb TL, compiled for each (plk_tl.h)


@pytest.mark.parametrize("tl_isa", TL_ISAS)
@needs_avx2
@pytest.mark.parametrize("fmt", ["q1", "tern", "q2"])
@pytest.mark.parametrize("n", [1, 3, 31, 33, 255, 257])
def test_tl_avx2_equals_reference_and_mad(fmt, n, tl_isa):
    """The vpshufb kernels (forced, on a prepared matrix) against the numpy reference and, bit for bit,
    the multiply-add kernel: row counts below, at and across the 32-row tiles, columns that are no
    multiple of 32 or 64 (odd and even counts of 64-groups; <= 4 groups: the multiply-add fallback),
    1..70 tokens (70: tables in two chunks of <= 64 tokens), groups of very different scale; each token alone
    gives the bits it gets in the batch."""
    rng = np.random.default_rng(n)
    for k in (200, 313, 445, 507, 1601):
        w = rng.standard_normal((n, k)).astype(np.float32)
        w *= np.repeat(rng.uniform(0.01, 10, (n, -(-k // 64))), 64, axis=1)[:, :k].astype(np.float32)
        q = K.prepare_tl(F.quantize(w, fmt))
        assert (q.tl is not None) == (n >= 32)
        for t in (1, 3, 8, 70):
            x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 10, (t, 1))).astype(np.float32)
            y = K.matmul(q, x, isa=tl_isa, tl=True)
            _close(y, F.matmul_ref(q, x), q, x)
            np.testing.assert_array_equal(y, K.matmul(q, x, isa=tl_isa, tl=False), err_msg=f"k={k} t={t}")
            if t in (3, 8):
                for i in range(t):
                    np.testing.assert_array_equal(K.matmul(q, x[i:i + 1].copy(), isa=tl_isa, tl=True)[0], y[i])


@pytest.mark.parametrize("tl_isa", TL_ISAS)
@needs_avx2
@pytest.mark.parametrize("fmt", ["q1", "tern", "q2"])
@pytest.mark.parametrize("threads", [1, 2])
def test_tl_avx2_k_chunks_and_super_tiles(fmt, threads, tl_isa):
    """The layout's K-chunks and super-tiles (plk.h): 19 whole tiles (two super-tiles of 8 and one of 3) + 5 rows,
    35 groups (q2/tern: chunks of 16, 16, 3; q1: 32, 3), split over 2 threads in items of 3 tiles that cut the
    super-tiles: bit for bit the multiply-add kernel and close to the reference."""
    rng = np.random.default_rng(19)
    n, k = 32 * 19 + 5, 35 * 64 - 40
    q = K.prepare_tl(F.quantize(rng.standard_normal((n, k)).astype(np.float32), fmt))
    old = K.get_threads()
    try:
        K.set_threads(threads)
        for t in (1, 5):
            x = rng.standard_normal((t, k)).astype(np.float32)
            y = K.matmul(q, x, isa=tl_isa, tl=True)
            np.testing.assert_array_equal(y, K.matmul(q, x, isa=tl_isa, tl=False), err_msg=f"t={t}")
            _close(y, F.matmul_ref(q, x), q, x)
    finally:
        K.set_threads(old)


@pytest.mark.parametrize("tl_isa", TL_ISAS)
@needs_avx2
@pytest.mark.parametrize("fmt,byte", [("q1", 0xFF), ("q1", 0x00), ("tern", 0xAA), ("q2", 0xFF), ("q2", 0x00)])
@pytest.mark.parametrize("sign", [1.0, -1.0, 0.0])
def test_tl_avx2_extreme_codes_and_activations(fmt, byte, sign, tl_isa):
    """Largest table entries (all codes at their maximum, every activation +-127): the int16 sums and
    the 6-bit split of q2/tern must not overflow. sign 0: alternating signs."""
    sp = F.FORMATS[fmt]
    n, k = 64, 64 * 9
    planes = {"qs": np.full((n, 9 * sp.qbytes), byte, np.uint8), "d": np.full((n, 9), 0.01, np.float16)}
    if sp.has_min:
        planes["m"] = np.full((n, 9), -0.02, np.float16)
    q = K.prepare_tl(F.QMatrix(fmt, n, k, planes))
    x = np.full((2, k), 5.0, np.float32) * np.float32(sign) if sign else \
        np.tile(np.where(np.arange(k) % 2, 5.0, -5.0).astype(np.float32), (2, 1))
    x[1] *= -1
    y = K.matmul(q, x, isa=tl_isa, tl=True)
    np.testing.assert_array_equal(y, K.matmul(q, x, isa=tl_isa, tl=False))
    _close(y, F.matmul_ref(q, x), q, x)


@pytest.mark.parametrize("fmt", ["q1", "tern", "q2"])
@pytest.mark.parametrize("k", [64 * 3, 64 * 7, 64 * 130])
def test_low_bit_kernels_exact_on_exact_inputs(fmt, k):
    """Where every float step is exact (power-of-two scales and mins, integer activations with a +-127 in
    each 32-block, so d_x = 1), every kernel must give the reference's numbers bit for bit: multiply-add
    on every variant, portable TL, AVX2 TL; 69 rows = two 32-row tiles + 5 rows in partial lane sets; short
    rows (3 groups), 7 groups, 130 groups; 1 and 5 tokens."""
    rng = np.random.default_rng(k)
    q = exact_lowbit(fmt, 69, k, rng)
    for t in (1, 5):
        x = exact_activations(t, k, rng)
        ref = F.matmul_ref(q, x)
        assert np.abs(ref).max() > 1000      # a real computation, not zeros
        for isa in ISAS:
            np.testing.assert_array_equal(K.matmul(q, x, isa=isa, tl=False), ref, err_msg=f"{isa} mad t={t}")
        np.testing.assert_array_equal(K.matmul(q, x, isa="generic", tl=True), ref, err_msg=f"generic tl t={t}")
        qt = K.prepare_tl(F.QMatrix(fmt, q.rows, k, dict(q.planes)))
        for isa in TL_ISAS:
            np.testing.assert_array_equal(K.matmul(qt, x, isa=isa, tl=True), ref, err_msg=f"{isa} tl t={t}")


@needs_avx2
@pytest.mark.parametrize("fmt", ["q1", "tern", "q2"])
def test_tl_avx2_layout_is_what_runs(fmt):
    """The TL kernel reads q.tl (not the planes): zeroing the layout changes the output of a forced TL
    call, and of a default call where TL_PREFERRED picks TL; the multiply-add output does not move.
    tl=True without a layout is an error."""
    rng = np.random.default_rng(5)
    q = K.prepare_tl(F.quantize(rng.standard_normal((64, 640)).astype(np.float32), fmt))
    x = rng.standard_normal((2, 640)).astype(np.float32)
    mad, tl, dflt = (K.matmul(q, x, isa="avx2", tl=v) for v in (False, True, None))
    np.testing.assert_array_equal(tl, mad)
    q.tl[:] = 0
    assert not np.array_equal(K.matmul(q, x, isa="avx2", tl=True), mad)
    assert np.array_equal(K.matmul(q, x, isa="avx2"), mad) != K.TL_PREFERRED.get((fmt, "avx2"), False)
    np.testing.assert_array_equal(K.matmul(q, x, isa="avx2", tl=False), mad)
    with pytest.raises(ValueError, match="prepare_tl"):
        K.matmul(F.quantize(rng.standard_normal((64, 640)).astype(np.float32), fmt), x, isa="avx2", tl=True)
    bad = F.quantize(rng.standard_normal((64, 640)).astype(np.float32), fmt)
    bad.tl = np.zeros(10, np.uint8)
    with pytest.raises(ValueError, match="tl layout"):
        K.matmul(bad, x, isa="avx2", tl=True)


@needs_avx2
@pytest.mark.parametrize("fmt", ["q1", "q2"])
def test_tl_avx2_attn_block_and_threads(fmt):
    """attn_block on prepared projections == on plain ones (the layout reaches the fused call), and a
    2-thread matmul (row chunks of whole tiles) == 1 thread, bit for bit."""
    rng = np.random.default_rng(8)
    K_, nh, nkv, hd, maxP, eps = 384, 6, 2, 32, 8, 1e-5
    lw = _attn_layer(rng, fmt, K_, nh, nkv, hd, False)
    plain = _attn_layer(np.random.default_rng(8), fmt, K_, nh, nkv, hd, False)
    K.prepare_tl(lw.wqkv), K.prepare_tl(lw.wo)
    assert lw.wqkv.tl is not None and plain.wqkv.tl is None
    x0 = rng.standard_normal((3, K_)).astype(np.float32)
    outs = []
    for m in (lw, plain):
        kc, vc = np.zeros((nkv, maxP, hd), np.float16), np.zeros((nkv, maxP, hd), np.float16)
        x, h = x0.copy(), np.empty((3, K_), np.float32)
        rope = K.rope_tables(np.arange(3, dtype=np.int64), hd, 1e4)
        K.attn_block(m, x, h, kc, vc, 0, rope, nh, nkv, eps, K.attn_scratch(3, nh, nkv, hd, K_), isa="avx2")
        outs.append((x, h))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    q = K.prepare_tl(F.quantize(rng.standard_normal((1000, 768)).astype(np.float32), fmt))
    x = rng.standard_normal((2, 768)).astype(np.float32)
    old = K.get_threads()
    try:
        ys = []
        for nt in (1, 2):
            K.set_threads(nt)
            ys.append(K.matmul(q, x, isa="avx2", tl=True))
    finally:
        K.set_threads(old)
    np.testing.assert_array_equal(ys[0], ys[1])


def _planes_matrix(fmt, rows, cols, rng, extreme):
    """A packed matrix built from its planes: random codes, or (extreme) every code at the end of its
    range (q4: 15, q8: +-127 by row), the case that fills the GEMM's int16 sums to their bound."""
    sp = F.FORMATS[fmt]
    g = -(-cols // sp.group)
    if extreme:
        qs = np.full((rows, g * sp.qbytes), 0xFF, np.uint8)
        if fmt == "q8":
            qs = np.where(np.arange(rows)[:, None] % 2 == 0, 127, -127).astype(np.int8) * np.ones_like(qs, np.int8)
    else:
        qs = rng.integers(0, 256, (rows, g * sp.qbytes), dtype=np.uint8)
    planes = {"qs": qs.view(np.int8) if fmt == "q8" else qs,
              "d": (rng.random((rows, g), np.float32) * 0.01 + 0.001).astype(np.float16)}
    if sp.has_min:
        planes["m"] = (-rng.random((rows, g), np.float32) * 0.05).astype(np.float16)
    return F.QMatrix(fmt, rows, cols, planes)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q4_1", "q8", "q4_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_asm_tiles_bit_exact(isa, fmt, threads):
    """The 2-row x 4-token tiles of the GEMM path run as one inline-asm statement per chunk (integer steps
    and float epilogue); edge tiles (a last single row, 1..3 tokens) run the C loop. Token counts 4, 5, 7,
    31, 33, 64 (whole tiles and every remainder, both sides of the 32-token bench batch), row counts that
    end on a single row or split over threads, K of exactly one chunk, several chunks with an even or odd
    group tail; random codes, and codes at the end of their range against activations at +-127 of one
    sign (the int16 sums at their bound). Each token's output equals, bit for bit, the one it gets
    alone, and the reference within tolerance."""
    rng = np.random.default_rng(7)
    old = K.get_threads()
    try:
        K.set_threads(threads)
        for n, k, extreme in ((2, 256, False), (5, 256 * 3 + 2 * 32, False), (130, 256 * 2 + 3 * 32, False),
                              (3, 256 * 2, True), (66, 256 + 6 * 32, True)):
            q = _planes_matrix(fmt, n, k, rng, extreme)
            for t in (4, 5, 7, 31, 33, 64):
                if extreme:
                    x = np.where(np.arange(t)[:, None] % 2 == 0, 1.0, -1.0) * np.ones((t, k), np.float32)
                    x = x.astype(np.float32)
                else:
                    x = (rng.standard_normal((t, k)) * rng.uniform(0.1, 10, (t, 1))).astype(np.float32)
                full = K.matmul(q, x, isa=isa)
                _close(full, F.matmul_ref(q, x), q, x)
                for i in sorted({i for i in (0, 3, 4, t // 2, t - 1) if i < t}):
                    np.testing.assert_array_equal(K.matmul(q, x[i:i + 1].copy(), isa=isa)[0], full[i],
                                                  err_msg=f"n={n} k={k} t={t} token {i} extreme={extreme}")
    finally:
        K.set_threads(old)


@pytest.mark.parametrize("isa,fmt,T", [("avx2", "q4_1", 8), ("avx2", "q2", 1), ("avx2", "tern", 3), ("avx2", "q1", 2),
                                       ("generic", "q1", 1), ("generic", "q2", 2)])
def test_failed_scratch_allocation_raises(isa, fmt, T):
    """A kernel whose scratch allocation fails must not leave a half-computed output behind silently: the call
    raises MemoryError (fault injection: the next scratch allocation fails), and the next call is exact again."""
    from powerlow import _kernels as _k
    if isa not in ISAS:
        pytest.skip(f"{isa} not available")
    rng = np.random.default_rng(21)
    q = F.quantize(rng.standard_normal((64, 1024)).astype(np.float32), fmt)
    x = rng.standard_normal((T, 1024)).astype(np.float32)
    ref = K.matmul(q, x, isa=isa)
    old = K.get_threads()
    try:
        K.set_threads(1)
        _k._test_fail_allocs(1)
        with pytest.raises(MemoryError):
            K.matmul(q, x, isa=isa)
        _k._test_fail_allocs(1)
        lay, arena, ptrs = _bundles(fmt, fmt, 64, 1024, 3, rng)
        with pytest.raises(MemoryError):
            K.ffn_bundles(ptrs, lay, x, "silu", np.zeros_like(x), isa=isa)
    finally:
        _k._test_fail_allocs(0)
        K.set_threads(old)
    np.testing.assert_array_equal(K.matmul(q, x, isa=isa), ref)


@pytest.mark.parametrize("fmt", ["q4_k", "q5_k"])
def test_failed_kquant_relayout_allocation_raises(fmt):
    """The AVX-512 K-quant decode rows read activations re-laid once per call (plk_act.xw, act_prepare): when that
    allocation fails the call raises MemoryError instead of running on nothing, and the next call is exact."""
    from powerlow import _kernels as _k
    if "avx512" not in ISAS:
        pytest.skip("avx512 not available")
    rng = np.random.default_rng(23)
    q = F.quantize(rng.standard_normal((64, 512)).astype(np.float32), fmt)
    x = rng.standard_normal((1, 512)).astype(np.float32)
    ref = K.matmul(q, x, isa="avx512")
    _k._test_fail_allocs(1)
    try:
        with pytest.raises(MemoryError):
            K.matmul(q, x, isa="avx512")
    finally:
        _k._test_fail_allocs(0)
    np.testing.assert_array_equal(K.matmul(q, x, isa="avx512"), ref)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_failed_attention_scratch_raises(dtype):
    from powerlow import _kernels as _k
    rng = np.random.default_rng(22)
    q = rng.standard_normal((2, 4, 16)).astype(np.float32)
    kc = rng.standard_normal((2, 8, 16)).astype(dtype)
    vc = rng.standard_normal((2, 8, 16)).astype(dtype)
    ref = K.attention(q, kc, vc, 3)
    _k._test_fail_allocs(1)
    try:
        with pytest.raises(MemoryError):
            K.attention(q, kc, vc, 3)
    finally:
        _k._test_fail_allocs(0)
    np.testing.assert_array_equal(K.attention(q, kc, vc, 3), ref)


def test_bench_dense_matrices_far_larger_than_l3():
    """bench-kernels' dense rows stream >= 75 MB per GEMV in every format (K = 8192), more than twice a
    32 MB L3, so neither the kernel nor the probe's equally large buffer can run from cache."""
    from powerlow.bench_kernels import dense_rows
    for fmt, sp in F.FORMATS.items():
        nbytes = dense_rows(fmt) * 8192 * sp.bits_per_weight / 8
        assert nbytes >= 75e6, (fmt, nbytes)


def test_bench_check_names_a_chosen_variant_slower_than_another():
    """bench-kernels' last line: per case the chosen row against the fastest one measured (ISAs and TL / MAD);
    within 5% passes, more is named with both times, a case with no chosen row is named too."""
    from powerlow.bench_kernels import check_chosen

    def row(fmt, isa, ms, chosen, kernel=None, kind="dense"):
        r = {"kind": kind, "format": fmt, "isa": isa, "shape": [64, 8192], "density": 1.0, "ms": ms, "chosen": chosen}
        if kernel:
            r["kernel"] = kernel
        return r
    rows = [row("q4_0", "avx2", 2.0, False), row("q4_0", "avx512", 2.08, True),          # +4%: fine
            row("q2", "avx2", 3.0, False, "tl"), row("q2", "avx512", 4.0, True, "mad"),  # +33%: named
            row("q2", "avx512", 3.1, False, "tl"),
            row("q8", "avx2", 1.0, False), row("q8", "avx512", 1.2, False),              # nothing chosen
            row("q4_k", "avx512", 20.0, True, kind="gemm"), row("q4_k", "avx2", 26.0, False, kind="gemm")]
    got = check_chosen(rows)
    assert got["cases"] == 4
    slow = {w["case"].split()[1]: w for w in got["slow"]}
    assert set(slow) == {"q2", "q8"}
    assert slow["q2"]["chosen"] == "avx512/mad" and slow["q2"]["fastest"] == "avx2/tl" and slow["q2"]["excess"] == 0.333
    assert slow["q8"]["chosen"] is None and slow["q8"]["fastest"] == "avx2"
    assert check_chosen(rows, tol=0.5)["slow"] == [slow["q8"]]


def test_bench_check_pairs_the_rounds():
    """With per-round times the check compares the variants round by round: a host that slows down for some
    rounds moves both medians apart without either being slower (not named), while a variant slower in every
    round is named with its paired excess even when the medians look level."""
    from powerlow.bench_kernels import check_chosen

    def row(isa, rounds, chosen, fmt):
        ms = sorted(rounds)[len(rounds) // 2]
        return {"kind": "dense", "format": fmt, "isa": isa, "shape": [64, 8192], "density": 1.0, "ms": ms,
                "chosen": chosen, "rounds_ms": rounds}
    # tern: the host turns 1.5x slower in the middle of round 3, between the two variants: avx512 (chosen) is 1%
    # faster in every round but that one, yet its median falls on a slow round and avx2's on a fast one (+48%)
    a2 = [2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0]
    a5 = [1.98, 1.98, 1.98, 2.97, 2.97, 2.97, 2.97]
    # q8: avx512 (chosen) 10% slower in every round, medians level only because the rounds drifted
    b2 = [2.0, 2.2, 2.4, 2.6, 2.8]
    b5 = [2.2, 2.42, 2.64, 2.86, 3.08]
    rows = [row("avx2", a2, False, "tern"), row("avx512", a5, True, "tern"),
            row("avx2", b2, False, "q8"), row("avx512", b5, True, "q8")]
    got = check_chosen(rows)
    assert [w["case"].split()[1] for w in got["slow"]] == ["q8"]
    w = got["slow"][0]
    assert w["chosen"] == "avx512" and w["fastest"] == "avx2" and w["excess"] == 0.1
    assert w["excess_of_medians"] == round(2.64 / 2.4 - 1, 3)
    # without the rounds (old JSON rows) the medians decide
    for r in rows:
        r["rounds_ms"] = []
    got = check_chosen(rows)
    assert {w["case"].split()[1]: w["excess"] for w in got["slow"]} == {"tern": 0.485, "q8": 0.1}



def test_bench_gemm_speedup_pairs_the_gemm_and_gemv_rounds(monkeypatch):
    """bench-kernels' batch speedup is T x GEMV time / GEMM time taken round by round (both calls in every round):
    a host that changes phase between rounds moves the two medians onto different phases, which a ratio of
    medians would report as a 2x speedup that no round showed."""
    from powerlow import bench_kernels as BK
    gemm = [10.0, 10.0, 10.0, 20.0, 20.0]   # the GEMM is fast in rounds 0-2
    gemv = [1.0, 1.0, 2.0, 2.0, 2.0]        # the GEMV only in rounds 0-1: every round's ratio is 3.2 (or 6.4 in round 2)
    seen = []

    def fake(kernels, nbytes, threads, repeats, **kw):
        for n, f in kernels.items():   # the callables run (shapes, ISA names)
            f()
            seen.append(n)
        ts = {n: [t / 1e3 for t in (gemm if n[0] == "gemm" else gemv)] for n in kernels}
        med = {n: statistics.median(v) for n, v in ts.items()}
        ts[BK.PROBE] = [30.0] * 5
        return med, 30.0, ts
    monkeypatch.setattr(BK, "_interleaved", fake)
    rows = BK.bench_gemm("q4_0", ["generic"], 1, 5, np.random.default_rng(0), N=64, Kd=256, T=32)
    assert sorted(seen) == [("gemm", "generic"), ("gemv", "generic")]
    (r,) = rows
    assert r["speedup"] == 3.2 and r["rounds_ms"] == gemm and r["ms"] == 10.0
    assert r["gemm_tok_s"] == 3200.0 and r["gemv_tok_s"] == 500.0   # medians: 32 / 10 ms, 1 / 2 ms (6.4x apart)


def test_bench_ratio_to_the_probe_pairs_the_rounds():
    """A row's ratio to the probe is taken round by round: with the host fast for the probe's first rounds and the
    kernel's last ones, the two medians fall on different phases (ratio_of_medians 2.0) while every round says 1.0."""
    from powerlow.bench_kernels import _row
    nbytes = 1e9
    rounds = [0.05, 0.05, 0.05, 0.1, 0.1]          # kernel: 20 GB/s x 3, 10 GB/s x 2 ... median 20 GB/s
    probe = [20.0, 20.0, 20.0, 10.0, 10.0]        # the probe moves with it: 1.0 in every round
    r = _row("dense", "q8", "avx2", 2, [1, 1], 1.0, nbytes, 0.05, 10.0, rounds, probe)
    assert r["ratio"] == 1.0 and r["ratio_of_medians"] == 2.0
    r = _row("dense", "q8", "avx2", 2, [1, 1], 1.0, nbytes, 0.05, 10.0)   # no rounds: the medians
    assert r["ratio"] == 2.0


def test_bench_check_measures_a_named_case_again():
    """A case the first pass names is measured again (rerun, more rounds) and judged on the new rows: a tie that
    crossed 5% by chance clears, a real gap stays named; cases not named are not rerun, the first pass's names are
    kept, and every rerun row is marked."""
    from powerlow.bench_kernels import check_chosen, confirm_slow

    def row(fmt, isa, rounds, chosen, kind="dense"):
        return {"kind": kind, "format": fmt, "isa": isa, "shape": [64, 8192], "density": 1.0,
                "ms": sorted(rounds)[len(rounds) // 2], "chosen": chosen, "rounds_ms": rounds}
    first = [row("q4_k", "avx2", [2.0] * 5, False), row("q4_k", "avx512", [2.12] * 5, True),   # +6%: a tie's fluke
             row("q8", "avx2", [2.0] * 5, False), row("q8", "avx512", [2.4] * 5, True),       # +20%: real
             row("q4_1", "avx2", [2.0] * 5, False), row("q4_1", "avx512", [1.9] * 5, True)]   # fine
    again = {"q4_k": [row("q4_k", "avx2", [2.0] * 15, False), row("q4_k", "avx512", [2.02] * 15, True)],
             "q8": [row("q8", "avx2", [2.0] * 15, False), row("q8", "avx512", [2.38] * 15, True)]}
    asked = []

    def rerun(kind, fmt):
        asked.append((kind, fmt))
        return [dict(r) for r in again[fmt]]
    chk = check_chosen(first)
    assert sorted(w["case"].split()[1] for w in chk["slow"]) == ["q4_k", "q8"]
    new, got = confirm_slow(first, chk, rerun)
    assert sorted(asked) == [("dense", "q4_k"), ("dense", "q8")]
    assert len(new) == 4 and all(r["remeasured"] for r in new)
    assert got["cases"] == 3 and [w["case"].split()[1] for w in got["slow"]] == ["q8"]
    assert got["slow"][0]["excess"] == 0.19
    assert got["first_pass_slow"] == chk["slow"]
    # nothing named: nothing rerun, the check unchanged
    ok = check_chosen(first[4:])
    assert confirm_slow(first[4:], ok, rerun) == ([], ok) and len(asked) == 2


@pytest.mark.parametrize("fmt", ["q2", "tern", "q1"])
def test_avx512_runs_the_avx2_table_lookup_with_the_same_bits(fmt):
    """On an AVX-512 CPU the dispatcher runs the vpshufb TL (compiled for AVX-512) for the 1/1.58/2-bit formats
    (faster than its multiply-add) and gets AVX-512 multiply-add's bits and the AVX2 TL's, prepared matrix or not."""
    if "avx512" not in K.supported_isas:
        pytest.skip("this CPU has no AVX-512")
    rng = np.random.default_rng(11)
    q = F.quantize(rng.standard_normal((96, 640)).astype(np.float32), fmt)
    x = rng.standard_normal((5, 640)).astype(np.float32)
    mad = K.matmul(q, x, isa="avx512", tl=False)
    np.testing.assert_array_equal(K.matmul(q, x, isa="avx512"), mad)          # unprepared: MAD inside
    K.prepare_tl(q)
    assert K.TL_PREFERRED[(fmt, "avx512")]
    np.testing.assert_array_equal(K.matmul(q, x, isa="avx512"), mad)          # the TL tiles
    np.testing.assert_array_equal(K.matmul(q, x, isa="avx2", tl=True), mad)


def test_all_finite_is_numpys_isfinite_all():
    """The engine's per-layer check: any NaN / +-inf anywhere (first, middle, last element) is caught; huge,
    tiny and subnormal finite values are not."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4099).astype(np.float32)
    assert K.all_finite(x) and K.all_finite(np.array([3.4e38, -3.4e38, 1e-45, -0.0], np.float32))
    for bad in (np.nan, np.inf, -np.inf):
        for i in (0, 2048, 4098):
            y = x.copy()
            y[i] = bad
            assert not K.all_finite(y) and not np.isfinite(y).all()
            assert not K.all_finite(y.reshape(1, -1))


def test_kernels_read_nothing_past_the_planes():
    """Every format's matmul, every ISA variant, 1 and 13 rows of awkward widths, with each weight plane ending at
    an inaccessible page (tests/guard_worker.py): a vector load past a plane's end faults. The short-row q8 path
    read 8 scales from a row near the end of a plane with fewer left (found by AddressSanitizer, 7 Dec 2026)."""
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "guard_worker.py")],
                       capture_output=True, text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-12:]
    assert r.returncode == 0, "\n".join(last)
    assert int(r.stdout.split()[-1]) >= 3 * len(F.FORMATS) * len(K.supported_isas)
