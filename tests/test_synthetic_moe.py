"""The synthetic MoE maker (scripts/synthetic_moe.py): a qwen3moe GGUF as llama.cpp lays it out, the planted
expert frequencies reached, co-selection planted, and powerlow running what it writes."""
from __future__ import annotations

import numpy as np
import pytest

import powerlow
from powerlow.convert import convert
from powerlow.errors import PowerlowError
from synthetic_moe import (MoESpec, calibration_frequencies, planted_from_gguf, spec_of,  # noqa: E402
                           write_moe_gguf)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    spec = spec_of("moe-tiny", calib_seqs=8)
    return spec, write_moe_gguf(root / "t.gguf", spec), root


def test_gguf_layout(tiny_moe):
    import gguf
    spec, path, _ = tiny_moe
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "qwen3moe"
    f = {k: r.fields[f"qwen3moe.{k}"].contents() for k in ("expert_count", "expert_used_count",
                                                          "expert_feed_forward_length", "block_count")}
    assert f == {"expert_count": 8, "expert_used_count": 2, "expert_feed_forward_length": 64, "block_count": 2}
    t = {x.name: x for x in r.tensors}
    E, F, D = spec.experts, spec.expert_ffn, spec.hidden
    assert tuple(reversed(t["blk.1.ffn_gate_exps.weight"].shape.tolist())) == (E, F, D)
    assert tuple(reversed(t["blk.1.ffn_down_exps.weight"].shape.tolist())) == (E, D, F)
    assert t["blk.1.ffn_gate_exps.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    assert path.stat().st_size >= spec.file_bytes()


def test_planted_frequencies_reached_and_coselected(tiny_moe):
    spec, path, _ = tiny_moe
    planted, measured = calibration_frequencies(path)
    np.testing.assert_allclose(planted.sum(axis=1), spec.top_k, rtol=1e-9)
    np.testing.assert_allclose(planted, planted_from_gguf(path))
    assert np.abs(measured - planted).max() < 0.05           # on the calibration batch the biases were fitted on
    top = np.sort(planted, axis=1)[:, ::-1]
    assert (top[:, : spec.experts // 4].sum(axis=1) / spec.top_k > 0.45).all()   # skewed, not uniform


def test_powerlow_runs_it_and_the_router_follows_the_plant(tiny_moe):
    """Converted, profiled on text: the experts chosen most are the planted-hot ones (rank correlation), and
    group mates (experts 2g, 2g+1) are chosen together more often than other pairs."""
    from safetensors.numpy import load_file
    from powerlow.profile import profile_model
    spec, path, root = tiny_moe
    d = convert(path, root / "m", progress=False)
    model = powerlow.load(d)
    assert model.tf.config.n_experts == spec.experts and model.tf.config.norm_topk
    profile_model(d, n_tokens=1024, progress=False)           # the default text (CPython's pydoc topics)
    p = load_file(str(d / "profile.safetensors"))
    planted = planted_from_gguf(path)
    for l in range(spec.layers):
        assert np.corrcoef(planted[l], p["expert_freq"][l])[0, 1] > 0.6, l
        f = p["expert_freq"][l]
        lift = p["co_select"][l] / np.maximum(np.outer(f, f), 1e-9)
        mates = np.mean([lift[e, e ^ 1] for e in range(spec.experts)])
        others = np.mean([lift[a, b] for a in range(spec.experts) for b in range(spec.experts) if a != b and b != a ^ 1])
        assert mates > 1.5 * others, (l, mates, others)


@pytest.mark.parametrize("kw,match", [(dict(top_k=9), "top_k 9 > experts 8"), (dict(expert_ffn=48), "multiples of 32"),
                                      (dict(group=3), "group"), (dict(qtype="Q2_K"), "qtype")])
def test_bad_specs(kw, match):
    with pytest.raises(PowerlowError, match=match):
        spec_of("moe-tiny", **kw)
    with pytest.raises(PowerlowError, match="no MoE preset"):
        spec_of("moe-huge")
    assert isinstance(spec_of("moe-2gb"), MoESpec) and 1.9e9 < spec_of("moe-2gb").file_bytes() < 2.3e9
