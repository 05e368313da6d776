"""Activation predictors: per token and layer, which neuron clusters of the FFN to compute.

One interface (what powerlow.ffn.SparseFFN calls on the hot path):
    select(layer, h (T, K) float32) -> int32 sorted cluster ids (stored order); None = all clusters
    lookahead(layer, h_prev) -> cluster ids layer ``layer`` will probably need, from the previous layer's
                                FFN input (for prefetching), or None when there is no guess
The registry (``PREDICTORS``) maps a name to a class, built as ``cls(model, ops, density)`` from a
``ModelParts`` record (the model dir and manifest, the FFN layout, activation and norms: no Transformer);
``make_predictor(tf)`` picks the one of the run's mode (``MODE_PREDICTOR``) at ``tf.runtime.density``:

  threshold  training-free, any gated model. Computes every neuron's gate from a resident copy of the gate
             rows (1/3 of the FFN's bytes stay in RAM and are read per token), scores a cluster by the sum
             of |act(gate)| over its neurons and keeps those above a per-layer threshold, calibrated by
             `powerlow profile` so that on average a share ``density`` of the clusters is computed (CATS/TEAL).
  gate       two-phase: gate rows first, then only the clusters where some neuron fires. Exact for ReLU
             models (gate <= 0 contributes nothing); for SiLU a neuron fires when |silu(gate)| is above a
             per-layer threshold for a neuron density ``density`` (density 1 = all clusters).
  lowrank    a per-layer low-rank MLP, sigmoid(B relu(A h + a) + b), trained by `powerlow train-predictor`
             (torch, offline) and run here with the 8-bit kernels (weights quantized to q8 at load).
             With density 1 it keeps the clusters holding a neuron above the threshold calibrated for the
             target recall; with density < 1, the clusters whose expected number of active neurons is above
             a threshold calibrated for that cluster density.
  static     (no mode; `powerlow eval --predictor static`) the same clusters for every token: each
             layer's hottest share ``density`` of clusters by mean |act(gate) * up| in the profile.
Lookahead (all predictors): layer l's rule applied to layer l-1's FFN input re-scaled by the ratio of the
two layers' norm weights (the residual stream changes little across one layer); for layer 0 (the next
token) the clusters layer 0 used for the previous token.
"""
from __future__ import annotations

import json

import numpy as np

from powerlow import formats
from powerlow.errors import PowerlowError

from .common import (PREDICTORS_FILE, PROFILE_FILE, ModelParts, act_fn, drop_page_cache, ffn_buffer, layer_rows,
                     load_checked, threshold_at)

__all__ = ["PREDICTORS", "MODE_PREDICTOR", "make_predictor", "Predictor", "ThresholdPredictor", "GatePredictor",
           "LowRankPredictor", "StaticPredictor"]


class Predictor:
    heldout_recall: float | None = None   # share of truly active neurons selected, on held-out samples (if known)
    """Shared parts: model shape, the norm ratio for lookahead, the last selection per layer."""
    name = "base"

    def __init__(self, model: ModelParts, ops, density: float):
        info = model.info
        self.model = model
        self.ops = ops
        self.density = float(density)
        self.act = model.act
        self.L, self.F, self.C, self.nC = info.n_layers, info.n_neurons, info.layout.C, info.n_clusters
        self.Fp = self.nC * self.C
        self.all_ids = np.arange(self.nC, dtype=np.int32)
        self.last: list[np.ndarray | None] = [None] * self.L
        norms = model.ffn_norms
        self.renorm = [None] + [np.where(np.abs(norms[l - 1]) > 1e-6, norms[l] / np.where(norms[l - 1] == 0, 1, norms[l - 1]),
                                         0).astype(np.float32)[None] for l in range(1, self.L)]
        self.resident_bytes = 0

    def _pick(self, layer: int, h: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def select(self, layer: int, h: np.ndarray) -> np.ndarray:
        ids = self._pick(layer, h)
        self.last[layer] = ids
        return ids

    def lookahead(self, layer: int, h_prev: np.ndarray):
        if layer == 0:
            return self.last[0]
        return self._pick(layer, h_prev * self.renorm[layer])

    def select_ahead(self, layer: int, h: np.ndarray, nxt: int):
        """(select(layer, h), lookahead(nxt, h)): what SparseFFN asks once per layer (a predictor may answer both
        in one evaluation)."""
        return self.select(layer, h), self.lookahead(nxt, h)

    def describe(self) -> dict:
        return {"predictor": self.name, "target_density": self.density, "predictor_bytes": int(self.resident_bytes),
                "recall": self.heldout_recall}


class _GateRows(Predictor):
    """Predictors that compute the gate of every neuron from resident gate rows."""

    def __init__(self, model: ModelParts, ops, density: float):
        super().__init__(model, ops, density)
        buf = ffn_buffer(model)
        self.G = [layer_rows(buf, model.info, l, "gate") for l in range(self.L)]   # copies
        del buf
        drop_page_cache(model)
        self.resident_bytes = sum(g.nbytes for g in self.G)
        self._mul = getattr(self.ops, {"silu": "silu_mul", "gelu_tanh": "gelu_tanh_mul"}.get(self.act, "relu_mul"), None)
        self._ones = np.ones((1, self.Fp), np.float32)

    def _act_abs(self, g: np.ndarray) -> np.ndarray:
        """|act(g)| (T, Fp)."""
        if self._mul is not None:
            if self._ones.shape != g.shape:
                self._ones = np.ones(g.shape, np.float32)
            a = self._mul(g, self._ones)
        else:
            a = act_fn(g, self.act)
        return np.abs(a, out=a)


def _profile(model: ModelParts) -> dict:
    tensors, _ = load_checked(model.dir, model.manifest, PROFILE_FILE, f"powerlow profile {model.dir}")
    return tensors


class ThresholdPredictor(_GateRows):
    name = "threshold"

    def __init__(self, model: ModelParts, ops, density: float):
        super().__init__(model, ops, density)
        prof = _profile(model)
        self.thr = [threshold_at(prof["cluster_thr"][l], self.density) for l in range(self.L)]

    def _pick(self, layer: int, h: np.ndarray) -> np.ndarray:
        a = self._act_abs(self.ops.matmul(self.G[layer], h))            # (T, Fp)
        score = a.reshape(-1, self.C).sum(axis=1)                       # (T * nC,) per token and cluster
        if len(a) > 1:
            score = score.reshape(len(a), self.nC).max(axis=0)
        return np.flatnonzero(score > self.thr[layer]).astype(np.int32)


class StaticPredictor(Predictor):
    """The same clusters for every token: the share ``density`` of each layer's clusters with the largest
    mean |act(gate) * up| in the profile. No per-token work and nothing resident; a baseline for the
    dynamic predictors, and what a cache pins."""
    name = "static"

    def __init__(self, model: ModelParts, ops, density: float):
        super().__init__(model, ops, density)
        mean_abs = _profile(model)["mean_abs"]                             # (L, F) stored order
        k = max(1, int(round(self.density * self.nC)))
        self.ids = []
        for l in range(self.L):
            score = np.zeros(self.Fp, np.float32)
            score[:self.F] = mean_abs[l]
            self.ids.append(np.sort(np.argsort(-score.reshape(self.nC, self.C).sum(axis=1), kind="stable")[:k])
                            .astype(np.int32))

    def _pick(self, layer: int, h: np.ndarray) -> np.ndarray:
        return self.ids[layer]


class GatePredictor(_GateRows):
    name = "gate"

    def __init__(self, model: ModelParts, ops, density: float):
        super().__init__(model, ops, density)
        self.exact = self.act == "relu"
        if self.exact:
            self.thr = [0.0] * self.L
            self.heldout_recall = 1.0          # exact: every firing neuron's cluster is computed
        elif self.density >= 1.0:
            self.thr = [-np.inf] * self.L
        else:
            prof = _profile(model)
            self.thr = [threshold_at(prof["gate_thr"][l], self.density) for l in range(self.L)]

    def _pick(self, layer: int, h: np.ndarray) -> np.ndarray:
        g = self.ops.matmul(self.G[layer], h)                           # (T, Fp)
        a = g if self.exact else self._act_abs(g)
        top = a.max(axis=0) if len(a) > 1 else a[0]                     # a cluster fires if its top neuron does
        return np.flatnonzero(top.reshape(self.nC, self.C).max(axis=1) > self.thr[layer]).astype(np.int32)


class LowRankPredictor(Predictor):
    name = "lowrank"

    def __init__(self, model: ModelParts, ops, density: float):
        super().__init__(model, ops, density)
        t, meta = load_checked(model.dir, model.manifest, PREDICTORS_FILE, f"powerlow train-predictor {model.dir}")
        K = model.info.layout.K
        # targets "clusters": one logit per cluster (the decision the engine needs); "neurons": one per neuron
        self.by_cluster = meta.get("targets", "neurons") == "clusters"
        n_out, n_pad = (self.nC, self.nC) if self.by_cluster else (self.F, self.Fp)
        self.A, self.a, self.B, self.b = [], [], [], []
        for l in range(self.L):
            A, B = t[f"blk.{l}.A"], t[f"blk.{l}.B"]
            if A.shape[0] != K or B.shape[1] != n_out or A.shape[1] != B.shape[0]:
                raise PowerlowError(f"{model.dir}/{PREDICTORS_FILE}: layer {l} has shapes A {A.shape}, B {B.shape}, "
                                    f"expected ({K}, r) and (r, {n_out}): made for another model; "
                                    f"re-run `powerlow train-predictor {model.dir}`")
            Bp = np.zeros((n_pad, B.shape[0]), np.float32)
            Bp[:n_out] = B.T
            bp = np.full((1, n_pad), -1e4, np.float32)   # padded neurons never fire
            bp[0, :n_out] = t[f"blk.{l}.b"]
            # run through the 8-bit kernels (q8 weights: well inside the predictor's own error; no BLAS threads)
            self.A.append(formats.quantize(np.ascontiguousarray(A.T, np.float32), "q8"))
            self.a.append(np.ascontiguousarray(t[f"blk.{l}.a"], np.float32)[None])
            self.B.append(formats.quantize(Bp, "q8"))
            self.b.append(bp)
        self.by_recall = self.density >= 1.0
        if self.by_recall:
            self.thr = [float(x) for x in t["thr"]]
        else:
            self.thr = [threshold_at(t["cluster_thr"][l], self.density) for l in range(self.L)]
        self.meta = {k: v for k, v in meta.items() if k in ("rank", "target_recall")}
        # by cluster or by recall the decision is a max and a compare: one compiled call a layer (kernels.lowrank_pick)
        self._fast = getattr(self.ops, "lowrank_pick", None) if (self.by_cluster or self.by_recall) else None
        self._scratch = None
        if self.by_recall and "summary" in meta:      # held-out recall measured by train-predictor
            self.heldout_recall = round(float(json.loads(meta["summary"])["mean_recall"]), 4)
        self.resident_bytes = sum(x.nbytes for x in self.A + self.a + self.B + self.b)

    def logits(self, layer: int, h: np.ndarray) -> np.ndarray:
        """(T, Fp) float32 neuron logits, or (T, nC) cluster logits."""
        z = self.ops.matmul(self.A[layer], h)                           # (T, r)
        z += self.a[layer]
        np.maximum(z, 0, out=z)
        y = self.ops.matmul(self.B[layer], z)                           # (T, Fp)
        y += self.b[layer]
        return y

    def _run(self, h: np.ndarray, layers: tuple, scales: tuple) -> list:
        """kernels.lowrank_pick over ``layers`` (the input scaled by scales[i] where not None) -> their cluster ids."""
        T = h.shape[0]
        sc = self._scratch
        if sc is None or sc[0].shape[0] < T:
            K = self.A[0].cols
            sc = self._scratch = (np.empty((T, self.A[0].rows), np.float32), np.empty((T, self.B[0].rows), np.float32),
                                  np.empty((T, K), np.float32), [np.empty(self.nC, np.int32) for _ in range(2)])
        jobs = [(self.A[l], self.a[l], self.B[l], self.b[l], self.thr[l], s, sc[3][i])
                for i, (l, s) in enumerate(zip(layers, scales))]
        counts = self._fast(jobs, 1 if self.by_cluster else self.C, h, sc[0], sc[1], sc[2])
        return [sc[3][i][:n].copy() for i, n in enumerate(counts)]

    def step_jobs(self):
        """(per layer (A, a, B, b, thr, lookahead scale or None), outputs per cluster) for steps.SparseStep (the
        whole predict-mode layer in one call), or None where the rule is not one compiled call (density < 1 by
        neuron). The step keeps these tables: a threshold changed later is not seen by it."""
        if self._fast is None:
            return None
        return ([(self.A[l], self.a[l], self.B[l], self.b[l], self.thr[l], self.renorm[l]) for l in range(self.L)],
                1 if self.by_cluster else self.C)

    def _pick_fast(self, layer: int, h: np.ndarray) -> np.ndarray:
        return self._run(h, (layer,), (None,))[0]

    def select_ahead(self, layer: int, h: np.ndarray, nxt: int):
        """(select(layer, h), lookahead(nxt, h)) in one compiled call (the low-rank rule of both layers)."""
        if self._fast is None or nxt == 0:
            return super().select_ahead(layer, h, nxt)
        ids, ahead = self._run(h, (layer, nxt), (None, self.renorm[nxt]))
        self.last[layer] = ids
        return ids, ahead

    def _pick(self, layer: int, h: np.ndarray) -> np.ndarray:
        if self._fast is not None:
            return self._pick_fast(layer, h)
        y = self.logits(layer, h)                                       # (T, Fp) or (T, nC)
        T = len(y)
        if self.by_cluster:           # a cluster logit against the recall- or density-calibrated threshold
            score = y.max(axis=0) if T > 1 else y[0]
        elif self.by_recall:
            top = y.max(axis=0) if T > 1 else y[0]
            score = top.reshape(self.nC, self.C).max(axis=1)
        else:
            np.negative(y, out=y)
            np.exp(y, out=y)
            y += 1.0
            score = np.reciprocal(y, out=y).reshape(-1, self.C).sum(axis=1)   # expected active neurons per cluster
            if T > 1:
                score = score.reshape(T, self.nC).max(axis=0)
        return np.flatnonzero(score > self.thr[layer]).astype(np.int32)


PREDICTORS = {"threshold": ThresholdPredictor, "gate": GatePredictor, "lowrank": LowRankPredictor,
              "static": StaticPredictor}
MODE_PREDICTOR = {"threshold": "threshold", "gate": "gate", "predict": "lowrank"}


def make_predictor(tf, name: str | None = None):
    """The predictor of tf.runtime.mode (or ``name``), at target density tf.runtime.density."""
    if name is None:
        mode = tf.runtime.mode
        if mode not in MODE_PREDICTOR:
            raise PowerlowError(f"mode {mode!r} has no predictor; choose one of {', '.join(MODE_PREDICTOR)}")
        name = MODE_PREDICTOR[mode]
    if name not in PREDICTORS:
        raise PowerlowError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")
    return PREDICTORS[name](ModelParts.of(tf), tf.ops, tf.runtime.density)
