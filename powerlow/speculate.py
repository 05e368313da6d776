"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one batched pass.

A pass runs the target on [pending token, d1 .. dk] at positions pos .. pos+k (``Transformer.forward`` with
T = k + 1: the GEMM path, and in an offloaded run each streamed bundle and attention unit read once for all
k + 1 tokens). Logits row i predicts the token after position pos + i, so

  greedy    d(i+1) is accepted while it is row i's argmax; the first row that disagrees gives its argmax
            instead, and when all k agree row k gives one more token: exactly plain greedy decoding's tokens
            (a token's logits are the same bits alone or in a batch: tests/test_kernels.py);
  sampling  row i's token is drawn from p_i as plain sampling draws it (one draw a token) and d(i+1) is kept
            iff it equals it: for point-mass drafts the rejection rule in distribution (keep with probability
            p_i(d), else p_i without d renormalised), and a seeded run gives plain sampling's very tokens.

The KV cache is rolled back past rejected positions by its length alone (the next pass overwrites them).

Drafters (``make_drafter``):
  ngram   prompt lookup: the longest suffix of the context (up to ``NGRAM_MAX``) seen earlier proposes what
          followed it there. No memory, no compute; strong where the output repeats its context (edits,
          summaries, code that reuses names).
  self    the same model from what is resident: FFN over the pinned clusters only, the layers whose attention
          streams skipped; it shares the target's KV cache (the positions it writes are overwritten by the
          verifying pass). Only under a budget (resident, the full model is the drafter).
  MODEL   a smaller model dir (or GGUF / HF folder) with the same tokenizer, resident, with its own KV cache.
Each reports its acceptance per draft position; ``KController`` picks k from those rates and the measured
cost of a pass of T tokens, so a drafter that does not pay is left off (k = 0: a plain decode step).
"""
from __future__ import annotations


import numpy as np

from .errors import PowerlowError

K_MAX = 8
# what --draft auto (the default) runs, and why: prompt lookup costs no memory and, with k chosen from the measured
# acceptance and pass cost, a plain step where it finds nothing. Measured on Qwen2.5-Coder-1.5B Q4_K_M (README,
# speculative decoding): under a 470 MiB budget it gave 1.15-3.6 tokens a pass, while drafting from the resident
# part (self: 15% of the FFN pinned) was accepted 9-16% of the time and cost more than it saved
AUTO_DRAFT = "ngram"
NGRAM_MAX = 4          # longest suffix the lookup matches
NGRAM_MIN = 1


class NgramDrafter:
    """Prompt lookup over the context: index of every n-gram's latest end, n = NGRAM_MIN .. NGRAM_MAX."""
    name = "ngram"

    def __init__(self, max_n: int = NGRAM_MAX, min_n: int = NGRAM_MIN):
        self.max_n, self.min_n = max_n, min_n
        self.reset()

    def reset(self, ids=()) -> None:
        self.index = {n: {} for n in range(self.min_n, self.max_n + 1)}
        self.done = 0       # end positions indexed: e in [n, done) for the n-gram ctx[e-n:e]

    def _index(self, ctx: list[int], upto: int) -> None:
        for e in range(max(self.done, 1), upto):
            for n, d in self.index.items():
                if e >= n:
                    d[tuple(ctx[e - n: e])] = e
        self.done = max(self.done, upto)

    def propose(self, ctx: list[int], k: int) -> list[int]:
        """Up to k tokens after ``ctx`` (its last token is the one the next pass runs); [] if nothing matches."""
        if k <= 0 or len(ctx) < 2:
            return []
        # index the n-grams ending before the current suffix's end, so a match is an earlier occurrence
        self._index(ctx, len(ctx))
        for n in range(min(self.max_n, len(ctx) - 1), self.min_n - 1, -1):
            e = self.index[n].get(tuple(ctx[-n:]))
            if e is not None:
                out = ctx[e: e + k]
                # a match close to the end copies what is there, then goes round again (a repeating span)
                while len(out) < k and out:
                    out.append(ctx[e + len(out)] if e + len(out) < len(ctx) else out[len(out) - (len(ctx) - e)])
                return out[:k]
        return []

    def accept(self, ctx: list[int]) -> None:
        pass

    def close(self) -> None:
        pass


class ModelDrafter:
    """A smaller model with the same tokenizer proposes its greedy continuation (its own KV cache)."""

    def __init__(self, tf, name: str):
        self.tf = tf
        self.name = name
        self.cached: list[int] = []      # tokens whose K/V are in the draft model's cache, in order

    def reset(self, ids=()) -> None:
        self.cached = []

    def _run(self, ids: list[int]) -> np.ndarray:
        """Logits after ids[-1], feeding only what the cache lacks."""
        n = 0
        lim = min(len(self.cached), len(ids) - 1)         # at least one token runs (its logits are needed)
        while n < lim and self.cached[n] == ids[n]:
            n += 1
        logits = self.tf.forward(ids[n:], start_pos=n, last_only=True)[-1]
        self.cached = list(ids)
        return logits

    def propose(self, ctx: list[int], k: int) -> list[int]:
        if k <= 0:
            return []
        out: list[int] = []
        seq = list(ctx)
        for _ in range(k):
            t = int(np.argmax(self._run(seq)))
            out.append(t)
            seq.append(t)
        return out          # the last draft was never run: _run left the cache at seq[:-1]

    def accept(self, ctx: list[int]) -> None:
        pass                # _run keeps the longest common prefix of what is cached and what comes next

    def close(self) -> None:
        self.tf.close()


class SelfDrafter:
    """The target computed from its resident part only (Transformer.forward(..., draft=True))."""
    name = "self"

    def __init__(self, tf):
        reason = tf.self_draft_unavailable()
        if reason:
            raise PowerlowError(f"--draft self: {reason}; use --draft ngram (or a small draft model)")
        self.tf = tf

    def reset(self, ids=()) -> None:
        pass

    def propose(self, ctx: list[int], k: int) -> list[int]:
        """ctx[-1] sits at position len(ctx) - 1 and is not in the cache yet; the drafts go after it."""
        out: list[int] = []
        tf = self.tf
        length = tf.kv.length
        pos = len(ctx) - 1
        t = ctx[-1]
        for _ in range(k):
            t = int(np.argmax(tf.forward([t], start_pos=pos, last_only=True, draft=True)[-1]))
            out.append(t)
            pos += 1
        tf.kv.length = length           # what the draft wrote past the verified cache is overwritten next
        return out

    def accept(self, ctx: list[int]) -> None:
        pass

    def close(self) -> None:
        pass


def make_drafter(spec: str, tf, runtime=None):
    """'none' -> None; 'ngram'; 'self'; else a model (dir, GGUF or HF folder) with the target's tokenizer."""
    if spec in (None, "", "none"):
        return None
    if spec == "auto":
        d = make_drafter(AUTO_DRAFT, tf, runtime)
        d.name = f"{d.name} (auto)"
        return d
    if spec == "ngram":
        return NgramDrafter()
    if spec == "self":
        return SelfDrafter(tf)
    from .default_model import resolve_model
    from .engine import Transformer
    from .config import RuntimeConfig
    d = resolve_model(spec)
    threads = tf.runtime.n_threads if runtime is None else runtime.n_threads
    dtf = Transformer(d, RuntimeConfig(threads=threads, max_context=tf.kv.limit))
    if dtf.config.vocab_size != tf.config.vocab_size or dtf.tokenizer.vocab_fingerprint() != tf.tokenizer.vocab_fingerprint():
        dtf.close()
        raise PowerlowError(f"--draft {spec}: its tokenizer differs from the model's (vocab {dtf.config.vocab_size} vs "
                            f"{tf.config.vocab_size}); a draft model must share the target's tokenizer")
    return ModelDrafter(dtf, str(spec))


class KController:
    """k per pass: the one that maximises expected tokens per second from the measured acceptance of each draft
    position and the measured seconds of a target pass of T tokens (+ the drafter's seconds per token).

    Expected tokens of a pass with k drafts: 1 + sum_j prod_{i<=j} a_i (a_i: acceptance of position i given
    the ones before it were accepted). Costs not measured yet are extrapolated from T = 1 with a slope learned
    from the passes run so far (prior 0.1 of a one-token pass per extra token). A pass is at most twice the
    largest T measured (the first at T = 2): where a T-token pass costs nearly T one-token passes (a small
    resident model, compute-bound) the optimistic prior then costs one T = 2 pass, not a T = 9 one (it sent
    SmolLM2's 8-token resident run from 111 to 74 tok/s), and where passes are nearly free (streamed weights)
    k reaches 8 by the fourth pass."""

    def __init__(self, k_max: int = K_MAX, fixed: int = 0):
        self.k_max = max(0, k_max)
        self.fixed = fixed
        self.reached = np.zeros(K_MAX + 1)      # per position i (1-based): drafts at i checked
        self.accepted = np.zeros(K_MAX + 1)
        self.cost = {}                          # T -> EMA seconds of a target pass of T tokens
        self.draft_cost = 0.0                   # EMA seconds per drafted token
        self.idle = 0                           # passes since the last draft was checked

    def rates(self) -> list[float]:
        """a_i, each with a prior of two checks at the rate of the position before it (position 1: 1 in 2), so a
        position not tried yet is worth what the last one was."""
        a = [0.0] * (K_MAX + 1)
        prev = 0.5
        acc, rea = self.accepted.tolist(), self.reached.tolist()
        for i in range(1, K_MAX + 1):
            a[i] = prev = (acc[i] + 2.0 * prev) / (rea[i] + 2.0)
        return a

    def pass_cost(self, T: int) -> float:
        """Seconds of a target pass of T tokens: measured, else from the nearest measured T along the median slope
        between measured ones (prior: 0.1 of a pass per extra token)."""
        return self._costs(T)[T]

    def _costs(self, T_max: int) -> list[float]:
        """pass_cost(T) for T = 0 .. T_max (index 0 unused), the slope worked out once (this runs every pass:
        numpy on these few numbers cost ~0.3 ms a pass, 5% of a SmolLM2 token)."""
        cost = self.cost
        if not cost:
            return [0.0] + [1.0 + 0.1 * (T - 1) for T in range(1, T_max + 1)]
        ts = sorted(cost)
        slopes = sorted((cost[b] - cost[a]) / (b - a) for i, a in enumerate(ts) for b in ts[i + 1:])
        if slopes:
            h = len(slopes) // 2
            slope = max(0.0, slopes[h] if len(slopes) % 2 else 0.5 * (slopes[h - 1] + slopes[h]))
        out = [0.0]
        for T in range(1, T_max + 1):
            if T in cost:
                out.append(cost[T])
                continue
            near = min(ts, key=lambda t: abs(t - T))
            sl = slope if slopes else 0.1 * cost[near] / near
            out.append(cost[near] + sl * (T - near))
        return out

    def choose(self, remaining: int) -> int:
        """Drafts to ask for (0: a plain step), at most remaining - 1 (the pass emits up to k + 1 tokens)."""
        cap = min(self.k_max, remaining - 1)
        if cap <= 0:
            return 0
        if self.fixed:
            return min(self.fixed, cap)
        cap = min(cap, 2 * max(self.cost, default=1) - 1)
        a = self.rates()
        c = self._costs(cap + 1)
        best, best_rate, e = 0, 1.0 / c[1], 1.0
        surv = 1.0
        for k in range(1, cap + 1):
            surv *= a[k]
            e += surv
            rate = e / (c[k + 1] + k * self.draft_cost)
            if rate > best_rate * 1.02:
                best, best_rate = k, rate
        if best == 0:
            self.idle += 1
            if self.idle >= 32:          # look again now and then: the text may have turned repetitive
                self.idle = 0
                return 1
        return best

    def record(self, T: int, seconds: float, proposed: int, n_accepted: int, draft_seconds: float) -> None:
        old = self.cost.get(T)
        self.cost[T] = seconds if old is None else 0.8 * old + 0.2 * seconds
        if proposed:
            self.idle = 0
            per = draft_seconds / proposed
            self.draft_cost = per if self.draft_cost == 0.0 else 0.8 * self.draft_cost + 0.2 * per
            i = np.arange(1, proposed + 1)
            self.reached[i[: n_accepted + 1 if n_accepted < proposed else proposed]] += 1
            self.accepted[i[:n_accepted]] += 1


class SpecStats:
    """What a speculative run reports (Stats.extra['speculation'])."""

    def __init__(self, drafter_name: str):
        self.drafter = drafter_name
        self.passes = 0            # target passes after prefill
        self.proposed = 0
        self.accepted = 0
        self.reached = np.zeros(K_MAX + 1, np.int64)
        self.acc_at = np.zeros(K_MAX + 1, np.int64)
        self.draft_seconds = 0.0
        self.emitted = 0           # tokens the passes produced

    def record(self, proposed: int, n_accepted: int, emitted: int) -> None:
        self.passes += 1
        self.proposed += proposed
        self.accepted += n_accepted
        self.emitted += emitted
        if proposed:
            self.reached[1: min(proposed, n_accepted + 1) + 1] += 1
            self.acc_at[1: n_accepted + 1] += 1

    def as_dict(self) -> dict:
        per = [round(float(self.acc_at[i] / self.reached[i]), 3) for i in range(1, K_MAX + 1) if self.reached[i]]
        return {"drafter": self.drafter, "passes": self.passes, "proposed": self.proposed, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.proposed, 3) if self.proposed else 0.0,
                "acceptance_per_position": per,
                "tokens_per_pass": round(self.emitted / self.passes, 3) if self.passes else 0.0,
                "draft_seconds": round(self.draft_seconds, 4)}


def verify(logits: np.ndarray, drafts: list[int], params, rng, sample_fn) -> tuple[int, int]:
    """(accepted drafts n, the token after them) from the pass's logits (k+1, vocab).

    Each position draws its token from the target's distribution exactly as plain decoding does (sample_fn, one
    draw of rng per emitted token) and a draft is accepted iff it equals that token. Against point-mass drafts
    this is the rejection rule in distribution (accept d with probability p(d); on rejection the token is p
    without d, renormalised) and, beyond that, the same tokens: a seeded sampled run gives the text of the plain
    seeded run whatever the drafter proposed and whatever k the controller chose (greedy: the argmax)."""
    k = len(drafts)
    for i in range(k):
        t = sample_fn(logits[i], params, rng)
        if t != drafts[i]:
            return i, t
    return k, sample_fn(logits[k], params, rng)
