"""What profile, the predictors and their training share: reading a layer's gate/up rows out of the
bundles, the profile/predictors files and the check that they belong to the model dir they sit in.

Neuron ids everywhere in profile.safetensors and predictors.safetensors are *stored* ids (the order of
ffn.bin after `powerlow profile` re-laid it hot-first). Both files carry, in their metadata, a digest of
the model's neuron order and FFN shape (``order_digest``); a file whose digest differs from the manifest's
was made for another model or before a re-layout, and is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from powerlow import formats
from powerlow.errors import PowerlowError

PROFILE_FILE = "profile.safetensors"
PREDICTORS_FILE = "predictors.safetensors"
DENSITY_GRID = np.linspace(0.0, 1.0, 101)      # thresholds are tabulated at these densities


def order_digest(manifest: dict) -> str:
    """A short digest of what neuron ids mean in this model dir: FFN shape + the stored neuron order. The text
    hashed is json.dumps({... "order": neuron_order}, sort_keys=True) of the lists, written out here one layer
    at a time, so the order may be lists or the int32 arrays load_manifest keeps, with the same digest."""
    ffn = manifest["ffn"]
    key = {"n_layers": ffn["n_layers"], "n_neurons": ffn["n_neurons"], "hidden": ffn["hidden"],
           "cluster_size": ffn["cluster_size"]}
    order = manifest.get("neuron_order")
    text = json.dumps(key, sort_keys=True)[:-1]          # "order" sorts after every other key
    h = hashlib.sha256(text.encode())
    if order is None:
        h.update(b', "order": null}')
    else:
        h.update(b', "order": [')
        for l, row in enumerate(order):
            h.update(((", " if l else "") + "[" + ", ".join(map(str, np.asarray(row).tolist())) + "]").encode())
        h.update(b"]}")
    return h.hexdigest()[:16]


def concat_rows(parts: list) -> "formats.QMatrix":
    """Stack QMatrices with the same format and cols (the C-row gate/up pieces of every bundle)."""
    p0 = parts[0]
    planes = {n: np.ascontiguousarray(np.concatenate([q.planes[n] for q in parts])) for n in p0.planes}
    return formats.QMatrix(p0.fmt, sum(q.rows for q in parts), p0.cols, planes)


@dataclass(frozen=True)
class ModelParts:
    """What a predictor is built from, without the Transformer: the model dir and manifest (its profile and
    predictors files), the FFN store's layout, the activation, each layer's FFN norm weights (the lookahead
    re-scales by their ratio), and ffn.bin's bytes where a resident store already holds them (else None: read
    through a memmap)."""
    dir: Path
    manifest: dict
    info: "StoreInfo"
    act: str
    ffn_norms: list
    ffn_ram: np.ndarray | None = None

    @classmethod
    def of(cls, tf) -> "ModelParts":
        return cls(tf.dir, tf.manifest, tf.store_info, tf.config.hidden_act,
                   [np.asarray(tf.w[f"blk.{l}.ffn_norm"], np.float32) for l in range(tf.store_info.n_layers)],
                   getattr(tf.ffn_source, "buf", None))


def ffn_buffer(model: ModelParts) -> np.ndarray:
    """ffn.bin's bytes: the resident store's RAM copy, else a read-only memmap (pages read once, on demand)."""
    if model.ffn_ram is not None:
        return model.ffn_ram
    return np.memmap(model.dir / "ffn.bin", dtype=np.uint8, mode="r")


def drop_page_cache(model: ModelParts) -> None:
    """After reading gate rows through a memmap (offloaded runs), tell the kernel not to keep ffn.bin's pages:
    the budget, not the page cache, decides what stays in RAM."""
    if model.ffn_ram is None:
        from powerlow.io import drop_page_cache as drop
        drop(model.dir / "ffn.bin")


def layer_rows(buf, info, layer: int, which: str = "gate") -> "formats.QMatrix":
    """Layer ``layer``'s gate or up rows for all its clusters, (n_clusters*C, K), in stored order (copied)."""
    lay = info.layouts[layer]
    off = lay.gate_off if which == "gate" else lay.up_off
    return concat_rows([formats.QMatrix.from_buffer(lay.fmt, lay.C, lay.K, buf, info.bundle_offset(layer, c) + off)
                        for c in range(info.n_clusters)])


def act_fn(g: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(g, 0.0)
    if act == "gelu_tanh":
        from powerlow.reference import act_fn as ref_act
        return ref_act(g, act)
    return g / (1.0 + np.exp(-g))


def threshold_at(table: np.ndarray, density: float) -> float:
    """A per-layer threshold row tabulated on DENSITY_GRID (descending in density) at ``density``."""
    return float(np.interp(density, DENSITY_GRID, table))


def quantile_table(scores: np.ndarray) -> np.ndarray:
    """thresholds t[i] such that P(score > t[i]) ~ DENSITY_GRID[i]; t[0] = +inf, t[-1] = -inf."""
    s = np.asarray(scores, np.float64).reshape(-1)
    t = np.quantile(s, np.clip(1.0 - DENSITY_GRID, 0.0, 1.0))
    t[0], t[-1] = np.inf, -np.inf
    return t.astype(np.float64)


def load_checked(model_dir: Path, manifest: dict, name: str, make_cmd: str) -> tuple[dict, dict]:
    """(tensors, metadata) of profile/predictors file ``name``, refused when missing or made for another model."""
    from powerlow.stream import TensorFile

    path = Path(model_dir) / name
    if not path.exists():
        raise PowerlowError(f"{model_dir} has no {name}; run `{make_cmd}` first")
    try:
        tensors = LazyTensors(TensorFile(path))
    except PowerlowError as e:
        raise PowerlowError(f"{e}".replace("re-convert the model", f"re-run `{make_cmd}`")) from None
    meta = tensors.metadata
    ffn = manifest["ffn"]
    want = (ffn["n_layers"], ffn["n_neurons"], ffn["hidden"])
    got = tuple(int(x) for x in json.loads(meta.get("shape", "[0, 0, 0]")))
    if got != want:
        raise PowerlowError(f"{path} was made for another model (layers, neurons, hidden = {got}, this model has {want}); "
                            f"re-run `{make_cmd}`")
    if meta.get("order_digest") != order_digest(manifest):
        raise PowerlowError(f"{path} is stale: it was made for another neuron order of this model (the store was "
                            f"re-laid since, or the file comes from another model dir); re-run `{make_cmd}`")
    return tensors, meta


class LazyTensors:
    """A safetensors file as a read-only mapping whose tensors are read (pread) when asked for: a predictor
    takes what it needs layer by layer and the profile's training samples are never loaded at run time."""

    def __init__(self, tfile):
        self.tfile = tfile
        self.metadata = tfile.header_metadata

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.tfile.meta:
            raise KeyError(key)
        return self.tfile.read(key)

    def __contains__(self, key) -> bool:
        return key in self.tfile.meta

    def keys(self):
        return self.tfile.meta.keys()

    def get(self, key: str, default=None):
        return self[key] if key in self else default


def publish(path: Path) -> None:
    """Give a file written through atomic_path (mkstemp: mode 0600) the usual umask permissions."""
    import os
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def file_meta(manifest: dict, **extra) -> dict:
    """safetensors metadata (strings) binding a file to this model dir's FFN shape and neuron order."""
    ffn = manifest["ffn"]
    meta = {"shape": json.dumps([ffn["n_layers"], ffn["n_neurons"], ffn["hidden"]]), "order_digest": order_digest(manifest)}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta
