"""Mixture-of-experts layers: the router is the exact predictor of which bundles a token needs.

In ffn.bin a MoE layer is its experts side by side (powerlow.models.moe): expert e is the ``cpe`` bundles
e*cpe .. e*cpe + cpe - 1 (convert picks the cluster size so an expert is whole bundles). Per layer:

    logits = h @ router^T; p = softmax(logits); the top n_experts_used experts; weights p (renormalized
    to sum 1 with norm_topk, as Qwen3-MoE and Mixtral; as they are for Qwen2-MoE)
    out += sum over the chosen experts, in expert order, of w * expert(h)     (kernels.moe_ffn, one call)
    qwen2moe: out += sigmoid(h . g_shared) * shared_expert(h)                  (resident matrices)

The routed pairs (token, expert) are grouped by expert, so in a prefill chunk each expert's bundles are read
and computed once for all its tokens. What a token gets depends only on its own row (kernels.moe_ffn), so
prefill, decode and batched verification give the same bits, and an offloaded run the resident run's.

Lookahead: layer l + 1's router applied to layer l's hidden state (the normed residual before layer l's FFN,
h_l / ffn_norm_l * ffn_norm_{l+1}) predicts the experts layer l + 1 will choose; the offloaded store reads them
while layer l computes. Its recall against the true choice is counted per layer (``describe``).
"""
from __future__ import annotations

import numpy as np

from .errors import PowerlowError


class Router:
    """Per layer: the router matrix (E, K) float32; ``route`` -> the groups kernels.moe_ffn takes."""

    def __init__(self, cfg, routers: list[np.ndarray], ffn_norms: list[np.ndarray], cpe: int):
        self.E, self.k, self.norm = cfg.n_experts, cfg.n_experts_used, cfg.norm_topk
        self.L = cfg.n_layers
        self.cpe = cpe
        self.W = [np.ascontiguousarray(w, np.float32) for w in routers]
        for l, w in enumerate(self.W):
            if w.shape != (self.E, cfg.hidden_size):
                raise PowerlowError(f"layer {l}: router is {w.shape}, the config says ({self.E}, {cfg.hidden_size}); "
                                    "re-convert the model")
        # h_l -> the normed residual with layer l+1's norm weights (zero where a weight is zero)
        self._ratio = []
        for l in range(self.L):
            a, b = ffn_norms[l], ffn_norms[(l + 1) % self.L]
            with np.errstate(divide="ignore", invalid="ignore"):
                self._ratio.append(np.where(a != 0, b / a, 0).astype(np.float32))
        self._ar = np.arange(cpe, dtype=np.int64)
        self._ahead: list[np.ndarray | None] = [None] * self.L   # experts predicted for layer l (one token)
        self.ahead_hits = np.zeros(self.L, np.int64)
        self.ahead_total = np.zeros(self.L, np.int64)
        self.selected = np.zeros((self.L, self.E), np.int64)      # (token, expert) choices over the run

    def top(self, layer: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(experts (T, k) int64, weights (T, k) float32) of the router of ``layer`` on h (T, K)."""
        W = self.W[layer]
        # row by row (one matrix-vector product each): a token's logits are the same bits alone or in a batch
        logits = np.empty((h.shape[0], self.E), np.float32)
        for t in range(h.shape[0]):
            np.dot(W, h[t], out=logits[t])
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits, dtype=np.float32)
        p /= p.sum(axis=1, keepdims=True)
        k = self.k
        if k < self.E:
            idx = np.argpartition(-p, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(self.E), p.shape).copy()
        w = np.take_along_axis(p, idx, axis=1)
        if self.norm:
            w = w / w.sum(axis=1, keepdims=True)
        return idx.astype(np.int64), w.astype(np.float32)

    def route(self, layer: int, h: np.ndarray):
        """(experts ascending (G,), gs (G+1,) int32, tok int32, wt float32): the (token, expert) pairs grouped by
        expert, tokens ascending within a group."""
        idx, w = self.top(layer, h)
        T = h.shape[0]
        e = idx.reshape(-1)
        t = np.repeat(np.arange(T, dtype=np.int64), self.k)
        order = np.lexsort((t, e))
        es = e[order]
        experts, starts = np.unique(es, return_index=True)
        gs = np.append(starts, len(es)).astype(np.int32)
        np.add.at(self.selected[layer], experts, np.diff(gs))
        pred = self._ahead[layer]
        if pred is not None and T == 1:
            self.ahead_hits[layer] += len(np.intersect1d(pred, experts, assume_unique=True))
            self.ahead_total[layer] += len(experts)
        self._ahead[layer] = None
        return experts, gs, t[order].astype(np.int32), w.reshape(-1)[order].astype(np.float32)

    def clusters(self, experts: np.ndarray) -> np.ndarray:
        """The bundle ids of ``experts`` (ascending), expert by expert."""
        return (experts[:, None] * self.cpe + self._ar).reshape(-1)

    def lookahead(self, layer: int, h_prev: np.ndarray) -> np.ndarray:
        """Bundle ids layer ``layer``'s router picks for the last token of h_prev (the FFN input of layer - 1)."""
        prev = (layer - 1) % self.L
        x = h_prev[-1:] * self._ratio[prev]
        idx, _ = self.top(layer, x)
        experts = np.sort(idx[0])
        self._ahead[layer] = experts
        return self.clusters(experts)

    def describe(self) -> dict:
        per = [round(float(h / t), 4) if t else None for h, t in zip(self.ahead_hits, self.ahead_total)]
        tot = int(self.ahead_total.sum())
        return {"recall": 1.0, "density": self.k / self.E,
                "lookahead_recall": round(float(self.ahead_hits.sum() / tot), 4) if tot else None,
                "lookahead_recall_per_layer": per}


class SharedExpert:
    """qwen2moe's shared expert of one layer: sigmoid(h . g) * down(silu(gate h) * up h), resident."""

    def __init__(self, gate, up, down, g: np.ndarray, act: str):
        self.gate, self.up, self.down = gate, up, down
        self.g = np.ascontiguousarray(g, np.float32).reshape(-1)
        self.act = act

    def add(self, h: np.ndarray, out: np.ndarray, ops) -> None:
        from .reference import act_fn
        a = act_fn(ops.matmul(self.gate, h), self.act) * ops.matmul(self.up, h)
        d = ops.matmul(self.down, np.ascontiguousarray(a, np.float32))
        z = np.array([np.dot(r, self.g) for r in h], np.float32)      # row by row, as the router
        s = 1.0 / (1.0 + np.exp(-z))
        out += (s[:, None] * d).astype(np.float32)
