"""Numpy reference of the engine's operations: the source of truth the C kernels are tested against.

Same signatures as the hot-path calls the engine makes through powerlow.kernels.
"""
from __future__ import annotations

import ctypes

import numpy as np

from . import formats


def matmul(q: "formats.QMatrix", x: np.ndarray) -> np.ndarray:
    """x (T, K) float32 -> (T, N) float32."""
    return formats.matmul_ref(q, x)


GELU_C, GELU_A = np.float32(0.7978845608028654), np.float32(0.044715)


def act_fn(g: np.ndarray, act: str) -> np.ndarray:
    if act == "silu":
        return g / (1.0 + np.exp(-g))
    if act == "gelu_tanh":          # 0.5 g (1 + tanh(u)) written as g / (1 + e^(-2u)), as the kernels do
        with np.errstate(over="ignore"):                # e^(-2u) = inf for g << 0: the result is -0, right
            return g / (1.0 + np.exp(np.float32(-2.0) * GELU_C * (g + GELU_A * g * g * g)))
    return np.maximum(g, 0.0)


def bundle_view(addr: int, nbytes: int) -> np.ndarray:
    """A uint8 view of ``nbytes`` at address ``addr`` (the caller keeps the memory alive)."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(int(addr)))


def ffn_bundles(ptrs: np.ndarray, layout: "formats.BundleLayout", h: np.ndarray, act: str, out: np.ndarray) -> None:
    """out (T, K) += sum over the bundles at addresses ``ptrs`` of down_c @ (act(gate_c h) * up_c h)."""
    for addr in ptrs:
        buf, off = bundle_view(addr, layout.nbytes), 0
        g = formats.QMatrix.from_buffer(layout.fmt, layout.C, layout.K, buf, off + layout.gate_off)
        u = formats.QMatrix.from_buffer(layout.fmt, layout.C, layout.K, buf, off + layout.up_off)
        d = formats.QMatrix.from_buffer(layout.down_fmt, layout.K, layout.C, buf, off + layout.down_off)
        a = act_fn(formats.matmul_ref(g, h), act) * formats.matmul_ref(u, h)   # (T, C)
        out += formats.matmul_ref(d, a.astype(np.float32))


def moe_ffn(ptrs, layout, h, act, out, gs, tok, wt, cpe, nch: int = 1) -> None:
    """kernels.moe_ffn: per group g in order (an expert: cpe bundles), its tokens' rows of h through the expert --
    the bundles cut into nch chunks (the kernels: ffn_nchunks(cpe)), each summed into its own buffer, the chunks
    added in order -- then out[tok] += wt * that."""
    K = h.shape[1]
    for g in range(len(gs) - 1):
        j0, j1 = int(gs[g]), int(gs[g + 1])
        if j0 == j1:
            continue
        rows = np.asarray(tok[j0:j1], np.int64)
        hg = np.ascontiguousarray(h[rows])
        res = None
        for c in range(nch):
            b = np.zeros((j1 - j0, K), np.float32)
            ffn_bundles(ptrs[g * cpe + cpe * c // nch: g * cpe + cpe * (c + 1) // nch], layout, hg, act, b)
            res = b if res is None else res + b
        out[rows] += np.asarray(wt[j0:j1], np.float32)[:, None] * res


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, K) -> (T, K): x / rms(x) * w."""
    ms = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(ms + eps)) * w


def rope_tables(head_dim: int, theta: float, positions: np.ndarray, scale: float = 1.0, factors=None):
    """cos, sin (T, head_dim/2) for the Hugging Face (rotate_half) RoPE; factors: per-pair divisors of the
    inverse frequencies (llama3 scaling, llama.cpp's rope_freqs), or None."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if factors is not None and len(factors):
        inv = inv / np.asarray(factors, np.float64)
    ang = np.outer(positions.astype(np.float64) / scale, inv)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, n_heads, hd) rotated; cos/sin (T, hd/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, *, window: int = 0,
              scale: float = 0.0) -> np.ndarray:
    """Causal grouped-query attention.

    q (T, n_heads, hd) for positions start..start+T-1; k_cache/v_cache (n_kv, >= start+T, hd).
    window > 0: keys in (pos - window, pos] only; scale: softmax scale (0 = 1/sqrt(hd)).
    Returns (T, n_heads * hd).
    """
    T, nh, hd = q.shape
    nkv = k_cache.shape[0]
    g = nh // nkv
    P = start + T
    K = k_cache[:, :P]                                          # (nkv, P, hd)
    V = v_cache[:, :P]
    qh = q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * T, hd)
    s = (qh @ K.transpose(0, 2, 1)) * (scale if scale > 0 else 1.0 / np.sqrt(hd))   # (nkv, g*T, P)
    s = s.reshape(nkv, g, T, P)
    qpos = (start + np.arange(T))[:, None]
    mask = np.arange(P)[None, :] > qpos                                  # (T, P) future keys
    if window > 0:
        mask |= np.arange(P)[None, :] <= qpos - window                   # keys out of the window
    s = np.where(mask, -np.inf, s)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    o = p.reshape(nkv, g * T, P) @ V                            # (nkv, g*T, hd)
    return o.reshape(nkv, g, T, hd).transpose(2, 0, 1, 3).reshape(T, nh * hd).astype(np.float32)
