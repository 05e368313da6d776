"""Generation: prefill the prompt as a batch, then decode one token at a time; sampling with a seed."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import PowerlowError
from .tokenizer import StreamDecoder


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0         # 1 = off
    seed: int | None = None

    def __post_init__(self):
        import math
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise PowerlowError(f"--temp must be a number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise PowerlowError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise PowerlowError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise PowerlowError(f"--seed must be in 0 .. 2^64-1, got {self.seed}; omit it for a random seed")


def probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a token is sampled from (temperature, then top-k, then top-p), float64 (vocab,)."""
    if not np.isfinite(logits).all():
        raise PowerlowError("the model produced non-finite logits (NaN or inf): its weights are corrupt or the input "
                            "overflowed; check the model with a fresh convert")
    # shifted before dividing: any positive temperature, however small, stays finite (the top token at 0)
    z = (logits.astype(np.float64) - float(logits.max())) / p.temperature
    if 0 < p.top_k < len(z):          # a top-k of the whole vocabulary (or more) keeps everything
        kth = np.partition(z, -p.top_k)[-p.top_k]
        z = np.where(z < kth, -np.inf, z)
    pr = np.exp(z)
    pr /= pr.sum()
    if p.top_p < 1.0:
        order = np.argsort(-pr)
        csum = np.cumsum(pr[order])
        keep = order[: int(np.searchsorted(csum, p.top_p) + 1)]
        mask = np.zeros_like(pr)
        mask[keep] = pr[keep]
        pr = mask / mask.sum()
    return pr


def sample(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits (vocab,)."""
    if p.temperature == 0.0:
        return int(np.argmax(logits))
    pr = probs(logits, p)
    return int(rng.choice(len(pr), p=pr))


@dataclass(frozen=True)
class Token:
    id: int
    text: str     # the new text this token completes (may be "" mid-UTF-8 sequence)


def generate(tf, prompt_ids: list[int], max_tokens: int, params: SamplingParams, stats,
             stop_ids: set[int] | None = None, drafter=None, k_max: int = 0) -> Iterator[Token]:
    """Yield generated tokens as they are made; ``stats`` gets prefill/decode timings.

    With a ``drafter`` (powerlow.speculate) each target pass checks the drafted tokens in one batch: greedy gives
    plain greedy decoding's tokens, sampling their distribution. ``k_max``: most drafts a pass (0 = adaptive up to
    speculate.K_MAX)."""
    if not prompt_ids:
        raise PowerlowError("the prompt is empty; give some text with -p")
    if max_tokens < 0:
        raise PowerlowError(f"-n must be >= 0, got {max_tokens}")
    n_ctx = tf.kv.limit
    if len(prompt_ids) + max_tokens > n_ctx:
        # max_context can lift a budget's cache size, never the model's own context: advise it only below that
        budget = tf.runtime.budget_bytes is not None and len(prompt_ids) + max_tokens <= tf.config.max_positions
        raise PowerlowError(f"prompt ({len(prompt_ids)} tokens) + -n {max_tokens} exceeds the context of {n_ctx} tokens; "
                            "shorten the prompt or lower -n" + (
                                f", or set max_context >= {len(prompt_ids) + max_tokens} in the config (the budget's "
                                "plan pays for the KV cache; `powerlow run --plan` shows it)" if budget else ""))
    rng = np.random.default_rng(params.seed)
    stop_ids = stop_ids or set()
    dec = StreamDecoder(tf.tokenizer)
    stats.prompt_tokens = len(prompt_ids)
    stats.generated_tokens = 0
    stats.decode_steps = 0
    stats.decode_seconds = 0.0
    stats.extra.pop("speculation", None)
    t0 = time.perf_counter()
    logits = tf.forward(prompt_ids, start_pos=0, last_only=True)[-1]
    stats.prefill_seconds = time.perf_counter() - t0
    if drafter is None:
        pos = len(prompt_ids)
        for _ in range(max_tokens):
            tok = sample(logits, params, rng)
            if tok in stop_ids:
                break
            yield Token(tok, dec.push(tok))
            stats.generated_tokens += 1
            if stats.generated_tokens == max_tokens:
                break
            t1 = time.perf_counter()
            logits = tf.forward([tok], start_pos=pos, last_only=True)[-1]
            stats.decode_seconds += time.perf_counter() - t1
            stats.decode_steps += 1
            pos += 1
        return
    yield from _speculate(tf, list(prompt_ids), logits, max_tokens, params, rng, stats, stop_ids, dec, drafter, k_max)


def _speculate(tf, ctx, logits, max_tokens, params, rng, stats, stop_ids, dec, drafter, k_max):
    """The speculative loop: ctx holds the prompt and every emitted token; its last one is pending (not in the
    KV cache) until the next pass runs it with the drafts after it."""
    from .speculate import K_MAX, KController, SpecStats, verify
    ctl = KController(K_MAX, fixed=k_max)
    spec = SpecStats(getattr(drafter, "name", "draft"))
    stats.extra["speculation"] = spec
    drafter.reset(ctx)
    tok = sample(logits, params, rng)
    while True:
        if tok in stop_ids:
            return
        yield Token(tok, dec.push(tok))
        stats.generated_tokens += 1
        ctx.append(tok)
        remaining = max_tokens - stats.generated_tokens
        if remaining <= 0:
            return
        pos = len(ctx) - 1                         # where the pending token goes
        t1 = time.perf_counter()
        k = ctl.choose(remaining)
        drafts = drafter.propose(ctx, k) if k else []
        t2 = time.perf_counter()
        logits = tf.forward([tok] + drafts, start_pos=pos, last_only=False)
        t3 = time.perf_counter()
        n, nxt = verify(logits, drafts, params, rng, sample)
        tf.kv.length = pos + n + 1                 # the rejected drafts' positions are overwritten next pass
        ctl.record(len(drafts) + 1, t3 - t2, len(drafts), n, t2 - t1)
        spec.record(len(drafts), n, n + 1)
        spec.draft_seconds += t2 - t1
        stats.decode_seconds += t3 - t1
        for d in drafts[:n]:
            if d in stop_ids:
                return
            yield Token(d, dec.push(d))
            stats.generated_tokens += 1
            stats.decode_steps += 1
            ctx.append(d)
        drafter.accept(ctx)
        stats.decode_steps += 1                    # nxt: made by this pass, emitted at the loop's top
        tok = nxt
