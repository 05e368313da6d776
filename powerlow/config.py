"""Runtime configuration: one frozen dataclass, from CLI flags and/or a TOML file, checked where it is built."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PowerlowError

MODES = ("dense", "gate", "threshold", "predict")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "mi": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "gi": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_size(text) -> int:
    """'512MiB', '2G', '1.5GB', 1048576 -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise PowerlowError(f"size {text!r}: write a number with an optional unit, e.g. 512MiB, 2GiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def default_threads() -> int:
    """Physical cores (the kernels are memory-bound: SMT siblings add nothing)."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cores = set()
        for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
            cores.add(((cpu / "physical_package_id").read_text().strip(), (cpu / "core_id").read_text().strip()))
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0                 # 0 = default (physical cores)
    mode: str = "dense"              # dense | gate | threshold | predict
    density: float = 1.0             # target FFN density for threshold/predict modes
    budget_bytes: int | None = None  # None = everything resident
    seed: int | None = None
    max_context: int | None = None   # KV cache capacity limit (None = model's context)

    def __post_init__(self):
        if self.threads < 0:
            raise PowerlowError(f"threads must be >= 1 (or 0 for the default), got {self.threads}")
        if self.mode not in MODES:
            raise PowerlowError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if not 0.0 < self.density <= 1.0:
            raise PowerlowError(f"density must be in (0, 1], got {self.density}")
        if self.budget_bytes is not None and self.budget_bytes <= 0:
            raise PowerlowError(f"budget must be positive, got {self.budget_bytes}")

    @property
    def n_threads(self) -> int:
        return self.threads or default_threads()

    def replace(self, **kw) -> "RuntimeConfig":
        return dataclasses.replace(self, **kw)
