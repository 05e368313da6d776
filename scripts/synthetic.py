"""Synthetic Llama-shaped models with planted neuron hotness.

Two uses: tests (tiny models that convert and run in seconds) and offloading benchmarks
(Llama-2-7B-shaped models of about 2 GB at Q4_0).

    make_hf_model(out_dir, hidden=..., ...)   -> a Hugging Face folder (config.json, safetensors,
                                                 tokenizer.json, planted_hotness.safetensors)
    export_gguf(hf_dir, out_path, qtype)      -> a llama-architecture GGUF that llama.cpp loads
    numpy_forward(hf_dir, ids)                -> reference logits (and gate pre-activations), tiny models

How the hotness is planted
--------------------------
Every embedding row holds the same component c*u along one fixed unit direction u, and every
matrix that writes into the residual stream (o_proj, down_proj) has u projected out of its
output, so the residual keeps exactly that component at every layer: u . x = c for all tokens.
After the RMS norm this becomes a positive, slowly varying s_t = u . h_t. Gate row j is
    gate_j = w_j + b_j * u        (w_j random, orthogonal to u)
so gate_j . h_t = w_j . h_t + b_j * s_t > 0  <=>  b_j > t_jt := -(w_j . h_t) / s_t.
While the model is generated, a calibration batch of random token sequences runs through the
layers built so far (numpy); t_j is nearly Gaussian over tokens, so b_j = mean_j + std_j * z(p_j)
(z = inverse normal CDF) makes neuron j fire (gate > 0) with the planted probability p_j.
p_j follows a power law p ~ (rank+1)^-alpha, capped at 0.98 and scaled to a mean density
(default 0.15); ranks are randomly permuted per layer so the hot neurons are not the first ones.
Co-activation (coact_group = G > 1): neurons come in groups of G consecutive ones that share a planted
probability (the power law runs over groups) and a common gate direction g_k: w_j = sqrt(1-rho) r_j +
sqrt(rho) g_k before scaling, so t_j of one group are correlated (about rho) and the group tends to fire
together, as neuron clusters do in trained ReLU models (what PowerInfer's clusters rely on). With G = 1
(the default) neurons fire independently, and clusters of 32 are active far more often than their neurons.
For SiLU models the planted event is gate > 1 (silu(gate) > 0.73; a negative gate gives
|silu| <= 0.28, and the gate pre-activation has std about 3), so |silu(gate) * up| is large
mostly when the neuron fires.

Tokenizer: byte-level BPE (GPT-2 byte-to-unicode alphabet) with ids 0 = <s> (bos), 1 = </s> (eos),
2..257 = the 256 bytes in byte order, then filler merges (letters, " "-prefixed words) up to vocab.
The GGUF gets tokenizer.ggml.model "gpt2" with pre "gpt-2": llama.cpp's "gpt-2" regex is the one
HF's ByteLevel pre-tokenizer uses, so both tokenize text the same way ("default" would add
llama.cpp-only punctuation and digit splits).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Iterable, Iterator

import numpy as np

from powerlow.errors import PowerlowError

BOS_ID = 0
EOS_ID = 1
N_SPECIAL = 2
BYTE_OFFSET = N_SPECIAL  # token id of byte b is BYTE_OFFSET + b

SHARD_MAX_BYTES = 1 << 30  # one safetensors file up to 1 GiB, sharded above
EMBED_CHUNK_ROWS = 4096  # rows generated per step (part of the model's definition: changing it changes weights)
GGUF_CHUNK_ROWS = 4096  # rows read and quantized per step by export_gguf
P_MAX = 0.98
CAL_SEQS, CAL_LEN = 8, 64  # calibration batch: 512 tokens
GATE_STD = 3.0  # std of a gate pre-activation's random part
# The planted event: ReLU neurons fire when gate > 0; SiLU neurons when gate > 1, i.e.
# silu(gate) > 0.73, well above anything the negative lobe reaches (|silu| <= 0.28 there).
FIRE_GATE = {"relu": 0.0, "silu": 1.0}
ATTN_OUT_STD = 0.5  # std of each attention / FFN output relative to the embedding noise, / sqrt(layers)
EMBED_KAPPA = 1.0  # |c*u| relative to the norm of an embedding row's random part

DTYPES = ("float32", "float16", "bfloat16")
ACTS = ("silu", "relu")
GGUF_QTYPES = ("Q4_0", "Q8_0", "F16")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and generation options of a synthetic model (checked when built)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    act: str = "silu"
    seed: int = 0
    hot_alpha: float | None = None
    hot_density: float = 0.15
    dtype: str = "float32"
    max_positions: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    coact_group: int = 1          # neurons per co-activating group (1: independent)
    coact_rho: float = 0.9        # share of a neuron's gate direction common to its group

    def __post_init__(self) -> None:
        def bad(msg: str) -> PowerlowError:
            return PowerlowError(f"synthetic model: {msg}")

        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "max_positions"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden % 32 or self.intermediate % 32:
            raise bad(f"hidden ({self.hidden}) and intermediate ({self.intermediate}) must be multiples of 32 "
                      "(GGUF Q4_0/Q8_0 blocks and powerlow clusters); pick other sizes")
        if self.hidden % self.heads:
            raise bad(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if (self.hidden // self.heads) % 2:
            raise bad(f"head_dim = hidden / heads = {self.hidden // self.heads} must be even (RoPE)")
        if self.heads % self.kv_heads:
            raise bad(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.vocab < BYTE_OFFSET + 256:
            raise bad(f"vocab must be >= {BYTE_OFFSET + 256} (2 special tokens + 256 bytes), got {self.vocab}")
        if self.act not in ACTS:
            raise bad(f"act must be one of {ACTS}, got {self.act!r}")
        if self.dtype not in DTYPES:
            raise bad(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.hot_alpha is not None and not (0.0 <= self.hot_alpha <= 10.0):
            raise bad(f"hot_alpha must be in [0, 10] or None, got {self.hot_alpha}")
        if not (0.0 < self.hot_density < P_MAX):
            raise bad(f"hot_density must be in (0, {P_MAX}), got {self.hot_density}")
        if self.rope_theta <= 0:
            raise bad(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.coact_group < 1 or self.intermediate % self.coact_group:
            raise bad(f"coact_group must be >= 1 and divide intermediate ({self.intermediate}), got {self.coact_group}")
        if not (0.0 <= self.coact_rho < 1.0):
            raise bad(f"coact_rho must be in [0, 1), got {self.coact_rho}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_weights(self) -> int:
        """Number of weights (embeddings, lm_head unless tied, all layers, norms)."""
        return sum(int(np.prod(shape)) for _, shape in _tensor_plan(self))

    @property
    def embed_std(self) -> float:
        # Embedding entries of this size give logits of std ~3 with tied embeddings;
        # everything written into the residual stream is scaled relative to it.
        return 3.0 / math.sqrt(self.hidden)


# Named presets for scripts/make_synthetic.py. "2gb" is Llama-2-7B's shape cut to 16 layers:
# per layer 4*4096^2 + 3*4096*11008 = 202.4 M weights, plus 2 * 32000*4096 = 262.1 M for
# embeddings and lm_head: 3.50 G weights; at Q4_0 (4.5 bits/weight) 1.97e9 bytes (1.83 GiB);
# the float16 HF folder is 7.0e9 bytes.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=128, intermediate=352, layers=2, heads=4, kv_heads=2, vocab=512,
                 dtype="float32", max_positions=512),
    "2gb": dict(hidden=4096, intermediate=11008, layers=16, heads=32, kv_heads=32, vocab=32000,
                dtype="float16", max_positions=4096),
    # Llama-3-8B / Mistral-7B shape (grouped-query attention, wider FFN) cut to 15 layers, 32k vocabulary:
    # attention is 19% of a layer instead of 33%, as in most current models
    "2gb-gqa": dict(hidden=4096, intermediate=14336, layers=15, heads=32, kv_heads=8, vocab=32000,
                    dtype="float16", max_positions=4096),
}


# --------------------------------------------------------------------------------------------
# Tokenizer


def _bytes_to_unicode() -> list[str]:
    """The byte-level BPE alphabet: char of byte b, in byte order.

    Printable Latin-1 bytes stand for themselves; the others (control chars, space, ...) are
    moved to code points 256, 257, ... in byte order, so every byte is one visible char.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _filler_merges(n: int) -> list[tuple[str, str]]:
    """n deterministic BPE merges building letter strings and " "-prefixed words.

    Each merge joins an existing token (starting from " " and the letters) with one letter, so
    every merge's parts are in the vocab by the time it is used. Letters follow rough English
    frequencies, so English-like text compresses a little; the vocab does not depend on seeds.
    """
    alphabet = _bytes_to_unicode()
    space = alphabet[ord(" ")]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = 1.0 / (np.arange(len(letters)) + 2.0)
    weights /= weights.sum()
    rng = np.random.default_rng(1234)
    pool = [space] + list(letters)  # tokens that may be extended
    seen = set(alphabet)
    merges: list[tuple[str, str]] = []
    while len(merges) < n:
        lefts = rng.integers(0, len(pool), size=4096)
        rights = rng.choice(len(letters), size=4096, p=weights)
        bias = rng.random(4096)
        for li, ri, bi in zip(lefts, rights, bias):
            # prefer recent (longer) tokens half the time so words grow past two letters
            left = pool[-1 - int(li) % min(len(pool), 64)] if bi < 0.5 else pool[int(li)]
            right = letters[int(ri)]
            new = left + right
            if new in seen or len(new) > 12:
                continue
            seen.add(new)
            pool.append(new)
            merges.append((left, right))
            if len(merges) == n:
                break
    return merges


def build_tokenizer(vocab: int):
    """A `tokenizers.Tokenizer`: byte-level BPE of exactly `vocab` tokens, <s> and </s> special.

    Encoding adds <s> in front (like Llama); decoding skips special tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    if vocab < BYTE_OFFSET + 256:
        raise PowerlowError(f"tokenizer: vocab must be >= {BYTE_OFFSET + 256}, got {vocab}")
    alphabet = _bytes_to_unicode()
    merges = _filler_merges(vocab - BYTE_OFFSET - 256)
    token_to_id = {"<s>": BOS_ID, "</s>": EOS_ID}
    for b, ch in enumerate(alphabet):
        token_to_id[ch] = BYTE_OFFSET + b
    for left, right in merges:
        token_to_id[left + right] = len(token_to_id)
    assert len(token_to_id) == vocab
    tok = Tokenizer(models.BPE(vocab=token_to_id, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False),
                            AddedToken("</s>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    return tok


# --------------------------------------------------------------------------------------------
# safetensors, written and read by hand so tensors stream through (and bfloat16 needs no torch)

_ST_DTYPE = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
_ST_NAME_TO_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)


def _encode(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(x, dtype=np.float16)
    return _bf16_bits(x)


def _decode(raw: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as float32 after a round trip through the storage dtype (what a loader will see)."""
    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    return _decode(_encode(x, dtype), _ST_DTYPE[dtype][0])


class _ShardedWriter:
    """Writes planned tensors, in plan order, into one or more safetensors files.

    The whole plan (names and shapes) is known up front, so every header is written before
    any data and a tensor's bytes go straight to disk (in row chunks if wanted).
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: str,
                 shard_max_bytes: int | None = None):
        if shard_max_bytes is None:
            shard_max_bytes = SHARD_MAX_BYTES
        self.folder, self.dtype = folder, dtype
        st_name, itemsize = _ST_DTYPE[dtype]
        sizes = [int(np.prod(shape)) * itemsize for _, shape in plan]
        self.total_bytes = sum(sizes)
        shards: list[list[int]] = [[]]
        shard_bytes = 0
        for i, n in enumerate(sizes):
            if self.total_bytes > shard_max_bytes and shards[-1] and shard_bytes + n > shard_max_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append(i)
            shard_bytes += n
        if len(shards) == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        self.files: list[tuple[str, list[int]]] = list(zip(names, shards))
        self.plan, self.sizes, self.st_name = plan, sizes, st_name
        self.weight_map = {plan[i][0]: fname for fname, idx in self.files for i in idx}
        self._order = [i for _, idx in self.files for i in idx]
        self._next = 0  # index into self._order
        self._fh = None
        self._file_no = -1
        self._left = 0  # bytes still due for the current tensor

    def _open_next_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._file_no += 1
        fname, idx = self.files[self._file_no]
        header: dict = {"__metadata__": {"format": "pt"}}
        off = 0
        for i in idx:
            name, shape = self.plan[i]
            header[name] = {"dtype": self.st_name, "shape": list(shape), "data_offsets": [off, off + self.sizes[i]]}
            off += self.sizes[i]
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._fh = open(self.folder / fname, "wb")
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)

    def write(self, name: str, chunks: np.ndarray | Iterable[np.ndarray]) -> None:
        """Write tensor `name` (the next one of the plan) from an array or an iterable of row chunks."""
        i = self._order[self._next]
        if self.plan[i][0] != name:
            raise AssertionError(f"tensor {name!r} written out of order; expected {self.plan[i][0]!r}")
        nxt = self._file_no + 1
        if nxt < len(self.files) and i == self.files[nxt][1][0]:
            self._open_next_file()
        left = self.sizes[i]
        for chunk in ([chunks] if isinstance(chunks, np.ndarray) else chunks):
            raw = _encode(chunk, self.dtype)
            self._fh.write(memoryview(raw).cast("B"))
            left -= raw.nbytes
        if left != 0:
            raise AssertionError(f"tensor {name!r}: wrote {self.sizes[i] - left} bytes, planned {self.sizes[i]}")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise AssertionError(f"only {self._next} of {len(self._order)} planned tensors written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class _SafetensorsFile:
    """Reader of one safetensors file; tensors come out as float32 copies.

    Reads with plain file reads, not a memory map, so reading a large model tensor by tensor
    does not leave the whole file counted in the process's resident memory.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        info = self.header[name]
        st, shape = info["dtype"], tuple(info["shape"])
        if st not in _ST_NAME_TO_NP:
            raise PowerlowError(f"{self.path}: tensor {name} has dtype {st}; only F32, F16 and BF16 are supported")
        np_dtype = np.dtype(_ST_NAME_TO_NP[st])
        a, b = info["data_offsets"]
        if int(np.prod(shape)) * np_dtype.itemsize != b - a:
            raise PowerlowError(f"{self.path}: tensor {name} has {b - a} bytes, its shape {list(shape)} needs "
                                f"{int(np.prod(shape)) * np_dtype.itemsize}; the file is corrupt")
        start, stop = 0, shape[0] if shape else 1
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            assert step == 1
        row_items = int(np.prod(shape[1:]))
        with open(self.path, "rb") as f:
            f.seek(self.data_start + a + start * row_items * np_dtype.itemsize)
            raw = np.fromfile(f, dtype=np_dtype, count=(stop - start) * row_items)
        return _decode(raw.reshape((stop - start,) + shape[1:] if shape else ()), st)


class _HFTensors:
    """All tensors of an HF folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        self.files: dict[str, _SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif single.exists():
            weight_map = None
        else:
            raise PowerlowError(f"{folder}: no model.safetensors or model.safetensors.index.json; "
                                "pass a Hugging Face model folder")
        for fname in sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]:
            sf = _SafetensorsFile(folder / fname)
            self.files[fname] = sf
            for name in sf.header:
                self.where[name] = fname

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _file(self, name: str) -> _SafetensorsFile:
        if name not in self.where:
            raise PowerlowError(f"tensor {name!r} not found in the model folder")
        return self.files[self.where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self._file(name).get(name, rows)


# --------------------------------------------------------------------------------------------
# Numpy Llama pieces (HF conventions: rotate_half RoPE, Q/K rows in HF order)


def _rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # x: [..., D]
    return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)) * w


def _rope_tables(T: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))  # [hd/2]
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    ang = np.concatenate([ang, ang], axis=-1)  # [T, hd]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    # x: [S, H, T, hd]; HF rotate_half form: pairs (i, i + hd/2)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rot * sin


def _attention(h: np.ndarray, wq, wk, wv, wo, n_heads: int, n_kv: int, cos, sin) -> np.ndarray:
    # h: [S, T, D] normed input; returns [S, T, D]
    S, T, _ = h.shape
    hd = wq.shape[0] // n_heads
    q = (h @ wq.T).reshape(S, T, n_heads, hd).transpose(0, 2, 1, 3)  # [S, H, T, hd]
    k = (h @ wk.T).reshape(S, T, n_kv, hd).transpose(0, 2, 1, 3)  # [S, KV, T, hd]
    v = (h @ wv.T).reshape(S, T, n_kv, hd).transpose(0, 2, 1, 3)
    q, k = _rope(q, cos[:T], sin[:T]), _rope(k, cos[:T], sin[:T])
    rep = n_heads // n_kv
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(math.sqrt(hd))  # [S, H, T, T]
    scores = scores + np.triu(np.full((T, T), -np.inf, dtype=np.float32), k=1)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(S, T, n_heads * hd)
    return out @ wo.T


def _act(g: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(g, 0)
    return g / (1.0 + np.exp(-g))


def _ffn(h: np.ndarray, wg, wu, wd, act: str) -> tuple[np.ndarray, np.ndarray]:
    # h: [..., D]; returns (output [..., D], gate pre-activations [..., F])
    g = h @ wg.T
    return (_act(g, act) * (h @ wu.T)) @ wd.T, g


def power_law_frequencies(n: int, alpha: float, density: float, p_max: float = P_MAX) -> np.ndarray:
    """p_j = min(k * (j+1)^-alpha, p_max), j = 0..n-1, with k chosen so mean(p) = density."""
    r = (np.arange(n, dtype=np.float64) + 1.0) ** -alpha
    lo, hi = 0.0, float(p_max) / r.min()  # at hi every p is capped
    for _ in range(200):
        k = 0.5 * (lo + hi)
        if np.minimum(k * r, p_max).mean() < density:
            lo = k
        else:
            hi = k
    return np.minimum(0.5 * (lo + hi) * r, p_max)


def _inv_norm_cdf(p: np.ndarray) -> np.ndarray:
    nd = NormalDist()
    return np.array([nd.inv_cdf(float(min(max(x, 1e-9), 1 - 1e-9))) for x in p], dtype=np.float64)


def _project_out(w: np.ndarray, u: np.ndarray, axis: int) -> np.ndarray:
    """Remove direction u from w's rows (axis=1: w @ u = 0) or from its outputs (axis=0: u @ w = 0)."""
    if axis == 1:
        return w - np.outer(w @ u, u)
    return w - np.outer(u, u @ w)


# --------------------------------------------------------------------------------------------
# The maker


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed, *key])


def _tensor_plan(spec: SyntheticSpec) -> list[tuple[str, tuple[int, ...]]]:
    D, F, hd = spec.hidden, spec.intermediate, spec.head_dim
    plan = [("model.embed_tokens.weight", (spec.vocab, D))]
    for l in range(spec.layers):
        p = f"model.layers.{l}."
        plan += [
            (p + "input_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (spec.heads * hd, D)),
            (p + "self_attn.k_proj.weight", (spec.kv_heads * hd, D)),
            (p + "self_attn.v_proj.weight", (spec.kv_heads * hd, D)),
            (p + "self_attn.o_proj.weight", (D, spec.heads * hd)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
        ]
    plan.append(("model.norm.weight", (D,)))
    if not spec.tie_embeddings:
        plan.append(("lm_head.weight", (spec.vocab, D)))
    return plan


def _config_json(spec: SyntheticSpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": spec.act,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "rope_scaling": None,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": spec.dtype,
        "dtype": spec.dtype,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "powerlow_synthetic": {k: v for k, v in asdict(spec).items()},
    }


def _embedding_chunks(spec: SyntheticSpec, u: np.ndarray, c: float,
                      want: np.ndarray, got: np.ndarray) -> Iterator[np.ndarray]:
    """Yield the embedding (dtype-rounded) in row chunks; copy rows `want` into `got` on the way."""
    D = spec.hidden
    for k, start in enumerate(range(0, spec.vocab, EMBED_CHUNK_ROWS)):
        n = min(EMBED_CHUNK_ROWS, spec.vocab - start)
        e = _rng(spec.seed, 1, k).standard_normal((n, D), dtype=np.float32)
        if c:
            e = _project_out(e, u, axis=1) + c * u
        e = _round_to(e * np.float32(spec.embed_std), spec.dtype)
        sel = (want >= start) & (want < start + n)
        got[sel] = e[want[sel] - start]
        yield e


def make_hf_model(out_dir: str | os.PathLike, *, hidden: int, intermediate: int, layers: int, heads: int,
                  kv_heads: int, vocab: int, act: str = "silu", seed: int = 0, hot_alpha: float | None = None,
                  hot_density: float = 0.15, dtype: str = "float32", max_positions: int = 2048,
                  rope_theta: float = 10000.0, tie_embeddings: bool = False, coact_group: int = 1,
                  coact_rho: float = 0.9, overwrite: bool = False, progress: bool = False) -> Path:
    """Write a random Llama model as a Hugging Face folder and return its path.

    Files: config.json, model.safetensors (or model-0000k-of-0000n.safetensors + index when the
    weights pass 1 GiB), tokenizer.json, tokenizer_config.json, generation_config.json, and with
    hot_alpha set planted_hotness.safetensors ("freq" [layers, intermediate] = planted firing
    probability of each neuron, "direction" [hidden] = the steady residual direction u).
    Weights are generated and written layer by layer (peak memory: a few of one layer's matrices);
    the folder is built under a temporary name and renamed into place.
    """
    spec = SyntheticSpec(hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads,
                         vocab=vocab, act=act, seed=seed, hot_alpha=hot_alpha, hot_density=hot_density,
                         dtype=dtype, max_positions=max_positions, rope_theta=rope_theta,
                         tie_embeddings=tie_embeddings, coact_group=coact_group, coact_rho=coact_rho)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise PowerlowError(f"{out} already exists; delete it, pass overwrite=True (--overwrite) "
                            "or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_model(spec, tmp, progress)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_model(spec: SyntheticSpec, folder: Path, progress: bool) -> None:
    D, F, L = spec.hidden, spec.intermediate, spec.layers
    planted = spec.hot_alpha is not None
    f32 = np.float32

    # steady residual direction u and its size c (in units of the embedding's random part)
    u = _rng(spec.seed, 0).standard_normal(D).astype(f32)
    u /= np.linalg.norm(u)
    c = EMBED_KAPPA * math.sqrt(D) if planted else 0.0

    # calibration batch: random non-special token sequences
    cal_ids = _rng(spec.seed, 2).integers(N_SPECIAL, spec.vocab, size=(CAL_SEQS, CAL_LEN))
    cal_T = min(CAL_LEN, spec.max_positions)
    cal_ids = cal_ids[:, :cal_T]
    want = np.unique(cal_ids)
    got = np.zeros((want.size, D), dtype=f32)
    cos, sin = _rope_tables(cal_T, spec.head_dim, spec.rope_theta)

    out_std = spec.embed_std * ATTN_OUT_STD / math.sqrt(L)
    freq = np.zeros((L, F), dtype=f32)

    writer = _ShardedWriter(folder, _tensor_plan(spec), spec.dtype)
    writer.write("model.embed_tokens.weight", _embedding_chunks(spec, u, c, want, got))
    x = got[np.searchsorted(want, cal_ids)]  # [S, T, D] residual stream of the calibration batch

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=L, desc="layers", unit="layer")
    for l in range(L):
        p = f"model.layers.{l}."
        rnd = lambda k, shape: _rng(spec.seed, 10 + l, k).standard_normal(shape, dtype=f32)  # noqa: E731
        hq, hkv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
        n1 = _round_to(1.0 + 0.1 * rnd(0, (D,)), spec.dtype)
        wq = _round_to(rnd(1, (hq, D)) / f32(math.sqrt(D)), spec.dtype)
        wk = _round_to(rnd(2, (hkv, D)) / f32(math.sqrt(D)), spec.dtype)
        wv = _round_to(rnd(3, (hkv, D)) / f32(math.sqrt(D)), spec.dtype)
        wo = rnd(4, (D, hq)) * f32(out_std / math.sqrt(hq))
        if planted:
            wo = _project_out(wo, u, axis=0)
        wo = _round_to(wo, spec.dtype)
        for name, w in (("input_layernorm", n1), ("self_attn.q_proj", wq), ("self_attn.k_proj", wk),
                        ("self_attn.v_proj", wv), ("self_attn.o_proj", wo)):
            writer.write(p + name + ".weight", w)
        x = x + _attention(_rmsnorm(x, n1, spec.rms_norm_eps), wq, wk, wv, wo, spec.heads, spec.kv_heads, cos, sin)
        del wq, wk, wv, wo

        n2 = _round_to(1.0 + 0.1 * rnd(5, (D,)), spec.dtype)
        h = _rmsnorm(x, n2, spec.rms_norm_eps).reshape(-1, D)  # [N, D]
        wg = rnd(6, (F, D))
        G = spec.coact_group
        if G > 1:       # a common direction per group of G consecutive neurons (unit variance kept)
            common = _rng(spec.seed, 10 + l, 101).standard_normal((F // G, D), dtype=f32)
            wg = f32(math.sqrt(1 - spec.coact_rho)) * wg + f32(math.sqrt(spec.coact_rho)) * np.repeat(common, G, axis=0)
            del common
        wg *= f32(GATE_STD / math.sqrt(D))
        if planted:
            wg = _project_out(wg, u, axis=1)
            s = h @ u  # [N] steady part, positive
            if s.min() <= 0:
                raise AssertionError(f"layer {l}: residual lost its steady direction (min u.h = {s.min():.3g})")
            fire = FIRE_GATE[spec.act]
            t = (fire - h @ wg.T) / s[:, None]  # [N, F]: gate_j > fire iff b_j > t_j
            p_sorted = power_law_frequencies(F // G, spec.hot_alpha, spec.hot_density)
            perm = _rng(spec.seed, 10 + l, 100).permutation(F // G)
            p_l = np.empty(F // G)
            p_l[perm] = p_sorted  # group perm[j] gets rank j
            p_l = np.repeat(p_l, G)
            b = t.mean(axis=0) + t.std(axis=0) * _inv_norm_cdf(p_l)
            wg = wg + np.outer(b.astype(f32), u)
            freq[l] = p_l
            del t
        wg = _round_to(wg, spec.dtype)
        wu = _round_to(rnd(7, (F, D)) / f32(math.sqrt(D)), spec.dtype)
        # down: an active neuron's act * up is O(GATE_STD) in size; scale for ~ out_std per entry
        wd = rnd(8, (D, F)) * f32(out_std / (GATE_STD * math.sqrt(F * spec.hot_density)))
        if planted:
            wd = _project_out(wd, u, axis=0)
        wd = _round_to(wd, spec.dtype)
        for name, w in (("post_attention_layernorm", n2), ("mlp.gate_proj", wg), ("mlp.up_proj", wu),
                        ("mlp.down_proj", wd)):
            writer.write(p + name + ".weight", w)
        y, _ = _ffn(h, wg, wu, wd, spec.act)
        x = x + y.reshape(x.shape)
        del wg, wu, wd, y, h
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    writer.write("model.norm.weight", _round_to(1.0 + 0.1 * _rng(spec.seed, 3).standard_normal(D).astype(f32),
                                                spec.dtype))
    if not spec.tie_embeddings:
        def lm_head_chunks() -> Iterator[np.ndarray]:
            for k, start in enumerate(range(0, spec.vocab, EMBED_CHUNK_ROWS)):
                n = min(EMBED_CHUNK_ROWS, spec.vocab - start)
                yield _rng(spec.seed, 4, k).standard_normal((n, D), dtype=f32) * f32(spec.embed_std)
        writer.write("lm_head.weight", lm_head_chunks())
    writer.close()

    (folder / "config.json").write_text(json.dumps(_config_json(spec), indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, indent=2) + "\n")
    build_tokenizer(spec.vocab).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_positions}, indent=2) + "\n")
    if planted:
        from safetensors.numpy import save_file
        save_file({"freq": freq, "direction": u}, str(folder / "planted_hotness.safetensors"), metadata={
            "hot_alpha": str(spec.hot_alpha), "hot_density": str(spec.hot_density), "act": spec.act,
            "fires": f"gate pre-activation > {FIRE_GATE[spec.act]}",
        })
        os.chmod(folder / "planted_hotness.safetensors", 0o644)


def load_planted_hotness(hf_dir: str | os.PathLike) -> np.ndarray:
    """The planted firing probabilities, float32 [layers, intermediate]."""
    path = Path(hf_dir) / "planted_hotness.safetensors"
    if not path.exists():
        raise PowerlowError(f"{path} not found: the model was made without hot_alpha")
    from safetensors.numpy import load_file
    return load_file(str(path))["freq"]


# --------------------------------------------------------------------------------------------
# Reference forward (numpy, whole model in RAM: for tiny models and tests)


def _read_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.exists():
        raise PowerlowError(f"{path} not found; pass a Hugging Face model folder")
    cfg = json.loads(path.read_text())
    if cfg.get("model_type") != "llama":
        raise PowerlowError(f"{path}: model_type is {cfg.get('model_type')!r}; only 'llama' is supported here")
    return cfg


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def numpy_forward(hf_dir: str | os.PathLike, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits [S, T, vocab] and each layer's gate pre-activations [S, T, F] for ids [S, T] (or [T])."""
    hf_dir = Path(hf_dir)
    cfg = _read_config(hf_dir)
    W = _HFTensors(hf_dir)
    ids = np.asarray(ids)
    if ids.ndim == 1:
        ids = ids[None]
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd = cfg.get("head_dim") or D // H
    eps, act = cfg["rms_norm_eps"], cfg["hidden_act"]
    cos, sin = _rope_tables(ids.shape[1], hd, _rope_theta(cfg))
    x = W.get("model.embed_tokens.weight")[ids]
    gates = []
    for l in range(cfg["num_hidden_layers"]):
        g = lambda n: W.get(f"model.layers.{l}.{n}.weight")  # noqa: E731
        x = x + _attention(_rmsnorm(x, g("input_layernorm"), eps), g("self_attn.q_proj"), g("self_attn.k_proj"),
                           g("self_attn.v_proj"), g("self_attn.o_proj"), H, KV, cos, sin)
        y, gate = _ffn(_rmsnorm(x, g("post_attention_layernorm"), eps), g("mlp.gate_proj"), g("mlp.up_proj"),
                       g("mlp.down_proj"), act)
        x = x + y
        gates.append(gate)
    head = W.get("lm_head.weight") if "lm_head.weight" in W else W.get("model.embed_tokens.weight")
    return _rmsnorm(x, W.get("model.norm.weight"), eps) @ head.T, gates


# --------------------------------------------------------------------------------------------
# GGUF export


def _gguf_permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF Q/K rows (per head: first halves, then second halves of the rotary pairs) -> GGUF order.

    HF's rotate_half pairs row i with row i + hd/2 of each head; llama.cpp's RoPE pairs rows
    2i and 2i+1. So row (head, half, i) of HF goes to row (head, i, half) of GGUF.
    """
    N, K = w.shape
    hd = N // n_head
    return w.reshape(n_head, 2, hd // 2, K).swapaxes(1, 2).reshape(N, K)


def _read_tokenizer(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types (GGUF TokenType ints), merges ("a b") from tokenizer.json."""
    path = hf_dir / "tokenizer.json"
    if not path.exists():
        raise PowerlowError(f"{path} not found; the GGUF needs the tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise PowerlowError(f"{path}: tokenizer model is {model.get('type')!r}; only byte-level BPE is supported")
    id_to_tok: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    special = set()
    for at in tj.get("added_tokens", []):
        id_to_tok[at["id"]] = at["content"]
        if at.get("special"):
            special.add(at["id"])
    n = max(vocab_size, max(id_to_tok) + 1)
    tokens, types = [], []
    for i in range(n):
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(3 if i in special else 1)  # CONTROL / NORMAL
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(hf_dir: str | os.PathLike, out_path: str | os.PathLike, qtype: str = "Q4_0", *,
                overwrite: bool = True, progress: bool = False) -> Path:
    """Write a llama-architecture GGUF of the HF Llama folder `hf_dir` and return its path.

    qtype: "Q4_0" or "Q8_0" (every 2-D weight, embeddings and lm_head included) or "F16".
    Norms stay F32. Q/K rows are permuted into GGUF order. Tensors are read (memory-mapped),
    quantized and written one at a time, into a temporary file renamed into place at the end.
    A ReLU model is written as is (with "powerlow.hidden_act" = "relu"); note llama.cpp's llama
    graph always applies SiLU, so llama.cpp runs it as a SiLU model.
    """
    import gguf
    from gguf.quants import quantize as gguf_quantize

    if qtype not in GGUF_QTYPES:
        raise PowerlowError(f"qtype must be one of {GGUF_QTYPES}, got {qtype!r}")
    hf_dir, out = Path(hf_dir), Path(out_path)
    if out.exists() and not overwrite:
        raise PowerlowError(f"{out} already exists; delete it or choose another path")
    cfg = _read_config(hf_dir)
    W = _HFTensors(hf_dir)
    D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or D // H
    vocab = cfg["vocab_size"]
    GT = gguf.GGMLQuantizationType
    ggml_type = {"Q4_0": GT.Q4_0, "Q8_0": GT.Q8_0, "F16": GT.F16}[qtype]
    ftype = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "F16": gguf.LlamaFileType.MOSTLY_F16}[qtype]
    tied = "lm_head.weight" not in W

    # (gguf name, hf name, qk heads or 0)
    names: list[tuple[str, str, int]] = [("token_embd.weight", "model.embed_tokens.weight", 0)]
    for l in range(L):
        p = f"model.layers.{l}."
        names += [
            (f"blk.{l}.attn_norm.weight", p + "input_layernorm.weight", 0),
            (f"blk.{l}.attn_q.weight", p + "self_attn.q_proj.weight", H),
            (f"blk.{l}.attn_k.weight", p + "self_attn.k_proj.weight", KV),
            (f"blk.{l}.attn_v.weight", p + "self_attn.v_proj.weight", 0),
            (f"blk.{l}.attn_output.weight", p + "self_attn.o_proj.weight", 0),
            (f"blk.{l}.ffn_norm.weight", p + "post_attention_layernorm.weight", 0),
            (f"blk.{l}.ffn_gate.weight", p + "mlp.gate_proj.weight", 0),
            (f"blk.{l}.ffn_up.weight", p + "mlp.up_proj.weight", 0),
            (f"blk.{l}.ffn_down.weight", p + "mlp.down_proj.weight", 0),
        ]
    names.append(("output_norm.weight", "model.norm.weight", 0))
    if not tied:
        names.append(("output.weight", "lm_head.weight", 0))

    def encoded_type(shape: tuple[int, ...]):
        return GT.F32 if len(shape) == 1 else ggml_type

    def nbytes(shape: tuple[int, ...]) -> int:
        t = encoded_type(shape)
        block, size = gguf.GGML_QUANT_SIZES[t]
        return int(np.prod(shape[:-1])) * (shape[-1] // block) * size

    def encode(w: np.ndarray) -> np.ndarray:
        t = encoded_type(w.shape)
        if t == GT.F32:
            return np.ascontiguousarray(w, dtype=np.float32)
        if t == GT.F16:
            return np.ascontiguousarray(w, dtype=np.float16)
        return gguf_quantize(np.ascontiguousarray(w, dtype=np.float32), t)

    tokens, types, merges = _read_tokenizer(hf_dir, vocab)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(hf_dir.name)
        writer.add_vocab_size(len(tokens))
        writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(D)
        writer.add_block_count(L)
        writer.add_feed_forward_length(int(cfg["intermediate_size"]))
        writer.add_rope_dimension_count(hd)
        writer.add_head_count(H)
        writer.add_head_count_kv(KV)
        writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
        writer.add_rope_freq_base(_rope_theta(cfg))
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("powerlow.hidden_act", cfg.get("hidden_act", "silu"))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(int(cfg.get("bos_token_id", BOS_ID)))
        writer.add_eos_token_id(int(cfg.get("eos_token_id", EOS_ID)))
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)

        for gname, hname, _ in names:
            shape = W.shape(hname)
            t = encoded_type(shape)
            if t in (GT.F32, GT.F16):
                writer.add_tensor_info(gname, shape, np.dtype(np.float32 if t == GT.F32 else np.float16), nbytes(shape))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, t)
                writer.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), nbytes(shape), raw_dtype=t)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(names), desc=f"gguf {qtype}", unit="tensor")
        for gname, hname, qk_heads in names:
            shape = W.shape(hname)
            if len(shape) == 2 and shape[0] > GGUF_CHUNK_ROWS and not qk_heads:
                parts = [encode(W.get(hname, slice(s, s + GGUF_CHUNK_ROWS)))
                         for s in range(0, shape[0], GGUF_CHUNK_ROWS)]
                data = np.concatenate(parts, axis=0)
                del parts
            else:
                w = W.get(hname)
                if qk_heads:
                    w = _gguf_permute_qk(w, qk_heads)
                data = encode(w)
                del w
            writer.write_tensor_data(data)
            del data
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
