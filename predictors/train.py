"""`powerlow train-predictor DIR`: per-layer low-rank MLP predictors from the profile's samples.

Per layer l: logits = B relu(A h + a) + b (A: K x r, B: r x n), trained with torch (binary cross-entropy on
the profile's active masks) on 80% of the samples. ``--targets clusters`` (the default) predicts, per neuron
cluster, whether any of its neurons fires (n = clusters): the engine reads and computes whole clusters, so
that is the decision it needs, and a per-cluster threshold does not select every cluster holding one
doubtful neuron (measured on the co-activating planted model, 768/6144, rank 64: selected cluster density
0.59 with neuron targets, 0.30 with cluster targets against a true 0.27, recall 0.955 and 0.961). ``--targets neurons``
predicts each neuron (n = neurons); a cluster is then selected if any of its neurons is. The other 20% are split in two: on the first half the
decision threshold is calibrated so that the layer's recall (share of truly active neurons selected) reaches
--target-recall plus two standard errors; the second half measures recall, precision and density, which are reported. Writes
predictors.safetensors (blk.{l}.A/.a/.B/.b float32, thr (L,) logit thresholds, cluster_thr (L, 101)
thresholds on a cluster's expected active count for cluster densities 0..1); torch is not needed to run them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from powerlow.errors import PowerlowError

from .common import PREDICTORS_FILE, PROFILE_FILE, file_meta, load_checked, publish, quantile_table


def _fit_layer(X: np.ndarray, Y: np.ndarray, rank: int, epochs: int, seed: int, lr: float = 3e-3):
    """Train one layer's MLP; returns (A (K, r), a (r,), B (r, F), b (F,)) float32 numpy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    K, F = X.shape[1], Y.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(K, rank), torch.nn.ReLU(), torch.nn.Linear(rank, F))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y.astype(np.float32))
    pos = float(Y.mean())
    # weight positives up (at most 4x) so rare activations are not traded away for the many zeros
    lossf = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(min(4.0, max(1.0, (1 - pos) / max(pos, 1e-3)))))
    bs = 128
    steps = max(1, epochs * -(-len(X) // bs))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    done = 0
    while done < steps:
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), bs):
            idx = perm[i: i + bs]
            opt.zero_grad()
            loss = lossf(net(Xt[idx]), Yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done == steps:
                break
    l1, l2 = net[0], net[2]
    return (l1.weight.detach().numpy().T.copy(), l1.bias.detach().numpy().copy(),
            l2.weight.detach().numpy().T.copy(), l2.bias.detach().numpy().copy())


def _logits(W, X):
    A, a, B, b = W
    return np.maximum(X @ A + a, 0) @ B + b


def _cluster_any(M: np.ndarray, C: int) -> np.ndarray:
    """(S, F) bool -> (S, nC) bool: cluster has >= 1 true neuron."""
    S, F = M.shape
    nC = -(-F // C)
    P = np.zeros((S, nC * C), bool)
    P[:, :F] = M
    return P.reshape(S, nC, C).any(axis=2)


def _cluster_sum(P: np.ndarray, C: int) -> np.ndarray:
    S, F = P.shape
    nC = -(-F // C)
    Q = np.zeros((S, nC * C), np.float32)
    Q[:, :F] = P
    return Q.reshape(S, nC, C).sum(axis=2)


def _stats(pred: np.ndarray, true: np.ndarray, C: int) -> dict:
    tp = float((pred & true).sum())
    cp, ct = _cluster_any(pred, C), _cluster_any(true, C)
    return {"recall": tp / max(1.0, float(true.sum())), "precision": tp / max(1.0, float(pred.sum())),
            "density": float(pred.mean()), "true_density": float(true.mean()),
            "cluster_density": float(cp.mean()), "true_cluster_density": float(ct.mean()),
            "cluster_recall": float((cp & ct).sum()) / max(1.0, float(ct.sum()))}


def _aim(target: float, n: float) -> float:
    """A recall a little above the target (two standard errors of a recall measured on n samples), so the
    recall on unseen tokens lands at or above the target rather than around it."""
    return min(1.0, target + 2.0 * np.sqrt(target * (1 - target) / max(1.0, n)))


def _recall_threshold(z: np.ndarray, w: np.ndarray, aim: float) -> float:
    """The largest t with sum(w[z > t]) >= aim * sum(w): clusters ranked by logit, weighted by active neurons."""
    keep = w > 0
    z, w = z[keep], w[keep]
    if not z.size:
        return 0.0
    order = np.argsort(-z, kind="stable")
    cum = np.cumsum(w[order])
    k = int(np.searchsorted(cum, aim * cum[-1] - 1e-9))       # first index reaching the aim
    k = min(k, z.size - 1)
    return float(np.nextafter(z[order][k], -np.inf))


def _cluster_stats(sel: np.ndarray, Y: np.ndarray, C: int) -> dict:
    """Cluster-target selection (S, nC) against the true neuron masks (S, F)."""
    cnt, ct = _cluster_sum(Y, C), _cluster_any(Y, C)
    return {"recall": float(cnt[sel].sum()) / max(1.0, float(cnt.sum())),
            "precision": float((sel & ct).sum()) / max(1.0, float(sel.sum())),
            "density": float(sel.mean()), "true_density": float(Y.mean()),
            "cluster_density": float(sel.mean()), "true_cluster_density": float(ct.mean()),
            "cluster_recall": float((sel & ct).sum()) / max(1.0, float(ct.sum()))}


def train_predictors(model_dir, *, rank: int = 128, target_recall: float = 0.95, epochs: int = 20,
                     seed: int = 0, threads: int = 0, targets: str = "clusters", progress: bool = True) -> dict:
    """Train, calibrate, evaluate and save every layer's predictor; returns the report."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from powerlow.manifest import atomic_path, file_entry, load_manifest, write_manifest

    model_dir = Path(model_dir)
    if rank < 1:
        raise PowerlowError(f"--rank {rank}: must be >= 1")
    if not 0.0 < target_recall < 1.0:
        raise PowerlowError(f"--target-recall {target_recall}: must be in (0, 1)")
    if targets not in ("clusters", "neurons"):
        raise PowerlowError(f"--targets {targets!r}: must be clusters or neurons")
    try:
        import torch
    except ImportError:
        raise PowerlowError("training predictors needs torch; install it with `pip install powerlow[train]`") from None
    torch.set_num_threads(threads or 1)
    manifest = load_manifest(model_dir)
    prof, _ = load_checked(model_dir, manifest, PROFILE_FILE, f"powerlow profile {model_dir}")
    ffn = manifest["ffn"]
    L, F, C = ffn["n_layers"], ffn["n_neurons"], ffn["cluster_size"]
    H, Mp = prof["samples.h"], prof["samples.mask"]
    S = H.shape[1]
    if S < 50:
        raise PowerlowError(f"{model_dir}/{PROFILE_FILE} holds only {S} samples per layer; re-run "
                            f"`powerlow profile {model_dir} --samples 2000` (or more)")
    with safe_open(str(model_dir / "resident.safetensors"), framework="numpy") as f:
        norms = [f.get_tensor(f"blk.{l}.ffn_norm").astype(np.float32) for l in range(L)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(S)
    n_hold = max(20, S // 5)
    tr, cal, te = order[n_hold:], order[: n_hold // 2], order[n_hold // 2: n_hold]
    t0 = time.time()
    tensors, report, thr, cthr = {}, [], np.zeros(L, np.float32), np.zeros((L, 101))
    layers = range(L)
    bar = None
    if progress:
        from tqdm import tqdm
        layers = bar = tqdm(range(L), desc="train-predictor", unit="layer", file=sys.stderr)
    for l in layers:
        W, thr[l], cthr[l], r = _train_layer(l, H, Mp, F, C, norms, (tr, cal, te), targets, rank, epochs, seed,
                                             target_recall)
        report.append({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})
        for name, v in zip("AaBb", W):
            tensors[f"blk.{l}.{name}"] = np.ascontiguousarray(v, np.float32)
        if bar is not None:
            bar.set_postfix(recall=f"{r['recall']:.3f}", density=f"{r['density']:.3f}")
    tensors["thr"] = thr
    tensors["cluster_thr"] = cthr
    summary = _summary(report, target_recall)
    summary.update(targets=targets, rank=rank, samples=S, train=len(tr), heldout=len(te), seconds=round(time.time() - t0, 1))
    path = model_dir / PREDICTORS_FILE
    meta = file_meta(manifest, rank=str(rank), target_recall=str(target_recall), targets=targets, summary=summary)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    publish(path)
    manifest["files"] = dict(manifest["files"], **{PREDICTORS_FILE: file_entry(path)})
    write_manifest(model_dir, manifest)
    return {"summary": summary, "layers": report}


def _train_layer(l, H, Mp, F, C, norms, split, targets, rank, epochs, seed, target_recall):
    """Layer l's predictor: fit on the training split, threshold for the target recall on the calibration split,
    measure on the test split (and as a lookahead from layer l-1's input). Returns (weights, threshold, cluster
    score quantiles, report row)."""
    tr, cal, te = split
    X = H[l].astype(np.float32)
    Y = np.unpackbits(Mp[l], axis=1, count=F).astype(bool)
    by_cluster = targets == "clusters"
    W = _fit_layer(X[tr], _cluster_any(Y[tr], C) if by_cluster else Y[tr], rank, epochs, seed + l)
    zc = _logits(W, X[cal])
    if by_cluster:      # clusters are kept or dropped whole: the sample size is the clusters' (weighted)
        w = _cluster_sum(Y[cal], C).reshape(-1)
        n_eff = float(w.sum()) ** 2 / max(1.0, float((w * w).sum()))
        thr = _recall_threshold(zc.reshape(-1), w, _aim(target_recall, n_eff))
    else:
        pos = zc[Y[cal]]
        thr = np.quantile(pos, 1.0 - _aim(target_recall, pos.size)) if pos.size else 0.0
    zt = _logits(W, X[te])
    stats = _cluster_stats if by_cluster else _stats
    r = {"layer": l, **stats(zt > thr, Y[te], C)}
    held = np.concatenate([zc, zt])
    cthr = quantile_table(held if by_cluster else _cluster_sum(1.0 / (1.0 + np.exp(-held)), C))
    if l > 0:     # lookahead: this layer's predictor on the previous layer's input, re-scaled by the norm ratio
        ratio = np.where(np.abs(norms[l - 1]) > 1e-6, norms[l] / np.where(norms[l - 1] == 0, 1, norms[l - 1]), 0)
        za = _logits(W, H[l - 1][te].astype(np.float32) * ratio)
        r["lookahead_recall"] = stats(za > thr, Y[te], C)["recall"]
    r["density_ratio"] = (r["cluster_density"] / max(r["true_cluster_density"], 1e-9) if by_cluster
                          else r["density"] / max(r["true_density"], 1e-9))
    return W, thr, cthr, r


def _summary(report: list[dict], target: float) -> dict:
    rec = np.array([r["recall"] for r in report])
    ratio = np.array([r["density_ratio"] for r in report])   # clusters: selected / true cluster density
    short = [r["layer"] for r, x, q in zip(report, rec, ratio) if x < target or q > 1.3]
    return {"target_recall": target, "mean_recall": float(rec.mean()), "min_recall": float(rec.min()),
            "mean_density": float(np.mean([r["density"] for r in report])),
            "mean_true_density": float(np.mean([r["true_density"] for r in report])),
            "max_density_ratio": float(ratio.max()), "mean_density_ratio": float(ratio.mean()),
            "mean_cluster_density": float(np.mean([r["cluster_density"] for r in report])),
            "mean_true_cluster_density": float(np.mean([r["true_cluster_density"] for r in report])),
            "layers_short": short}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="powerlow model dir (after `powerlow profile`)")
    p.add_argument("--rank", type=int, default=128, help="hidden width r of each layer's MLP (default 128)")
    p.add_argument("--target-recall", type=float, default=0.95, help="recall each layer's threshold is calibrated for")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training samples (default 20)")
    p.add_argument("--targets", choices=("clusters", "neurons"), default="clusters",
                   help="predict each neuron cluster (default) or each neuron")
    p.add_argument("-s", "--seed", type=int, default=0)
    p.add_argument("-t", "--threads", type=int, default=0, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def main(args) -> int:
    from powerlow.default_model import resolve_model

    rep = train_predictors(resolve_model(args.dir), rank=args.rank, target_recall=args.target_recall,
                           epochs=args.epochs, seed=args.seed, threads=args.threads, targets=args.targets)
    if args.json:
        print(json.dumps(rep))
        return 0
    print("layer  recall  precision  density  true_density  ratio  clusters(sel/true)  lookahead_recall")
    for r in rep["layers"]:
        print(f"{r['layer']:5d}  {r['recall']:6.3f}  {r['precision']:9.3f}  {r['density']:7.3f}  {r['true_density']:12.3f}"
              f"  {r['density_ratio']:5.2f}  {r['cluster_density']:7.3f}/{r['true_cluster_density']:.3f}"
              f"      {r.get('lookahead_recall', float('nan')):6.3f}")
    s = rep["summary"]
    print(f"mean recall {s['mean_recall']:.3f} (min {s['min_recall']:.3f}, target {s['target_recall']}), "
          f"density {s['mean_density']:.3f} vs true {s['mean_true_density']:.3f} (ratio mean {s['mean_density_ratio']:.2f}, "
          f"max {s['max_density_ratio']:.2f}); clusters {s['mean_cluster_density']:.3f} vs {s['mean_true_cluster_density']:.3f}")
    if s["layers_short"]:
        print(f"layers short of recall >= {s['target_recall']} at density <= 1.3x true: {s['layers_short']}")
    print(f"wrote {PREDICTORS_FILE} (rank {s['rank']}, {s['train']} training / {s['heldout']} test samples per layer, "
          f"{s['seconds']} s)")
    return 0
