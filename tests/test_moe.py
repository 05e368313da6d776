"""Mixture-of-experts models (qwen3moe, qwen2moe with its shared expert, mixtral): tiny random transformers models
against transformers, the GGUF route against the HF route, the expert kernel against the numpy reference, the
same bits for a token alone or in a batch, offloaded runs against resident ones, and bad input refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import powerlow
from powerlow import formats, kernels, reference
from powerlow.config import RuntimeConfig
from powerlow.convert import convert
from powerlow.errors import PowerlowError
from powerlow.manifest import load_manifest
from powerlow.plan import make_plan, minimum_budget
from powerlow.store import StoreInfo

import transformers  # noqa: F401  (the test extras: missing is a failure)
from archs_util import MOE_KINDS, make_tiny, tiny_models, write_gguf  # noqa: E402

IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (HF folder, model dir converted with --bits 8), made once per module."""
    return tiny_models(tmp_path_factory)


def _hf_run(hf, ids):
    """transformers' logits and, per layer, each token's top-k expert set."""
    import torch
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        o = model(torch.tensor([list(ids)]), output_router_logits=True)
    routes = [torch.topk(r.float().softmax(-1), k, dim=-1).indices.numpy() for r in o.router_logits]
    return o.logits[0].float().numpy(), routes


def _record_routes(model):
    """Wrap the router so each call's (layer, experts (T, k)) is kept."""
    r = model.tf.ffn.router
    seen, top = [], r.top

    def rec(layer, h):
        idx, w = top(layer, h)
        seen.append((layer, idx.copy()))
        return idx, w
    r.top = rec
    return seen


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_matches_transformers(tiny, kind):
    """8-bit weights and int8 activations against float32 transformers. A router near a tie may pick another
    expert than transformers does after the 8-bit rounding (that token's logits then differ by far more than
    rounding): the routes must agree for >= 90% of (token, layer) pairs, and the tokens routed as transformers
    routes them must meet the dense families' tolerance (tests/test_archs.py)."""
    hf, d = tiny(kind)
    ref, hf_routes = _hf_run(hf, IDS)
    model = powerlow.load(d)
    seen = _record_routes(model)
    full = model.forward(IDS)
    ours = [idx for _, idx in seen]
    assert len(ours) == len(hf_routes) == model.tf.config.n_layers
    agree = np.array([[set(a) == set(b) for a, b in zip(o, h)] for o, h in zip(ours, hf_routes)])   # (L, T)
    same = agree.all(axis=0)
    rel = np.linalg.norm(full[same] - ref[same]) / np.linalg.norm(ref[same])
    print(f"\n{kind}: routes agree {agree.mean():.3f} of (token, layer); rel L2 error on those tokens {rel:.4f}, "
          f"on all {np.linalg.norm(full - ref) / np.linalg.norm(ref):.4f}")
    assert agree.mean() >= 0.9
    assert rel < 0.03


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_prefill_plus_decode_is_the_full_forward_bit_for_bit(tiny, kind):
    """A token's experts are computed from its own row only (kernels.moe_ffn): prefill, decode and a batch give
    the same bits (what exact speculative decoding and offloaded runs rely on)."""
    _, d = tiny(kind)
    model = powerlow.load(d)
    full = model.forward(IDS)
    model.forward(IDS[:20])
    inc = [model.forward([IDS[i]], start_pos=i)[0] for i in range(20, 26)]
    inc.append(model.forward(IDS[26:31], start_pos=26))
    np.testing.assert_array_equal(np.vstack(inc), full[20:31])


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_route_equals_hf_route(tiny, kind, qtype, tmp_path):
    """llama.cpp's layout (ffn_*_exps (E, F, K) / (E, K, F), ffn_gate_inp, shexp tensors, expert_* keys;
    Mixtral as architecture llama) gives the HF route's logits."""
    hf, d = tiny(kind)
    g = write_gguf(hf, tmp_path / "m.gguf", qtype)
    a = powerlow.load(convert(g, tmp_path / "g", progress=False))
    b = powerlow.load(d)
    ca, cb = a.tf.config, b.tf.config
    assert (ca.n_experts, ca.n_experts_used, ca.expert_ffn, ca.norm_topk, ca.shared_ffn) == \
        (cb.n_experts, cb.n_experts_used, cb.expert_ffn, cb.norm_topk, cb.shared_ffn)
    assert ca.arch == ("llama" if kind == "mixtral" else kind)
    la, lb = a.forward(IDS), b.forward(IDS)
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-3 * np.abs(lb).max())


def test_config_fields(tiny):
    assert powerlow.load(tiny("qwen3moe")[1]).tf.config.norm_topk is True
    q2 = powerlow.load(tiny("qwen2moe")[1]).tf.config
    assert (q2.norm_topk, q2.shared_ffn, q2.attn_bias) == (False, 64, True)
    mx = powerlow.load(tiny("mixtral")[1]).tf.config
    assert (mx.n_experts, mx.n_experts_used, mx.expert_ffn, mx.norm_topk) == (8, 2, 32, True)


# -- the kernel ------------------------------------------------------------------------------------
def _bundles(fmt, down_fmt, C, K, n, seed):
    info = StoreInfo.plan(fmt, down_fmt, C, K, n * C, 1)
    rng = np.random.default_rng(seed)
    buf = np.zeros(info.total_bytes, np.uint8)
    from io import BytesIO
    f = BytesIO()
    from powerlow.store import write_layer
    g = rng.standard_normal((n * C, K)).astype(np.float32) * 0.5
    u = rng.standard_normal((n * C, K)).astype(np.float32) * 0.5
    dn = rng.standard_normal((K, n * C)).astype(np.float32) * 0.2
    write_layer(f, info, 0, g, u, dn)
    buf[:] = np.frombuffer(f.getvalue(), np.uint8)
    ptrs = (buf.ctypes.data + np.arange(n, dtype=np.uint64) * np.uint64(info.layout.stride)).astype(np.uint64)
    return buf, ptrs, info.layout


@pytest.mark.parametrize("fmt,down_fmt,C", [("q8", "q8", 32), ("q4_0", "q4_0", 64), ("q4_k", "q6_k", 256)])
def test_moe_kernel_matches_reference_and_is_batch_independent(fmt, down_fmt, C):
    K, E, cpe, T = 256, 6, 2, 5
    buf, ptrs_all, lay = _bundles(fmt, down_fmt, C, K, E * cpe, seed=1)
    rng = np.random.default_rng(2)
    h = rng.standard_normal((T, K)).astype(np.float32)
    experts = np.array([0, 2, 3, 5])
    pairs = [(t, e) for e in experts for t in range(T) if (t + e) % 2 == 0 or e == 3]
    gs = np.array([0] + list(np.cumsum([sum(1 for _, e2 in pairs if e2 == e) for e in experts])), np.int32)
    tok = np.array([t for t, _ in pairs], np.int32)
    wt = rng.uniform(0.1, 1.0, len(pairs)).astype(np.float32)
    ptrs = np.concatenate([ptrs_all[e * cpe:(e + 1) * cpe] for e in experts]).astype(np.uint64)
    out = rng.standard_normal((T, K)).astype(np.float32)
    x0 = out.copy()
    kernels.moe_ffn(ptrs, lay, h, "silu", out, gs, tok, wt, cpe)
    ref = x0.copy()
    reference.moe_ffn(ptrs, lay, h, "silu", ref, gs, tok, wt, cpe, kernels.ffn_nchunks(cpe))
    np.testing.assert_allclose(out - x0, ref - x0, rtol=0, atol=2e-3 * np.abs(ref - x0).max())
    assert np.abs(out - x0).max() > 0.1                 # the experts did add something
    # each token alone: the same bits as in the batch
    for t in range(T):
        sel = [i for i, (tt, _) in enumerate(pairs) if tt == t]
        es = [pairs[i][1] for i in sel]
        one = x0[t:t + 1].copy()
        kernels.moe_ffn(np.concatenate([ptrs_all[e * cpe:(e + 1) * cpe] for e in es]).astype(np.uint64), lay,
                        np.ascontiguousarray(h[t:t + 1]), "silu", one, np.arange(len(es) + 1, dtype=np.int32),
                        np.zeros(len(es), np.int32), wt[sel], cpe)
        np.testing.assert_array_equal(one[0], out[t])
    # every SIMD variant this CPU runs gives those bits (the dispatcher may pick one for T = 1 and another for a
    # batch); the portable C variant's activation function rounds differently
    for isa in kernels.supported_isas:
        again = x0.copy()
        kernels.moe_ffn(ptrs, lay, h, "silu", again, gs, tok, wt, cpe, isa=isa)
        if isa == "generic":
            np.testing.assert_allclose(again, out, rtol=0, atol=1e-5 * np.abs(out).max())
        else:
            np.testing.assert_array_equal(again, out, err_msg=isa)


def test_moe_kernel_bad_groups():
    K, cpe = 256, 2
    buf, ptrs, lay = _bundles("q8", "q8", 32, K, 4, seed=3)
    h = np.zeros((2, K), np.float32)
    out = np.zeros_like(h)
    with pytest.raises(ValueError, match="cpe"):
        kernels.moe_ffn(ptrs[:3], lay, h, "silu", out, np.array([0, 1], np.int32), np.zeros(1, np.int32),
                        np.ones(1, np.float32), cpe)
    with pytest.raises(ValueError, match="token indices"):
        kernels.moe_ffn(ptrs[:2], lay, h, "silu", out, np.array([0, 1], np.int32), np.array([7], np.int32),
                        np.ones(1, np.float32), cpe)
    with pytest.raises(ValueError, match="gs must rise"):
        kernels.moe_ffn(ptrs[:2], lay, h, "silu", out, np.array([0, 3], np.int32), np.zeros(1, np.int32),
                        np.ones(1, np.float32), cpe)


# -- offloaded ------------------------------------------------------------------------------------
def _tokens(d, cfg, n=10):
    model = powerlow.load(d, cfg)
    try:
        ids = [t.id for t in model.generate(IDS[:8], n, ignore_eos=True)]
        src = model.tf.ffn_source
        return ids, (src.counters() if hasattr(src, "counters") else {}), model.tf.ffn.router.describe()
    finally:
        model.tf.close()


@pytest.mark.parametrize("kind", ["qwen3moe", "qwen2moe"])
def test_offloaded_equals_resident(tiny, kind):
    """Experts are the cache's units: at two budgets (one layer of bundles + a little; about half the experts) the
    tokens are the resident ones, bundles are read, and the lookahead's recall is counted."""
    _, d = tiny(kind)
    want, _, _ = _tokens(d, RuntimeConfig(draft="none"))
    info = StoreInfo.from_json(load_manifest(d)["ffn"])
    low = minimum_budget(d, load_manifest(d), RuntimeConfig(draft="none"))
    for budget in (low + 2 * info.layout.stride, low + info.total_bytes // 2):
        cfg = RuntimeConfig(budget_bytes=budget, draft="none")
        plan = make_plan(d, load_manifest(d), cfg)
        assert plan.n_hot < info.n_layers * info.n_clusters          # some experts stay on disk
        ids, c, desc = _tokens(d, cfg)
        assert ids == want, budget
        assert c["misses"] > 0 and c["bytes_read"] > 0
        assert desc["lookahead_recall"] is not None and 0.0 <= desc["lookahead_recall"] <= 1.0


def test_speculative_run_gives_the_plain_tokens(tiny):
    _, d = tiny("mixtral")
    plain, _, _ = _tokens(d, RuntimeConfig(draft="none"), n=16)
    spec, _, _ = _tokens(d, RuntimeConfig(draft="ngram", draft_k=4), n=16)
    assert spec == plain


def test_plan_shows_the_expert_budget(tiny):
    _, d = tiny("qwen3moe")
    low = minimum_budget(d, load_manifest(d), RuntimeConfig())
    text = make_plan(d, load_manifest(d), RuntimeConfig(budget_bytes=low + 4096 * 8)).render()
    assert "experts" in text


# -- bad input ------------------------------------------------------------------------------------
def test_modes(tiny, tmp_path):
    _, d = tiny("qwen3moe")
    with pytest.raises(PowerlowError, match="mixture-of-experts model.*mode experts"):
        powerlow.load(d, RuntimeConfig(mode="predict", density=0.5))
    from archs_util import make_tiny as mk
    dense = convert(mk("qwen3", tmp_path / "hf"), tmp_path / "m", bits="8", progress=False)
    with pytest.raises(PowerlowError, match="experts is for mixture-of-experts"):
        powerlow.load(dense, RuntimeConfig(mode="experts"))


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(mlp_only_layers=[1]), "every layer is experts"),
    (lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok 9"),
])
def test_bad_hf_moe_configs(tiny, tmp_path, edit, match):
    hf, _ = tiny("qwen2moe")
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    c = json.loads((bad / "config.json").read_text())
    edit(c)
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(PowerlowError, match=match):
        convert(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_expert_named(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file
    hf, _ = tiny("qwen3moe")
    bad = tmp_path / "bad"
    shutil.copytree(hf, bad)
    f = next(bad.glob("*.safetensors"))
    st = load_file(str(f))
    del st["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(st, str(f))
    with pytest.raises(PowerlowError, match=r"experts\.5\.up_proj.*expert 5 of 8"):
        convert(bad, tmp_path / "out", progress=False)


def test_gguf_expert_count_disagreeing_with_tensors(tiny, tmp_path):
    hf, _ = tiny("qwen3moe")
    g = write_gguf(hf, tmp_path / "m.gguf", "F32", expert_count=6)
    with pytest.raises(PowerlowError, match="expert_count"):
        convert(g, tmp_path / "out", progress=False)


def test_expert_store_layout(tiny):
    """An expert is whole bundles, and the bundles of expert e hold its rows: ffn.bin's layer 0 read back equals
    the HF experts side by side."""
    hf, d = tiny("qwen2moe")
    m = load_manifest(d)
    info = StoreInfo.from_json(m["ffn"])
    cfg = m["config"]
    assert cfg["expert_ffn"] % info.cluster_size == 0
    assert info.n_clusters * info.cluster_size == cfg["n_experts"] * cfg["expert_ffn"]
    from safetensors.numpy import load_file
    from powerlow.store import read_layer_matrices
    st = load_file(str(next(hf.glob("*.safetensors"))))
    g, u, dn = read_layer_matrices(np.fromfile(d / "ffn.bin", np.uint8), info, 0)
    F = cfg["expert_ffn"]
    for e in (0, 5):
        w = st[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"]
        np.testing.assert_allclose(g[e * F:(e + 1) * F], w, atol=np.abs(w).max() / 100)
        w = st[f"model.layers.0.mlp.experts.{e}.down_proj.weight"]
        np.testing.assert_allclose(dn[:, e * F:(e + 1) * F], w, atol=np.abs(w).max() / 100)


def test_profile_counts_experts_and_the_plan_pins_them(tiny, tmp_path):
    """`powerlow profile` on a MoE model counts the router's choices (each token picks k experts a layer); the next
    budgeted run pins the most chosen experts and still gives the resident tokens."""
    from powerlow.profile import profile_model
    from safetensors.numpy import load_file
    _, d0 = tiny("qwen3moe")
    d = tmp_path / "m"
    shutil.copytree(d0, d)
    want, _, _ = _tokens(d, RuntimeConfig(draft="none"))
    text = " ".join(f"word{i} and more text {i * 7}" for i in range(300))
    s = profile_model(d, text=text, n_tokens=400, progress=False, plot=str(tmp_path / "skew.png"))
    assert (tmp_path / "skew.png").stat().st_size > 1000
    p = load_file(str(d / "profile.safetensors"))
    freq = p["expert_freq"]
    np.testing.assert_allclose(freq.sum(axis=1), 2.0, rtol=1e-5)          # top-2: two choices a token
    np.testing.assert_allclose(np.diagonal(p["co_select"], axis1=1, axis2=2), freq, rtol=1e-6)
    assert 0.25 <= s["hot25_expert_share_mean"] <= 1.0
    info = StoreInfo.from_json(load_manifest(d)["ffn"])
    low = minimum_budget(d, load_manifest(d), RuntimeConfig(draft="none"))
    cfg = RuntimeConfig(budget_bytes=low + info.total_bytes // 3, draft="none")
    plan = make_plan(d, load_manifest(d), cfg)
    assert plan.hot_source == "profile"
    cpe = info.n_clusters // 8
    for l in range(info.n_layers):                 # the pinned bundles are the most chosen experts' first
        pinned = np.bincount(plan.hot_clusters[l] // cpe, minlength=8)
        if 0 < pinned.sum() < info.n_clusters:
            hot_e = np.flatnonzero(pinned)
            cold_e = np.flatnonzero(pinned == 0)
            assert freq[l][hot_e].min() >= freq[l][cold_e].max() - 1e-9
    ids, _, _ = _tokens(d, cfg)
    assert ids == want
