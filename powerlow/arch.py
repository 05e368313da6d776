"""The model architecture config: one frozen dataclass, checked where it is built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import PowerlowError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
SUPPORTED_ACTS = ("silu", "relu")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int          # d_model
    intermediate_size: int    # FFN neurons per layer
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int        # context length the model was trained for
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "relu" (ReLU-gated, the sparse kind)
    tie_embeddings: bool = False
    attn_bias: bool = False   # qwen2: biases on q/k/v
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (1.0 = none)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise PowerlowError(f"architecture {self.arch!r} is not supported; powerlow runs {', '.join(SUPPORTED_ARCHS)}")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise PowerlowError(f"hidden_act {self.hidden_act!r} is not supported; powerlow runs {', '.join(SUPPORTED_ACTS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_positions"):
            if int(getattr(self, name)) <= 0:
                raise PowerlowError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise PowerlowError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise PowerlowError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_ids"] = list(self.eos_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PowerlowError(f"manifest config has unknown keys {sorted(unknown)}; the model dir was written by a newer powerlow — re-convert it")
        d = dict(d)
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        return cls(**d)
