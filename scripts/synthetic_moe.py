"""Synthetic Qwen3-MoE models with planted expert skew, written straight into a qwen3moe GGUF that llama.cpp and
powerlow both load (benchmarks of models bigger than memory; not part of the runtime package).

    write_moe_gguf(out, MoESpec(...) or preset name)  -> Path     (chunk by chunk; memory ~ one layer's experts)

The model is the Qwen3-MoE block exactly as llama.cpp's qwen3moe graph runs it: attention with per-head RMSNorm
of q and k, rotate-half RoPE, and every FFN a mixture of ``experts`` experts of ``expert_ffn`` neurons, top
``top_k`` chosen by softmax(h @ router^T), their weights renormalized to sum 1.

How the skew is planted
-----------------------
As in scripts/synthetic.py: every embedding row holds the same component c*u along a fixed unit direction u, and
the matrices writing into the residual stream (attention output, expert down) have u projected out of their
output, so u . x = c at every layer and after the RMS norm s_t = u . h_t is positive and slowly varying. Router
row e of a layer is  a * z_e + b_e * u  (z_e random, orthogonal to u): b_e * s_t acts as a per-expert bias. While
the model is generated, a calibration batch of random token sequences runs through the layers made so far
(float numpy) and the biases are fitted so expert e is chosen with its planted frequency p_e: a power law over
expert ranks, p ~ (rank + 1)^-alpha, scaled to sum top_k (each token picks top_k), capped at 0.95, ranks
permuted per layer. Co-selection: experts come in groups of ``group`` that share a planted frequency and a common
router direction g (z_e = sqrt(1 - rho) r_e + sqrt(rho) g), so a group tends to be chosen together. The
residual stream changes little from one layer to the next, so layer l + 1's router applied to layer l's hidden
state predicts layer l + 1's choice to a degree (what powerlow's lookahead prefetch uses; measured, not planted).

Scales: every sub-layer's output is set, on the calibration batch, to ``out_ratio / sqrt(layers)`` of the
residual's RMS (so the stream neither explodes nor freezes), logits have a std of about 3.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from powerlow.errors import PowerlowError

BOS_ID, EOS_ID = 0, 1


@dataclass(frozen=True)
class MoESpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    expert_ffn: int
    top_k: int
    vocab: int
    seed: int = 0
    alpha: float = 1.0            # power law of expert popularity (0: uniform)
    group: int = 2                # experts per co-selection group (1: none)
    rho: float = 0.5              # share of a group member's router direction common to its group
    out_ratio: float = 0.6        # each sub-layer's output RMS relative to the residual's, times sqrt(layers)
    qtype: str = "Q4_0"           # Q4_0 | Q8_0 | F16 | F32 for the matrices (norms and routers stay F32)
    max_positions: int = 4096
    rope_theta: float = 1000000.0
    eps: float = 1e-6
    calib_seqs: int = 4
    calib_len: int = 64

    def __post_init__(self):
        def bad(msg):
            return PowerlowError(f"synthetic MoE model: {msg}")
        for n in ("hidden", "layers", "heads", "kv_heads", "head_dim", "experts", "expert_ffn", "top_k", "vocab"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1:
                raise bad(f"{n} must be a positive integer, got {getattr(self, n)!r}")
        if self.top_k > self.experts:
            raise bad(f"top_k {self.top_k} > experts {self.experts}")
        if self.hidden % 32 or self.expert_ffn % 32:
            raise bad(f"hidden ({self.hidden}) and expert_ffn ({self.expert_ffn}) must be multiples of 32 (GGUF blocks)")
        if self.heads % self.kv_heads or self.head_dim % 2:
            raise bad(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads}), head_dim even")
        if self.experts % self.group:
            raise bad(f"group ({self.group}) must divide experts ({self.experts})")
        if self.vocab < 258:
            raise bad(f"vocab must be >= 258 (2 special tokens + 256 bytes), got {self.vocab}")
        if self.qtype not in QTYPES:
            raise bad(f"qtype must be one of {', '.join(QTYPES)}, got {self.qtype!r}")
        if not 0.0 <= self.rho < 1.0 or self.alpha < 0:
            raise bad("rho must be in [0, 1) and alpha >= 0")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def tensors(self) -> list[tuple[str, tuple[int, ...], bool]]:
        """(GGUF name, numpy shape, quantized?) in file order."""
        D, E, F = self.hidden, self.experts, self.expert_ffn
        out = [("token_embd.weight", (self.vocab, D), True)]
        for l in range(self.layers):
            p = f"blk.{l}."
            out += [(p + "attn_norm.weight", (D,), False), (p + "attn_q.weight", (self.q_dim, D), True),
                    (p + "attn_k.weight", (self.kv_dim, D), True), (p + "attn_v.weight", (self.kv_dim, D), True),
                    (p + "attn_output.weight", (D, self.q_dim), True), (p + "attn_q_norm.weight", (self.head_dim,), False),
                    (p + "attn_k_norm.weight", (self.head_dim,), False), (p + "ffn_norm.weight", (D,), False),
                    (p + "ffn_gate_inp.weight", (E, D), False), (p + "ffn_gate_exps.weight", (E, F, D), True),
                    (p + "ffn_up_exps.weight", (E, F, D), True), (p + "ffn_down_exps.weight", (E, D, F), True)]
        return out + [("output_norm.weight", (D,), False), ("output.weight", (self.vocab, D), True)]

    def file_bytes(self) -> int:
        import gguf
        total = 0
        for _, shape, q in self.tensors():
            t = _gtype(self.qtype if q else "F32")
            block, size = gguf.GGML_QUANT_SIZES[t]
            total += int(np.prod(shape[:-1])) * (shape[-1] // block) * size
        return total


QTYPES = ("Q4_0", "Q8_0", "F16", "F32")
# Qwen3-MoE-like shapes. moe-2gb: hidden 2048, 64 experts of 768, top 8, 16 heads x 128 / 4 kv heads, vocab 32000,
# 12 layers: 3.62 G weights, 2.04e9 bytes as Q4_0 (experts 96% of it; a token reads 1/8 of them: ~250 MB)
PRESETS: dict[str, dict] = {
    "moe-tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, experts=8, expert_ffn=64, top_k=2,
                     vocab=512, max_positions=512, qtype="Q8_0"),
    "moe-small": dict(hidden=512, layers=4, heads=8, kv_heads=2, head_dim=64, experts=32, expert_ffn=256, top_k=4,
                      vocab=2048, max_positions=1024),
    "moe-2gb": dict(hidden=2048, layers=12, heads=16, kv_heads=4, head_dim=128, experts=64, expert_ffn=768, top_k=8,
                    vocab=32000),
    "moe-4gb": dict(hidden=2048, layers=24, heads=16, kv_heads=4, head_dim=128, experts=64, expert_ffn=768, top_k=8,
                    vocab=32000),
}


def spec_of(preset_or_spec, **over) -> MoESpec:
    if isinstance(preset_or_spec, MoESpec):
        return MoESpec(**{**asdict(preset_or_spec), **over})
    if preset_or_spec not in PRESETS:
        raise PowerlowError(f"no MoE preset {preset_or_spec!r}; choose one of {', '.join(PRESETS)}")
    return MoESpec(**{**PRESETS[preset_or_spec], **over})


def _gtype(name: str):
    import gguf
    return gguf.GGMLQuantizationType[name]


def planted_frequencies(spec: MoESpec, rng: np.random.Generator) -> np.ndarray:
    """Per expert, the share of tokens that should choose it (sums to top_k); groups share one value."""
    G = spec.experts // spec.group
    p = (np.arange(G) + 1.0) ** -spec.alpha
    p = p / p.sum() * spec.top_k / spec.group
    for _ in range(50):                                   # cap at 0.95, the excess spread over the others
        over = p > 0.95
        if not over.any():
            break
        extra = (p[over] - 0.95).sum()
        p[over] = 0.95
        p[~over] += extra * p[~over] / p[~over].sum()
    per_group = rng.permutation(p)
    return np.repeat(per_group, spec.group)


# ---------------------------------------------------------------------------------------------- numpy blocks
def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):                   # x (S, T, n, hd): rotate-half (NeoX / HF)
    T, hd = x.shape[1], x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(T)[:, None] * inv[None]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)


def _attention(h, wq, wk, wv, wo, spec):
    S, T, _ = h.shape
    n, nk, hd = spec.heads, spec.kv_heads, spec.head_dim
    q = _rope(_rms((h @ wq.T).reshape(S, T, n, hd), 1.0, spec.eps), spec.rope_theta)
    k = _rope(_rms((h @ wk.T).reshape(S, T, nk, hd), 1.0, spec.eps), spec.rope_theta)
    v = (h @ wv.T).reshape(S, T, nk, hd)
    rep = n // nk
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    sc = np.einsum("sqhd,skhd->shqk", q, k) / math.sqrt(hd)
    sc = np.where(np.tril(np.ones((T, T), bool)), sc, -np.inf)
    sc = np.exp(sc - sc.max(-1, keepdims=True))
    sc /= sc.sum(-1, keepdims=True)
    a = np.einsum("shqk,skhd->sqhd", sc, v).reshape(S, T, n * hd)
    return a @ wo.T


def route(h2: np.ndarray, router: np.ndarray, k: int):
    """(experts (N, k), weights (N, k)) of softmax(h @ router^T), top k, renormalized (qwen3moe)."""
    lg = h2 @ router.T
    lg = lg - lg.max(axis=1, keepdims=True)
    p = np.exp(lg)
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argpartition(-p, k - 1, axis=1)[:, :k]
    w = np.take_along_axis(p, idx, axis=1)
    return idx, w / w.sum(axis=1, keepdims=True)


def _moe(h2, router, gate, up, down, k):
    idx, w = route(h2, router, k)
    out = np.zeros_like(h2)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        x = h2[rows]
        g = x @ gate[e].T
        a = g / (1.0 + np.exp(-g)) * (x @ up[e].T)
        out[rows] += w[rows, slot, None] * (a @ down[e].T)
    return out, idx


def _fit_bias(A: np.ndarray, target: np.ndarray, k: int, iters: int = 200) -> np.ndarray:
    """Per-expert biases b so that top-k of (A + b) chooses expert e on a share ``target[e]`` of the rows."""
    b = np.zeros(A.shape[1])
    N = A.shape[0]
    lr = 1.0
    for it in range(iters):
        idx = np.argpartition(-(A + b), k - 1, axis=1)[:, :k]
        f = np.bincount(idx.reshape(-1), minlength=A.shape[1]) / N
        b += lr * (np.log(np.clip(target, 0.5 / N, None)) - np.log(np.clip(f, 0.5 / N, None)))
        if it % 50 == 49:
            lr *= 0.5
    return b


# ---------------------------------------------------------------------------------------------- the writer
def write_moe_gguf(out, spec, *, progress: bool = False, overwrite: bool = True) -> Path:
    """Make the model of ``spec`` (a MoESpec or a preset name) and write it as a qwen3moe GGUF at ``out``
    (through a temporary name, renamed into place). Returns the path; the planted frequencies and what the
    calibration batch measured are in the metadata keys powerlow.synthetic_moe.*."""
    import gguf
    from gguf.quants import quantize

    spec = spec if isinstance(spec, MoESpec) else spec_of(spec)
    out = Path(out)
    if out.exists() and not overwrite:
        raise PowerlowError(f"{out} already exists; delete it or choose another path")
    D, L, E, F, k = spec.hidden, spec.layers, spec.experts, spec.expert_ffn, spec.top_k
    rng = np.random.default_rng(spec.seed)
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    P = lambda w: w - np.outer(u, u @ w)                  # noqa: E731  project u out of a matrix's output (rows: D)

    def unit_rows(n):                                     # random rows orthogonal to u, unit norm
        r = rng.standard_normal((n, D))
        r -= np.outer(r @ u, u)
        return r / np.linalg.norm(r, axis=1, keepdims=True)

    tensors = spec.tensors()
    qt = _gtype(spec.qtype)

    def encode(w, quant):
        if not quant or spec.qtype == "F32":
            return np.ascontiguousarray(w, np.float32)
        if spec.qtype == "F16":
            return np.ascontiguousarray(w, np.float16)
        flat = np.ascontiguousarray(w, np.float32).reshape(-1, w.shape[-1])
        q = quantize(flat, qt)
        return q.reshape(w.shape[:-1] + (q.shape[-1],))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)[1])
    writer = gguf.GGUFWriter(str(tmp), "qwen3moe")
    arch = "qwen3moe"
    try:
        tok_dir = Path(tempfile.mkdtemp(prefix="moe-tok-"))
        from synthetic import _read_tokenizer, build_tokenizer
        build_tokenizer(spec.vocab).save(str(tok_dir / "tokenizer.json"))
        tokens, types, merges = _read_tokenizer(tok_dir, spec.vocab)
        writer.add_name(f"synthetic qwen3moe {D}x{L} {E}x{F} top{k}")
        for key, v in {"context_length": spec.max_positions, "embedding_length": D, "block_count": L,
                       "feed_forward_length": F, "expert_feed_forward_length": F, "expert_count": E,
                       "expert_used_count": k, "attention.head_count": spec.heads,
                       "attention.head_count_kv": spec.kv_heads, "attention.key_length": spec.head_dim,
                       "attention.value_length": spec.head_dim}.items():
            writer.add_uint32(f"{arch}.{key}", int(v))
        writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", spec.eps)
        writer.add_float32(f"{arch}.rope.freq_base", spec.rope_theta)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        planted = np.stack([planted_frequencies(spec, rng) for _ in range(L)])     # (L, E)
        writer.add_array("powerlow.synthetic_moe.planted_freq", [float(x) for x in planted.reshape(-1)])
        for name, shape, quant in tensors:
            t = qt if quant and spec.qtype not in ("F32", "F16") else _gtype("F16" if quant and spec.qtype == "F16" else "F32")
            block, size = gguf.GGML_QUANT_SIZES[t]
            nbytes = int(np.prod(shape[:-1])) * (shape[-1] // block) * size
            if t in (_gtype("F32"), _gtype("F16")):
                writer.add_tensor_info(name, shape, np.dtype(np.float32 if t == _gtype("F32") else np.float16), nbytes)
            else:
                writer.add_tensor_info(name, gguf.quant_shape_to_byte_shape(shape, t), np.dtype(np.uint8), nbytes,
                                       raw_dtype=t)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        # embeddings: noise + c u (|c u| = the noise's norm)
        emb = rng.standard_normal((spec.vocab, D)).astype(np.float32)
        emb += np.float32(math.sqrt(D)) * u.astype(np.float32)
        writer.write_tensor_data(encode(emb, True))
        ids = rng.integers(258, spec.vocab, (spec.calib_seqs, spec.calib_len))
        x = emb[ids].astype(np.float64)                              # (S, T, D) the calibration batch
        del emb
        measured = np.zeros((L, E))
        target = spec.out_ratio / math.sqrt(L)
        it = range(L)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, desc="moe layers", unit="layer")
        for l in it:
            ones_d, ones_h = np.ones(D, np.float32), np.ones(spec.head_dim, np.float32)
            wq = rng.standard_normal((spec.q_dim, D)) / math.sqrt(D)
            wk = rng.standard_normal((spec.kv_dim, D)) / math.sqrt(D)
            wv = rng.standard_normal((spec.kv_dim, D)) / math.sqrt(D)
            wo = P(rng.standard_normal((D, spec.q_dim)) / math.sqrt(spec.q_dim))
            h = _rms(x, 1.0, spec.eps)
            a = _attention(h, wq, wk, wv, wo, spec)
            wo *= target * np.sqrt(np.mean(x * x)) / np.sqrt(np.mean(a * a))
            x = x + a * (target * np.sqrt(np.mean(x * x)) / np.sqrt(np.mean(a * a)))
            h2 = _rms(x, 1.0, spec.eps).reshape(-1, D)
            # router: a z_e + b_e u, the biases fitted on the calibration batch to the planted frequencies
            groups = np.repeat(unit_rows(E // spec.group), spec.group, axis=0)
            z = math.sqrt(1 - spec.rho) * unit_rows(E) + math.sqrt(spec.rho) * groups
            z /= np.linalg.norm(z, axis=1, keepdims=True)
            A = h2 @ z.T
            z *= 1.0 / A.std()                                        # logits' random part: std 1
            s = h2 @ u
            bias = _fit_bias(h2 @ z.T, planted[l], k)
            router = z + np.outer(bias / s.mean(), u)
            gate = rng.standard_normal((E, F, D)).astype(np.float32) * np.float32(1.5 / math.sqrt(D))
            up = rng.standard_normal((E, F, D)).astype(np.float32) * np.float32(1.0 / math.sqrt(D))
            down = rng.standard_normal((E, D, F)).astype(np.float32) * np.float32(1.0 / math.sqrt(F))
            down -= np.einsum("d,edf->ef", u.astype(np.float32), down)[:, None, :] * u.astype(np.float32)[None, :, None]
            m, idx = _moe(h2, router, gate, up, down, k)
            scale = target * np.sqrt(np.mean(x * x)) / max(np.sqrt(np.mean(m * m)), 1e-12)
            down *= np.float32(scale)
            x = x + (m * scale).reshape(x.shape)
            measured[l] = np.bincount(idx.reshape(-1), minlength=E) / len(h2)
            for name, w, quant in ((f"blk.{l}.attn_norm.weight", ones_d, False), (f"blk.{l}.attn_q.weight", wq, True),
                                   (f"blk.{l}.attn_k.weight", wk, True), (f"blk.{l}.attn_v.weight", wv, True),
                                   (f"blk.{l}.attn_output.weight", wo, True), (f"blk.{l}.attn_q_norm.weight", ones_h, False),
                                   (f"blk.{l}.attn_k_norm.weight", ones_h, False), (f"blk.{l}.ffn_norm.weight", ones_d, False),
                                   (f"blk.{l}.ffn_gate_inp.weight", router, False), (f"blk.{l}.ffn_gate_exps.weight", gate, True),
                                   (f"blk.{l}.ffn_up_exps.weight", up, True), (f"blk.{l}.ffn_down_exps.weight", down, True)):
                writer.write_tensor_data(encode(w, quant))
            del gate, up, down
        writer.write_tensor_data(encode(np.ones(D, np.float32), False))
        head = rng.standard_normal((spec.vocab, D)).astype(np.float32) * np.float32(3.0 / math.sqrt(D))
        writer.write_tensor_data(encode(head, True))
        writer.close()
        os.replace(tmp, out)
        _MEASURED[str(out)] = (planted, measured)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


_MEASURED: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def calibration_frequencies(path) -> tuple[np.ndarray, np.ndarray] | None:
    """(planted, measured on the calibration batch) expert frequencies (L, E) of a model written in this process."""
    return _MEASURED.get(str(Path(path)))


def planted_from_gguf(path, spec_layers: int | None = None) -> np.ndarray:
    """The planted expert frequencies (L, E) stored in the GGUF's metadata."""
    import gguf
    r = gguf.GGUFReader(str(path))
    flat = np.asarray(r.fields["powerlow.synthetic_moe.planted_freq"].contents(), np.float64)
    E = int(r.fields["qwen3moe.expert_count"].contents())
    return flat.reshape(-1, E)
