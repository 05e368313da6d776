"""Every architecture family (llama, llama3 RoPE, mistral, qwen2, qwen3, gemma3, phi3), from a tiny random
transformers model: HF route against transformers, prefill + decode against one forward, the GGUF route (F32 and
Q8_0, written as llama.cpp's converter does) against the HF route, and bad checkpoints refused at convert with a
PowerlowError."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import powerlow
from powerlow.convert import convert
from powerlow.errors import PowerlowError

import transformers  # noqa: F401  (the test extras: missing is a failure)
from archs_util import KINDS, hf_logits, make_tiny, tiny_models, write_gguf  # noqa: E402

IDS = list(range(3, 40))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """kind -> (HF folder, model dir converted with --bits 8), made once per module."""
    return tiny_models(tmp_path_factory)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_route_matches_transformers(tiny, kind):
    """8-bit weights and int8 activations against float32 transformers (tolerance of test_tiny_models), and
    prefill + token-by-token decode equal to one full forward."""
    hf, d = tiny(kind)
    ref = hf_logits(hf, IDS)
    model = powerlow.load(d)
    full = model.forward(IDS)
    rel = np.linalg.norm(full - ref) / np.linalg.norm(ref)
    print(f"\n{kind}: relative L2 error vs transformers {rel:.4f}")
    assert rel < 0.03
    model.forward(IDS[:20])
    inc = [model.forward([IDS[i]], start_pos=i)[0] for i in range(20, len(IDS))]
    np.testing.assert_allclose(np.stack(inc), full[20:], rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_route_equals_hf_route(tiny, kind, qtype, tmp_path):
    """The same weights as a GGUF (metadata keys, tensor names, Q/K permutation for llama, +1 on gemma3 norms as
    llama.cpp writes them) give the HF route's logits."""
    hf, d = tiny(kind)
    g = write_gguf(hf, tmp_path / "m.gguf", qtype)
    a = powerlow.load(convert(g, tmp_path / "g", progress=False))
    b = powerlow.load(d)
    assert a.tf.config.arch == ("llama" if kind in ("llama3", "mistral") else kind)
    la, lb = a.forward(IDS), b.forward(IDS)
    np.testing.assert_allclose(la, lb, rtol=0, atol=1e-3 * np.abs(lb).max())


def test_config_fields_per_family(tiny):
    cfg = {k: powerlow.load(tiny(k)[1]).tf.config for k in ("llama3", "mistral", "qwen2", "qwen3", "gemma3", "phi3")}
    assert cfg["phi3"].sliding_window == 9 and cfg["phi3"].swa_layers == (0, 1, 2)
    assert len(cfg["llama3"].rope_freq_factors) == 8 and max(cfg["llama3"].rope_freq_factors) == 8.0
    assert cfg["mistral"].sliding_window == 7 and cfg["mistral"].swa_layers == (0, 1, 2)
    assert cfg["qwen2"].attn_bias and cfg["qwen2"].tie_embeddings
    assert cfg["qwen3"].qk_norm and cfg["qwen3"].head_dim == 32 and not cfg["qwen3"].attn_bias
    g = cfg["gemma3"]
    assert (g.hidden_act, g.qk_norm, g.post_norms, g.swa_layers, g.sliding_window) == ("gelu_tanh", True, True, (0, 2), 6)
    assert (g.rope_theta, g.rope_theta_local, g.embed_scale, g.logit_softcap) == (1e6, 1e4, 8.0, 3.0)


def test_llama3_fused_equals_unfused(tiny):
    """The llama3 frequency factors reach both the fused attn_block (its rope tables) and the op sequence."""
    m = powerlow.load(tiny("llama3")[1])
    fused = m.forward(IDS)
    m.tf.fused = False
    np.testing.assert_array_equal(m.forward(IDS), fused)


@pytest.mark.parametrize("kind", KINDS)
def test_every_family_fused_equals_unfused(tiny, kind):
    """Every family's attention block runs fused (qwen3's QK-norm, mistral's / phi3's sliding window, gemma3's
    QK-norm, attention scale, post-attention norm, sliding window and local RoPE base), and the whole pass in one
    compiled loop (gemma3's post-FFN norm and second RoPE base in it too): the same bits as the op sequence (prefill,
    then decode steps past the tiny models' windows of 6-9 positions)."""
    m = powerlow.load(tiny(kind)[1])
    loop = m.tf._layer_loop()
    assert loop is not None
    if kind == "gemma3":          # the tiny gemma3 has both kinds of layer and a post-FFN norm on every layer
        assert any(loop.local) and not all(loop.local) and all(p is not None for p in loop.post_ffn)
    ids = list(IDS) + [3, 1, 4, 1, 5]

    def run():
        out = [m.forward(ids[:6])]
        return out + [m.tf.forward([int(i)], start_pos=6 + j) for j, i in enumerate(ids[6:])]
    fused = run()
    m.tf.fused = False
    assert m.tf._layer_loop() is None
    for a, b in zip(fused, run()):
        np.testing.assert_array_equal(a, b)


def test_qwen3_streamed_attention_equals_resident(tmp_path, monkeypatch):
    """qwen3 at its minimum budget: attention layers stream through the ring and run the fused block on the ring's
    views with the layer's resident QK-norms; the same logits as the resident model, bit for bit (prefill and
    decode). The model is test_stream's shape (untied, a vocabulary of 3000) so that streaming pays."""
    import torch
    import powerlow.plan as plan_mod
    from powerlow.config import RuntimeConfig
    from powerlow.manifest import load_manifest
    from powerlow.plan import minimum_budget
    from synthetic import build_tokenizer
    monkeypatch.setattr(plan_mod, "tokenizer_load_peak", lambda path: 0)     # the tiny model can stream then
    cfg = transformers.Qwen3Config(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, vocab_size=3000, tie_word_embeddings=False,
                                   max_position_embeddings=128)
    torch.manual_seed(3)
    hf = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape))     # q/k norms that matter
    hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True)
    build_tokenizer(3000).save(str(tmp_path / "hf" / "tokenizer.json"))
    d = convert(tmp_path / "hf", tmp_path / "m", bits="4", progress=False)

    def run(rt):
        with powerlow.load(d, rt) as m:
            out = [m.forward(IDS)] + [m.tf.forward([int(i)], start_pos=len(IDS) + j) for j, i in enumerate(IDS[:3])]
            return out, sorted(m.tf._ring_of_layer)
    want, _ = run(RuntimeConfig(draft="none"))
    got, streamed = run(RuntimeConfig(budget_bytes=minimum_budget(d, load_manifest(d), RuntimeConfig(draft="none")),
                                      draft="none"))
    assert streamed                                       # some attention layers stream
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_sliding_window_matters(tiny, tmp_path):
    """Mistral's window changes transformers' logits well past the tolerance: the window test above is real."""
    hf, _ = tiny("mistral")
    full = tmp_path / "nowindow"
    shutil.copytree(hf, full)
    c = json.loads((full / "config.json").read_text())
    c["sliding_window"] = None
    (full / "config.json").write_text(json.dumps(c))
    a, b = hf_logits(hf, IDS), hf_logits(full, IDS)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) > 0.1


def test_gemma3_query_pre_attn_scalar(tiny, tmp_path):
    """query_pre_attn_scalar other than head_dim (the 27B's case) sets the attention scale."""
    hf, _ = tiny("gemma3")
    alt = tmp_path / "hf"
    shutil.copytree(hf, alt)
    c = json.loads((alt / "config.json").read_text())
    c["query_pre_attn_scalar"] = 20
    (alt / "config.json").write_text(json.dumps(c))
    m = powerlow.load(convert(alt, tmp_path / "m", bits="8", progress=False))
    assert m.tf.config.attn_scale == pytest.approx(20 ** -0.5)
    ref = hf_logits(alt, IDS)
    assert np.linalg.norm(m.forward(IDS) - ref) / np.linalg.norm(ref) < 0.03


def test_old_manifest_config_loads():
    """A manifest config written before the registry (no new keys) loads with the plain-llama defaults."""
    from powerlow.arch import ModelConfig
    old = dict(arch="llama", vocab_size=300, hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
               head_dim=16, rms_eps=1e-5, rope_theta=1e4, max_positions=128, hidden_act="silu", tie_embeddings=False,
               attn_bias=False, rope_scaling_factor=1.0, bos_id=1, eos_ids=[2])
    c = ModelConfig.from_json(old)
    assert c.swa_layers == () and c.embed_scale == 1.0 and not c.qk_norm and not c.post_norms
    assert ModelConfig.from_json(c.to_json()) == c


# -- bad input ------------------------------------------------------------------------------------------------

def test_unsupported_hf_architecture_names_the_supported(tiny, tmp_path):
    hf, _ = tiny("llama")
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    c = json.loads((bad / "config.json").read_text())
    c.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(PowerlowError, match="'gpt_neox' is not supported; powerlow runs llama, mistral, qwen2, qwen3, gemma3, phi3"):
        convert(bad, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("override,match", [
    ({"embedding_length": 80}, r"token_embd is \(300, 64\) but the config says \(300, 80\).*disagree"),
    ({"attention.head_count": 0}, "head_count = 0 must be positive"),
    ({"feed_forward_length": 100}, r"ffn_gate is \(96, 64\) but the config says \(100, 64\).*feed_forward_length"),
    ({"attention.head_count_kv": 4}, r"attn_k is \(32, 64\).*head_count_kv"),
])
def test_gguf_metadata_disagreeing_with_tensors(tiny, tmp_path, override, match):
    hf, _ = tiny("qwen2")
    g = write_gguf(hf, tmp_path / "bad.gguf", "F32", **override)
    with pytest.raises(PowerlowError, match=match):
        convert(g, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))


def test_hf_config_disagreeing_with_tensors(tiny, tmp_path):
    hf, _ = tiny("qwen3")
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    c = json.loads((bad / "config.json").read_text())
    c["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(PowerlowError, match=r"ffn_gate is \(96, 64\) but the config says \(128, 64\)"):
        convert(bad, tmp_path / "m", progress=False)


def test_real_qwen_gguf_metadata(qwen_gguf):
    """The real Qwen2.5-Coder-1.5B Q4_K_M file's metadata."""
    p = qwen_gguf
    from powerlow.loaders.gguf_file import GGUFSource
    c = GGUFSource(p).config
    assert (c.arch, c.hidden_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim) == ("qwen2", 1536, 28, 12, 2, 128)
    assert c.attn_bias and c.rope_theta == 1e6 and not c.swa_layers and not c.qk_norm


@pytest.mark.parametrize("hidden", [64, 640, 1152, 2560])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_gemma3_embed_scale_in_the_embedding_dtype(hidden, dtype):
    """sqrt(hidden) rounded as transformers rounds it (a tensor cast to the weights' dtype)."""
    import torch
    from powerlow.models.gemma3 import _embed_scale
    want = torch.tensor(hidden ** 0.5).to(getattr(torch, dtype)).float().item()
    assert _embed_scale(hidden, dtype) == want


@pytest.mark.parametrize("kind,edit,match", [
    ("qwen3", {"num_attention_heads": 0}, "num_attention_heads = 0 must be positive"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
     "rope scaling type 'yarn' is not supported \\(powerlow runs none, linear and llama3\\)"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}},
     "llama3 rope scaling lacks 'low_freq_factor'"),
    ("gemma3", {"text_config": {}}, "lacks 'hidden_size'"),
    ("mistral", {"layer_types": ["sliding_attention"]}, "layer_types must list"),
])
def test_bad_hf_configs(tiny, tmp_path, kind, edit, match):
    hf, _ = tiny(kind)
    bad = tmp_path / "hf"
    shutil.copytree(hf, bad)
    c = json.loads((bad / "config.json").read_text())
    c.update(edit)
    (bad / "config.json").write_text(json.dumps(c))
    with pytest.raises(PowerlowError, match=match):
        convert(bad, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_gemma3_vision_language_checkpoint_converts_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: text_config + tensors under language_model.model.; text-only logits as
    transformers' full model gives them (the vision tower is left out)."""
    import torch
    import transformers as T
    from archs_util import VOCAB
    from synthetic import build_tokenizer
    tc = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
              layer_types=["sliding_attention", "full_attention"])
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=tc, vision_config=vc, mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and p.ndim == 2:
                p.copy_(0.05 * torch.randn(p.shape))
    hf = tmp_path / "hf"
    model.save_pretrained(str(hf))
    build_tokenizer(VOCAB).save(str(hf / "tokenizer.json"))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([IDS])).logits[0].float().numpy()
    m = powerlow.load(convert(hf, tmp_path / "m", bits="8", progress=False))
    assert m.tf.config.arch == "gemma3" and m.tf.config.swa_layers == (0,)
    ours = m.forward(IDS)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"\ngemma3 vision-language checkpoint, text model: relative L2 error vs transformers {rel:.4f}")
    assert rel < 0.03


def test_layer_loop_refuses_bad_gemma3_parts(tiny):
    """The compiled loop's per-layer gemma3 parts are checked: local layers run without their RoPE tables, a
    post_ffn / local list of the wrong length, a post-FFN norm of the wrong length, a local_rope flag that is not
    0 / 1: ValueError naming it."""
    from powerlow import kernels, steps
    m = powerlow.load(tiny("gemma3")[1])
    m.forward(list(IDS[:2]))          # the KV caches exist after a pass
    tf = m.tf
    loop = tf._layer_loop()
    cfg = tf.config
    x = np.zeros((1, cfg.hidden_size), np.float32)
    pos = np.arange(1)
    glob, local = kernels.rope_tables(pos, cfg.head_dim, cfg.rope_theta), \
        kernels.rope_tables(pos, cfg.head_dim, cfg.rope_theta_local)

    def run(lp, *extra):
        return lp.run(x.copy(), np.empty_like(x), tf.kv.k, tf.kv.v, 0, glob, cfg.rms_eps, tf._attn_scratch(1), *extra)
    assert run(loop, local) == 0
    with pytest.raises(ValueError, match="local RoPE tables"):
        run(loop)
    with pytest.raises(ValueError, match="one post_ffn and local entry per layer"):
        steps.LayerLoop(loop.layers, loop.step, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, post_ffn=[None])
    bad = steps.LayerLoop(loop.layers, loop.step, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                          post_ffn=[np.ones(cfg.hidden_size - 1, np.float32)] + loop.post_ffn[1:], local=loop.local)
    with pytest.raises(ValueError, match="post_ffn must have"):
        run(bad, local)
    lw = loop.layers[0]
    which, fq, tlq, qs, d, m, qtl, fo, tlo, oqs, od, om, otl, parts = kernels._attn_args(lw, x, None)
    with pytest.raises(ValueError, match="local_rope must be 0 or 1"):
        loop._s.set_layer(0, which, fq, tlq, qs, d, m, qtl, lw.bqkv, fo, tlo, oqs, od, om, otl, lw.attn_norm,
                          lw.ffn_norm, parts, *kernels.attn_extras(lw), local_rope=2)
