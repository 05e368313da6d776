"""Runtime configuration: one frozen dataclass, from CLI flags and/or a TOML file, checked where it is built.

A TOML config file holds the same knobs as the dataclass fields (``budget`` takes a size such as "512MiB"):

    budget = "512MiB"          # memory budget; omit for everything resident
    threads = 2
    mode = "dense"             # dense | gate | threshold | predict
    density = 0.25             # target FFN density (threshold / predict)
    recall = 0.99              # target predictor recall (predict), instead of a density
    max_context = 256          # KV cache positions (with a budget: default fits the KV in 1/8 of it)
    cache_policy = "lfu"       # dynamic segment eviction: lfu | lru | fifo
    hot_fraction = 0.7         # share of the neuron cache pinned hot (the rest is dynamic); omit for auto (1.0)
    queue_depth = 8            # bundle reads in flight (one reader thread each)
    io_threads = 1             # zstd decompression threads (compressed stores only)
    io_block = "1MiB"          # largest single read (adjacent bundles are merged up to this)
    prefetch_depth = 1         # layers read ahead of the one being computed
    o_direct = true            # O_DIRECT reads (falls back to buffered + DONTNEED where refused)
    draft = "auto"             # speculative decoding: auto | none | ngram | self | a draft model's path
    draft_k = 0                # drafts per pass, 0 = adaptive

Unknown keys and impossible values are errors that name the key and say what to write instead.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PowerlowError

MODES = ("dense", "gate", "threshold", "predict", "experts")
CACHE_POLICIES = ("lfu", "lru", "fifo")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "ki": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "mi": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30, "gi": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def for_model(rt: "RuntimeConfig", cfg: dict) -> "RuntimeConfig":
    """The runtime a model dir runs with: a mixture-of-experts model runs in mode "experts" (its router picks
    the bundles; the default "dense" means that), a dense model never does."""
    moe = bool(cfg.get("n_experts"))
    if moe and rt.mode == "dense":
        return rt.replace(mode="experts")
    if moe and rt.mode != "experts":
        raise PowerlowError(f"--mode {rt.mode}: this is a mixture-of-experts model, whose router is the exact predictor "
                            "of the experts a token needs; it runs in mode experts (the default), not with a "
                            "neuron predictor")
    if not moe and rt.mode == "experts":
        raise PowerlowError("--mode experts is for mixture-of-experts models (qwen3moe, qwen2moe, mixtral); this model "
                            "has a dense FFN: choose dense, gate, threshold or predict")
    return rt


def parse_size(text) -> int:
    """'512MiB', '2G', '1.5GB', 1048576 -> bytes."""
    if isinstance(text, bool):
        raise PowerlowError(f"size {text!r}: write a number with an optional unit, e.g. 512MiB, 2GiB, 1.5GB")
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise PowerlowError(f"size {text!r}: write a number with an optional unit, e.g. 512MiB, 2GiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def format_size(n: int) -> str:
    """Bytes -> '1.23 GiB' / '45.6 MiB' / '789 KiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}" if shift == 30 else f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


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
    recall: float | None = None      # target predictor recall (predict mode), instead of a density
    budget_bytes: int | None = None  # None = everything resident
    seed: int | None = None
    max_context: int | None = None   # KV cache capacity limit (None = model's context; with a budget, see plan.py)
    # -- the offloaded run (powerlow.cache / powerlow.io); used only with a budget --
    cache_policy: str = "lfu"        # eviction in the dynamic segment (lfu measured best: README.offload.md)
    hot_fraction: float | None = None  # share of the neuron cache pinned hot; None = auto (plan.py)
    queue_depth: int = 8             # bundle reads in flight (one reader thread each)
    io_threads: int = 1              # zstd decompression threads
    io_block_bytes: int = 1 << 20    # largest single read; adjacent bundles are merged up to this
    prefetch_depth: int = 1          # layers read ahead of the one being computed
    o_direct: bool = True            # O_DIRECT (else buffered reads + POSIX_FADV_DONTNEED)
    # -- speculative decoding (powerlow.speculate) --
    draft: str = "auto"              # auto | none | ngram | self | a draft model (dir, GGUF or HF folder, same
                                     # tokenizer); auto = ngram (powerlow.speculate.AUTO_DRAFT: why)
    draft_k: int = 0                 # drafts per target pass; 0 = adaptive (1..8, from acceptance and pass cost)

    def __post_init__(self):
        def check(ok, key, msg):
            if not ok:
                raise PowerlowError(f"{key}: {msg}")
        for key in ("threads", "queue_depth", "io_threads", "io_block_bytes", "prefetch_depth"):
            v = getattr(self, key)
            check(isinstance(v, int) and not isinstance(v, bool), key, f"must be an integer, got {v!r}")
        check(self.threads >= 0, "threads", f"must be >= 1 (or 0 for the default), got {self.threads}")
        check(self.mode in MODES, "mode", f"{self.mode!r} is not a mode; choose one of {', '.join(MODES)}")
        check(isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0, "density",
              f"must be in (0, 1], got {self.density}")
        check(self.recall is None or isinstance(self.recall, (int, float)) and 0.0 < self.recall <= 1.0, "recall",
              f"must be in (0, 1], got {self.recall}")
        check(self.budget_bytes is None or isinstance(self.budget_bytes, int) and self.budget_bytes > 0, "budget",
              f"must be a positive size such as 512MiB, got {self.budget_bytes}")
        check(self.max_context is None or isinstance(self.max_context, int) and self.max_context >= 1, "max_context",
              f"must be a positive number of positions, got {self.max_context}")
        check(self.cache_policy in CACHE_POLICIES, "cache_policy",
              f"{self.cache_policy!r} is not a policy; choose one of {', '.join(CACHE_POLICIES)}")
        check(self.hot_fraction is None or isinstance(self.hot_fraction, (int, float)) and 0.0 <= self.hot_fraction <= 1.0,
              "hot_fraction", f"must be in [0, 1] (or omitted for auto), got {self.hot_fraction}")
        check(1 <= self.queue_depth <= 256, "queue_depth", f"must be 1..256 reads in flight, got {self.queue_depth}")
        check(1 <= self.io_threads <= 64, "io_threads", f"must be 1..64, got {self.io_threads}")
        check(self.io_block_bytes >= 4096 and self.io_block_bytes % 4096 == 0 and self.io_block_bytes <= 64 << 20,
              "io_block", f"must be a multiple of 4KiB between 4KiB and 64MiB, got {self.io_block_bytes}")
        check(0 <= self.prefetch_depth <= 8, "prefetch_depth", f"must be 0..8 layers, got {self.prefetch_depth}")
        check(isinstance(self.o_direct, bool), "o_direct", f"must be true or false, got {self.o_direct!r}")
        check(isinstance(self.draft, str) and self.draft.strip() != "", "draft",
              f"must be auto, none, ngram, self or a draft model's path, got {self.draft!r}")
        check(isinstance(self.draft_k, int) and not isinstance(self.draft_k, bool) and 0 <= self.draft_k <= 8,
              "draft_k", f"must be 0 (adaptive) .. 8 drafts a pass, got {self.draft_k!r}")

    @classmethod
    def from_args(cls, args) -> "RuntimeConfig":
        """The runtime of a command line (powerlow.cli's shared flags: -t, --mode, --density, --budget, --config,
        -s, --draft, --draft-k) over the --config file's keys."""
        kw = {}
        if args.config:
            kw.update(load_toml(args.config))
        if args.threads:
            kw["threads"] = args.threads
        if args.mode:
            kw["mode"] = args.mode
        if args.density is not None:
            kw["density"] = args.density
        if args.budget is not None:       # --budget '' is an error, not "everything resident"
            try:
                kw["budget_bytes"] = parse_size(args.budget)
            except PowerlowError as e:
                raise PowerlowError(f"--budget: {e}") from None
        if args.seed is not None:
            kw["seed"] = args.seed
        if getattr(args, "draft", None) is not None:
            kw["draft"] = args.draft
        if getattr(args, "draft_k", None) is not None:
            kw["draft_k"] = args.draft_k
        if args.threads < 0:
            raise PowerlowError(f"-t {args.threads}: threads must be >= 1")
        return cls(**kw)

    @property
    def n_threads(self) -> int:
        return self.threads or default_threads()

    def replace(self, **kw) -> "RuntimeConfig":
        return dataclasses.replace(self, **kw)


# TOML key -> (RuntimeConfig field, converter)
def _size_key(v):
    return parse_size(v)


_TOML_KEYS = {f.name: (f.name, None) for f in dataclasses.fields(RuntimeConfig)}
del _TOML_KEYS["budget_bytes"], _TOML_KEYS["io_block_bytes"]
_TOML_KEYS["budget"] = ("budget_bytes", _size_key)
_TOML_KEYS["io_block"] = ("io_block_bytes", _size_key)
_FLOAT_KEYS = ("density", "recall", "hot_fraction")


def config_from_dict(d: dict, *, source: str = "config") -> dict:
    """TOML-style dict -> RuntimeConfig kwargs (checked: unknown keys and bad values raise PowerlowError)."""
    kw = {}
    for key, value in d.items():
        if key not in _TOML_KEYS:
            import difflib
            near = difflib.get_close_matches(key, list(_TOML_KEYS), n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise PowerlowError(f"{source}: unknown key {key!r}; {hint}known keys: {', '.join(sorted(_TOML_KEYS))}")
        field, conv = _TOML_KEYS[key]
        if isinstance(value, dict):
            raise PowerlowError(f"{source}: {key} is a table; write it as a plain value (key = value)")
        try:
            if conv is not None:
                value = conv(value)
            elif key in _FLOAT_KEYS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
        except PowerlowError as e:
            raise PowerlowError(f"{source}: {key}: {e}") from None
        kw[field] = value
    try:
        RuntimeConfig(**kw)
    except PowerlowError as e:
        raise PowerlowError(f"{source}: {e}") from None
    return kw


def load_toml(path) -> dict:
    """Read a TOML runtime config -> RuntimeConfig kwargs (checked)."""
    import tomllib
    p = Path(path)
    try:
        with open(p, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise PowerlowError(f"config file {p} does not exist; check the path given to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PowerlowError(f"config file {p} is not valid TOML ({e}); give a TOML file (see `powerlow tune`'s "
                            "output for an example)") from None
    except OSError as e:
        raise PowerlowError(f"config file {p} cannot be read ({e.strerror}); give a TOML file to --config") from None
    return config_from_dict(d, source=str(p))


def dump_toml(kw: dict) -> str:
    """RuntimeConfig kwargs -> TOML text that load_toml reads back (for `powerlow tune`)."""
    inv = {field: key for key, (field, _) in _TOML_KEYS.items()}
    lines = []
    for field, value in kw.items():
        if value is None:
            continue
        key = inv[field]
        if field in ("budget_bytes", "io_block_bytes"):
            value = f"{value // (1 << 20)}MiB" if value % (1 << 20) == 0 else int(value)
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"
