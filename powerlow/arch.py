"""The model architecture config: one frozen dataclass, checked where it is built."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import PowerlowError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "qwen3moe", "qwen2moe", "mixtral")   # powerlow.models has one module per family
SUPPORTED_ACTS = ("silu", "relu", "gelu_tanh")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # one of SUPPORTED_ARCHS
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
    hidden_act: str = "silu"  # "silu" (SwiGLU) | "relu" (ReLU-gated, the sparse kind) | "gelu_tanh" (GeGLU, gemma3)
    tie_embeddings: bool = False
    attn_bias: bool = False   # qwen2: biases on q/k/v
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (1.0 = none)
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    # fields added with the architecture registry; their defaults are the plain llama layer, so the manifests
    # of older model dirs load unchanged
    qk_norm: bool = False     # qwen3, gemma3: per-head RMSNorm of q and k (attn_q_norm, attn_k_norm) before RoPE
    post_norms: bool = False  # gemma3: RMSNorm of the attention and FFN outputs (post_attention_norm, post_ffw_norm)
    attn_scale: float = 0.0   # softmax scale of q.k; 0 = 1/sqrt(head_dim) (gemma3: query_pre_attn_scalar^-0.5)
    embed_scale: float = 1.0  # gemma3: embeddings times sqrt(hidden_size)
    logit_softcap: float = 0.0   # final logits cap * tanh(logits / cap); 0 = none
    sliding_window: int = 0   # keys in (pos - window, pos] on the layers of swa_layers; 0 = none
    swa_layers: tuple[int, ...] = ()    # the sliding-window (local) layers
    rope_theta_local: float = 0.0       # RoPE base of the local layers (gemma3), unscaled; 0 = rope_theta
    rope_freq_factors: tuple[float, ...] = ()   # llama3 RoPE: per-pair divisors of the frequencies (global layers)
    # mixture of experts (qwen3moe, qwen2moe, mixtral): every layer's FFN is n_experts experts of expert_ffn
    # neurons, n_experts_used of them per token chosen by the router (ffn_gate_inp); 0 = a dense FFN
    n_experts: int = 0
    n_experts_used: int = 0
    expert_ffn: int = 0
    norm_topk: bool = False   # the chosen experts' router probabilities renormalized to sum 1 (qwen3moe, mixtral)
    shared_ffn: int = 0       # qwen2moe: neurons of the shared expert every token runs, gated by sigmoid(h . g)

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise PowerlowError(f"architecture {self.arch!r} is not supported; powerlow runs {', '.join(SUPPORTED_ARCHS)}")
        if self.hidden_act not in SUPPORTED_ACTS:
            raise PowerlowError(f"hidden_act {self.hidden_act!r} is not supported; powerlow runs {', '.join(SUPPORTED_ACTS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PowerlowError(f"model config: {name} must be a positive integer, got {v!r}")
        for name in ("rms_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise PowerlowError(f"model config: {name} must be a positive number, got {v!r}")
        self._check_types()
        if self.n_heads % self.n_kv_heads:
            raise PowerlowError(f"model config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise PowerlowError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_freq_factors and len(self.rope_freq_factors) != self.head_dim // 2:
            raise PowerlowError(f"model config: {len(self.rope_freq_factors)} RoPE frequency factors for head_dim "
                                f"{self.head_dim} (want head_dim / 2 = {self.head_dim // 2})")
        if self.n_experts or self.n_experts_used or self.expert_ffn:
            if not (self.n_experts > 0 and 0 < self.n_experts_used <= self.n_experts and self.expert_ffn > 0):
                raise PowerlowError(f"model config: a mixture of experts needs n_experts > 0, 0 < n_experts_used <= "
                                    f"n_experts and expert_ffn > 0; got {self.n_experts}, {self.n_experts_used}, "
                                    f"{self.expert_ffn}")
        elif self.shared_ffn:
            raise PowerlowError("model config: a shared expert (shared_ffn) without routed experts")
        if self.swa_layers and self.sliding_window <= 0:
            raise PowerlowError("model config: sliding-window layers without a positive sliding_window")
        if any(not 0 <= l < self.n_layers for l in self.swa_layers):
            raise PowerlowError(f"model config: sliding-window layer ids {list(self.swa_layers)} outside 0..{self.n_layers - 1}")

    def _check_types(self) -> None:
        """The optional fields: each of its own type and range (a corrupt manifest is refused, not run)."""
        import math

        def num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

        def count(x):
            return isinstance(x, int) and not isinstance(x, bool) and x >= 0
        bad = [n for n in ("tie_embeddings", "attn_bias", "qk_norm", "post_norms") if not isinstance(getattr(self, n), bool)]
        bad += [n for n in ("attn_scale", "embed_scale", "logit_softcap", "rope_theta_local") if not num(getattr(self, n))]
        bad += [n for n in ("rope_scaling_factor",) if not (num(self.rope_scaling_factor) and self.rope_scaling_factor > 0)]
        bad += [n for n in ("sliding_window", "n_experts", "n_experts_used", "expert_ffn", "shared_ffn")
                if not count(getattr(self, n))]
        bad += [n for n in ("norm_topk",) if not isinstance(self.norm_topk, bool)]
        bad += [n for n in ("bos_id",) if self.bos_id is not None and not count(self.bos_id)]
        bad += [n for n in ("eos_ids", "swa_layers") if not all(count(i) for i in getattr(self, n))]
        bad += [n for n in ("rope_freq_factors",) if not all(num(f) and f > 0 for f in self.rope_freq_factors)]
        if bad:
            raise PowerlowError(f"model config: {bad[0]} has a value of the wrong type or range "
                                f"({getattr(self, bad[0])!r}); the manifest is corrupt — re-convert the model")

    def is_local(self, layer: int) -> bool:
        """True for a sliding-window layer."""
        return layer in self.swa_layers

    def local_rope(self, layer: int) -> bool:
        """True if the layer's RoPE is its own unscaled local base (gemma3's sliding-window layers)."""
        return bool(self.is_local(layer) and self.rope_theta_local)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    @property
    def ffn_neurons(self) -> int:
        """Neurons of a layer's FFN in ffn.bin: the experts side by side (expert e: e*expert_ffn ..), or the dense FFN."""
        return self.n_experts * self.expert_ffn if self.moe else self.intermediate_size

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("eos_ids", "swa_layers", "rope_freq_factors"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PowerlowError(f"manifest config has unknown keys {sorted(unknown)}; the model dir was written by a newer powerlow — re-convert it")
        d = dict(d)
        try:
            for k in ("eos_ids", "swa_layers", "rope_freq_factors"):
                d[k] = tuple(d.get(k, ()))
            return cls(**d)
        except (TypeError, ValueError) as e:      # a missing key, or a value of the wrong type
            raise PowerlowError(f"manifest config is incomplete or corrupt ({e}); re-convert the model") from None
