"""`powerlow profile DIR`: how often each FFN neuron fires, training samples for the predictors, and the
cluster store re-laid hot-first.

What counts as active (per token, layer l, neuron j; g = gate row j . h, u = up row j . h):
  * ReLU models: g > 0 (exact: the neuron contributes nothing otherwise);
  * SiLU models: |silu(g) * u| > t_l, t_l calibrated on the first window so that a share ``density`` of the
    layer's neurons is active (training-free, CATS/TEAL style; the engine's threshold modes use the gate).
Writes profile.safetensors (neuron ids are *stored* ids, i.e. after the re-layout):
  freq           (L, F)  float32  share of profiled tokens on which each neuron was active
  cluster_freq   (L, nC) float32  share of sampled tokens on which each cluster is computed: ReLU, it has an
                                  active neuron (gate mode); SiLU, threshold mode at ``density`` keeps it
  cluster_any    (L, nC) float32  share of sampled tokens on which each cluster had >= 1 active neuron
  mean_abs       (L, F)  float32  mean |act(g) * u| per neuron
  act_threshold  (L,)    float32  t_l above (SiLU; 0 for ReLU)
  gate_thr       (L, 101) float64 thresholds on |act(g)| per neuron for densities 0, 0.01, .., 1
  cluster_thr    (L, 101) float64 thresholds on a cluster's sum of |act(g)| for cluster densities 0 .. 1
  samples.h      (L, S, K) float16 FFN inputs of S sampled tokens (the same tokens in every layer)
  samples.mask   (L, S, ceil(F/8)) uint8  their active neurons, np.packbits along F
Re-lays ffn.bin hot-first, in one of two ways (``--relayout``):
  clusters (default)  whole clusters move, hottest first (by their neurons' summed firing frequency): every
                      bundle's bytes are kept, and the manifest's ``cluster_order[l]`` (the converted cluster
                      id at each stored position) lets the engine sum bundles in their original order, so the
                      outputs are bit-identical to before (a test);
  neurons             each neuron moves on its own, hottest first, so hot neurons share clusters (gate/up
                      rows move exactly; down columns are re-quantized to q8, since permuted columns mix GGUF
                      groups): outputs move slightly (SmolLM2 perplexity 11.254 -> 11.280).
The padded last cluster (when C does not divide the neuron count) stays last. The manifest's
``neuron_order[l]`` lists the original neuron id at each stored position. Old predictors are deleted (their
neuron ids no longer hold).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import PowerlowError

DEFAULT_TOKENS = 4096
DEFAULT_SAMPLES = 4096
DEFAULT_DENSITY = 0.3
WINDOW = 512          # tokens per profiled sequence
EVAL_EVERY = 5        # every 5th pydoc topic (sorted by name) is held out for evaluation


# ------------------------------------------------------------------ text
def default_texts() -> tuple[str, str]:
    """(calibration, evaluation) text from CPython's pydoc_data topics, which ship with every Python:
    topics sorted by name, every EVAL_EVERY-th one held out; paragraphs of a held-out topic that also
    appear in a calibration topic (pydoc repeats some) are dropped, so the two texts never overlap."""
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise PowerlowError("this Python has no pydoc_data (the default text); give text files with --text") from None
    keys = sorted(topics)
    cal = [topics[k] for i, k in enumerate(keys) if i % EVAL_EVERY != EVAL_EVERY - 1]
    seen = {p.strip() for t in cal for p in t.split("\n\n")}
    ev = []
    for i, k in enumerate(keys):
        if i % EVAL_EVERY == EVAL_EVERY - 1:
            for p in topics[k].split("\n\n"):
                if p.strip() and p.strip() not in seen:
                    seen.add(p.strip())
                    ev.append(p)
    return "\n\n".join(cal), "\n\n".join(ev)


def read_texts(paths) -> str:
    out = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise PowerlowError(f"--text {p}: no such file")
        try:
            out.append(p.read_text())
        except UnicodeDecodeError:
            raise PowerlowError(f"--text {p} is not UTF-8 text") from None
    return "\n\n".join(out)


def token_windows(tokenizer, text: str, n_tokens: int, window: int, what: str) -> list[np.ndarray]:
    """Split text's tokens into windows of up to ``window`` tokens (each starting with BOS if the model has
    one), n_tokens in all; too little text is an error naming both counts."""
    ids = tokenizer.encode(text, add_special=False)
    bos = tokenizer.bos_id
    per = window - (1 if bos is not None else 0)
    need = n_tokens - (-(-n_tokens // window) if bos is not None else 0)
    if len(ids) < need:
        raise PowerlowError(f"the {what} text has {len(ids)} tokens, fewer than the {n_tokens} requested; "
                            f"give more text with --text or lower --tokens")
    out, pos, left = [], 0, n_tokens
    while left > 0:
        take = min(per, left - (1 if bos is not None else 0))
        seq = ids[pos: pos + take]
        pos += take
        if bos is not None:
            seq = [bos] + seq
        out.append(np.asarray(seq, np.int64))
        left -= len(seq)
    return out


# ------------------------------------------------------------------ the profiling pass
class _Recorder:
    """The FFN's observer (SparseFFN.observer): per layer, every neuron's activation from the resident gate/up rows."""

    def __init__(self, tf, density: float, sample_mask: np.ndarray):
        from powerlow.predictors.common import ModelParts, ffn_buffer, layer_rows

        self.tf = tf
        info = tf.store_info
        self.F, self.L, self.K = info.n_neurons, info.n_layers, info.layout.K
        self.act = tf.config.hidden_act
        self.density = density
        buf = ffn_buffer(ModelParts.of(tf))
        self.G = [layer_rows(buf, info, l, "gate") for l in range(self.L)]
        self.U = [layer_rows(buf, info, l, "up") for l in range(self.L)]
        self.count = np.zeros((self.L, self.F), np.int64)
        self.abs_sum = np.zeros((self.L, self.F), np.float64)
        self.cluster_count = np.zeros((self.L, info.n_clusters), np.int64)
        self.thr = np.zeros(self.L, np.float32)
        self.calibrated = np.zeros(self.L, bool)
        self.sample_mask = sample_mask           # over all profiled token positions
        S = int(sample_mask.sum())
        self.samples_h = np.zeros((self.L, S, self.K), np.float16)
        self.samples_m = np.zeros((self.L, S, -(-self.F // 8)), np.uint8)
        self.pos = 0                             # first global token index of the current window
        self.spos = 0                            # samples written before the current window
        self.tokens = 0
        tf.ffn.observer = self.record

    def close(self):
        self.tf.ffn.observer = None

    def record(self, l: int, h: np.ndarray) -> None:
        ops = self.tf.ops
        F = self.F
        g = ops.matmul(self.G[l], h)[:, :F]                    # (T, F)
        u = ops.matmul(self.U[l], h)[:, :F]
        a = np.abs(_act(g, self.act) * u)
        if self.act == "relu":
            active = g > 0
        else:
            if not self.calibrated[l]:
                self.thr[l] = np.quantile(a, 1.0 - self.density)
                self.calibrated[l] = True
            active = a > self.thr[l]
        self.count[l] += active.sum(axis=0)
        self.abs_sum[l] += a.sum(axis=0, dtype=np.float64)
        T = h.shape[0]
        C, nC = self.tf.store_info.layout.C, self.tf.store_info.n_clusters
        padded = np.zeros((T, nC * C), bool)
        padded[:, :F] = active
        self.cluster_count[l] += padded.reshape(T, nC, C).any(axis=2).sum(axis=0)
        sel = self.sample_mask[self.pos: self.pos + T]
        n = int(sel.sum())
        if n:
            self.samples_h[l, self.spos: self.spos + n] = h[sel]
            self.samples_m[l, self.spos: self.spos + n] = np.packbits(active[sel], axis=1)
        if l == self.L - 1:
            self.pos += T
            self.spos += n
            self.tokens += T


def _act(g, act):
    from powerlow.predictors.common import act_fn
    return act_fn(g, act)


def profile_model(model_dir, *, text: str | None = None, n_tokens: int = DEFAULT_TOKENS,
                  n_samples: int = DEFAULT_SAMPLES, density: float = DEFAULT_DENSITY, relayout: str | bool = "clusters",
                  threads: int = 0, seed: int = 0, plot: str | None = None, progress: bool = True) -> dict:
    """Profile ``model_dir`` (see the module doc); returns a summary dict (coverage figures, times)."""
    from powerlow.config import RuntimeConfig
    from powerlow.engine import Transformer

    model_dir = Path(model_dir)
    relayout = {True: "clusters", False: "none", None: "none"}.get(relayout, relayout)
    if relayout not in ("clusters", "neurons", "none"):
        raise PowerlowError(f"--relayout {relayout!r}: must be clusters, neurons or none")
    if not 0.0 < density < 1.0:
        raise PowerlowError(f"--density {density}: the share of neurons counted active must be in (0, 1)")
    if n_tokens < 16:
        raise PowerlowError(f"--tokens {n_tokens}: profile at least 16 tokens (thousands for useful figures)")
    t0 = time.time()
    tf = Transformer(model_dir, RuntimeConfig(threads=threads))
    if text is None:
        text = default_texts()[0]
    if tf.config.moe:
        return profile_experts(tf, text, n_tokens, plot, progress, t0)
    windows = token_windows(tf.tokenizer, text, n_tokens, min(WINDOW, tf.kv.limit), "calibration")
    total = sum(len(w) for w in windows)
    rng = np.random.default_rng(seed)
    sample_mask = np.zeros(total, bool)
    sample_mask[rng.choice(total, size=min(n_samples, total), replace=False)] = True
    rec = _record(tf, windows, density, sample_mask, progress)
    info = tf.store_info
    L, F, C = info.n_layers, info.n_neurons, info.layout.C
    freq = (rec.count / rec.tokens).astype(np.float32)
    mean_abs = (rec.abs_sum / rec.tokens).astype(np.float32)
    perms, cperms = _hot_first(relayout, freq, mean_abs, C)
    unpacked = np.unpackbits(rec.samples_m, axis=2, count=F).astype(bool)       # (L, S, F)
    samples_m = np.stack([np.packbits(unpacked[l][:, perms[l]], axis=1) for l in range(L)])
    freq_p = np.stack([freq[l][perms[l]] for l in range(L)])
    mean_abs_p = np.stack([mean_abs[l][perms[l]] for l in range(L)])
    gate_thr, cluster_thr, cluster_freq, cluster_any = _mode_thresholds(tf, rec, perms, unpacked, density)
    manifest = tf.manifest
    tf.close()
    del tf, rec.G, rec.U
    if relayout == "neurons":
        manifest = relayout_store(model_dir, manifest, perms)
    elif relayout == "clusters":
        manifest = relayout_clusters(model_dir, manifest, cperms)
    from powerlow.predictors.common import file_meta
    tensors = {"freq": freq_p, "cluster_freq": cluster_freq, "cluster_any": cluster_any, "mean_abs": mean_abs_p, "act_threshold": rec.thr,
               "gate_thr": gate_thr, "cluster_thr": cluster_thr,
               "samples.h": rec.samples_h, "samples.mask": samples_m}
    cover = coverage(freq_p)
    summary = {"tokens": int(rec.tokens), "samples": int(sample_mask.sum()), "density": density,
               "act": manifest["config"]["hidden_act"], "relaid": relayout != "none", "relayout": relayout,
               "mean_neuron_density": float(freq_p.mean()), "mean_cluster_density": float(cluster_freq.mean()),
               "mean_cluster_any_density": float(cluster_any.mean()),
               "hot20_coverage_mean": float(np.mean(cover["hot20"])), "hot20_coverage": [round(float(x), 4) for x in cover["hot20"]],
               "seconds": round(time.time() - t0, 1)}
    _write_profile(model_dir, manifest, tensors, file_meta(manifest, summary=summary))
    if plot:
        plot_coverage(freq_p, plot, title=f"{model_dir.name}: activation coverage by the hottest neurons")
    return summary


def _record(tf, windows, density: float, sample_mask, progress: bool) -> "_Recorder":
    """Run the calibration windows through ``tf`` with a recorder on every FFN."""
    rec = _Recorder(tf, density, sample_mask)
    try:
        it = windows
        if progress:
            from tqdm import tqdm
            it = tqdm(windows, desc="profile", unit="window", file=sys.stderr)
        for w in it:
            tf.forward(w)
    finally:
        rec.close()
    return rec


def _hot_first(relayout: str, freq: np.ndarray, mean_abs: np.ndarray, C: int):
    """Per layer the neuron permutation (and, relaying clusters, the cluster order): by firing frequency, ties
    broken by mean magnitude."""
    L, F = freq.shape
    if relayout == "neurons":
        return [np.lexsort((-mean_abs[l], -freq[l])) for l in range(L)], None
    if relayout == "clusters":
        cperms = [hot_cluster_order(freq[l], mean_abs[l], C) for l in range(L)]
        return [cluster_to_neuron_perm(cp, C, F) for cp in cperms], cperms
    return [np.arange(F) for _ in range(L)], None


def _mode_thresholds(tf, rec, perms, unpacked: np.ndarray, density: float):
    """The training-free modes' thresholds on the sampled tokens, in the new order: (gate_thr, cluster_thr
    quantile tables, cluster_freq at ``density``, cluster_any)."""
    from powerlow.predictors.common import quantile_table, threshold_at
    info = tf.store_info
    L, F, C, nC = info.n_layers, info.n_neurons, info.layout.C, info.n_clusters
    gate_thr = np.zeros((L, 101))
    cluster_thr = np.zeros((L, 101))
    cluster_freq = np.zeros((L, nC), np.float32)
    cluster_any = np.zeros((L, nC), np.float32)
    for l in range(L):
        hs = np.ascontiguousarray(rec.samples_h[l].astype(np.float32))
        g = np.abs(_act(tf.ops.matmul(rec.G[l], hs)[:, :F], tf.config.hidden_act))[:, perms[l]]
        gate_thr[l] = quantile_table(g)
        gp = np.zeros((len(hs), nC * C), np.float32)
        gp[:, :F] = g
        cs = gp.reshape(len(hs), nC, C).sum(axis=2)                   # threshold mode's cluster score
        cluster_thr[l] = quantile_table(cs)
        mp = np.zeros((len(hs), nC * C), bool)
        mp[:, :F] = unpacked[l][:, perms[l]]
        cluster_any[l] = mp.reshape(len(hs), nC, C).any(axis=2).mean(axis=0)
        if tf.config.hidden_act == "relu":
            cluster_freq[l] = cluster_any[l]                             # what gate mode computes, exactly
        else:
            cluster_freq[l] = (cs > threshold_at(cluster_thr[l], density)).mean(axis=0)
    return gate_thr, cluster_thr, cluster_freq, cluster_any


def profile_experts(tf, text: str, n_tokens: int, plot: str | None, progress: bool, t0: float) -> dict:
    """A mixture-of-experts model: how often the router picks each expert (L, E) -- the skew the hot experts are
    pinned by (powerlow.plan) -- and how often pairs are picked together. Experts are never re-laid (each is a
    contiguous run of bundles). profile.safetensors: expert_freq (L, E) share of tokens that chose each expert;
    cluster_freq (L, nC) the same per bundle (what the plan reads); co_select (L, E, E) share of tokens that chose
    both."""
    windows = token_windows(tf.tokenizer, text, n_tokens, min(WINDOW, tf.kv.limit), "calibration")
    r = tf.ffn.router
    L, E = r.L, r.E
    co = np.zeros((L, E, E), np.int64)

    def rec(layer, h):                       # the router's choices, counted (the forward pass is unchanged)
        idx, _ = r.top(layer, h)
        onehot = np.zeros((len(idx), E), np.int64)
        np.put_along_axis(onehot, idx, 1, axis=1)
        co[layer] += onehot.T @ onehot
    tf.ffn.observer = rec
    it = windows
    if progress:
        from tqdm import tqdm
        it = tqdm(windows, desc="profile", unit="window", file=sys.stderr)
    try:
        for w in it:
            tf.forward(w)
    finally:
        tf.ffn.observer = None
    tokens = sum(len(w) for w in windows)
    freq = (np.diagonal(co, axis1=1, axis2=2) / tokens).astype(np.float32)      # (L, E)
    manifest = tf.manifest
    tf.close()
    from powerlow.predictors.common import file_meta
    share = np.sort(freq, axis=1)[:, ::-1]
    q = max(1, E // 4)
    top25 = share[:, :q].sum(axis=1) / share.sum(axis=1)
    summary = {"tokens": int(tokens), "experts": E, "experts_per_token": r.k, "relaid": False, "relayout": "none",
               "act": manifest["config"]["hidden_act"],
               "hot25_expert_share_mean": round(float(top25.mean()), 4),
               "hot25_expert_share": [round(float(x), 4) for x in top25], "seconds": round(time.time() - t0, 1)}
    tensors = {"expert_freq": freq, "cluster_freq": np.repeat(freq, r.cpe, axis=1),
               "co_select": (co / tokens).astype(np.float32)}
    _write_profile(Path(tf.dir), manifest, tensors, file_meta(manifest, summary=summary))
    if plot:
        plot_coverage(freq, plot, title=f"{Path(tf.dir).name}: router choices covered by the most chosen experts",
                      unit="experts")
    return summary


def coverage(freq: np.ndarray) -> dict:
    """Per layer, the share of all activations covered by the hottest x% of neurons (curve and x = 20%)."""
    L, F = freq.shape
    s = -np.sort(-freq, axis=1)
    cum = np.cumsum(s, axis=1) / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
    k20 = max(1, int(round(0.2 * F)))
    return {"curve": cum, "hot20": cum[:, k20 - 1]}


def plot_coverage(freq: np.ndarray, path, title: str = "", unit: str = "neurons") -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PowerlowError("--plot needs matplotlib; install it with `pip install matplotlib`") from None
    cum = coverage(freq)["curve"]
    L, F = cum.shape
    x = np.arange(1, F + 1) / F * 100
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("viridis")
    for l in range(L):
        ax.plot(x, cum[l] * 100, color=cmap(l / max(1, L - 1)), lw=1, label=f"layer {l}" if l in (0, L - 1) else None)
    ax.plot(x, x, "k:", lw=0.8, label="no skew")
    ax.axvline(20, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"hottest {unit} of the layer (%)")
    ax.set_ylabel("share of activations covered (%)" if unit == "neurons" else "share of router choices covered (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hot_cluster_order(freq: np.ndarray, mean_abs: np.ndarray, C: int) -> np.ndarray:
    """Clusters hottest first (summed neuron firing frequency, ties by summed magnitude); a padded last
    cluster (C does not divide the neuron count) stays last."""
    F = len(freq)
    nC = -(-F // C)
    full = F // C
    f = freq[: full * C].reshape(full, C).sum(axis=1)
    a = mean_abs[: full * C].reshape(full, C).sum(axis=1)
    order = np.lexsort((-a, -f))
    return np.concatenate([order, np.arange(full, nC)]).astype(np.int64)


def cluster_to_neuron_perm(cperm: np.ndarray, C: int, F: int) -> np.ndarray:
    """Neuron permutation (stored position -> previous id) of a cluster permutation."""
    idx = (cperm[:, None] * C + np.arange(C)[None, :]).reshape(-1)
    return idx[idx < F]


# ------------------------------------------------------------------ files
def relayout_clusters(model_dir: Path, manifest: dict, cperms: list[np.ndarray]) -> dict:
    """Rewrite ffn.bin with each layer's clusters in order cperms[l] (whole bundles, bytes unchanged);
    records the converted cluster id of each stored cluster in the manifest's ``cluster_order``."""
    from powerlow.manifest import atomic_path
    from powerlow.store import StoreInfo

    info = StoreInfo.from_json(manifest["ffn"])
    L, nC, C, F = info.n_layers, info.n_clusters, info.layout.C, info.n_neurons
    if all(np.array_equal(p, np.arange(nC)) for p in cperms):
        return manifest
    path = model_dir / "ffn.bin"
    with open(path, "rb") as src, atomic_path(path) as tmp, open(tmp, "wb") as f:
        for l in range(L):
            S = info.layouts[l].stride
            for c in cperms[l]:
                src.seek(info.bundle_offset(l, int(c)))
                b = src.read(S)
                if len(b) != S:
                    raise PowerlowError(f"{path}: truncated at layer {l}; re-convert the model")
                f.write(b)
    prev_c = manifest.get("cluster_order")
    # relative to the clusters as converted, or as the last neuron re-layout made them (cluster_order None)
    order = [[int(x) for x in (np.asarray(prev_c[l])[cperms[l]] if prev_c else cperms[l])] for l in range(L)]
    return _publish_relayout(model_dir, manifest, [cluster_to_neuron_perm(cp, C, F) for cp in cperms],
                             bundle_perms=cperms, cluster_order=order)


def _publish_relayout(model_dir: Path, manifest: dict, perms: list[np.ndarray], *, bundle_perms=None,
                      **changes) -> dict:
    """After ffn.bin was rewritten: compose neuron_order with perms, apply ``changes`` to the manifest, record
    the new ffn.bin and its bundles' checksums (moved by ``bundle_perms`` when whole bundles moved, else computed
    anew), delete predictors (their neuron ids no longer hold), write and return the manifest."""
    from powerlow.integrity import rewrite_after_relayout
    from powerlow.manifest import file_entry, write_manifest
    from powerlow.store import StoreInfo
    from powerlow.predictors.common import PREDICTORS_FILE, publish

    path = model_dir / "ffn.bin"
    publish(path)
    prev = manifest.get("neuron_order")
    m = dict(manifest, **changes)
    m["neuron_order"] = [[int(x) for x in (np.asarray(prev[l])[p] if prev else p)] for l, p in enumerate(perms)]
    m["files"] = {k: v for k, v in m["files"].items() if k != PREDICTORS_FILE}
    m["files"]["ffn.bin"] = file_entry(path)
    entry = rewrite_after_relayout(model_dir, StoreInfo.from_json(m["ffn"]), bundle_perms)
    if entry is not None:
        m["checksums"] = entry
    (model_dir / PREDICTORS_FILE).unlink(missing_ok=True)
    write_manifest(model_dir, m)
    return m


def relayout_store(model_dir: Path, manifest: dict, perms: list[np.ndarray]) -> dict:
    """Rewrite ffn.bin with each layer's neurons in order perms[l] (stored ids); returns the new manifest
    (also written). Gate/up rows are moved without loss; down becomes q8 (see the module doc)."""
    from powerlow import formats
    from powerlow.integrity import require_good_bundles
    from powerlow.manifest import atomic_path
    from powerlow.predictors.common import concat_rows
    from powerlow.store import StoreInfo, read_layer_matrices

    old = StoreInfo.from_json(manifest["ffn"])
    F = old.n_neurons
    if all(np.array_equal(p, np.arange(F)) for p in perms):
        return manifest                                           # already hot-first: nothing to move
    require_good_bundles(model_dir, old)     # re-quantized bundles get new checksums: no corrupt source may go in
    down_fmt = "q8"
    new = StoreInfo.plan([x.fmt for x in old.layouts], down_fmt, old.layout.C, old.layout.K, F, old.n_layers)
    path = model_dir / "ffn.bin"
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    Fp = new.n_clusters * old.layout.C
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for l in range(old.n_layers):
            lay = old.layouts[l]

            def rows(off):
                return concat_rows([formats.QMatrix.from_buffer(lay.fmt, lay.C, lay.K, mm, old.bundle_offset(l, c) + off)
                                    for c in range(old.n_clusters)])
            idx = np.concatenate([perms[l], np.arange(F, Fp)])     # padding neurons (zero rows) stay last
            gate = formats.select_rows(rows(lay.gate_off), idx)    # exact: quantized rows move whole
            up = formats.select_rows(rows(lay.up_off), idx)
            down = np.zeros((lay.K, Fp), np.float32)
            down[:, :F] = read_layer_matrices(mm, old, l)[2][:, perms[l]]
            _write_bundles(f, new.layouts[l], new.n_clusters, gate, up, formats.quantize(down, down_fmt))
    del mm
    # new clusters: no original bundle order to keep (cluster_order None)
    return _publish_relayout(model_dir, manifest, perms, ffn=new.to_json(), cluster_order=None,
                             formats=dict(manifest["formats"], ffn_down=down_fmt))


def _write_bundles(f, lay, n_clusters: int, gate, up, down) -> None:
    """Append one layer's bundles: gate/up QMatrix (n_clusters*C, K) and down (K, n_clusters*C), already in
    the layout's formats (store.write_layer would re-quantize gate/up whenever the last cluster is padded)."""
    from powerlow import formats

    buf = bytearray(lay.stride)
    for c in range(n_clusters):
        r = np.arange(c * lay.C, (c + 1) * lay.C)
        buf[:] = bytes(lay.stride)
        for off, q in ((lay.gate_off, formats.select_rows(gate, r)), (lay.up_off, formats.select_rows(up, r)),
                       (lay.down_off, formats.select_cols_blocks(down, c * lay.C, (c + 1) * lay.C))):
            b = q.to_bytes()
            buf[off: off + len(b)] = b
        f.write(buf)


def _write_profile(model_dir: Path, manifest: dict, tensors: dict, meta: dict) -> None:
    from safetensors.numpy import save_file
    from powerlow.manifest import atomic_path, file_entry, write_manifest
    from powerlow.predictors.common import PROFILE_FILE, publish

    path = model_dir / PROFILE_FILE
    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=meta)
    publish(path)
    manifest["files"] = dict(manifest["files"], **{PROFILE_FILE: file_entry(path)})
    write_manifest(model_dir, manifest)


# ------------------------------------------------------------------ CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="powerlow model dir")
    p.add_argument("--text", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: CPython's pydoc topics, the part `eval` does not use)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"tokens to profile (default {DEFAULT_TOKENS})")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                   help=f"(layer input, active mask) pairs kept per layer for training (default {DEFAULT_SAMPLES})")
    p.add_argument("--density", type=float, default=DEFAULT_DENSITY,
                   help=f"SiLU models: share of neurons counted active per layer (default {DEFAULT_DENSITY}); ReLU: gate > 0")
    p.add_argument("--relayout", choices=("clusters", "neurons", "none"), default="clusters",
                   help="hot-first re-layout of ffn.bin: whole clusters (default; outputs bit-identical), single "
                        "neurons (hot neurons share clusters; down re-quantized to q8), or none")
    p.add_argument("--no-relayout", action="store_true", help="same as --relayout none")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="plot activation coverage by the hottest neurons")
    p.add_argument("-t", "--threads", type=int, default=0, help="threads (default: physical cores)")
    p.add_argument("-s", "--seed", type=int, default=0, help="seed of the token sample")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args) -> int:
    from .default_model import resolve_model

    text = read_texts(args.text) if args.text else None
    s = profile_model(resolve_model(args.dir), text=text, n_tokens=args.tokens, n_samples=args.samples,
                      density=args.density, relayout="none" if args.no_relayout else args.relayout,
                      threads=args.threads, seed=args.seed,
                      plot=args.plot)
    if args.json:
        print(json.dumps(s))
        return 0
    if "experts" in s:
        h = np.asarray(s["hot25_expert_share"])
        print(f"profiled {s['tokens']} tokens in {s['seconds']} s: {s['experts']} experts a layer, {s['experts_per_token']} "
              f"a token; the most chosen 25% of experts take {h.mean():.1%} of the router's choices (layers: min "
              f"{h.min():.1%}, max {h.max():.1%}); experts are pinned by this at the next budgeted run")
        return 0
    rule = "gate > 0" if s["act"] == "relu" else f"top {s['density']:.0%} |act| per layer"
    print(f"profiled {s['tokens']} tokens ({s['samples']} samples per layer) in {s['seconds']} s; active: {rule}")
    print(f"mean density: neurons {s['mean_neuron_density']:.3f}, clusters with an active neuron "
          f"{s['mean_cluster_any_density']:.3f}, clusters computed (cluster_freq) {s['mean_cluster_density']:.3f}")
    h = np.asarray(s["hot20_coverage"])
    print(f"hottest 20% of neurons cover {h.mean():.1%} of activations (layers: min {h.min():.1%}, max {h.max():.1%})")
    print("ffn.bin re-laid hot-first" if s["relaid"] else "ffn.bin order kept")
    return 0
