"""Supervised fine-tuning of the whole image encoder on base classes (after self-supervision).

Every layer of Lite0 is trained, at a low learning rate (LR, one-cycle), with a cosine classifier
over the base classes of the encoder-training split (class-balanced sampling, the ISIC base classes
getting half of the mass, as in adapt.py) on augmented views made by ssl.augment (square crop of
35-100 % of the area, flip, rot90, colour x0.8-1.2) at SIZE px. The epoch with the best base-class
validation (prototype accuracy on held-out base images, as in adapt.py) is kept, the starting
weights included. The weights are cached in the work dir, keyed by the starting weights, both
image lists and every setting here.

Why: on a GPU (device probe, models/README.md) whole-network supervision at lr 1e-4 after SimCLR
raised novel-class imprinting by 0.7-3.2 points, where training only the top (adapt.py) lost
0.3-0.8. Whether it is used is decided by heldout.adaptation_check on base classes held out of it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import adapt, cache, lite0, ssl

log = logging.getLogger("sgps_train.finetune")

SIZE = 224  # training resolution (= the deployed input size)
EPOCHS = 6
LR = 1e-4
BATCH = 64
ISIC_WEIGHT = 0.5
VAL_EPISODES = 200


def settings() -> dict:
    return {"size": SIZE, "epochs": EPOCHS, "lr": LR, "batch": BATCH, "isic_weight": ISIC_WEIGHT,
            "crop_area": list(ssl.CROP_AREA), "jitter": ssl.JITTER}


@torch.no_grad()
def pool_features(model: lite0.Lite0, pool: torch.Tensor, batch: int = 128) -> np.ndarray:
    """Pooled features of uint8 images [n, 3, SIZE, SIZE] (already the deployed centre crop)."""
    model.eval()
    out = []
    for i in range(0, len(pool), batch):
        x = ssl.normalise(pool[i : i + batch].float() / 255.0)
        out.append(model.features(x.contiguous(memory_format=torch.channels_last)).numpy())
    return np.concatenate(out)


def finetune(model: lite0.Lite0, pool_a: torch.Tensor, items_a, pool_val: torch.Tensor, items_val,
             quick: bool = False, seed: int = 0) -> tuple[lite0.Lite0, dict]:
    """A copy of `model` with every layer fine-tuned on `pool_a` (uint8 images of `items_a`), the
    epoch chosen on `pool_val`; returns (model, report). Trains EPOCHS read at call time, the value
    finetune_cached's key records (1 step when `quick`)."""
    if len({it.key for it in items_a}) < 2:
        raise ValueError("whole-encoder fine-tuning needs at least 2 base classes")
    epochs = EPOCHS
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = copy.deepcopy(model).to(memory_format=torch.channels_last)
    classes, y, w = adapt.sampling_weights(items_a, ISIC_WEIGHT)
    f0 = pool_features(net, pool_a)
    head = adapt.CosineHead(torch.from_numpy(np.stack([f0[y == i].mean(0) for i in range(len(classes))])).float())
    params = [p for n, p in net.named_parameters() if not n.startswith("_fc.")]
    opt = torch.optim.AdamW([{"params": params, "lr": LR, "weight_decay": 1e-4},
                             {"params": head.parameters(), "lr": LR * 10, "weight_decay": 0}])
    batch = min(BATCH, len(items_a))
    steps = max(1, len(items_a) // batch)
    if quick:
        epochs, steps = 1, 1
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[LR, LR * 10], total_steps=epochs * steps, pct_start=0.1)
    n_ep = 20 if quick else VAL_EPISODES
    score = adapt.proto_score(pool_features(net, pool_val), items_val, n_ep)
    log.info("finetune: start, base-val proto acc ISIC-base %.4f all-base %.4f", *score)
    best = (sum(score), copy.deepcopy(net.state_dict()), 0)
    history = [{"epoch": 0, "isic_base": round(score[0], 4), "all_base": round(score[1], 4)}]
    ty = torch.from_numpy(y)
    for ep in range(1, epochs + 1):
        net.train()
        tl = 0.0
        for _ in range(steps):
            idx = torch.from_numpy(rng.choice(len(y), size=batch, p=w))
            x = ssl.augment(pool_a[idx], SIZE, gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(head(net.features(x)), ty[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item()
        score = adapt.proto_score(pool_features(net, pool_val), items_val, n_ep)
        history.append({"epoch": ep, "loss": round(tl / steps, 4), "isic_base": round(score[0], 4),
                        "all_base": round(score[1], 4)})
        log.info("finetune epoch %d/%d: loss %.4f, base-val proto acc ISIC-base %.4f all-base %.4f (%.0f s)",
                 ep, epochs, tl / steps, score[0], score[1], time.time() - t0)
        if sum(score) > best[0]:
            best = (sum(score), copy.deepcopy(net.state_dict()), ep)
    net.load_state_dict(best[1])
    net = net.to(memory_format=torch.contiguous_format).eval()
    report = {"method": "whole encoder fine-tuned (every layer), cosine classifier over the base classes of the "
                        "encoder-training split, augmented views, best base-validation epoch kept",
              **settings(), "epochs": epochs, "train_images": len(items_a), "classes": len(classes),
              "selected_epoch": best[2], "history": history, "seconds": round(time.time() - t0, 1)}
    return net, report


class Pools:
    """The uint8 SIZE px centre crops of images, each decoded once and shared by the fine-tuning runs."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self._images: dict[str, torch.Tensor] = {}

    def get(self, items) -> torch.Tensor:
        """uint8 [len(items), 3, SIZE, SIZE]."""
        new = [it for it in items if it.path not in self._images]
        if new:
            t0 = time.time()
            for it, im in zip(new, ssl.load_pool(self.data_dir, new, SIZE)):
                self._images[it.path] = im
            log.info("finetune: %d images decoded at %d px (%.0f s)", len(new), SIZE, time.time() - t0)
        return torch.stack([self._images[it.path] for it in items])


def finetune_cached(model: lite0.Lite0, model_key: str, pools: Pools, items_a, items_val, work: Path,
                    quick: bool = False, seed: int = 0) -> tuple[lite0.Lite0, str, dict]:
    """`finetune`, the weights and report cached as work/ft_<key>.pt / .json (key: `model_key`
    naming the starting weights, both image lists, the settings, seed and quick). Returns
    (model, key, report)."""
    s = (model_key + "\n" + "\n".join(it.path for it in items_a) + "|" + "\n".join(it.path for it in items_val)
         + f"|{sorted(settings().items())}|{seed}|{quick}")
    key = hashlib.sha256(s.encode()).hexdigest()[:16]
    path, rpath = work / f"ft_{key}.pt", work / f"ft_{key}.json"
    if path.exists() and rpath.exists():
        log.info("cache hit %s", path.name)
        net = copy.deepcopy(model)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval(), key, json.loads(rpath.read_text())
    with ssl.keep_freed_memory():  # also for the no-grad feature passes (about 2x faster)
        net, report = finetune(model, pools.get(items_a), items_a, pools.get(items_val), items_val, quick=quick, seed=seed)
    cache.save_atomic(rpath, lambda t: t.write_text(json.dumps(report)))
    cache.save_atomic(path, lambda t: torch.save(net.state_dict(), t))
    return net, key, report
