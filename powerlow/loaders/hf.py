"""Hugging Face folder loader: config.json + *.safetensors (+ tokenizer.json)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..arch import ModelConfig
from ..errors import PowerlowError
from ..st_header import read_header
from .base import Source

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class _SafetensorsFile:
    """Zero-copy view of one .safetensors file (header parsed here so BF16 works without torch)."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        self.header, self.data_start = read_header(path, fix="re-download it")
        self.header.pop("__metadata__", None)
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
        from ..models import hf_family
        self.family = hf_family(cfg, str(path))
        self._prefix = "model."                  # where the text model's tensors are (a VLM nests them deeper)
        self.config = self.family.config_from_hf(cfg, str(path))
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise PowerlowError(f"{path}: no *.safetensors files; powerlow reads safetensors checkpoints (convert .bin with transformers first)")
        self._index: dict[str, _SafetensorsFile] = {}
        for f in files:
            st = _SafetensorsFile(f)
            for name in st.header:
                self._index[name] = st
        for p in getattr(self.family, "HF_PREFIXES", ()):
            if p + "embed_tokens.weight" in self._index:
                self._prefix = p
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
        from ..models.common import check_shapes
        check_shapes(self.config, self._shape, f"{path}/config.json", self.names())

    def _key(self, name: str) -> str:
        from ..models.common import hf_name
        key = hf_name(name, self.family.HF_LAYER_MAP)
        if self._prefix != "model." and key.startswith("model."):
            key = self._prefix + key[len("model."):]
        if key not in self._index:
            raise PowerlowError(f"{self.path}: tensor {key} is missing from the safetensors files; the checkpoint is incomplete "
                                f"(or not a {self.config.arch} model)")
        return key

    def _experts(self, name: str):
        """(per-expert keys, None) or (None, fused key) of MoE tensor ``name`` (blk.{i}.ffn_gate/up/down)."""
        i, part = name.split(".")[1], name.split(".", 2)[2]
        tmpl = self.family.HF_EXPERTS
        pre = f"{self._prefix}layers.{i}."
        keys = [pre + tmpl[part].format(e=e) for e in range(self.config.n_experts)]
        if all(k in self._index for k in keys):
            return keys, None
        fused = pre + tmpl["fused"] + ("down_proj" if part == "ffn_down" else "gate_up_proj")
        if fused in self._index:
            return None, fused
        missing = next(k for k in keys if k not in self._index)
        raise PowerlowError(f"{self.path}: tensor {missing} (expert {keys.index(missing)} of {len(keys)}) is missing from "
                            "the safetensors files; the checkpoint is incomplete (or its num_experts is wrong)")

    def _is_experts(self, name: str) -> bool:
        return self.config.moe and name.startswith("blk.") and name.split(".", 2)[2] in ("ffn_gate", "ffn_up", "ffn_down")

    def _expert_shape(self, name: str) -> tuple:
        keys, fused = self._experts(name)
        E, down = self.config.n_experts, name.endswith("ffn_down")
        if fused is not None:
            e, r, c = self._index[fused].header[fused]["shape"]
            if e != E:
                return (e, r, c)
            return (r, E * c) if down else (E * r // 2, c)
        shapes = {tuple(self._index[k].header[k]["shape"]) for k in keys}
        if len(shapes) != 1:
            raise PowerlowError(f"{self.path}: the experts of {name} have different shapes {sorted(shapes)}; the "
                                "checkpoint is broken")
        r, c = shapes.pop()
        return (r, E * c) if down else (E * r, c)

    def _expert_get(self, name: str) -> np.ndarray:
        """The layer's experts side by side (powerlow.models.moe): gate/up (E*F, K), down (K, E*F)."""
        keys, fused = self._experts(name)
        part = name.split(".", 2)[2]
        if fused is not None:
            w = self._index[fused].get(fused)
            E, R, C = w.shape
            if part == "ffn_down":
                return np.ascontiguousarray(w.transpose(1, 0, 2).reshape(R, E * C))
            F = R // 2
            w = w[:, :F] if part == "ffn_gate" else w[:, F:]
            return np.ascontiguousarray(w.reshape(E * F, C))
        ws = [self._index[k].get(k) for k in keys]
        return np.ascontiguousarray(np.concatenate(ws, axis=1 if part == "ffn_down" else 0), dtype=np.float32)

    def _shape(self, name: str) -> tuple:
        from ..models.common import part_rows, part_shape
        if self._is_experts(name):
            return self._expert_shape(name)
        key = self._key(name)
        if name.endswith("ffn_gate_inp_shexp"):           # a Linear(K, 1): (1, K)
            return (int(np.prod(self._index[key].header[key]["shape"])),)
        return part_shape(tuple(self._index[key].header[key]["shape"]), part_rows(self.family, name, self.config))

    def get(self, name: str):
        from ..models.common import part_rows, take_rows
        if self._is_experts(name):
            return self._expert_get(name)
        key = self._key(name)
        w = take_rows(self._index[key].get(key), part_rows(self.family, name, self.config))
        w = np.ascontiguousarray(w, dtype=np.float32)
        return self.family.sanitize(name, w, self.config, "hf")


def _replace(cfg: ModelConfig, **kw) -> ModelConfig:
    import dataclasses
    return dataclasses.replace(cfg, **kw)
