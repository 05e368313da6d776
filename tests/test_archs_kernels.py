"""Kernel pieces the architecture families added: gelu_tanh in the gated FFN (every ISA variant), and the
attention kernel's sliding window and softmax scale, against the numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from powerlow import kernels as K
from powerlow import reference as R
from test_kernels import ISAS, _bundles


def test_gelu_tanh_reference_is_torch_gelu_tanh():
    import torch
    g = np.linspace(-12, 12, 2001, dtype=np.float32)
    want = torch.nn.functional.gelu(torch.from_numpy(g), approximate="tanh").numpy()
    np.testing.assert_allclose(R.act_fn(g, "gelu_tanh"), want, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_mul_matches_reference():
    rng = np.random.default_rng(3)
    g = (4 * rng.standard_normal(1003)).astype(np.float32)
    u = rng.standard_normal(1003).astype(np.float32)
    np.testing.assert_allclose(K.gelu_tanh_mul(g, u), R.act_fn(g, "gelu_tanh") * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["q8", "q4_1"])
def test_ffn_bundles_gelu_tanh(isa, fmt):
    rng = np.random.default_rng(12)
    Kd, C = 100, 64
    lay, arena, ptrs = _bundles(fmt, fmt, C, Kd, 5, rng)
    for t in (1, 3):
        h = rng.standard_normal((t, Kd)).astype(np.float32)
        base = rng.standard_normal((t, Kd)).astype(np.float32)
        ref = base.copy()
        R.ffn_bundles(ptrs, lay, h, "gelu_tanh", ref)
        out = base.copy()
        K.ffn_bundles(ptrs, lay, h, "gelu_tanh", out, isa=isa)
        np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref - base).max())


@pytest.mark.parametrize("hd", [16, 32, 256])
@pytest.mark.parametrize("window,scale", [(0, 0.0), (5, 0.0), (3, 0.3), (0, 0.11)])
def test_attention_window_and_scale(hd, window, scale):
    rng = np.random.default_rng(hd + window)
    nh, nkv, start, T, maxP = 4, 2, 9, 6, 32
    q = (2 * rng.standard_normal((T, nh, hd))).astype(np.float32)
    kc = (2 * rng.standard_normal((nkv, maxP, hd))).astype(np.float16)
    vc = rng.standard_normal((nkv, maxP, hd)).astype(np.float16)
    got = K.attention(q, kc, vc, start, window=window, scale=scale)
    want = R.attention(q, kc.astype(np.float32), vc.astype(np.float32), start, window=window, scale=scale)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if window == 0 and scale == 0.0:      # the defaults are the old kernel, bit for bit
        np.testing.assert_array_equal(got, K.attention(q, kc, vc, start))


def test_attention_window_keeps_the_last_window_keys():
    """A query at position p sees keys p - window + 1 .. p: changing an older key changes nothing."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 16)).astype(np.float32)
    kc = rng.standard_normal((1, 16, 16)).astype(np.float16)
    vc = rng.standard_normal((1, 16, 16)).astype(np.float16)
    a = K.attention(q, kc, vc, 10, window=4)
    kc[:, 6], vc[:, 6] = 9, 9                              # position 6 = 10 - 4: outside
    np.testing.assert_array_equal(K.attention(q, kc, vc, 10, window=4), a)
    kc[:, 7] = 9                                           # position 7: inside
    assert not np.array_equal(K.attention(q, kc, vc, 10, window=4), a)


def test_rope_tables_with_frequency_factors():
    pos = np.arange(5, 12, dtype=np.int64)
    f = np.linspace(1, 8, 8)
    c, s = K.rope_tables(pos, 16, 5e5, 1.0, f)
    ang = pos[:, None] * (1.0 / 5e5 ** (np.arange(0, 16, 2) / 16) / f)[None, :]
    np.testing.assert_allclose(c, np.cos(ang), rtol=0, atol=1e-6)
    np.testing.assert_allclose(s, np.sin(ang), rtol=0, atol=1e-6)
