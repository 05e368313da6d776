"""Speculative decoding (powerlow.speculate): greedy output equals plain greedy decoding with every drafter,
resident and offloaded; sampling keeps the distribution; the drafters and the k controller."""
from __future__ import annotations

import numpy as np
import pytest

import powerlow
from powerlow.config import RuntimeConfig
from powerlow.errors import PowerlowError
from powerlow.generate import SamplingParams, probs, sample
from powerlow.manifest import load_manifest
from powerlow.plan import minimum_budget
from powerlow.speculate import KController, NgramDrafter, verify
from powerlow.store import StoreInfo

from conftest import make_converted, run_cli

RNG = np.random.default_rng(7)
# 24 prompts of random ids: a tiny random model's greedy output falls into loops, which n-gram drafts catch
PROMPTS = [[int(t) for t in RNG.integers(3, 300, size=int(RNG.integers(1, 12)))] for _ in range(24)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_converted(tmp_path_factory.mktemp("spec"), act="silu", seed=5, hidden=64, intermediate=512,
                          layers=3, heads=4, kv_heads=2, vocab=300, max_positions=128)[1]


class ListDrafter:
    """Proposes whatever a function of the context says (a test double: always wrong, always right, ...)."""
    name = "list"

    def __init__(self, fn):
        self.fn = fn

    def reset(self, ids=()):
        pass

    def propose(self, ctx, k):
        return list(self.fn(ctx, k))[:k]

    def accept(self, ctx):
        pass

    def close(self):
        pass


def _ids(model, prompt, n, **kw):
    return [t.id for t in model.generate(prompt, n, **kw)]


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    """Untied, with a vocabulary big enough that small budgets stream attention and lm_head chunks."""
    return make_converted(tmp_path_factory.mktemp("spec_stream"), bits="4", act="silu", seed=5, hidden=64,
                          intermediate=256, layers=4, heads=4, kv_heads=2, vocab=3000, max_positions=128)[1]


def _budget(d, where):
    m = load_manifest(d)
    info = StoreInfo.from_json(m["ffn"])
    rt = RuntimeConfig(max_context=128)
    lo, hi = minimum_budget(d, m, rt), minimum_budget(d, m, rt, dense_resident=True)
    return {"min": lo, "mid": (lo + hi) // 2, "pinned": hi + 6 * info.layout.stride}[where]


@pytest.fixture(scope="module")
def plain(tiny_dir):
    with powerlow.load(tiny_dir) as m:
        return [_ids(m, p, 40) for p in PROMPTS]


@pytest.mark.parametrize("draft", ["ngram", "oracle-off-by-one", "wrong", "self-model"])
@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_greedy_identical_resident(tiny_dir, plain, draft, k):
    """Every drafter (and any k) gives exactly plain greedy decoding's tokens on 24 prompts."""
    with powerlow.load(tiny_dir) as m:
        if draft == "self-model":
            drafter = m.drafter(str(tiny_dir))        # the model drafting for itself: every draft accepted
        elif draft == "wrong":
            drafter = ListDrafter(lambda ctx, k: [(ctx[-1] + 1 + i) % 300 for i in range(k)])
        elif draft == "oracle-off-by-one":      # the true continuation, with its 2nd token wrong
            drafter = None
        else:
            drafter = m.drafter(draft)
        for p, ref in zip(PROMPTS, plain):
            if drafter is None:
                def fn(ctx, kk, ref=ref, n0=len(p)):
                    done = len(ctx) - n0
                    out = list(ref[done: done + kk])
                    if len(out) > 1:
                        out[1] = (out[1] + 1) % 300
                    return out
                d = ListDrafter(fn)
            else:
                d = drafter
            got = [t.id for t in m._generate(p, 40, SamplingParams(), d, k)]
            assert got == ref, (draft, k, p)
        spec = m.stats.extra["speculation"].as_dict()
        if draft == "self-model" and k:
            assert spec["acceptance"] == 1.0 and spec["tokens_per_pass"] > 1.5
        if draft == "wrong" and k:
            assert spec["accepted"] == 0 and spec["tokens_per_pass"] == 1.0


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_seeded_sampling_identical(tiny_dir, k):
    """A seeded sampled run gives the plain seeded run's tokens whatever the drafts and k (each emitted token is
    one draw from the target distribution; a draft is kept iff it equals it): the n-gram drafter, the model
    drafting for itself, always-wrong drafts, at top-k/top-p/temperature settings."""
    settings = [dict(temperature=0.8), dict(temperature=1.2, top_k=20), dict(temperature=0.7, top_p=0.9)]
    with powerlow.load(tiny_dir) as m:
        drafters = [m.drafter("ngram"), m.drafter(str(tiny_dir)),
                    ListDrafter(lambda ctx, kk: [(ctx[-1] + 1 + i) % 300 for i in range(kk)])]
        for j, p in enumerate(PROMPTS[:8]):
            sp = SamplingParams(**settings[j % 3], seed=100 + j)
            ref = [t.id for t in m._generate(p, 30, sp, None, 0)]
            for d in drafters:
                got = [t.id for t in m._generate(p, 30, sp, d, k)]
                assert got == ref, (j, d, k)
        if k:
            assert m.stats.extra["speculation"].as_dict()["accepted"] == 0     # the last drafter: always wrong


@pytest.mark.parametrize("where", ["min", "mid", "pinned"])
@pytest.mark.parametrize("draft", ["ngram", "self"])
def test_greedy_identical_offloaded(stream_dir, monkeypatch, where, draft):
    """Under a budget (attention and lm_head streamed, some of them, or all resident with a few pinned clusters):
    plain greedy's tokens; each target pass reads the FFN stream once for all its tokens."""
    import powerlow.plan as plan_mod
    monkeypatch.setattr(plan_mod, "tokenizer_load_peak", lambda path: 0)   # as tests/test_stream.py: reach the
    with powerlow.load(stream_dir) as m:                                  # streaming plans of a tiny model
        plain = [_ids(m, p, 40) for p in PROMPTS[:12]]
    cfg = RuntimeConfig(budget_bytes=_budget(stream_dir, where), max_context=128)
    with powerlow.load(stream_dir, cfg) as m:
        tf = m.tf
        head_streams = any(c[2] is None for c in tf.head_chunks)
        if draft == "self" and head_streams:
            with pytest.raises(PowerlowError, match="lm_head streams"):
                m.drafter("self")
            return
        skipped = sum(lw is None for lw in tf.layers)
        passes = tokens = 0
        for p, ref in zip(PROMPTS[:12], plain):
            passes0 = tf.ffn_source.passes
            got = _ids(m, p, 40, draft=draft, draft_k=4)
            assert got == ref
            spec = m.stats.extra["speculation"]
            # one pass of the FFN stream for the prompt and one per target pass (the self-drafter reads nothing)
            assert tf.ffn_source.passes - passes0 == 1 + spec.passes
            passes, tokens = passes + spec.passes, tokens + len(got) - 1
        assert passes < tokens               # drafts were accepted: fewer target passes than tokens
        if where == "mid":
            assert skipped > 0 and (draft == "ngram" or not head_streams)


def test_smollm2_greedy_identical(smol):
    """The real model: prompt lookup and the model drafting for itself give plain greedy's tokens."""
    prompts = ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "Repeat after me: the quick brown fox. "
               "Again: the quick brown fox.", "1, 2, 3, 4, 5,", "The capital of France is"]
    for p in prompts:
        ref = _ids(smol, p, 32, draft="none")
        for d in ("ngram",):
            assert _ids(smol, p, 32, draft=d) == ref
            assert _ids(smol, p, 32, draft=d, draft_k=6) == ref


def test_kv_rolled_back(tiny_dir):
    """After rejected drafts the cache length is the verified sequence's, and a later forward continues it."""
    with powerlow.load(tiny_dir) as m:
        d = ListDrafter(lambda ctx, k: [7] * k)
        ids = [t.id for t in m._generate(PROMPTS[0], 10, SamplingParams(), d, 3)]
        # the last emitted token is pending (never run): the cache holds prompt + all but it
        assert m.tf.kv.length == len(PROMPTS[0]) + len(ids) - 1
        seq = PROMPTS[0] + ids
        cont = m.tf.forward([ids[-1]], start_pos=len(seq) - 1)[-1]     # over positions rejected drafts wrote
        full = m.forward(seq)[-1]                                        # a fresh sequence
        assert np.array_equal(cont, full)


def test_verify_sampling_distribution():
    """Rejection sampling against a point-mass draft: the emitted token at each position is distributed as p."""
    rng = np.random.default_rng(0)
    V = 6
    logits = rng.normal(size=(3, V)).astype(np.float32) * 2
    params = SamplingParams(temperature=0.8, seed=0)
    p0 = probs(logits[0], params)
    p1 = probs(logits[1], params)
    drafts = [int(np.argsort(-p0)[1]), 2]       # a draft that is right less than half the time
    N = 40000
    first = np.zeros(V)
    second = {}
    for _ in range(N):
        n, nxt = verify(logits, drafts, params, rng, sample)
        t0 = drafts[0] if n >= 1 else nxt
        first[t0] += 1
        if n >= 1:
            t1 = drafts[1] if n >= 2 else nxt
            second[t1] = second.get(t1, 0) + 1
    # chi-square against p0 (5 dof: 20.5 is p = 0.001)
    chi = ((first - N * p0) ** 2 / (N * p0)).sum()
    assert chi < 20.5, (first / N, p0)
    n1 = sum(second.values())
    obs = np.array([second.get(i, 0) for i in range(V)])
    chi1 = ((obs - n1 * p1) ** 2 / (n1 * p1)).sum()
    assert chi1 < 20.5, (obs / n1, p1)


def test_sampling_distribution_end_to_end(tiny_dir):
    """Speculative sampling on a tiny model: the joint distribution of the first two generated tokens matches the
    exact one computed from the model's logits (top-k 3 keeps the support small)."""
    params = dict(temperature=1.0, top_k=3)
    sp = SamplingParams(**params)
    prompt = [5, 17, 33]
    with powerlow.load(tiny_dir) as m:
        l0 = m.forward(prompt)[-1]
        p0 = probs(l0, sp)
        exact = {}
        for a in np.flatnonzero(p0):
            p1 = probs(m.forward(prompt + [int(a)])[-1], sp)
            for b in np.flatnonzero(p1):
                exact[(int(a), int(b))] = p0[a] * p1[b]
        # a drafter that proposes the second most likely first token: accepted sometimes, rejected sometimes
        guess = int(np.argsort(-l0)[1])
        d = ListDrafter(lambda ctx, k: [guess] * k)
        N = 3000
        counts = {}
        for s in range(N):
            got = tuple(t.id for t in m._generate(prompt, 3, SamplingParams(**params, seed=s), d, 2))[:2]
            counts[got] = counts.get(got, 0) + 1
    keys = sorted(exact)
    assert set(counts) <= set(keys)
    obs = np.array([counts.get(k, 0) for k in keys], float)
    exp = np.array([exact[k] for k in keys]) * N
    keep = exp >= 5                      # chi-square over cells with enough mass, the rest pooled
    chi = (((obs[keep] - exp[keep]) ** 2) / exp[keep]).sum()
    rest_o, rest_e = obs[~keep].sum(), exp[~keep].sum()
    if rest_e > 0:
        chi += (rest_o - rest_e) ** 2 / rest_e
    dof = int(keep.sum()) + (rest_e > 0) - 1
    from math import sqrt
    assert chi < dof + 4 * sqrt(2 * dof), (chi, dof)       # ~p = 0.001 for these dof


def test_ngram_drafter():
    d = NgramDrafter()
    ctx = [1, 2, 3, 4, 9, 9, 1, 2, 3]
    assert d.propose(ctx, 3) == [4, 9, 9]          # the longest suffix [1 2 3] occurred before: what followed
    assert d.propose([5, 6, 7], 3) == []            # nothing seen twice
    # a period shorter than k goes round again
    assert NgramDrafter().propose([8, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    # the most recent occurrence wins
    assert NgramDrafter().propose([3, 1, 3, 2, 3], 1) == [2]


def test_controller_leaves_a_drafter_off_when_it_does_not_pay():
    c = KController()
    for _ in range(50):                 # a pass of T tokens costs T x a one-token pass (compute-bound)
        k = c.choose(100)
        c.record(k + 1, 1.0 * (k + 1), k, 0, 0.0)
    assert c.choose(100) == 0
    c = KController()
    for _ in range(50):                 # flat cost (reads dominate) and drafts always right: the most drafts
        k = c.choose(100)
        c.record(k + 1, 1.0 + 0.01 * k, k, k, 0.0)
    assert c.choose(100) == 8
    assert c.choose(3) == 2             # never past what is left to generate


def test_controller_explores_k_by_doubling():
    """Untried pass sizes are reached by doubling T from 2: a wrong cost prior costs one small pass. Drafts always
    right, flat cost: k goes 1, 3, 7, 8; T-proportional cost: the first pass is T = 2 and after it no drafts."""
    c = KController()
    ks = []
    for _ in range(5):
        k = c.choose(100)
        ks.append(k)
        c.record(k + 1, 1.0 + 0.01 * k, k, k, 0.0)
    assert ks == [1, 3, 7, 8, 8]
    c = KController()
    k = c.choose(100)
    assert k == 1
    c.record(1, 1.0, 0, 0, 0.0)
    c.record(2, 2.0, 1, 0, 0.0)
    assert c.choose(100) == 0


def test_draft_config_checks(tiny_dir, tmp_path):
    with pytest.raises(PowerlowError, match="draft_k"):
        RuntimeConfig(draft_k=9)
    with pytest.raises(PowerlowError, match="draft"):
        RuntimeConfig(draft="")
    # a draft model with another tokenizer is refused by name
    other = make_converted(tmp_path, act="silu", seed=9, hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1,
                           vocab=280, max_positions=64)[1]
    with pytest.raises(PowerlowError, match="tokenizer differs"):
        powerlow.load(tiny_dir, RuntimeConfig(draft=str(other)))
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "-n", "4", "--draft", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "-n", "4", "--draft", "self")
    assert r.returncode == 2 and "fully resident" in r.stderr
    r = run_cli("run", "-m", tiny_dir, "-p", "hi there hi there hi there", "-n", "16", "--draft", "ngram")
    assert r.returncode == 0 and "draft ngram" in r.stderr


def test_bench_and_plan_report_the_drafter(tiny_dir):
    import json
    r = run_cli("bench", "-m", tiny_dir, "--draft", "ngram", "-n", "24", "--repeats", "1", "--prompt-tokens", "16",
                "--json", "-t", "1")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["draft"] == "ngram" and res["draft_same_tokens"] is True
    assert res["draft_tokens_per_pass"] >= 1.0 and 0.0 <= res["draft_acceptance"] <= 1.0
    assert res["generate_tok_s_plain"] > 0 and res["generate_tok_s_draft"] > 0
    m = load_manifest(tiny_dir)
    b = minimum_budget(tiny_dir, m, RuntimeConfig(max_context=64)) + (1 << 20)
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "-n", "8", "--budget", str(b), "--plan")
    assert r.returncode == 0 and "speculative decoding: auto -> ngram" in r.stdout, r.stdout + r.stderr
    r = run_cli("run", "-m", tiny_dir, "-p", "hi", "-n", "8", "--budget", str(b), "--plan", "--draft", "none")
    assert "speculative decoding: off" in r.stdout


def test_drafts_never_pass_the_planned_context(tiny_dir):
    """A budget's KV cache holds prompt + n positions (what `run` plans): k = 8 drafts near the end are cut to what
    is left, so no pass writes past it, and the tokens are plain greedy's."""
    p = PROMPTS[3]
    n = 30
    with powerlow.load(tiny_dir) as m:
        ref = _ids(m, p, n, draft="none")
    m_ = load_manifest(tiny_dir)
    b = minimum_budget(tiny_dir, m_, RuntimeConfig(max_context=len(p) + n)) + (64 << 10)
    with powerlow.load(tiny_dir, RuntimeConfig(budget_bytes=b, max_context=len(p) + n)) as m:
        assert m.tf.kv.limit == len(p) + n
        always = ListDrafter(lambda ctx, k, r=ref, n0=len(p): r[len(ctx) - n0: len(ctx) - n0 + k])
        got = [t.id for t in m._generate(p, n, SamplingParams(), always, 8)]
        assert got == ref and m.tf.kv.length <= m.tf.kv.limit
        assert m.stats.extra["speculation"].passes <= -(-(n - 1) // 9) + 1
