"""GGUF loader (through the `gguf` package): the architectures of powerlow.models.

Tensor types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K are kept as they are (bit-exact, computed natively);
F32, F16, BF16 are read as floats (convert stores them in --bits, default 8-bit); Q2_K and Q3_K have no kernels of
their own: they are dequantized and re-quantized to q4_k (the nearest native format), with a notice."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import PowerlowError
from .base import Source

LOSSLESS = {"Q8_0": "q8", "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1",   # GGUF type -> powerlow
            "Q4_K": "q4_k", "Q5_K": "q5_k", "Q6_K": "q6_k"}                                    # format, bit-exact
REQUANTIZED = {"Q2_K": "q4_k", "Q3_K": "q4_k"}       # no native kernels: dequantized, re-quantized (lossy)
FLOAT_TYPES = {"F32", "F16", "BF16"}
SUPPORTED_TYPES = set(LOSSLESS) | set(REQUANTIZED) | FLOAT_TYPES


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _check_layout(tensors, path) -> None:
    """Tensor data must not overlap (an edited offset would read another tensor's bytes as this one's)."""
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes), t.name) for t in tensors)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise PowerlowError(f"{path}: tensors {an} and {bn} overlap in the file (corrupt tensor offsets); the "
                                "file is broken or was edited: re-export it from the original model")


class GGUFSource(Source):
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # the gguf package raises ValueError/struct.error/IndexError on bad files
            raise PowerlowError(f"{path}: cannot read GGUF ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
        r = self.reader
        from ..models import family
        from ..models.common import GGUFMeta, check_shapes
        arch = _field(r, "general.architecture")
        self.family = family(arch, str(path), "GGUF architecture")
        self.tensors = {t.name: t for t in r.tensors}
        _check_layout(r.tensors, path)
        for t in r.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise PowerlowError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; powerlow reads "
                                    f"{', '.join(sorted(SUPPORTED_TYPES))} (re-quantize the GGUF with llama-quantize)")
        requant = sorted({t.tensor_type.name for t in r.tensors if t.tensor_type.name in REQUANTIZED})
        if requant:
            import sys
            print(f"powerlow: {path.name} has {'/'.join(requant)} tensors, which powerlow has no kernels for: they are "
                  f"re-quantized to q4_k (lossy; the other tensors are kept as they are)", file=sys.stderr)
        emb = self.tensors.get("token_embd.weight")
        if emb is None:
            raise PowerlowError(f"{path}: tensor token_embd.weight is missing; the GGUF is incomplete")
        meta = GGUFMeta(r, arch, path)
        # before the config is built (it and the shape checks go over every layer): block_count must be the layers
        # the file has tensors of, or a 2**32 count hangs and a small one silently drops layers
        blocks = {n.split(".")[1] for n in self.tensors if n.startswith("blk.")}
        n_blocks = meta.count("block_count")
        if len(blocks) != n_blocks or blocks != {str(l) for l in range(n_blocks)}:
            raise PowerlowError(f"{path}: GGUF metadata {arch}.block_count = {n_blocks} but the file has tensors of "
                                f"{len(blocks)} layers; the metadata and the tensors disagree — the file is broken or "
                                "was edited: re-export it from the original model")
        vocab = int(emb.shape[1]) if len(emb.shape) > 1 else meta.count("vocab_size")
        self.config = self.family.config_from_gguf(
            meta, {"vocab_size": vocab, "tie_embeddings": "output.weight" not in self.tensors},
            self.tensors, lambda key: self._read(self.tensors[key]))
        check_shapes(self.config, self._shape, f"{path} (GGUF metadata {arch}.*)", self.names())
        from ..tokenizer import tokenizer_json_from_gguf
        self.tokenizer_json = tokenizer_json_from_gguf(r, path)
        self.chat_template = _field(r, "tokenizer.chat_template")
        self.description = f"GGUF {path.name}"

    def _is_experts(self, name: str) -> bool:
        return self.config.moe and name.startswith("blk.") and name.split(".", 2)[2] in ("ffn_gate", "ffn_up", "ffn_down")

    def _tensor(self, name: str):
        if getattr(self, "config", None) is not None and self._is_experts(name):
            from ..models.moe import GGUF_EXPS
            i, part = name.split(".")[1], name.split(".", 2)[2]
            key = f"blk.{i}.{GGUF_EXPS[part]}.weight"
            t = self.tensors.get(key)
            if t is None:
                legacy = f"blk.{i}.{part}.0.weight" in self.tensors
                raise PowerlowError(f"{self.path}: tensor {key} is missing" + (
                    "; this GGUF stores each expert as its own tensor (an old Mixtral export): re-export it with a "
                    "current llama.cpp convert_hf_to_gguf.py" if legacy else "; the GGUF is incomplete"))
            return t
        fused = getattr(self.family, "GGUF_SOURCE", {})
        if name.startswith("blk.") and name.split(".", 2)[2] in fused:
            name = name.rsplit(".", 1)[0] + "." + fused[name.split(".", 2)[2]]
        key = name if name.endswith(".bias") else name + ".weight"
        t = self.tensors.get(key)
        if t is None:
            raise PowerlowError(f"{self.path}: tensor {key} is missing; the GGUF is incomplete (or not a {self.config.arch} model)")
        return t

    def _shape(self, name: str) -> tuple:
        from ..models.common import part_rows, part_shape
        shape = tuple(int(s) for s in reversed(self._tensor(name).shape.tolist()))
        if self._is_experts(name):
            if len(shape) != 3:
                return shape
            E, R, C = shape             # gate/up (E, F, K); down (E, K, F)
            return (R, E * C) if name.endswith("ffn_down") else (E * R, C)
        return part_shape(shape, part_rows(self.family, name, self.config))

    def stored_format(self, name: str) -> str | None:
        """The format get(name) returns, from the tensor's GGUF type (no data read); fused tensors split into rows
        keep their type."""
        t = self._tensor(name)
        tname = t.tensor_type.name
        if len(t.shape) < 2 or name.endswith("ffn_gate_inp_shexp"):
            return None
        return LOSSLESS.get(tname) or REQUANTIZED.get(tname) or "f32"

    def get(self, name: str):
        from ..models.common import part_rows, take_rows
        if self._is_experts(name):
            return self._read_experts(self._tensor(name), name.endswith("ffn_down"))
        w = take_rows(self._read(self._tensor(name)), part_rows(self.family, name, self.config))
        return self.family.sanitize(name, w, self.config, "gguf")

    def _read_experts(self, t, down: bool):
        """A (E, F, K) / (E, K, F) expert tensor as the layer's experts side by side (powerlow.models.moe): gate/up
        rows stacked (E*F, K); down (K, E*F), each row of K the experts' blocks in turn (bytes moved, not
        re-quantized: F is a multiple of the format's block)."""
        from .. import formats
        import gguf
        tname = t.tensor_type.name
        E, R, C = (int(s) for s in reversed(t.shape.tolist()))
        if tname in LOSSLESS:
            raw = np.asarray(t.data).reshape(E, R, -1)
            if down:
                raw = raw.transpose(1, 0, 2)
            raw = np.ascontiguousarray(raw).reshape((R, -1) if down else (E * R, -1))
            return formats.from_gguf(raw, tname, R if down else E * R, E * C if down else C)
        if tname in ("F32", "F16"):
            w = np.asarray(t.data, dtype=np.float32).reshape(E, R, C)
        else:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(E, R, C)
        w = np.ascontiguousarray(w.transpose(1, 0, 2).reshape(R, E * C) if down else w.reshape(E * R, C))
        return formats.quantize(w, REQUANTIZED[tname]) if tname in REQUANTIZED else w

    def _read(self, t):
        """One tensor in HF row order as stored: float32 array, or a QMatrix for the lossless types."""
        from .. import formats
        import gguf

        tname = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        data = t.data
        if tname in LOSSLESS:
            return formats.from_gguf(np.ascontiguousarray(data).reshape(rows, -1), tname, rows, cols)
        if tname in ("F32", "F16"):
            return np.asarray(data, dtype=np.float32).reshape(shape)
        out = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).reshape(shape)
        if tname in REQUANTIZED and out.ndim == 2:
            return formats.quantize(out, REQUANTIZED[tname])
        return out
