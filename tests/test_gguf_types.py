"""GGUF tensor types: the GGML block formats are kept as they are (bit-exact), Q2_K/Q3_K re-quantized to q4_k with a
notice, floats stored 8-bit; a tiny llama model written in each type by tests/archs_util.write_gguf."""
from __future__ import annotations

import json

import numpy as np
import pytest

from archs_util import write_gguf
from powerlow import formats
from powerlow.convert import convert
from powerlow.manifest import load_manifest
from powerlow.stream import TensorFile, read_matrix
from synthetic import make_hf_model


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    # 256-wide hidden and FFN: the K-quants need rows of whole 256-blocks (gate/up and the bundles' down columns)
    return make_hf_model(tmp_path_factory.mktemp("types") / "hf", hidden=256, intermediate=512, layers=2, heads=4,
                         kv_heads=2, vocab=300, max_positions=128, seed=3)


def _stored(d, name):
    m = load_manifest(d)
    tf = TensorFile(d / "resident.safetensors")
    try:
        return read_matrix(m["tensors"], tf, name)
    finally:
        tf.close()


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1"])
def test_block_formats_are_kept_bit_exact(hf, tmp_path, qtype):
    import gguf
    g = write_gguf(hf, tmp_path / "m.gguf", qtype)
    d = convert(g, tmp_path / "m", progress=False)
    m = load_manifest(d)
    fmt = {"Q8_0": "q8"}.get(qtype, qtype.lower())
    assert m["formats"]["ffn"] == fmt and m["tensors"]["blk.0.attn_output"]["fmt"] == fmt
    t = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}["blk.1.attn_output.weight"]
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(256, 256)
    assert np.array_equal(formats.dequantize(_stored(d, "blk.1.attn_output")), want)
    import powerlow
    with powerlow.load(d) as model:
        assert np.isfinite(model.forward([1, 5, 9, 33])).all()


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K"])
def test_low_k_quants_are_requantized_with_a_notice(hf, tmp_path, qtype, capfd):
    import gguf
    g = write_gguf(hf, tmp_path / "m.gguf", qtype)
    d = convert(g, tmp_path / "m", progress=False)
    err = capfd.readouterr().err
    assert f"has {qtype} tensors" in err and "re-quantized to q4_k" in err
    m = load_manifest(d)
    assert m["formats"]["ffn"] == "q4_k" and m["tensors"]["blk.0.attn_output"]["fmt"] == "q4_k"
    t = {t.name: t for t in gguf.GGUFReader(str(g)).tensors}["blk.1.attn_output.weight"]
    want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(256, 256)
    got = formats.dequantize(_stored(d, "blk.1.attn_output"))
    # q4_k at 4.5 bits holds 2-3.4-bit values to within a fraction of their own step
    assert np.abs(got - want).max() <= 0.25 * np.abs(want).max()


@pytest.mark.parametrize("qtype", ["F32"])
def test_float_gguf_is_stored_8_bit(hf, tmp_path, qtype):
    d = convert(write_gguf(hf, tmp_path / "m.gguf", qtype), tmp_path / "m", progress=False)
    assert json.loads((d / "manifest.json").read_text())["formats"]["ffn"] == "q8"
