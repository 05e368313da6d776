"""What each part of a run occupies in memory (bytes), from a model directory's files and config, without loading
anything: the KV cache, the scratch of a prefill, the tokenizer, the predictors. The planner (powerlow.plan)
shares the budget out over these."""
from __future__ import annotations

import json
from pathlib import Path

from .st_header import read_header, tensor_bytes

SCRATCH_PREFILL_TOKENS = 64
SCRATCH_FIXED_BYTES = 2 << 20


def lowrank_predictor_bytes(path: Path, n_layers: int, Fp: int) -> int:
    """RAM of the low-rank predictors once loaded: A (K, r) and B (r, F) as q8 (powerlow.predictors), biases f32.
    Falls back to the file's tensor bytes for tensors it does not recognise."""
    from .formats import packed_nbytes
    h = read_header(path)[0]
    total = 0
    for l in range(n_layers):
        A, B = h.get(f"blk.{l}.A"), h.get(f"blk.{l}.B")
        if A is None or B is None:
            return tensor_bytes(path)
        K, r = A["shape"]
        n = B["shape"][1]
        n = Fp if n >= Fp - 64 else n            # neuron targets are padded to whole clusters; cluster targets not
        total += packed_nbytes("q8", r, K) + packed_nbytes("q8", n, r) + 4 * r + 4 * n
    return total


def predictor_density(model_dir: Path) -> float | None:
    """The cluster density the low-rank predictors selected on held-out samples (train-predictor's summary),
    with a 20% margin; None if unknown."""
    p = Path(model_dir) / "predictors.safetensors"
    try:
        summary = json.loads(read_header(p)[0].get("__metadata__", {}).get("summary", "null"))
        return min(1.0, 1.2 * float(summary["mean_cluster_density"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kv_bytes_per_position(cfg: dict) -> int:
    """KV cache bytes per position: every layer's K and V, float16 storage (engine.KVCache)."""
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["n_heads"]
    return cfg["n_layers"] * 2 * cfg["n_kv_heads"] * head_dim * 2


def auto_context(cfg: dict, budget: int) -> int:
    """Default KV capacity under a budget: the largest power of two (>= 64) whose cache fits in 1/8 of it."""
    per = kv_bytes_per_position(cfg)
    ctx = 64
    while ctx * 2 <= cfg["max_positions"] and ctx * 2 * per <= budget // 8:
        ctx *= 2
    return min(ctx, cfg["max_positions"])


def tokenizer_bytes(path: Path) -> int:
    """RAM the loaded HF tokenizer keeps once the engine has handed its parse garbage back (malloc_trim right after
    the load), measured with a long encode after it: SmolLM2's 1.5 MB tokenizer.json -> 16 MiB, the 2 GB synthetic's
    1 MB -> 13 MiB, a 4096-token one 0.1 MB -> 4 MiB (the tokenizers library's own ~8 MiB counts with the
    interpreter's baseline: it is imported with powerlow); so 12 x the file + 3 MiB."""
    try:
        return 12 * path.stat().st_size + (3 << 20)
    except OSError:
        return 3 << 20


def tokenizer_load_peak(path: Path) -> int:
    """RAM while tokenizer.json is parsed (before any weight is loaded; the excess is handed back right after):
    measured SmolLM2 +44 MiB, the 2 GB synthetic +28 MiB, 0.1 MB -> +5 MiB; so 30 x the file + 3 MiB.
    No budget below this can hold: it is a floor of the minimum budget."""
    try:
        return 30 * path.stat().st_size + (3 << 20)
    except OSError:
        return 3 << 20


def scratch_bytes(cfg: dict, context: int, ffn_chunks: int = 1) -> int:
    """Activations of a prefill of SCRATCH_PREFILL_TOKENS tokens (residual, norms, q/k/v, attention scores, FFN
    output: about 12 K-wide rows a token; the FFN kernel's per-chunk sums: ffn_chunks - 1 more) and one row of
    logits (generation asks for the last token's only). Under a budget, longer prompts run in pieces of
    SCRATCH_PREFILL_TOKENS (engine.forward)."""
    T = min(SCRATCH_PREFILL_TOKENS, context)
    K, vocab = cfg["hidden_size"], cfg["vocab_size"]
    return 4 * T * ((11 + ffn_chunks) * K + cfg["n_heads"] * context) + 4 * 2 * vocab + SCRATCH_FIXED_BYTES
