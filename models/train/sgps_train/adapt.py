"""Encoder adaptation on base classes, CPU-budgeted.

The Lite0 trunk up to the end of stage 6 (block 15, 192x7x7) stays frozen at its starting weights
(ImageNet, or the self-supervised ones of ssl.py) and is run once per training image (cached). The top - stage 7 (block 15), the 1x1 head conv and
its BN - is fine-tuned on the cached maps with a cosine classifier over the 16 base classes
(ISIC base classes up-weighted: they are the in-domain dermoscopy data), with flip/rot90
augmentation in feature-map space. The epoch with the best base-class validation (held-out base
images, prototype accuracy in ISIC-base 4-way and all-base 5-way episodes) is kept.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import cache, data, embed, lite0

log = logging.getLogger("sgps_train.adapt")

def split_block(model: lite0.Lite0) -> int:
    """The first block of the top (blocks before it are the frozen trunk): the last block (stage 7) -
    15 for Lite0, 20 for Lite1 / Lite2."""
    return len(model._blocks) - 1


def trunk(model: lite0.Lite0, x):
    return model.run_blocks(model.stem(x), 0, split_block(model))


def top(model: lite0.Lite0, maps):
    return model.head(model.run_blocks(maps, split_block(model), None))


def npy_cache(work: Path, prefix: str, items, salt: str, make) -> np.ndarray:
    """`make()` cached as work/<prefix>_<key>.npy, key = SHA-256 of the file list and `salt`."""
    key = hashlib.sha256(("\n".join(i.path for i in items) + salt).encode()).hexdigest()[:16]
    path = work / f"{prefix}_{key}.npy"
    if path.exists():
        log.info("cache hit %s", path.name)
        return np.load(path)
    arr = make()

    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, arr)

    cache.save_atomic(path, write)
    return arr


def cache_trunk(model, data_dir: Path, items, work: Path, tag: str, model_key: str = "") -> np.ndarray:
    """Frozen-trunk maps [n, 192, 7, 7] float16, cached on disk under work/ keyed by the file list
    and `model_key` (empty for the ImageNet weights, else a key naming the trunk's weights)."""
    model.eval()
    return npy_cache(work, f"trunk_{tag}", items, f"|{split_block(model)}{model_key}", lambda: embed.embed_items(
        lambda x: trunk(model, x).half(), data_dir, items, batch=32, desc=f"trunk {tag}"))


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random flips / 90-degree rotations of the feature maps, per sample."""
    b = x.shape[0]
    out = x.clone()
    hf = torch.rand(b) < 0.5
    out[hf] = out[hf].flip(-1)
    vf = torch.rand(b) < 0.5
    out[vf] = out[vf].flip(-2)
    rt = torch.rand(b) < 0.5
    out[rt] = out[rt].transpose(-1, -2)
    return out


class CosineHead(nn.Module):
    def __init__(self, init: torch.Tensor, scale: float = 16.0):
        super().__init__()
        self.w = nn.Parameter(init.clone())
        self.scale = scale

    def forward(self, f):
        return self.scale * F.normalize(f, dim=-1) @ F.normalize(self.w, dim=-1).T


def proto_score(feats: np.ndarray, items, episodes_n: int, seed: int = 5) -> tuple[float, float]:
    """(ISIC-base 4-way, all-base 5-way) prototype accuracy averaged over 1- and 5-shot."""
    from .data import ISIC_BASE, group
    from .episodes import proto_acc

    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    emb = group(f, items)
    isic = [c for c in ISIC_BASE if c in emb]
    s_isic = float(np.mean([proto_acc(emb, isic, 4, k, 5, episodes_n, seed) for k in (1, 5)])) if len(isic) == 4 else 0.0
    s_all = float(np.mean([proto_acc(emb, list(emb), 5, k, 5, episodes_n, seed + 1) for k in (1, 5)]))
    return s_isic, s_all


@torch.no_grad()
def top_features(model, maps: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(maps), batch):
        out.append(top(model, torch.from_numpy(maps[i : i + batch]).float()).numpy())
    return np.concatenate(out)


def sampling_weights(items, isic_weight: float):
    """(classes, label index per item, sampling probability per item): class-balanced, with the
    ISIC classes (in-domain dermoscopy) getting `isic_weight` of the total mass."""
    classes = sorted({it.key for it in items})
    cidx = {c: i for i, c in enumerate(classes)}
    y = np.asarray([cidx[it.key] for it in items])
    is_isic = np.asarray([it.dataset == "isic" for it in items])
    n_isic_cls = len({it.key for it in items if it.dataset == "isic"})
    n_other_cls = len(classes) - n_isic_cls
    counts = np.bincount(y, minlength=len(classes)).astype(np.float64)
    w = np.where(is_isic, isic_weight / max(n_isic_cls, 1), (1 - isic_weight) / max(n_other_cls, 1)) / counts[y]
    return classes, y, w / w.sum()


def adapt_encoder(model: lite0.Lite0, maps_a: np.ndarray, items_a, maps_val: np.ndarray, items_val,
                  quick: bool = False, seed: int = 0, epochs: int = 8, lr: float = 3e-4,
                  isic_weight: float = 0.5, batch: int = 64):
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(model)
    classes, y, w = sampling_weights(items_a, isic_weight)

    feats0 = top_features(model, maps_a)
    init = torch.from_numpy(np.stack([feats0[y == i].mean(0) for i in range(len(classes))])).float()
    head = CosineHead(init)
    params = [p for n, p in model.named_parameters() if n.startswith(f"_blocks.{split_block(model)}") or n.startswith("_conv_head") or n.startswith("_bn1")]
    opt = torch.optim.AdamW([{"params": params, "lr": lr, "weight_decay": 1e-4}, {"params": head.parameters(), "lr": lr * 10, "weight_decay": 0}])
    steps_per_epoch = max(1, len(items_a) // batch)
    if quick:
        epochs, steps_per_epoch = 1, 1
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 10], total_steps=total, pct_start=0.15)

    base_score = proto_score(top_features(model, maps_val), items_val, 20 if quick else 200)
    log.info("adapt: unadapted top, base-val proto acc ISIC-base %.4f all-base %.4f", *base_score)
    best = (sum(base_score), copy.deepcopy(model.state_dict()), 0)
    history = [{"epoch": 0, "isic_base": round(base_score[0], 4), "all_base": round(base_score[1], 4)}]
    tm = torch.from_numpy(maps_a)
    ty = torch.from_numpy(y)
    for ep in range(1, epochs + 1):
        model.train()
        # frozen trunk BN stays irrelevant; top BN trains
        tl, tn = 0.0, 0
        for _ in range(steps_per_epoch):
            idx = torch.from_numpy(rng.choice(len(y), size=batch, p=w))
            x = augment(tm[idx].float())
            f = top(model, x)
            loss = F.cross_entropy(head(f), ty[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tl += float(loss) * len(idx)
            tn += len(idx)
        s = proto_score(top_features(model, maps_val), items_val, 20 if quick else 200)
        history.append({"epoch": ep, "loss": round(tl / tn, 4), "isic_base": round(s[0], 4), "all_base": round(s[1], 4)})
        log.info("adapt epoch %d: loss %.4f, base-val proto acc ISIC-base %.4f all-base %.4f (%.0f s)", ep, tl / tn, s[0], s[1], time.time() - t0)
        if sum(s) > best[0]:
            best = (sum(s), copy.deepcopy(model.state_dict()), ep)
    model.load_state_dict(best[1])
    model.eval()
    report = {
        "method": "frozen trunk (ImageNet or self-supervised weights) to block 15 (cached), fine-tune block 15 + head conv/BN with a cosine classifier over the 16 base classes; feature-map flip/rot90 augmentation; ISIC base classes get %.0f%% of the sampling mass" % (100 * isic_weight),
        "epochs": epochs,
        "lr": lr,
        "batch": batch,
        "train_images": len(items_a),
        "selected_epoch": best[2],
        "history": history,
        "seconds": round(time.time() - t0, 1),
    }
    return model, report

