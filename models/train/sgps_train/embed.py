"""Batch embedding of image files / texts with PyTorch (used for caching and reference data)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from . import data, lite0

log = logging.getLogger("sgps_train.embed")


def load_batch(data_dir: Path, items, size=data.INPUT_SIZE):
    return np.stack([data.preprocess_file(data_dir / it.path, lite0.MEAN, lite0.STD, size) for it in items])


@torch.no_grad()
def embed_items(fn, data_dir: Path, items, batch: int = 64, desc: str = "embed") -> np.ndarray:
    """fn: tensor [B,3,H,W] -> tensor [B,D]. Returns float32 [len(items), D]."""
    out = []
    t0 = time.time()
    for i in range(0, len(items), batch):
        x = torch.from_numpy(load_batch(data_dir, items[i : i + batch]))
        out.append(fn(x).float().numpy())
        if (i // batch) % 20 == 0:
            log.info("%s: %d/%d images (%.0f s)", desc, i + len(out[-1]), len(items), time.time() - t0)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@torch.no_grad()
def embed_texts(model, tok, texts: list[str]) -> np.ndarray:
    return model(*tok(texts)).numpy()
