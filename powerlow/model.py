"""The Python API: ``powerlow.load(path_or_None)`` -> Model."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .config import RuntimeConfig
from .default_model import resolve_model
from .engine import Stats, Transformer
from .errors import PowerlowError
from .generate import SamplingParams, Token, generate as _generate


def token_ids(ids, vocab_size: int, what: str = "token ids") -> list[int]:
    """A 1-D sequence of integer token ids, checked (no silent coercion of floats, 2-D arrays, bytes or text)."""
    if isinstance(ids, (str, bytes, bytearray, memoryview)) or ids is None:
        raise PowerlowError(f"{what} must be a 1-D sequence of integers, got {type(ids).__name__}"
                            + ("; pass text to generate(), or tokenize it first" if isinstance(ids, (str, bytes)) else ""))
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise PowerlowError(f"{what} must be a 1-D integer array, got a {ids.ndim}-D {ids.dtype} array")
        return _in_range([int(i) for i in ids], vocab_size, what)
    try:
        out = list(ids)
    except TypeError:
        raise PowerlowError(f"{what} must be a 1-D sequence of integers, got {type(ids).__name__}") from None
    for i in out:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise PowerlowError(f"{what} must be integers, got {type(i).__name__} {i!r}")
    return _in_range([int(i) for i in out], vocab_size, what)


def _in_range(ids: list[int], vocab_size: int, what: str) -> list[int]:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PowerlowError(f"{what}: id {bad[0]} is out of range 0..{vocab_size - 1}")
    return ids


class Model:
    """A loaded powerlow model: tokenize / detokenize / forward / generate / stats.

    One model has one KV cache, so one sequence at a time: a ``generate`` or ``forward`` call starts a new one, and
    an earlier ``generate`` iterator resumed afterwards raises PowerlowError (its cache was overwritten)."""

    def __init__(self, transformer: Transformer, drafter=None):
        self.tf = transformer
        self.config = transformer.config
        self.tokenizer = transformer.tokenizer
        self.stats = Stats()
        self._epoch = 0             # bumped by every call that writes the KV cache
        self._closed = False
        self._drafters = {}         # draft spec -> drafter (powerlow.speculate), made at first use
        if drafter is not None:
            self._drafters[transformer.runtime.draft] = drafter

    def close(self) -> None:
        """Stop the I/O threads and close the model's files (an offloaded run's readers)."""
        if not self._closed:
            self._closed = True
            for d in self._drafters.values():
                if d is not None:
                    d.close()
            self.tf.close()

    def drafter(self, spec: str | None = None):
        """The drafter of ``spec`` (default: the config's ``draft``), made once; None for 'none'."""
        spec = self.tf.runtime.draft if spec is None else spec
        if spec not in self._drafters:
            from .speculate import make_drafter
            self._drafters[spec] = make_drafter(spec, self.tf)
        return self._drafters[spec]

    def _begin(self) -> int:
        if self._closed:
            raise PowerlowError("the model is closed; load it again")
        self._epoch += 1
        return self._epoch

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def forward(self, ids, *, start_pos: int | None = None) -> np.ndarray:
        """Logits (T, vocab) float32 for ``ids`` (a fresh sequence unless ``start_pos`` continues the cached one)."""
        ids = token_ids(ids, self.config.vocab_size)
        if start_pos is not None and (isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer))
                                      or start_pos < 0):
            raise PowerlowError(f"start_pos must be an integer >= 0, got {start_pos!r}")
        self._begin()
        return self.tf.forward(ids, start_pos=start_pos)

    def generate(self, prompt, max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False, draft: str | None = None,
                 draft_k: int | None = None, ignore_eos: bool = False) -> Iterator[Token]:
        """Tokens as they are made. ``prompt`` is text (or a list of ids). ``draft``: speculative decoding's drafter
        (none | ngram | self | a draft model; default: the config's), ``draft_k`` drafts a pass (0 = adaptive);
        greedy output is the same tokens with any drafter. ``ignore_eos``: go on past end-of-sequence tokens
        until max_tokens (benchmarks and soak runs of a fixed length)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PowerlowError("the prompt is empty; give some text")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise PowerlowError(f"the prompt is not valid text ({e.reason} at position {e.start}); give UTF-8 text") from None
            text = self.tokenizer.apply_chat(prompt) if chat else prompt
            ids = self.tokenize(text)
        else:
            ids = token_ids(prompt, self.config.vocab_size, "the prompt")
        params = SamplingParams(temperature, top_k, top_p, seed)
        if draft_k is not None and (isinstance(draft_k, bool) or not isinstance(draft_k, int) or not 0 <= draft_k <= 8):
            raise PowerlowError(f"draft_k must be 0 (adaptive) .. 8, got {draft_k!r}")
        return self._generate(ids, max_tokens, params, self.drafter(draft),
                              self.tf.runtime.draft_k if draft_k is None else draft_k, ignore_eos=bool(ignore_eos))

    def _generate(self, ids, max_tokens, params, drafter=None, draft_k=0, ignore_eos=False) -> Iterator[Token]:
        epoch = self._begin()
        ffn = self.tf.ffn
        used0, total0 = ffn.clusters_used, ffn.clusters_total      # this call's density, not the model's lifetime
        stop = set() if ignore_eos else self.tokenizer.stop_ids()
        for tok in _generate(self.tf, ids, max_tokens, params, self.stats, stop_ids=stop,
                             drafter=drafter, k_max=draft_k):
            yield tok
            if self._epoch != epoch:
                raise PowerlowError("this generation was superseded: a later generate() or forward() on the same model "
                                    "overwrote its KV cache; start it again (one model runs one sequence at a time)")
        self.stats.ffn_density = (ffn.clusters_used - used0) / max(1, ffn.clusters_total - total0)


def runtime_of(config) -> RuntimeConfig | None:
    """``config`` as a RuntimeConfig: one, None (the defaults), or a dict of the config file's keys
    (``{"budget": "512MiB", "threads": 2}``, checked as the file is); anything else is a PowerlowError."""
    if config is None or isinstance(config, RuntimeConfig):
        return config
    if isinstance(config, dict):
        from .config import config_from_dict
        return RuntimeConfig(**config_from_dict(config, source="powerlow.load config"))
    raise PowerlowError(f"powerlow.load: config must be a RuntimeConfig, a dict of config keys or None, got "
                        f"{type(config).__name__}")


def load(path=None, config: RuntimeConfig | dict | None = None, *, backend: str | None = None) -> Model:
    """Load a powerlow model dir, or a GGUF file / Hugging Face folder (converted on first use into
    $POWERLOW_HOME/models and reused afterwards); None: the default model. ``config``: a RuntimeConfig or a dict
    of the config file's keys. A read error (EIO, a directory where a file should be) is a PowerlowError naming
    the file."""
    config = runtime_of(config)
    model_dir = resolve_model(path)
    rt = config or RuntimeConfig()
    target_rt, draft_dir = rt, None
    if rt.draft not in ("auto", "none", "ngram", "self"):
        # a draft model is resident; under a budget its footprint comes off what the target may use
        draft_dir = resolve_model(rt.draft)
        if rt.budget_bytes is not None:
            from .manifest import load_manifest
            from .tune import full_footprint
            fp, _ = full_footprint(draft_dir, load_manifest(draft_dir, check_files=False), rt)
            from .config import format_size
            if fp >= rt.budget_bytes:
                raise PowerlowError(f"the draft model {rt.draft} needs {format_size(fp)} resident, the whole budget of "
                                    f"{format_size(rt.budget_bytes)}; give a bigger --budget or --draft ngram")
            target_rt = rt.replace(budget_bytes=rt.budget_bytes - fp)
    try:
        tf = Transformer(model_dir, target_rt, backend=backend)
        drafter = None
        if draft_dir is not None:
            from .speculate import make_drafter
            try:
                drafter = make_drafter(str(draft_dir), tf)
            except BaseException:
                tf.close()
                raise
            tf.runtime = tf.runtime.replace(draft=str(draft_dir))
        return Model(tf, drafter)
    except OSError as e:
        raise PowerlowError(f"{e.filename or model_dir}: read error while loading the model ({e.strerror or e}); "
                            "check the disk and the file (re-convert the model if it is damaged)") from None
