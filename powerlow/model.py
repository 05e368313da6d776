"""The Python API: ``powerlow.load(path_or_None)`` -> Model."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .config import RuntimeConfig
from .default_model import resolve_model
from .engine import Stats, Transformer
from .generate import SamplingParams, Token, generate as _generate


class Model:
    """A loaded powerlow model: tokenize / detokenize / forward / generate / stats."""

    def __init__(self, transformer: Transformer):
        self.tf = transformer
        self.config = transformer.config
        self.tokenizer = transformer.tokenizer
        self.stats = Stats()

    def close(self) -> None:
        """Stop the I/O threads and close the model's files (an offloaded run's readers)."""
        self.tf.close()

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
        return self.tf.forward(ids, start_pos=start_pos)

    def generate(self, prompt, max_tokens: int = 64, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = False) -> Iterator[Token]:
        """Tokens as they are made. ``prompt`` is text (or a list of ids)."""
        if isinstance(prompt, str):
            if not prompt.strip():
                from .errors import PowerlowError
                raise PowerlowError("the prompt is empty; give some text")
            text = self.tokenizer.apply_chat(prompt) if chat else prompt
            ids = self.tokenize(text)
        else:
            ids = [int(i) for i in prompt]
        params = SamplingParams(temperature, top_k, top_p, seed)
        yield from _generate(self.tf, ids, max_tokens, params, self.stats, stop_ids=self.tokenizer.stop_ids())
        self.stats.ffn_density = self.tf.ffn.clusters_used / max(1, self.tf.ffn.clusters_total)


def load(path=None, config: RuntimeConfig | None = None, *, backend: str | None = None) -> Model:
    """Load a powerlow model dir, or a GGUF file / Hugging Face folder (converted on first use into
    $POWERLOW_HOME/models and reused afterwards); None: the default model."""
    return Model(Transformer(resolve_model(path), config, backend=backend))
