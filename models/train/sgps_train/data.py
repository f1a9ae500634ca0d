"""Data access: the fixed class split, image listing from manifest.csv, preprocessing."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

INPUT_SIZE = 224

# The fixed split (../shared/DESIGN.md). Novel classes are never used for training, early
# stopping, model selection or calibration.
NOVEL = {
    ("isic", "actinic_keratosis"),
    ("isic", "dermatofibroma"),
    ("isic", "squamous_cell_carcinoma"),
    ("isic", "vascular_lesion"),
}
BASE_DATASETS = ["isic", "brain_mri", "blood_cells", "breast_us", "chest_xray"]
# Skin conditions added later (all base): used by the synthesizer stage (conditions.py), not by
# the encoder stage, whose cached runs and checks stay on BASE_DATASETS.
CONDITION_DATASETS = ["dermnet", "sd198", "derm7pt"]


@dataclass(frozen=True)
class Item:
    path: str  # relative to the data dir
    dataset: str
    cls: str

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.cls}"


def read_manifest(data_dir: Path) -> list[Item]:
    mf = data_dir / "manifest.csv"
    if not mf.exists():
        raise FileNotFoundError(
            f"{mf} not found: pass --data pointing at the medical few-shot image collection "
            "(the folder with manifest.csv, e.g. ../shared/data)"
        )
    items = []
    with mf.open(newline="") as f:
        for row in csv.DictReader(f):
            items.append(Item(row["path"], row["dataset"], row["class"]))
    return items


def base_items(items: list[Item]) -> list[Item]:
    return [
        it
        for it in items
        if it.dataset in BASE_DATASETS and it.cls and (it.dataset, it.cls) not in NOVEL
    ]


def all_base_items(items: list[Item]) -> list[Item]:
    """Every base class of the fixed split (251): BASE_DATASETS plus CONDITION_DATASETS."""
    keep = set(BASE_DATASETS) | set(CONDITION_DATASETS)
    return [it for it in items if it.dataset in keep and it.cls and (it.dataset, it.cls) not in NOVEL]


def novel_items(items: list[Item]) -> list[Item]:
    return [it for it in items if (it.dataset, it.cls) in NOVEL]


def by_class(items: list[Item]) -> dict[str, list[Item]]:
    out: dict[str, list[Item]] = {}
    for it in items:
        out.setdefault(it.key, []).append(it)
    return dict(sorted(out.items()))


def split_images(items: list[Item], frac_a: float, seed: int = 0):
    """Per-class random split of images into (A, B)."""
    rng = random.Random(seed)
    a, b = [], []
    for _, its in by_class(items).items():
        its = sorted(its, key=lambda i: i.path)
        rng.shuffle(its)
        n = int(round(len(its) * frac_a))
        a += its[:n]
        b += its[n:]
    return a, b


def subsample(items: list[Item], per_class: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    out = []
    for _, its in by_class(items).items():
        its = sorted(its, key=lambda i: i.path)
        rng.shuffle(its)
        out += its[:per_class]
    return out


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int = INPUT_SIZE) -> Image.Image:
    """Resize the shorter side to `size` (bilinear/triangle) and centre-crop to size x size."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BILINEAR)
    left = (nw - size) // 2
    top = (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def to_tensor(im: Image.Image, mean, std) -> np.ndarray:
    """HWC uint8 RGB -> CHW float32 normalised ((x/255 - mean) / std)."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def preprocess_file(path: Path, mean, std, size: int = INPUT_SIZE) -> np.ndarray:
    return to_tensor(resize_center_crop(load_rgb(path), size), mean, std)


def is_dermoscopic(key: str) -> bool:
    """A dermoscopic class ("dataset/class"): ISIC or derm7pt; the rest are clinical photos or other modalities."""
    return key.startswith(("isic/", "derm7pt/"))


ISIC_BASE = ["isic/basal_cell_carcinoma", "isic/melanoma", "isic/nevus", "isic/pigmented_benign_keratosis"]


def group(emb: np.ndarray, items) -> dict[str, np.ndarray]:
    """Embeddings by class key (rows of `emb` in `items` order), classes sorted."""
    out: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(it.key, []).append(i)
    return {k: emb[np.asarray(v)] for k, v in sorted(out.items())}
