"""Held-out-class checks: would a recipe choice help on classes it never saw - the user's case?

The base-class validation split (B2) holds new *images* of classes the encoder and G were trained
on, so it rewards memorising those classes. These checks instead hold out a pair of ISIC base
classes at a time (the folds), train without them and score 2-way episodes on them. They use base
classes only; the novel classes are never touched. They decide (i) whether the self-supervised encoder
is kept (ssl_check; it never reads a label, so every class is held out for it), (ii) whether the
encoder is adapted, and how: top only or every layer (adaptation_check) and (iii) which parts of the synthesizer are switched on
(synth_check).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from . import adapt, episodes, finetune, lite0, meta
from .synth import Synthesizer

log = logging.getLogger("sgps_train.heldout")

FOLDS = [("isic/basal_cell_carcinoma", "isic/melanoma"), ("isic/nevus", "isic/pigmented_benign_keratosis")]

# A step that adds something (self-supervision, adaptation, a part of G) is taken only when it beats
# the simpler alternative by more than this on the held-out pairs (mean over folds and 1/5-shot,
# accuracy as a fraction). The 95% CI of one fold's 600-episode 2-way figure is about +-1.2 points,
# so about +-0.6 for the mean of four; half a point keeps noise from switching things on.
MIN_GAIN = 0.005



def passes(check: dict) -> bool:
    """Whether a check's mean gain is large enough to take the step it tested."""
    return check["mean_gain"] > MIN_GAIN


# synthesizer configurations, simplest first (ties within MIN_GAIN go to the simpler one)
CONFIGS = {
    "imprinting": {"text_with_images": False, "image_delta": False, "train": False},
    "image_delta": {"text_with_images": False, "image_delta": True, "train": True},
    "text_and_image_delta": {"text_with_images": True, "image_delta": True, "train": True},
}


def classes_accuracy(feats: np.ndarray, items, classes, n_ep: int) -> dict:
    """len(classes)-way prototype accuracy, 1- and 5-shot (15 queries, the checks' episode seeds),
    on the L2-normalised `feats` of those `items` whose class is in `classes`."""
    from .data import group
    from .episodes import proto_acc

    held = [i for i, it in enumerate(items) if it.key in classes]
    f = feats[held]
    emb = group(f / np.linalg.norm(f, axis=1, keepdims=True), [items[i] for i in held])
    return {k: proto_acc(emb, list(classes), len(classes), k, 15, n_ep, 11 + k) for k in (1, 5)}


def _pair_accuracy(model, maps: np.ndarray, items, fold, n_ep: int) -> dict:
    held = [i for i, it in enumerate(items) if it.key in fold]
    return classes_accuracy(adapt.top_features(model, maps[held]), [items[i] for i in held], fold, n_ep)


def _compare(fold, items, n_ep: int, old, new) -> tuple[dict, float]:
    """One fold's row: 2-way prototype accuracy (1/5-shot) of `old` and `new` ((tag, model, maps)
    triples; maps are each model's own trunk maps of `items`) on the fold's classes, and the gain
    new - old (mean over shots)."""
    row = {"held_out": list(fold)}
    for tag, m, maps in (old, new):
        for k, acc in _pair_accuracy(m, maps, items, fold, n_ep).items():
            row[f"{tag}_{k}shot"] = round(acc, 4)
    g = float(np.mean([row[f"{new[0]}_{k}shot"] - row[f"{old[0]}_{k}shot"] for k in (1, 5)]))
    row["gain"] = round(g, 4)
    return row, g


def _summary(rows_gains, n_ep: int, t0: float) -> dict:
    return {"folds": [r for r, _ in rows_gains], "episodes": n_ep,
            "mean_gain": round(float(np.mean([g for _, g in rows_gains])), 4), "min_gain": MIN_GAIN,
            "seconds": round(time.time() - t0, 1)}


def ssl_check(before: lite0.Lite0, maps_before: np.ndarray, after: lite0.Lite0, maps_after: np.ndarray, items,
              quick: bool = False, episodes_n: int = 600) -> dict:
    """Does the self-supervised encoder help on the fold pairs? 2-way prototype accuracy (1- and
    5-shot) of each fold's classes with the encoder before and after self-supervision (which used
    no labels), each on its own trunk maps of `items`. Returns the per-fold figures and the mean
    gain (after - before)."""
    t0 = time.time()
    n_ep = 20 if quick else episodes_n
    rows = []
    for fold in FOLDS:
        rows.append(_compare(fold, items, n_ep, ("before", before, maps_before), ("after", after, maps_after)))
        log.info("held-out ssl check %s: %s", fold, rows[-1][0])
    return _summary(rows, n_ep, t0)


# encoder adaptations, simplest first (ties within MIN_GAIN go to the simpler one): none, the top
# only on cached trunk maps (adapt.py), every layer (finetune.py)
ADAPTATIONS = ("unadapted", "top", "whole")


def choose(means: dict) -> str:
    """The first (simplest) option, replaced by a later one only when that beats it by more than
    MIN_GAIN; `means` is ordered simplest first."""
    best = None
    for name, m in means.items():
        if best is None or m > means[best] + MIN_GAIN:
            best = name
    return best


def adaptation_check(model: lite0.Lite0, model_key: str, maps: dict, items: dict, data_dir, work, pools,
                     quick: bool = False, seed: int = 0, episodes_n: int = 600):
    """Does adapting the encoder help on dermoscopy classes it never saw - the user's situation?

    For each fold (a pair of ISIC base classes), adapt the top only (adapt.py) and the whole
    encoder (finetune.py) with that fold's classes removed from the training and selection data,
    then compare 2-way prototype accuracy (1- and 5-shot) on the held-out classes with the
    unadapted encoder (ImageNet's, or the self-supervised one when ssl_check kept it). `maps` and
    `items` hold the trunk maps / items of the splits "a" (training), "b2" (selection), "b1".
    Base classes only; the novel classes are never touched. Returns the figures with the chosen
    adaptation, and per adaptation the fold encoders with their own trunk maps (for synth_check)."""
    t0 = time.time()
    n_ep = 20 if quick else episodes_n
    order = ("a", "b2", "b1")
    items_all = [it for t in order for it in items[t]]
    maps_all = np.concatenate([maps[t] for t in order])
    rows, folds = [], {name: [] for name in ADAPTATIONS}
    for fold in FOLDS:
        keep = {t: [i for i, it in enumerate(items[t]) if it.key not in fold] for t in ("a", "b2")}
        kept = {t: [items[t][i] for i in keep[t]] for t in keep}
        top, _ = adapt.adapt_encoder(model, maps["a"][keep["a"]], kept["a"], maps["b2"][keep["b2"]], kept["b2"],
                                     quick=quick, seed=seed)
        whole, key, _ = finetune.finetune_cached(model, model_key, pools, kept["a"], kept["b2"], work, quick=quick,
                                                 seed=seed)
        whole_maps = {t: adapt.cache_trunk(whole, data_dir, items[t], work, t, f"{model_key}|ft:{key}") for t in maps}
        folds["unadapted"].append((model, maps))
        folds["top"].append((top, maps))
        folds["whole"].append((whole, whole_maps))
        row = {"held_out": list(fold)}
        for name in ADAPTATIONS:
            m, mp = folds[name][-1]
            all_maps = maps_all if mp is maps else np.concatenate([mp[t] for t in order])
            for k, acc in _pair_accuracy(m, all_maps, items_all, fold, n_ep).items():
                row[f"{name}_{k}shot"] = round(acc, 4)
        rows.append(row)
        log.info("held-out adaptation check %s: %s", fold, row)
    means = {name: round(float(np.mean([r[f"{name}_{k}shot"] for r in rows for k in (1, 5)])), 4) for name in ADAPTATIONS}
    chosen = choose(means)
    log.info("held-out adaptation check means %s -> %s", means, chosen)
    return {"folds": rows, "mean_accuracy": means, "chosen": chosen, "min_gain": MIN_GAIN, "episodes": n_ep,
            "finetune_settings": finetune.settings(), "seconds": round(time.time() - t0, 1)}, folds[chosen]


def _l2(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_g(cfg: dict, dim: int, init_scale: float) -> Synthesizer:
    g = Synthesizer(dim=dim, text_dim=384, init_scale=init_scale)
    g.text_with_images = cfg["text_with_images"]
    g.image_delta = cfg["image_delta"]
    return g


def synth_check(fold_models, items: dict, texts: dict, ridge_init, dim: int, init_scale: float,
                quick: bool = False, seed: int = 0, episodes_n: int = 600) -> dict:
    """For each fold: features from the fold's encoder (adapted without the fold, or the unadapted
    one) on its own trunk maps (`fold_models`: (model, {split: maps}) per fold; `items`: {split:
    items}, splits "a", "b1", "b2"), G meta-trained on the other base classes in each configuration, then 2-way images+text
    accuracy (1- and 5-shot, the held-out classes' own descriptions through the text projection
    fitted without them) on the held-out pair. Returns figures and the chosen configuration."""
    from .data import group

    t0 = time.time()
    ia, ib1, ib2 = items["a"], items["b1"], items["b2"]
    n_ep = 20 if quick else episodes_n
    rows = []
    for fold, (model, maps) in zip(FOLDS, fold_models):
        f = {t: _l2(adapt.top_features(model, maps[t])) for t in ("a", "b1", "b2")}
        e1 = {c: v for c, v in group(f["b1"], ib1).items() if c not in fold}
        e2 = {c: v for c, v in group(f["b2"], ib2).items() if c not in fold}
        held_all = group(np.concatenate([f["a"], f["b1"], f["b2"]]), list(ia) + list(ib1) + list(ib2))
        held = {c: held_all[c] for c in fold if c in held_all}
        if len(held) < 2:
            continue
        tr_texts = {c: t for c, t in texts.items() if c not in fold}
        row = {"held_out": list(fold)}
        for name, cfg in CONFIGS.items():
            g = make_g(cfg, dim, init_scale)
            ridge_init(g, e1, tr_texts)
            if cfg["train"]:
                g, _, _ = meta.meta_train(g, e1, e2, tr_texts, quick=quick, seed=seed)
            g.eval()
            for k in (1, 5):
                r = episodes.evaluate(g, held, {c: texts[c] for c in fold}, list(fold), 2, k, 15, n_ep, True, seed=50 + k)
                row[f"{name}_{k}shot"] = round(r["acc"], 4)
        log.info("held-out synthesizer check %s: %s", fold, row)
        rows.append(row)
    means = {name: round(float(np.mean([r[f"{name}_{k}shot"] for r in rows for k in (1, 5)])), 4) for name in CONFIGS}
    best = choose(means)  # CONFIGS is ordered simplest first
    log.info("held-out synthesizer check means %s -> %s", means, best)
    return {"folds": rows, "mean_images_text_accuracy": means, "chosen": best, "min_gain": MIN_GAIN, "episodes": n_ep,
            "seconds": round(time.time() - t0, 1)}
