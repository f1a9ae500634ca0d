"""Self-supervised training of the encoder top on unlabelled dermoscopy (isic_unlabelled).

SimCLR (NT-Xent, temperature 0.2) on the top of EfficientNet-Lite0 (block SPLIT_BLOCK + 1x1 head
conv + BN), fed by frozen-trunk maps of `views` augmented versions of each unlabelled image
(random square crop of 35-100 % of the area, flip, rot90, brightness / contrast / colour
0.8-1.2), plus the feature-map flips of `adapt.augment`. The views are computed once and cached
under the work dir; an epoch over the 2,584 images then takes ~30 s on two cores. No labels are
read. Whether the result is used is decided by heldout.ssl_check (base classes only).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from . import adapt, data, lite0

log = logging.getLogger("sgps_train.ssl")

VIEWS = 4
EPOCHS = 12
LR = 3e-4
TEMPERATURE = 0.2
BATCH = 128


def augment_image(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    c = max(1, int(round(min(w, h) * np.sqrt(rng.uniform(0.35, 1.0)))))
    left, top = int(rng.integers(0, w - c + 1)), int(rng.integers(0, h - c + 1))
    im = im.crop((left, top, left + c, top + c)).resize((data.INPUT_SIZE, data.INPUT_SIZE), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    im = im.rotate(90 * int(rng.integers(0, 4)))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(float(rng.uniform(0.8, 1.2)))
    return im


def cache_views(model: lite0.Lite0, data_dir: Path, items, work: Path, views: int = VIEWS, seed: int = 0) -> np.ndarray:
    """Frozen-trunk maps of `views` augmented versions per image: [n, views, C, 7, 7] float16,
    cached on disk under work/ keyed by the file list, the number of views and the seed."""
    return adapt.npy_cache(work, "ssl_views", items, f"|{adapt.SPLIT_BLOCK}|{views}|{seed}",
                           lambda: _views(model, data_dir, items, views, seed))


@torch.no_grad()
def _views(model: lite0.Lite0, data_dir: Path, items, views: int, seed: int) -> np.ndarray:
    model.eval()
    rng = np.random.default_rng(seed)
    out = None
    t0 = time.time()
    for i in range(0, len(items), 32):
        ims = [data.load_rgb(data_dir / it.path) for it in items[i : i + 32]]
        for v in range(views):
            x = torch.from_numpy(np.stack([data.to_tensor(augment_image(im, rng), lite0.MEAN, lite0.STD) for im in ims]))
            maps = adapt.trunk(model, x).half().numpy()
            if out is None:
                out = np.zeros((len(items), views) + maps.shape[1:], np.float16)
            out[i : i + len(ims), v] = maps
        if (i // 32) % 20 == 0:
            log.info("ssl views: %d/%d images (%.0f s)", i + len(ims), len(items), time.time() - t0)
    return out


def train_top(model: lite0.Lite0, views: np.ndarray, epochs: int = EPOCHS, lr: float = LR, seed: int = 0) -> lite0.Lite0:
    """A copy of `model` whose top (blocks[SPLIT_BLOCK:] + head) is trained with SimCLR on `views`."""
    if views.shape[1] < 2:
        raise ValueError("SimCLR needs at least two views per image")
    torch.manual_seed(seed)
    net = copy.deepcopy(model)
    top_params = [p for b in net._blocks[adapt.SPLIT_BLOCK :] for p in b.parameters()]
    top_params += [*net._conv_head.parameters(), *net._bn1.parameters()]
    proj = torch.nn.Sequential(torch.nn.Linear(lite0.FEATURE_DIM, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128))
    opt = torch.optim.AdamW([{"params": top_params, "lr": lr}, {"params": proj.parameters(), "lr": 1e-3}],
                            weight_decay=1e-4)
    vt = torch.from_numpy(views)
    n_views = vt.shape[1]
    batch = min(BATCH, len(vt))
    for epoch in range(epochs):
        net.train()
        t0, total, steps = time.time(), 0.0, 0
        perm = torch.randperm(len(vt))
        for i in range(0, len(perm) - batch + 1, batch):
            idx = perm[i : i + batch]
            pick = torch.stack([torch.randperm(n_views)[:2] for _ in idx])
            x1 = adapt.augment(vt[idx, pick[:, 0]].float())
            x2 = adapt.augment(vt[idx, pick[:, 1]].float())
            z = F.normalize(proj(adapt.top(net, torch.cat([x1, x2]))), dim=-1)
            sim = z @ z.T / TEMPERATURE
            sim.fill_diagonal_(-1e9)
            n = len(idx)
            loss = F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        log.info("ssl epoch %d: loss %.3f (%.0f s)", epoch, total / max(steps, 1), time.time() - t0)
    return net.eval()
