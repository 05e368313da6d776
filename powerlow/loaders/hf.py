"""Hugging Face folder loader: config.json + *.safetensors (+ tokenizer.json)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..arch import ModelConfig
from ..errors import PowerlowError
from .base import Source

_HF_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
}
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class _SafetensorsFile:
    """Zero-copy view of one .safetensors file (header parsed here so BF16 works without torch)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PowerlowError(f"{path}: truncated safetensors file (no header); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise PowerlowError(f"{path}: corrupt safetensors header (length {n} > file size); re-download it")
            try:
                self.header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise PowerlowError(f"{path}: corrupt safetensors header ({e}); re-download it") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in self.header.items():
            end = self.data_start + info["data_offsets"][1]
            if end > size:
                raise PowerlowError(f"{path}: tensor {name} ends past the end of the file (truncated); re-download it")

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise PowerlowError(f"{self.path}: tensor {name} has dtype {dt}; powerlow reads F32, F16, BF16")
        a, b = info["data_offsets"]
        raw = self.mm[self.data_start + a: self.data_start + b].view(_DTYPES[dt]).reshape(info["shape"])
        if dt == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


class HFSource(Source):
    def __init__(self, path: Path):
        self.path = path
        try:
            cfg = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise PowerlowError(f"{path}/config.json is not valid JSON ({e})") from None
        self.config = _config_from_hf(cfg, path)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PowerlowError(f"{path}: no *.safetensors files; powerlow reads safetensors checkpoints (convert .bin with transformers first)")
        self._index: dict[str, _SafetensorsFile] = {}
        for f in files:
            st = _SafetensorsFile(f)
            for name in st.header:
                self._index[name] = st
        tok = path / "tokenizer.json"
        if not tok.exists():
            raise PowerlowError(f"{path}: no tokenizer.json; powerlow needs the fast tokenizer file next to the weights")
        self.tokenizer_json = tok.read_text()
        tcfg = {}
        if (path / "tokenizer_config.json").exists():
            tcfg = json.loads((path / "tokenizer_config.json").read_text())
        self.chat_template = tcfg.get("chat_template") if isinstance(tcfg.get("chat_template"), str) else None
        if self.config.tie_embeddings is False and "lm_head.weight" not in self._index:
            # some checkpoints omit lm_head although config says untied: treat as tied
            self.config = _replace(self.config, tie_embeddings=True)
        self.description = f"HF {self.config.arch} {path.name}"

    def get(self, name: str):
        if name in _HF_NAMES:
            key = _HF_NAMES[name]
        else:
            _, i, rest = name.split(".", 2)
            key = f"model.layers.{i}.{_HF_LAYER[rest]}"
        if key not in self._index:
            raise PowerlowError(f"{self.path}: tensor {key} is missing from the safetensors files; the checkpoint is incomplete")
        return np.ascontiguousarray(self._index[key].get(key), dtype=np.float32)


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def _config_from_hf(c: dict, path: Path) -> ModelConfig:
    mt = c.get("model_type")
    if mt not in ("llama", "mistral", "qwen2"):
        raise PowerlowError(f"{path}: model_type {mt!r} is not supported; powerlow converts llama, mistral and qwen2 models")
    try:
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        eos = c.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        scaling = c.get("rope_scaling") or None
        factor = 1.0
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "default"):
                raise PowerlowError(f"{path}: rope_scaling type {kind!r} is not supported (only linear)")
            factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        max_pos = int(c.get("max_position_embeddings", 2048))
        sw = c.get("sliding_window")
        if sw and c.get("use_sliding_window", mt == "mistral") and int(sw) < max_pos:
            max_pos = int(sw)  # no sliding-window attention here: cap the context instead of computing wrong
        return ModelConfig(
            arch=mt,
            vocab_size=int(c["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(c["intermediate_size"]),
            n_layers=int(c["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads),
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            max_positions=max_pos,
            hidden_act=c.get("hidden_act", "silu"),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            attn_bias=(mt == "qwen2") or bool(c.get("attention_bias", False)),
            rope_scaling_factor=factor,
            bos_id=c.get("bos_token_id"),
            eos_ids=eos_ids,
        )
    except KeyError as e:
        raise PowerlowError(f"{path}/config.json lacks {e.args[0]!r}; it is not a complete HF model config") from None
