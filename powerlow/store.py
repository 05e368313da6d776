"""ffn.bin, the neuron-cluster store: every layer's FFN as 4 KiB-aligned bundles, one per cluster of C neurons.

Bundle c of layer l starts at ``layer_offsets[l] + c * layouts[l].stride`` and holds (see formats.BundleLayout):
  gate  QMatrix (C, K)  rows of ffn_gate for the cluster's neurons
  up    QMatrix (C, K)  rows of ffn_up
  down  QMatrix (K, C)  ffn_down[:, cluster], quantized along the neurons (keeps GGUF's down blocks whole)
Neurons are stored in ``order[l]`` (hot-first after `powerlow profile`; identity after convert).

A layer's formats are its source's: a GGUF quantization mix such as Q4_K_M stores ffn_down as Q6_K in some
layers and Q4_K in others, and both are kept without loss, so bundles of different layers may differ in size
(``layouts[l]``). ``layout`` is the layout with the largest stride: the size of one slot of the offloaded
run's cache (a slot holds a bundle of any layer); cluster size C and hidden size K are the same in every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from . import formats
from .errors import PowerlowError

ALIGN = 4096


@dataclass(frozen=True)
class StoreInfo:
    layouts: tuple["formats.BundleLayout", ...]   # per layer
    n_layers: int
    n_neurons: int          # F (real neurons per layer)
    n_clusters: int         # per layer; n_clusters * C >= F (the last cluster may be zero-padded)
    layer_offsets: tuple[int, ...]

    @property
    def layout(self) -> "formats.BundleLayout":
        """The layout with the largest stride (a cache slot's size; every layer's C and K)."""
        return max(self.layouts, key=lambda lay: lay.stride)

    @property
    def uniform(self) -> bool:
        return len(set(self.layouts)) == 1

    @property
    def cluster_size(self) -> int:
        return self.layouts[0].C

    def layer_bytes(self, layer: int) -> int:
        return self.n_clusters * self.layouts[layer].stride

    @property
    def total_bytes(self) -> int:
        return sum(self.layer_bytes(l) for l in range(self.n_layers))

    def bundle_offset(self, layer: int, cluster: int) -> int:
        return self.layer_offsets[layer] + cluster * self.layouts[layer].stride

    def to_json(self) -> dict:
        lay = self.layouts[0]
        d = {"fmt": lay.fmt, "down_fmt": lay.down_fmt, "cluster_size": lay.C, "hidden": lay.K,
             "bundle_bytes": lay.nbytes, "stride": lay.stride, "n_layers": self.n_layers,
             "n_neurons": self.n_neurons, "n_clusters": self.n_clusters, "layer_offsets": list(self.layer_offsets)}
        if not self.uniform:      # fmt/down_fmt/stride above are layer 0's
            d["layer_formats"] = [[x.fmt, x.down_fmt] for x in self.layouts]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "StoreInfo":
        try:
            C, K, L, nC = int(d["cluster_size"]), int(d["hidden"]), int(d["n_layers"]), int(d["n_clusters"])
            fmts = d.get("layer_formats") or [[d["fmt"], d["down_fmt"]]] * L
            offsets = tuple(int(o) for o in d["layer_offsets"])
            lays = tuple(formats.BundleLayout.make(f, df, C, K) for f, df in fmts)
            F = int(d["n_neurons"])
        except (KeyError, TypeError, ValueError) as e:
            raise PowerlowError(f"manifest.json: the ffn store description is incomplete or corrupt ({type(e).__name__}: "
                                f"{e}); re-convert the model") from None
        if lays[0].stride != d["stride"] or lays[0].nbytes != d["bundle_bytes"]:
            raise PowerlowError("ffn.bin bundle layout in the manifest does not match this powerlow's format "
                                f"({d['stride']} vs {lays[0].stride} bytes per bundle); re-convert the model")
        if len(lays) != L or len(offsets) != L:
            raise PowerlowError(f"manifest.json: the ffn store lists {len(offsets)} layer offsets and {len(lays)} layer "
                                f"formats for {L} layers; re-convert the model")
        if L < 1 or nC < 1 or not 0 < F <= nC * C:
            raise PowerlowError(f"manifest.json: the ffn store has {L} layers of {nC} clusters of {C} for {F} neurons "
                                "(impossible); re-convert the model")
        # layers lie back to back in ffn.bin: any other offset reads outside the file or another layer's bundles
        want = np.concatenate([[0], np.cumsum([nC * lay.stride for lay in lays])[:-1]]).astype(np.int64)
        bad = [l for l in range(L) if offsets[l] != want[l]]
        if bad:
            l = bad[0]
            raise PowerlowError(f"manifest.json: ffn layer_offsets[{l}] is {offsets[l]}, the store's layout puts layer {l} at "
                                f"{want[l]} (corrupt or edited manifest); re-convert the model")
        return cls(lays, L, F, nC, offsets)

    @classmethod
    def plan(cls, fmt, down_fmt, C: int, K: int, F: int, n_layers: int) -> "StoreInfo":
        """fmt, down_fmt: one format for every layer, or a list with one per layer."""
        fmts = fmt if isinstance(fmt, (list, tuple)) else [fmt] * n_layers
        dfmts = down_fmt if isinstance(down_fmt, (list, tuple)) else [down_fmt] * n_layers
        lays = tuple(formats.BundleLayout.make(f, df, C, K) for f, df in zip(fmts, dfmts))
        n_clusters = -(-F // C)
        offsets = np.concatenate([[0], np.cumsum([n_clusters * lay.stride for lay in lays])[:-1]])
        return cls(lays, n_layers, F, n_clusters, tuple(int(o) for o in offsets))


def _as_format(w, fmt: str) -> "formats.QMatrix":
    if isinstance(w, formats.QMatrix):
        if w.fmt == fmt:
            return w
        w = formats.dequantize(w)
    return formats.quantize(np.ascontiguousarray(w, dtype=np.float32), fmt)


def _pad_rows(w: np.ndarray, n: int) -> np.ndarray:
    if w.shape[0] == n:
        return w
    out = np.zeros((n,) + w.shape[1:], dtype=np.float32)
    out[: w.shape[0]] = w
    return out


def write_layer(f: BinaryIO, info: StoreInfo, layer: int, gate, up, down, order: np.ndarray | None = None) -> None:
    """Append layer ``layer``'s bundles to ``f``. gate/up: (F, K), down: (K, F); float32 arrays or QMatrix.

    ``order`` permutes the neurons (new position i holds old neuron order[i]). Gate/up rows permute exactly;
    down columns permute exactly only when whole quantization groups move together, else down is
    re-quantized into ``layout.down_fmt`` from its dequantized values.
    """
    lay = info.layouts[layer]
    C, F = lay.C, info.n_neurons
    Fp = info.n_clusters * C
    lossless = (order is None or np.array_equal(order, np.arange(F))) and Fp == F
    if lossless and all(isinstance(w, formats.QMatrix) for w in (gate, up, down)) \
            and gate.fmt == up.fmt == lay.fmt and down.fmt == lay.down_fmt:
        gq, uq, dq = gate, up, down
    else:
        def rows(w):
            a = formats.dequantize(w) if isinstance(w, formats.QMatrix) else w
            return _pad_rows(a if order is None else a[order], Fp)
        gq = _as_format(rows(gate), lay.fmt) if not (lossless and isinstance(gate, formats.QMatrix) and gate.fmt == lay.fmt) else gate
        uq = _as_format(rows(up), lay.fmt) if not (lossless and isinstance(up, formats.QMatrix) and up.fmt == lay.fmt) else up
        if lossless and isinstance(down, formats.QMatrix) and down.fmt == lay.down_fmt:
            dq = down
        else:
            d = formats.dequantize(down) if isinstance(down, formats.QMatrix) else down
            d = d if order is None else d[:, order]
            dq = _as_format(np.ascontiguousarray(_pad_rows(d.T, Fp).T), lay.down_fmt)
    buf = bytearray(lay.stride)
    for c in range(info.n_clusters):
        rows_c = np.arange(c * C, (c + 1) * C)
        parts = ((lay.gate_off, formats.select_rows(gq, rows_c)), (lay.up_off, formats.select_rows(uq, rows_c)),
                 (lay.down_off, formats.select_cols_blocks(dq, c * C, (c + 1) * C)))
        buf[:] = bytes(lay.stride)
        for off, q in parts:
            b = q.to_bytes()
            buf[off: off + len(b)] = b
        f.write(buf)


def read_layer_matrices(mm: np.ndarray, info: StoreInfo, layer: int):
    """Reassemble a layer's (gate, up, down) as float32 (F, K), (F, K), (K, F) in stored neuron order (for tests/tools)."""
    lay = info.layouts[layer]
    gs, us, ds = [], [], []
    for c in range(info.n_clusters):
        base = info.bundle_offset(layer, c)
        gs.append(formats.dequantize(formats.QMatrix.from_buffer(lay.fmt, lay.C, lay.K, mm, base + lay.gate_off)))
        us.append(formats.dequantize(formats.QMatrix.from_buffer(lay.fmt, lay.C, lay.K, mm, base + lay.up_off)))
        ds.append(formats.dequantize(formats.QMatrix.from_buffer(lay.down_fmt, lay.K, lay.C, mm, base + lay.down_off)))
    F = info.n_neurons
    return np.concatenate(gs)[:F], np.concatenate(us)[:F], np.concatenate(ds, axis=1)[:, :F]
