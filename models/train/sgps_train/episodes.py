"""Episodic evaluation on cached embeddings: accuracy, ECE, calibration, refer threshold."""

from __future__ import annotations

import math

import numpy as np
import torch

from .synth import logits


def sample_episode(rng: np.random.Generator, emb: dict, classes: list[str], n_way: int, k: int, q: int):
    """Returns (support [N,K,D], query [N*q,D], labels [N*q], chosen class keys)."""
    chosen = list(rng.choice(classes, size=n_way, replace=False))
    sup, qry, lab = [], [], []
    for ci, c in enumerate(chosen):
        e = emb[c]
        need = k + q
        idx = rng.choice(len(e), size=need, replace=len(e) < need)
        sup.append(e[idx[:k]])
        qry.append(e[idx[k:]])
        lab += [ci] * q
    d = next(iter(emb.values())).shape[1]
    support = np.stack(sup) if k > 0 else np.zeros((n_way, 0, d), np.float32)
    return support, np.concatenate(qry), np.asarray(lab), chosen


def text_for(chosen, texts: dict, rng: np.random.Generator, use_text: bool, t_dim: int, text_weights=None):
    """texts: class -> [n_desc, T]; picks one description per class at random. With
    text_weights (class -> [n_desc, D]) also returns the matching precomputed text weights."""
    t = np.zeros((len(chosen), t_dim), np.float32)
    m = np.zeros((len(chosen),), np.float32)
    tw = None
    if text_weights is not None:
        tw = np.zeros((len(chosen), next(iter(text_weights.values())).shape[1]), np.float32)
    if use_text:
        for i, c in enumerate(chosen):
            if c in texts:
                arr = texts[c]
                j = rng.integers(len(arr))
                t[i] = arr[j]
                m[i] = 1.0
                if tw is not None:
                    tw[i] = text_weights[c][j]
    return t, m, tw


@torch.no_grad()
def run_g(g, support: np.ndarray, text: np.ndarray, text_mask: np.ndarray, tw=None, chosen=()):
    """G on one episode; `chosen` (the episode's class keys) hides those classes from a calibrating
    G's base-class memory."""
    n, k, d = support.shape
    if k == 0:
        sup = torch.zeros(n, 1, d)
        sm = torch.zeros(n, 1)
    else:
        sup = torch.from_numpy(support).float()
        sm = torch.ones(n, k)
    return g(sup, sm, torch.from_numpy(text), torch.from_numpy(text_mask),
             None if tw is None else torch.from_numpy(tw), memory_exclude=g.memory_exclude(chosen))


def evaluate(g, emb: dict, texts: dict, classes: list[str], n_way: int, k: int, q: int,
             episodes: int, use_text: bool, seed: int = 0, temp: float = 1.0, text_weights=None):
    """Returns dict(acc, ci95, probs [E*N*q, N], labels) on seeded episodes."""
    rng = np.random.default_rng(seed)
    t_dim = next(iter(texts.values())).shape[1] if texts else 384
    accs, all_p, all_y = [], [], []
    was = g.training
    g.eval()
    for _ in range(episodes):
        s, qx, y, chosen = sample_episode(rng, emb, classes, n_way, k, q)
        t, tm, tw = text_for(chosen, texts, rng, use_text, t_dim, text_weights)
        w, b, sc = run_g(g, s, t, tm, tw, chosen)
        lg = logits(torch.from_numpy(qx).float(), w, b, sc) * temp
        p = torch.softmax(lg, -1).numpy()
        accs.append(float((p.argmax(-1) == y).mean()))
        all_p.append(p)
        all_y.append(y)
    g.train(was)
    accs = np.asarray(accs)
    return {
        "acc": float(accs.mean()),
        "ci95": float(1.96 * accs.std(ddof=1) / math.sqrt(len(accs))) if len(accs) > 1 else 0.0,
        "probs": all_p,
        "labels": all_y,
    }


def ece(probs_list, labels_list, bins: int = 15) -> float:
    conf = np.concatenate([p.max(-1) for p in probs_list])
    pred = np.concatenate([p.argmax(-1) for p in probs_list])
    y = np.concatenate(labels_list)
    correct = (pred == y).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def fit_temperature(probs_logits: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """probs_logits: list of (logits [M,N], labels [M]); grid search T minimising NLL."""
    best, best_t = 1e18, 1.0
    for t in np.exp(np.linspace(math.log(0.25), math.log(4.0), 57)):
        nll = 0.0
        for lg, y in probs_logits:
            z = lg * t
            z = z - z.max(-1, keepdims=True)
            lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            nll -= lp[np.arange(len(y)), y].sum()
        if nll < best:
            best, best_t = nll, float(t)
    return best_t


def refer_threshold(probs_list, labels_list) -> dict:
    """Refer when max p < t. t maximises (+1 correct accepted, -1 wrong accepted, 0 referred)."""
    conf = np.concatenate([p.max(-1) for p in probs_list])
    pred = np.concatenate([p.argmax(-1) for p in probs_list])
    y = np.concatenate(labels_list)
    ok = pred == y
    best = None
    for t in np.round(np.arange(0.30, 0.951, 0.01), 2):
        acc_mask = conf >= t
        util = (ok & acc_mask).sum() - ((~ok) & acc_mask).sum()
        if best is None or util > best[0]:
            best = (util, float(t))
    t = best[1]
    acc_mask = conf >= t
    return {
        "threshold": t,
        "refer_rate": float(1 - acc_mask.mean()),
        "accepted_accuracy": float(ok[acc_mask].mean()) if acc_mask.any() else 0.0,
    }


@torch.no_grad()
def collect_logits(g, emb, texts, classes, n_way, k, q, episodes, use_text, seed, text_weights=None):
    rng = np.random.default_rng(seed)
    t_dim = next(iter(texts.values())).shape[1]
    out = []
    g.eval()
    for _ in range(episodes):
        s, qx, y, chosen = sample_episode(rng, emb, classes, n_way, k, q)
        t, tm, tw = text_for(chosen, texts, rng, use_text, t_dim, text_weights)
        w, b, sc = run_g(g, s, t, tm, tw, chosen)
        out.append((logits(torch.from_numpy(qx).float(), w, b, sc).numpy(), y))
    return out


def proto_acc(emb_by_class: dict, classes, n_way, k, q, episodes_n, seed=0) -> float:
    """Prototype (imprinting) accuracy on seeded N-way K-shot episodes."""
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(episodes_n):
        s, qx, y, _ = sample_episode(rng, emb_by_class, classes, n_way, k, q)
        w = s.mean(1)
        w /= np.linalg.norm(w, axis=1, keepdims=True) + 1e-8
        accs.append(float(((qx @ w.T).argmax(-1) == y).mean()))
    return float(np.mean(accs))
