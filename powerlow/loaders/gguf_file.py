"""GGUF loader (through the `gguf` package): llama architecture; F32, F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..arch import ModelConfig
from ..errors import PowerlowError
from .base import Source, gguf_to_hf_qk_index

LOSSLESS = {"Q8_0": "q8", "Q4_0": "q4_0", "Q4_1": "q4_1"}   # GGUF type -> powerlow format, bit-exact
SUPPORTED_TYPES = {"F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFSource(Source):
    def __init__(self, path: Path):
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as e:  # the gguf package raises ValueError/struct.error/IndexError on bad files
            raise PowerlowError(f"{path}: cannot read GGUF ({type(e).__name__}: {e}); the file is truncated or corrupt") from None
        r = self.reader
        arch = _field(r, "general.architecture")
        if arch != "llama":
            raise PowerlowError(f"{path}: GGUF architecture {arch!r} is not supported; powerlow reads llama-architecture GGUF files "
                                "(convert other models from their Hugging Face folder)")
        self.tensors = {t.name: t for t in r.tensors}
        for t in r.tensors:
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise PowerlowError(f"{path}: tensor {t.name} has type {t.tensor_type.name}; powerlow reads "
                                    f"{', '.join(sorted(SUPPORTED_TYPES))} (re-quantize the GGUF with llama-quantize)")
        hidden = int(_field(r, "llama.embedding_length"))
        heads = int(_field(r, "llama.attention.head_count"))
        emb = self.tensors["token_embd.weight"]
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        scaling = _field(r, "llama.rope.scaling.type")
        factor = 1.0
        if scaling not in (None, "none", "linear"):
            raise PowerlowError(f"{path}: rope scaling {scaling!r} is not supported (only linear)")
        if scaling == "linear":
            factor = float(_field(r, "llama.rope.scaling.factor", 1.0))
        # llama.cpp's llama architecture is always SwiGLU; powerlow's synthetic ReLU models carry their own key
        act = _field(r, "powerlow.hidden_act", "silu")
        try:
            self.config = ModelConfig(
                arch="llama",
                vocab_size=int(emb.shape[1]) if len(emb.shape) > 1 else int(_field(r, "llama.vocab_size")),
                hidden_size=hidden,
                intermediate_size=int(_field(r, "llama.feed_forward_length")),
                n_layers=int(_field(r, "llama.block_count")),
                n_heads=heads,
                n_kv_heads=int(_field(r, "llama.attention.head_count_kv", heads)),
                head_dim=int(_field(r, "llama.rope.dimension_count", hidden // heads)),
                rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
                max_positions=int(_field(r, "llama.context_length", 2048)),
                hidden_act=act,
                tie_embeddings="output.weight" not in self.tensors,
                attn_bias=False,
                rope_scaling_factor=factor,
                bos_id=_field(r, "tokenizer.ggml.bos_token_id"),
                eos_ids=(int(eos),) if eos is not None else (),
            )
        except TypeError:
            raise PowerlowError(f"{path}: llama metadata is incomplete (missing block_count, embedding_length, ...)") from None
        from ..tokenizer import tokenizer_json_from_gguf
        self.tokenizer_json = tokenizer_json_from_gguf(r, path)
        self.chat_template = _field(r, "tokenizer.chat_template")
        self.description = f"GGUF {path.name}"

    def get(self, name: str):
        from .. import formats
        import gguf

        key = name if name.endswith(".bias") else name + ".weight"
        t = self.tensors.get(key)
        if t is None:
            raise PowerlowError(f"{self.path}: tensor {key} is missing; the GGUF is incomplete")
        tname = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dims fastest-first
        rows = shape[0]
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        data = t.data
        if tname in LOSSLESS:
            out = formats.from_gguf(np.ascontiguousarray(data).reshape(rows, -1), tname, rows, cols)
        elif tname in ("F32", "F16"):
            out = np.asarray(data, dtype=np.float32).reshape(shape)
        else:
            out = gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).reshape(shape)
        if name.endswith("attn_q") or name.endswith("attn_k"):
            n_head = self.config.n_heads if name.endswith("attn_q") else self.config.n_kv_heads
            idx = gguf_to_hf_qk_index(n_head, rows)
            out = formats.select_rows(out, idx) if isinstance(out, formats.QMatrix) else np.ascontiguousarray(out[idx])
        return out
