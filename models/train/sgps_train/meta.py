"""Episodic meta-training of the synthesizer G on cached base-class embeddings.

Tasks mix (i) dermoscopic tasks (the ISIC base classes; with a domain-aware G every dermoscopic
class, ISIC base + derm7pt), (ii) tasks inside one other base dataset and (iii) tasks across all
base classes; K in 0..10 (per-class shots randomly
dropped), text present or dropped per episode and per class. The text weight fed to G during
training comes from a text->embedding projection fitted WITHOUT the episode's class (leave-one-
class-out ridge), so G learns how much to trust text on classes the projection never saw - the
situation of a user's new class. For the same reason a calibrating G (Synthesizer.calib) never sees
an episode's own classes in its base-class memory. Model selection on held-out base images (split B2).
"""

from __future__ import annotations

import copy
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from .data import is_dermoscopic
from .synth import Synthesizer, l2n, logits

log = logging.getLogger("sgps_train.meta")

ISIC_PREFIX = "isic/"


def ridge(X: np.ndarray, Y: np.ndarray, lam: float) -> np.ndarray:
    Xa = np.concatenate([X, np.ones((len(X), 1))], 1)
    return np.linalg.solve(Xa.T @ Xa + lam * np.eye(Xa.shape[1]), Xa.T @ Y)


def class_means(emb: dict) -> dict:
    out = {}
    for c, e in emb.items():
        m = e.mean(0)
        out[c] = m / (np.linalg.norm(m) + 1e-8)
    return out


def loo_text_weights(emb: dict, texts: dict, lam: float) -> dict:
    """class -> [n_desc, D] text weights from a ridge projection fitted without that class."""
    means = class_means(emb)
    out = {}
    for c in texts:
        X = np.concatenate([texts[o] for o in texts if o != c and o in means])
        Y = np.concatenate([np.repeat(means[o][None], len(texts[o]), 0) for o in texts if o != c and o in means])
        W = ridge(X.astype(np.float64), Y.astype(np.float64), lam)
        tw = np.concatenate([texts[c], np.ones((len(texts[c]), 1))], 1) @ W
        out[c] = (tw / (np.linalg.norm(tw, axis=1, keepdims=True) + 1e-8)).astype(np.float32)
    return out


class TaskSampler:
    def __init__(self, emb: dict, tw: dict, texts: dict, rng: np.random.Generator, text_with_images: bool = True,
                 derm_pool: bool = False, memory_exclude=None):
        self.text_with_images = text_with_images
        # a calibrating G's Synthesizer.memory_exclude: each episode hides its own classes' memory rows
        self.memory_exclude = memory_exclude
        self.emb = {c: torch.from_numpy(e).float() for c, e in emb.items()}
        self.tw = {c: torch.from_numpy(v).float() for c, v in tw.items()}
        self.texts = {c: torch.from_numpy(v).float() for c, v in texts.items()}
        self.classes = list(emb)
        # the dermoscopic task pool: ISIC base classes, or (derm_pool) every dermoscopic class;
        # the other classes are pooled by dataset
        self.isic = [c for c in self.classes if (is_dermoscopic(c) if derm_pool else c.startswith(ISIC_PREFIX))]
        self.by_ds = {}
        for c in self.classes:
            if c not in self.isic:
                self.by_ds.setdefault(c.split("/")[0], []).append(c)
        self.rng = rng
        self.dim = next(iter(self.emb.values())).shape[1]
        self.tdim = next(iter(self.texts.values())).shape[1]

    def pick_pool(self):
        r = self.rng.random()
        if r < 0.4 and len(self.isic) >= 2:
            return self.isic
        if r < 0.7:
            ds = [d for d, cs in self.by_ds.items() if len(cs) >= 2]
            return self.by_ds[ds[self.rng.integers(len(ds))]] if ds else self.classes
        return self.classes

    def batch(self, b: int, q: int = 10):
        """A batch of b episodes with the same N and K_max."""
        pool_cls = self.pick_pool()
        n = min(int(self.rng.integers(2, 9)), len(pool_cls))
        k = int(self.rng.choice([0, 1, 1, 2, 3, 5, 5, 8, 10]))
        kk = max(k, 1)
        S = torch.zeros(b, n, kk, self.dim)
        SM = torch.zeros(b, n, kk)
        T = torch.zeros(b, n, self.tdim)
        TW = torch.zeros(b, n, self.dim)
        TM = torch.zeros(b, n)
        Q, Y, EX = [], [], []
        use_text_ep = (self.rng.random() < 0.6 and self.text_with_images) or k == 0
        for e in range(b):
            cls = list(self.rng.choice(pool_cls, size=n, replace=False))
            if self.memory_exclude is not None:
                EX.append(self.memory_exclude(cls))
            qs, ys = [], []
            for i, c in enumerate(cls):
                pool = self.emb[c]
                idx = torch.from_numpy(self.rng.choice(len(pool), size=kk + q, replace=len(pool) < kk + q))
                if k > 0:
                    kc = k if self.rng.random() < 0.7 else int(self.rng.integers(1, k + 1))
                    S[e, i, :kc] = pool[idx[:kc]]
                    SM[e, i, :kc] = 1.0
                qs.append(pool[idx[kk:]])
                ys.append(torch.full((q,), i))
                if use_text_ep and (k == 0 or self.rng.random() < 0.85):
                    j = int(self.rng.integers(len(self.texts[c])))
                    T[e, i] = self.texts[c][j]
                    TW[e, i] = self.tw[c][j]
                    TM[e, i] = 1.0
            Q.append(torch.cat(qs))
            Y.append(torch.cat(ys))
        if k == 0:  # every class needs text when there are no shots
            TM[:] = 1.0
        return S, SM, T, TW, TM, torch.stack(Q), torch.stack(Y), torch.stack(EX) if EX else None


@torch.no_grad()
def val_score(g: Synthesizer, emb_val: dict, texts: dict, seed: int, n_ep: int, tw: dict) -> dict:
    from .episodes import evaluate
    from .data import ISIC_BASE

    isic = [c for c in ISIC_BASE if c in emb_val]
    out = {}
    for k in (1, 5):
        for use_text in (True, False):
            if len(isic) == 4:
                out[f"isic4_{k}_{int(use_text)}"] = evaluate(g, emb_val, texts, isic, 4, k, 10, n_ep, use_text, seed + k, text_weights=tw)["acc"]
            out[f"all5_{k}_{int(use_text)}"] = evaluate(g, emb_val, texts, list(emb_val), 5, k, 10, n_ep // 2, use_text, seed + 10 + k, text_weights=tw)["acc"]
    out["score"] = float(np.mean([v for kk, v in out.items() if kk.startswith("isic4")] or [0.0])) * 0.7 + float(
        np.mean([v for kk, v in out.items() if kk.startswith("all5")])) * 0.3
    return out


def meta_train(g: Synthesizer, emb_train: dict, emb_val: dict, texts: dict, quick: bool = False, seed: int = 0,
               steps: int = 1500, lr: float = 1e-3, batch: int = 16, eval_every: int = 250, ridge_lam: float = 0.1):
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tw = loo_text_weights(emb_train, texts, ridge_lam)
    sampler = TaskSampler(emb_train, tw, texts, rng, text_with_images=g.text_with_images,
                          derm_pool=g.derm_pool, memory_exclude=g.memory_exclude if g.calib else None)
    if quick:
        steps, eval_every = 4, 2
    n_val = 10 if quick else 150
    opt = torch.optim.AdamW([p for n, p in g.named_parameters() if not n.startswith("text_proj")], lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    v0 = val_score(g, emb_val, texts, 1000, n_val, tw)
    log.info("meta: step 0 (= imprinting) validation %s", {k: round(v, 4) for k, v in v0.items()})
    best = (v0["score"], copy.deepcopy(g.state_dict()), 0)
    history = [{"step": 0} | {k: round(v, 4) for k, v in v0.items()}]
    g.train()
    run_loss = 0.0
    for step in range(1, steps + 1):
        S, SM, T, TW, TM, Q, Y, EX = sampler.batch(batch)
        w, b, sc = g(S, SM, T, TM, text_weight=TW, memory_exclude=EX)
        lg = logits(Q, w, b, sc)
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), Y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(g.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss = 0.98 * run_loss + 0.02 * float(loss) if step > 1 else float(loss)
        if step % eval_every == 0 or step == steps:
            v = val_score(g, emb_val, texts, 1000, n_val, tw)
            g.train()
            history.append({"step": step, "loss": round(run_loss, 4)} | {k: round(x, 4) for k, x in v.items()})
            log.info("meta step %d loss %.4f val %s (%.0f s)", step, run_loss, {k: round(x, 4) for k, x in v.items()}, time.time() - t0)
            if v["score"] > best[0]:
                best = (v["score"], copy.deepcopy(g.state_dict()), step)
    g.load_state_dict(best[1])
    g.eval()
    report = {
        "text_weights_in_training": "leave-one-class-out ridge projection (lambda %g)" % ridge_lam,
        "steps": steps,
        "batch_episodes": batch,
        "lr": lr,
        "selected_step": best[2],
        "selection": "0.7 * ISIC-base 4-way + 0.3 * all-base 5-way accuracy (1/5-shot, with/without text) on held-out base images",
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    return g, report, tw
