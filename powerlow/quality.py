"""What a lossy mode costs: perplexity against dense, measured by `powerlow eval` and kept in the model dir.

``quality.json`` (next to manifest.json; not part of the converted model, so not in the manifest) holds one entry
per (mode, density, predictor, text): the mode's perplexity and the dense perplexity on the same tokens. `powerlow
run` and `bench` in a lossy mode (threshold, predict, gate) print the entry of their mode and density, and warn
when it was never measured or costs more than ``WARN_RATIO``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

WARN_RATIO = 1.03
FILE = "quality.json"


def _path(model_dir) -> Path:
    return Path(model_dir) / FILE


def read(model_dir) -> list[dict]:
    try:
        d = json.loads(_path(model_dir).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in d.get("entries", []) if isinstance(e, dict)] if isinstance(d, dict) else []


def record(model_dir, entry: dict) -> None:
    """Add or replace the entry with the same mode, density, predictor and text (written atomically)."""
    key = ("mode", "target_density", "predictor", "text")
    entries = [e for e in read(model_dir) if any(e.get(k) != entry.get(k) for k in key)] + [entry]
    p = _path(model_dir)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"entries": entries}, indent=1) + "\n")
    os.replace(tmp, p)


def dense_ppl(model_dir, text: str) -> float | None:
    for e in read(model_dir):
        if e.get("mode") == "dense" and e.get("text") == text:
            return e.get("ppl")
    return None


def describe(model_dir, mode: str, density: float, predictor: str | None = None) -> tuple[str | None, bool]:
    """(message, is_warning) for a run in ``mode`` at ``density``; (None, False) for dense (exact)."""
    if mode == "dense":
        return None, False
    hits = [e for e in read(model_dir) if e.get("mode") == mode and e.get("dense_ppl")
            and abs(float(e.get("target_density", -1)) - density) < 1e-6
            and (predictor is None or e.get("predictor") == predictor)]
    cmd = f"powerlow eval -m {model_dir} --mode {mode} --density {density}"
    if not hits:
        return (f"warning: --mode {mode} at density {density} is lossy and its quality cost on this model was never "
                f"measured; measure it with `{cmd}` (or run --mode dense, which is exact)"), True
    worst = max(hits, key=lambda e: e["ppl"] / e["dense_ppl"])
    ratio = worst["ppl"] / worst["dense_ppl"]
    msg = (f"--mode {mode} at density {density}: perplexity {worst['ppl']:.2f} against dense {worst['dense_ppl']:.2f} "
           f"(x{ratio:.3f}) on {worst.get('text_name', 'the eval text')}, {worst.get('tokens')} tokens (`powerlow eval`)")
    if ratio > WARN_RATIO:
        return (f"warning: {msg}: more than {100 * (WARN_RATIO - 1):.0f}% worse than the exact dense mode; "
                "raise --density or use --mode dense"), True
    return msg, False
