"""Self-supervised training of the whole image encoder on dermoscopy images without labels.

SimCLR (NT-Xent, temperature 0.2, a 1280-512-128 projection that is thrown away) on every layer of
EfficientNet-Lite0, fed with pairs of augmented views of the pool images (isic_unlabelled plus the
encoder-training split's ISIC images, labels never read): random square crop of 35-100 % of the
area, flip, rot90 and brightness / contrast / saturation x0.8-1.2, all done batched in torch
(hue rotation, grey views, blur and multi-crop were screened on a device and lost - the colour ones
by about 9 points, colour is what tells these lesions apart; multi-crop -0.44 - and were removed;
models/train/HISTORY.md has the figures). A BYOL objective (OBJECTIVE = "byol") is kept, switched
off: it has not been screened yet and is the next candidate for a GPU session.
Training runs at SIZE px (128) to fit two CPU cores: an epoch over ~3,700 images takes 1.5-2.5 min (BYOL: 1.5x that)
(channels-last tensors, and glibc told to keep freed memory: without that, page faults on the big
activation tensors took half of every step); the encoder is still used at 224 px. The trained weights are cached in the work dir, keyed by the pool
file list and every setting here. Whether the result is used is decided by heldout.ssl_check on
base classes.

Why the whole network and not only the top: on a GPU (device experiment, see models/README.md) this
took novel-class imprinting from 41.6 / 54.5 (ImageNet) to 49.2 / 63.0 at 128 px x 15 epochs and
50.3 / 64.2 at 60 epochs, where SimCLR on the top alone gave about +3.5.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import cache, data, lite0

log = logging.getLogger("sgps_train.ssl")

SIZE = 128  # training resolution
STORE = 180  # images are held in memory as STORE x STORE uint8 (resize shorter side + centre crop)
EPOCHS = 48
LR = 3e-4
PROJ_LR = 1e-3
TEMPERATURE = 0.2  # 0.3 won the device screen (+0.70) but only +0.15 in the CPU recipe: rejected (models/README.md)
BATCH = 256  # images per step (2 views each)
CROP_AREA = (0.35, 1.0)
JITTER = 0.2
# objective: "simclr" (the recipe) or "byol" (BYOL: an online encoder + projector + predictor
# regresses the projection of the other view by a target network, the exponential moving average
# of the online one, momentum rising from BYOL_TAU to 1 on a cosine; no negatives); untried on a GPU
OBJECTIVE = "simclr"
BYOL_TAU = 0.99
# recompute activations in the backward pass (`train(low_memory=...)`, same result): None = only for
# the variants larger than Lite0 (run.py --ssl-recompute); not part of the cache key
LOW_MEMORY: bool | None = None


def settings() -> dict:
    # hue / grey / blur: the removed view options, at the "off" values they always had in the
    # recipe, so the cache keys of the shipped setting stay as they were
    s = {"size": SIZE, "store": STORE, "epochs": EPOCHS, "lr": LR, "temperature": TEMPERATURE,
         "batch": BATCH, "crop_area": list(CROP_AREA), "jitter": JITTER, "hue": 0.0, "gray_p": 0.0,
         "blur_p": 0.0, "blur_sigma": [0.1, 1.5]}
    if OBJECTIVE != "simclr":  # likewise
        s.update(objective=OBJECTIVE, byol_tau=BYOL_TAU)
    return s


def load_pool(data_dir: Path, items, store: int = STORE) -> torch.Tensor:
    """The pool images as uint8 [n, 3, store, store] (shorter side resized, centre crop)."""
    arr = np.stack([np.asarray(data.resize_center_crop(data.load_rgb(data_dir / it.path), store)) for it in items])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def augment(x: torch.Tensor, size: int, gen: torch.Generator, crop_area: tuple | None = None) -> torch.Tensor:
    """Batched random view of uint8 images [b, 3, h, w] -> normalised float [b, 3, size, size]:
    square crop of `crop_area` (default CROP_AREA) of the area at a random place, random flip and rot90 (one affine
    resampling), then brightness, contrast and saturation each x(1 +- JITTER). The random draws come
    from `gen` (a CPU generator) whatever device `x` is on."""
    b, dev = x.shape[0], x.device

    def uni(lo, hi, *shape):
        return (lo + (hi - lo) * torch.rand(b, *shape, generator=gen)).to(dev)

    x = x.float() / 255.0
    s = uni(*(CROP_AREA if crop_area is None else crop_area)).sqrt()
    tx, ty = uni(-1, 1) * (1 - s), uni(-1, 1) * (1 - s)
    k = torch.randint(0, 4, (b,), generator=gen).to(dev)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=dev)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=dev)[k]
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0).to(dev)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = s * cos * flip, -s * sin, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = s * sin * flip, s * cos, ty
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    x = x * uni(1 - JITTER, 1 + JITTER, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * uni(1 - JITTER, 1 + JITTER, 1, 1, 1) + m
    g = x.mean(dim=1, keepdim=True)
    x = (g + (x - g) * uni(1 - JITTER, 1 + JITTER, 1, 1, 1)).clamp(0, 1)
    return normalise(x)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1], [b, 3, h, w] -> the encoder's input normalisation."""
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (lite0.MEAN, lite0.STD))
    return (x - mean) / std


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
    """SimCLR loss: each view must pick its partner among the other 2n - 1 views (at TEMPERATURE,
    read when called, unless `temperature` is given)."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    sim = z @ z.T / (TEMPERATURE if temperature is None else temperature)
    sim.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device))


def bf16_on_gpu(dev: torch.device):
    """Autocast to bf16 on a GPU (the device probe); a no-op on the CPU, where the recipe runs in fp32."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


@contextlib.contextmanager
def keep_freed_memory():
    """glibc: serve every allocation from the heap and keep what is freed (M_MMAP_MAX = 0,
    M_TRIM_THRESHOLD = 1 GiB), so the step's activation tensors reuse pages instead of faulting in
    fresh ones (2x faster here); the defaults are restored and the heap trimmed afterwards. A no-op
    where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)
        libc.mallopt(-1, 1 << 30)
    except (OSError, AttributeError):
        libc = None
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-4, 65536)
            libc.mallopt(-1, 128 * 1024)
            libc.malloc_trim(0)


def checkpointed_features(net: lite0.Lite0, x: torch.Tensor) -> torch.Tensor:
    """net.features(x) keeping only each block's input for the backward pass (every block's forward
    is recomputed there): a fraction of the activation memory for about one more forward pass. The
    recomputation normalises with the same batch statistics, so the gradients are those of
    net.features; it also updates the batch-norm running statistics a second time, which the caller
    undoes (see `train`)."""
    from torch.utils.checkpoint import checkpoint as ckpt

    y = ckpt(net.stem, x, use_reentrant=False)
    for b in net._blocks:
        y = ckpt(b, y, use_reentrant=False)
    return net.head(y)


def train(model: lite0.Lite0, pool: torch.Tensor, epochs: int = EPOCHS, seed: int = 0, max_steps: int | None = None,
          checkpoint: Path | None = None, low_memory: bool = False) -> lite0.Lite0:
    """A copy of `model` with every layer trained by SimCLR (or BYOL, see OBJECTIVE) on `pool` (uint8 [n, 3, h, w]), on the
    pool's device (the recipe: CPU; the device probe: a GPU, where the forward pass runs in bf16).

    With `checkpoint`, the whole training state (weights, projection, optimiser, schedule, the view
    generator's state) is written there after every epoch, and a run that finds one resumes after its
    epoch: a cut run loses at most one epoch, and the resumed weights equal an uncut run's.

    `low_memory` recomputes each block's forward pass in the backward pass instead of keeping its
    activations (`checkpointed_features`; Lite1 needs 21.4 GB per step of 256 images x 2 views
    without it) and restores the batch-norm running statistics the recomputation updated again, so
    the trained weights and statistics are those of a run without it, at about a third more time."""
    if len(pool) < 2:
        raise ValueError(f"self-supervised training needs at least 2 images, got {len(pool)}")
    dev = pool.device
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(model).to(dev, memory_format=torch.channels_last)
    if OBJECTIVE not in ("simclr", "byol"):
        raise ValueError(f"ssl.OBJECTIVE must be 'simclr' or 'byol', not {OBJECTIVE!r}")
    byol = BYOL(net, dev) if OBJECTIVE == "byol" else None
    proj = byol.proj if byol else torch.nn.Sequential(torch.nn.Linear(lite0.FEATURE_DIM, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).to(dev)
    enc_params = [p for n, p in net.named_parameters() if not n.startswith("_fc.")]
    head_params = list(proj.parameters()) + (list(byol.pred.parameters()) if byol else [])
    opt = torch.optim.AdamW([{"params": enc_params, "lr": LR}, {"params": head_params, "lr": PROJ_LR}],
                            weight_decay=1e-4)
    batch = min(BATCH, len(pool))
    steps = len(pool) // batch
    if max_steps is not None:
        steps = min(steps, max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[LR, PROJ_LR], total_steps=epochs * steps, pct_start=0.05)
    first = 0
    if checkpoint is not None and checkpoint.exists():
        st = torch.load(checkpoint, map_location=dev, weights_only=True)
        net.load_state_dict(st["net"])
        (byol.target if byol else proj).load_state_dict(st["head"])
        if byol:
            byol.proj.load_state_dict(st["proj"])
            byol.pred.load_state_dict(st["pred"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"].cpu())
        first = int(st["epoch"]) + 1
        log.info("ssl: resumed from %s after epoch %d/%d", checkpoint.name, first, epochs)
    with keep_freed_memory():
        for epoch in range(first, epochs):
            net.train()
            t0, total = time.time(), 0.0
            perm = torch.randperm(len(pool), generator=gen).to(dev)
            for s in range(steps):
                x = pool[perm[s * batch : (s + 1) * batch]]
                views = torch.cat([augment(x, SIZE, gen), augment(x, SIZE, gen)])
                views = views.contiguous(memory_format=torch.channels_last)
                with bf16_on_gpu(dev):
                    z = proj(checkpointed_features(net, views) if low_memory else net.features(views)).float()
                if byol:
                    loss = byol.loss(z, views)
                else:
                    loss = nt_xent(z[: len(x)], z[len(x) :])
                opt.zero_grad()
                bn = [(b, b.clone()) for b in net.buffers()] if low_memory else []
                loss.backward()
                for b, kept in bn:  # undo the recomputation's second update of the running statistics
                    b.copy_(kept)
                opt.step()
                sched.step()
                if byol:
                    byol.update(net, (epoch * steps + s + 1) / (epochs * steps))
                total += loss.item()
            log.info("ssl epoch %d/%d: loss %.3f (%.0f s)", epoch + 1, epochs, total / max(steps, 1), time.time() - t0)
            if checkpoint is not None and epoch + 1 < epochs:
                st = {"net": net.state_dict(), "head": (byol.target if byol else proj).state_dict(),
                      "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(), "epoch": epoch}
                if byol:
                    st.update(proj=byol.proj.state_dict(), pred=byol.pred.state_dict())
                cache.save_atomic(checkpoint, lambda p: torch.save(st, p))
    return net.to(memory_format=torch.contiguous_format).eval()


class BYOL:
    """BYOL's parts beside the online encoder: a projector and a predictor (Linear-BN-ReLU-Linear,
    1280-512-128 and 128-512-128) and the target network (encoder + projector), an exponential
    moving average of the online ones that gets no gradient."""

    def __init__(self, net: lite0.Lite0, dev):
        def mlp(i):
            return torch.nn.Sequential(torch.nn.Linear(i, 512), torch.nn.BatchNorm1d(512), torch.nn.ReLU(),
                                       torch.nn.Linear(512, 128)).to(dev)

        self.proj, self.pred = mlp(lite0.FEATURE_DIM), mlp(128)
        self.target = torch.nn.ModuleDict({"net": copy.deepcopy(net), "proj": copy.deepcopy(self.proj)})
        self.target.requires_grad_(False)

    def loss(self, z: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        """Symmetric BYOL loss, 2 - 2 cos(prediction of one view, target projection of the other),
        averaged over both orders; z = online projections of the two view halves of `views`."""
        n = len(z) // 2
        with torch.no_grad(), bf16_on_gpu(views.device):
            self.target.train()
            t = self.target["proj"](self.target["net"].features(views)).float()
        with bf16_on_gpu(views.device):
            p = self.pred(z).float()
        p, t = F.normalize(p, dim=-1), F.normalize(t, dim=-1)
        return 2 - (p[:n] * t[n:]).sum(-1).mean() - (p[n:] * t[:n]).sum(-1).mean()

    @torch.no_grad()
    def update(self, net: lite0.Lite0, progress: float):
        """Target <- tau target + (1 - tau) online, tau = 1 - (1 - BYOL_TAU) (cos(pi progress) + 1) / 2;
        batch-norm buffers are copied."""
        tau = 1 - (1 - BYOL_TAU) * (math.cos(math.pi * progress) + 1) / 2
        for tgt, src in ((self.target["net"], net), (self.target["proj"], self.proj)):
            for pt, ps in zip(tgt.parameters(), src.parameters()):
                pt.lerp_(ps, 1 - tau)
            for bt, bs in zip(tgt.buffers(), src.buffers()):
                bt.copy_(bs)


def cache_key(items, seed: int, epochs: int, variant: str = "lite0") -> str:
    s = "\n".join(it.path for it in items) + f"|{sorted(settings().items())}|{epochs}|{seed}"
    if variant != "lite0":  # Lite0's keys stay as they were before the other variants existed
        s += f"|{variant}"
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def train_cached(model: lite0.Lite0, data_dir: Path, items, work: Path, epochs: int = EPOCHS, seed: int = 0,
                 max_steps: int | None = None) -> tuple[lite0.Lite0, str]:
    """`train` on the pool `items`, the weights cached as work/ssl_<key>.pt. Returns (model, key)."""
    key = cache_key(items, seed, epochs, getattr(model, "variant", "lite0")) + ("" if max_steps is None else f"s{max_steps}")
    path = work / f"ssl_{key}.pt"
    ckpt = work / f"ssl_{key}.resume.pt"
    if path.exists():
        log.info("cache hit %s", path.name)
        net = copy.deepcopy(model)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.eval(), key
    t0 = time.time()
    pool = load_pool(data_dir, items)
    log.info("ssl: %d images loaded (%.0f s); %d epochs at %d px", len(pool), time.time() - t0, epochs, SIZE)
    # Lite1 / Lite2 do not fit in 24 GB at the recipe's batch beside anything else without
    # recomputation (same result, but an epoch takes about 2.2x a Lite0 epoch here instead of ~1.3x)
    low_memory = getattr(model, "variant", "lite0") != "lite0" if LOW_MEMORY is None else LOW_MEMORY
    net = train(model, pool, epochs=epochs, seed=seed, max_steps=max_steps, checkpoint=ckpt, low_memory=low_memory)
    cache.save_atomic(path, lambda t: torch.save(net.state_dict(), t))
    ckpt.unlink(missing_ok=True)
    return net, key
