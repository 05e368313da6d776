"""A GGUF quant mix (Q4_K_M keeps ffn_down in Q6_K in some layers, Q4_K in others): each layer's bundles keep
their own formats, and resident, offloaded and streamed runs give the same tokens."""
from __future__ import annotations

import numpy as np

import powerlow
from powerlow import formats
from powerlow.config import RuntimeConfig
from powerlow.convert import convert
from powerlow.loaders import open_source
from powerlow.loaders.base import Source
from powerlow.manifest import load_manifest
from powerlow.plan import minimum_budget
from powerlow.store import StoreInfo, read_layer_matrices
from synthetic import make_hf_model

PROMPT = [5, 17, 33, 9, 100, 7]
DOWN = {0: "q8", 1: "q4_1", 2: "q4_0"}     # per layer


class MixedSource(Source):
    """A HF model whose layers' matrices arrive already quantized, in a different format per layer."""

    def __init__(self, hf):
        self.inner = open_source(hf)
        self.config, self.tokenizer_json = self.inner.config, self.inner.tokenizer_json
        self.chat_template, self.description = self.inner.chat_template, "mixed " + self.inner.description

    def get(self, name):
        w = self.inner.get(name)
        if np.ndim(w) == 2 and name.startswith("blk."):
            l = int(name.split(".")[1])
            return formats.quantize(w, DOWN[l] if name.endswith("ffn_down") else "q4_1")
        return w


def _tokens(d, cfg, n=10):
    m = powerlow.load(d, cfg)
    try:
        return [t.id for t in m.generate(PROMPT, n)]
    finally:
        m.close()


def test_mixed_layer_formats_are_kept_and_run_the_same(tmp_path):
    hf = make_hf_model(tmp_path / "hf", act="relu", seed=5, hidden=64, intermediate=256, layers=3, heads=4,
                       kv_heads=2, vocab=300, max_positions=128)
    src = MixedSource(hf)
    d = convert(src, tmp_path / "m", progress=False)
    info = StoreInfo.from_json(load_manifest(d)["ffn"])
    assert [lay.down_fmt for lay in info.layouts] == [DOWN[l] for l in range(3)]
    assert len({lay.stride for lay in info.layouts}) > 1          # the point: bundles differ in size per layer
    assert (d / "ffn.bin").stat().st_size == info.total_bytes
    mm = np.memmap(d / "ffn.bin", dtype=np.uint8, mode="r")
    for l in range(3):                                            # every layer's down kept without loss
        want = formats.dequantize(src.get(f"blk.{l}.ffn_down"))
        assert np.array_equal(read_layer_matrices(mm, info, l)[2], want)
    del mm
    resident = _tokens(d, RuntimeConfig())
    lo = minimum_budget(d, load_manifest(d), RuntimeConfig())
    for budget in (lo, lo + 5 * info.layout.stride):
        assert _tokens(d, RuntimeConfig(budget_bytes=budget)) == resident
    lo_gate = minimum_budget(d, load_manifest(d), RuntimeConfig(mode="gate"))
    assert _tokens(d, RuntimeConfig(budget_bytes=lo_gate + 3 * info.layout.stride, mode="gate")) == resident
