"""The synthesizer stage over every base condition: class-level folds, the text map and G.

The encoder stage (recipe.run) adapts the image encoder on the 16 original base classes. This
stage starts from the encoder it exported (`models/image_encoder.onnx`, fixed by its SHA-256) and
learns what the 16 classes could not teach: a map from clinical descriptions to classifier weights
and a synthesizer G, from all 251 base conditions (the 16 plus dermnet, sd198 and derm7pt).

Selection is by class-level folds: the base conditions are dealt into FOLDS folds; for each fold
the text map and G are trained without its classes and scored on N-way K-shot episodes among
them (K = 0, 1, 5). Two episode families are scored and weighted equally, so a clinical-photo
gain cannot hide a dermoscopy loss: dermoscopic (ISIC base + derm7pt, 4-way) and skin (every
held-out skin condition, 5-way). The novel ISIC classes are never read: `data.all_base_items`
excludes them and `check_no_novel` fails the run if one reaches a training list.

    python models/train/run.py --stage conditions     # after the full recipe (or on its shipped encoder)
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import data, episodes, export, meta
from .cache import save_atomic
from .synth import Synthesizer
from .words import Words

log = logging.getLogger("sgps_train.conditions")

FOLDS = 4
# A part is switched on only if it beats the simpler configuration by more than this on the fold
# score (mean over folds, K in {1, 5}, dermoscopic and skin weighted equally), and does not lose
# more than this on the dermoscopic episodes alone.
MIN_GAIN = 0.005
# images per class embedded for the non-skin base datasets (they are 400-4,245 per class)
CAP_OTHER = 100
SKIN = ("isic", "dermnet", "sd198", "derm7pt")
RIDGE_LAM = 0.1

# Text maps the text map check chooses among, simplest first (a later one must beat the current
# choice by > MIN_GAIN on the mean of dermoscopic and skin K = 0, and not lose more than MIN_GAIN on
# dermoscopy). A map reads the MiniLM embedding of the description, its word features (words.py:
# TF-IDF over the vocabulary of the training classes' descriptions), or both side by side; `lam`
# is its ridge penalty; `concepts` adds the derm7pt seven-point sentences (MiniLM only).
TEXT_MAPS = {
    "descriptions": {"minilm": True, "words": False, "concepts": False, "lam": RIDGE_LAM},
    "descriptions+concepts": {"minilm": True, "words": False, "concepts": True, "lam": RIDGE_LAM},
    "words": {"minilm": False, "words": True, "concepts": False, "lam": 1.0},
    "words_lam3": {"minilm": False, "words": True, "concepts": False, "lam": 3.0},
    "minilm+words": {"minilm": True, "words": True, "concepts": False, "lam": 1.0},
    "minilm+words_lam3": {"minilm": True, "words": True, "concepts": False, "lam": 3.0},
}
WORDS_MIN_DF = 2

CONFIGS = {
    "imprinting": {"text_with_images": False, "image_delta": False, "train": False},
    "text_mix": {"text_with_images": True, "image_delta": False, "train": True},
    "text_and_image_delta": {"text_with_images": True, "image_delta": True, "train": True},
    # G's dermoscopic training tasks draw from every dermoscopic class (ISIC base + derm7pt) instead of
    # the 4 ISIC base classes (stop 34's ablation: this half of "+domain" is what helped dermoscopy)
    "text_and_image_delta+derm_pool": {"text_with_images": True, "image_delta": True, "train": True, "derm_pool": True},
    # G also reads where each class sits between clinical photos and dermoscopy (Synthesizer.domain),
    # and its dermoscopic training tasks draw from every dermoscopic class (ISIC base + derm7pt)
    "text_and_image_delta+domain": {"text_with_images": True, "image_delta": True, "train": True, "domain": True},
    # each prototype is first pulled toward the means of its nearest base skin conditions, by kappa / K
    # (Synthesizer.calib; memory = the skin classes G is trained on, per fold its training classes)
    "text_and_image_delta+calib": {"text_with_images": True, "image_delta": True, "train": True, "calib": True},
    # the same, but only the classes G's domain reading puts on the dermoscopic side are calibrated
    # (the screen's clinical-photo loss came where the text mix already pulls a prototype)
    "text_and_image_delta+calib_derm": {"text_with_images": True, "image_delta": True, "train": True, "calib": True,
                                        "calib_domain": True},
}


is_dermoscopic = data.is_dermoscopic


def check_no_novel(keys) -> None:
    novel = {f"{d}/{c}" for d, c in data.NOVEL}
    bad = sorted(set(keys) & novel)
    if bad:
        raise RuntimeError(f"novel classes reached a training list: {bad}")


def choose_simplest(means: dict, score: str = "score", derm: str = "derm") -> str:
    """The selection rule over candidates listed simplest first (`means`: name -> figures, in that
    order): a later candidate replaces the current choice only if its `score` is higher by more than
    MIN_GAIN and its `derm` figure is not lower by more than MIN_GAIN."""
    names = list(means)
    chosen = names[0]
    for name in names[1:]:
        m, cur = means[name], means[chosen]
        if m[score] > cur[score] + MIN_GAIN and m[derm] >= cur[derm] - MIN_GAIN:
            chosen = name
    return chosen


def make_folds(classes: list[str], n: int = FOLDS, seed: int = 0) -> list[list[str]]:
    """Deal the classes into n folds: dermoscopic ones round-robin first (4 per fold for the 16),
    then the rest, each group in a seeded shuffle, so every fold has its share of both."""
    rng = np.random.default_rng(seed)
    folds = [[] for _ in range(n)]
    for group in ([c for c in classes if is_dermoscopic(c)], [c for c in classes if not is_dermoscopic(c)]):
        group = sorted(group)
        rng.shuffle(group)
        for i, c in enumerate(group):
            folds[i % n].append(c)
    return [sorted(f) for f in folds]


# ---------------------------------------------------------------- embeddings (cached)


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def image_embeddings(models: Path, data_dir: Path, items, work: Path) -> np.ndarray:
    """Embeddings of `items` by the exported image encoder (onnxruntime, fp32), cached by the
    encoder's SHA-256 and the item list."""
    mf = json.loads((models / "manifest.json").read_text())
    ie = mf["image_encoder"]
    path = models / ie["variants"]["fp32"]["file"]
    sha = export.sha256(path)
    cache = work / f"cond_img_{_key(sha, *[it.path for it in items])}.npy"
    if cache.exists():
        return np.load(cache)
    mean, std = ie["preprocess"]["mean"], ie["preprocess"]["std"]
    sess = export.ort_session(path)
    out, t0 = [], time.time()
    for i in range(0, len(items), 32):
        x = np.stack([data.preprocess_file(data_dir / it.path, mean, std) for it in items[i : i + 32]])
        out.append(sess.run([ie["output"]], {ie["input"]: x})[0])
        if (i // 32) % 40 == 0:
            log.info("embedded %d / %d images (%.0f s)", i + len(x), len(items), time.time() - t0)
    emb = np.concatenate(out).astype(np.float32)
    save_atomic(cache, lambda p: np.save(open(p, "wb"), emb))
    return emb


def text_encoder_file(models: Path) -> Path:
    te = json.loads((models / "manifest.json").read_text())["text_encoder"]
    return models / te["variants"][te["default_variant"]]["file"]


class TextEncoder:
    """The shipped default text encoder through onnxruntime, one text per run, unpadded - exactly
    what the runtime does (a dynamically quantized variant would depend on batch neighbours)."""

    def __init__(self, models: Path):
        from tokenizers import Tokenizer

        mf = json.loads((models / "manifest.json").read_text())
        te = mf["text_encoder"]
        self.te = te
        self.path = text_encoder_file(models)
        self.tok = Tokenizer.from_file(str(models / te["tokenizer"]["file"]))
        self.tok.no_padding()
        self.sess = export.ort_session(self.path)

    def embed(self, text: str) -> np.ndarray:
        enc = self.tok.encode(text)
        ids = np.asarray([enc.ids], np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self.te["inputs"].get("token_type_ids"):
            feeds["token_type_ids"] = np.zeros_like(ids)
        return self.sess.run([self.te["output"]], feeds)[0][0].astype(np.float32)


def text_embeddings(models: Path, texts: dict, work: Path) -> dict:
    """class -> [n, T] embeddings of its texts, cached by the text encoder's SHA-256 and the texts
    (the encoder is loaded only on a cache miss)."""
    sha = export.sha256(text_encoder_file(models))
    flat = [(c, t) for c, ts in sorted(texts.items()) for t in ts]
    cache = work / f"cond_txt_{_key(sha, *[c + t for c, t in flat])}.npy"
    if cache.exists():
        arr = np.load(cache)
    else:
        enc = TextEncoder(models)
        arr = np.stack([enc.embed(t) for _, t in flat])
        save_atomic(cache, lambda p: np.save(open(p, "wb"), arr))
    out, i = {}, 0
    for c, ts in sorted(texts.items()):
        out[c] = arr[i : i + len(ts)]
        i += len(ts)
    return out


def chosen_items(data_dir: Path, quick: bool, seed: int):
    """The base-condition images this stage embeds (skin datasets whole, the others CAP_OTHER per class)."""
    items = data.all_base_items(data.read_manifest(data_dir))
    by = data.by_class(items)
    chosen = []
    for c, its in sorted(by.items()):
        cap = 3 if quick else (10_000 if its[0].dataset in SKIN else CAP_OTHER)
        chosen += data.subsample(its, cap, seed)
    if quick:
        keep = sorted(by)[:: max(1, len(by) // 24)]
        keep += [c for c in sorted(by) if is_dermoscopic(c)][:8]
        chosen = [it for it in chosen if it.key in set(keep)]
    check_no_novel({it.key for it in chosen})
    return chosen


def group_by_class(items, emb: np.ndarray) -> dict:
    groups = {}
    for e, it in zip(emb, items):
        groups.setdefault(it.key, []).append(e)
    return {c: np.stack(v) for c, v in groups.items()}


def load_conditions(models: Path, data_dir: Path, work: Path, desc: dict, quick: bool, seed: int):
    chosen = chosen_items(data_dir, quick, seed)
    check_no_novel(desc)
    emb = image_embeddings(models, data_dir, chosen, work)
    emb_by = group_by_class(chosen, emb)
    missing = sorted(set(emb_by) - set(desc))
    if missing:
        raise RuntimeError(f"base classes without descriptions in descriptions.json: {missing[:5]} ... ({len(missing)})")
    texts = text_embeddings(models, {c: desc[c] for c in emb_by}, work)
    concepts = concept_pairs(models, data_dir, chosen, emb, work)
    return emb_by, texts, concepts


CONCEPT_KEYS = {"pigment_network": "pigment network", "streaks": "streaks", "pigmentation": "pigmentation",
                "regression_structures": "regression structures", "dots_and_globules": "dots and globules",
                "blue_whitish_veil": "blue-whitish veil", "vascular_structures": "vessels"}


def concept_text(row: dict) -> str:
    """The seven-point checklist of one derm7pt image as a sentence ("Dermoscopy: atypical pigment
    network, no streaks, ...")."""
    def phrase(k, v):
        if v == "absent":
            return f"no {CONCEPT_KEYS[k]}"
        return CONCEPT_KEYS[k] if v == "present" else f"{v} {CONCEPT_KEYS[k]}"

    return "Dermoscopy: " + ", ".join(phrase(k, row[k]) for k in CONCEPT_KEYS) + "."


def concept_pairs(models: Path, data_dir: Path, items, emb: np.ndarray, work: Path) -> list:
    """(class, concept-sentence embedding, image embedding) for every embedded derm7pt image with
    seven-point labels in derm7pt/concepts.csv (none when the file is absent)."""
    import csv

    path = data_dir / "derm7pt" / "concepts.csv"
    if not path.exists():
        return []
    rows = {r["path"]: r for r in csv.DictReader(path.open(newline=""))}
    found = [(it, e) for it, e in zip(items, emb) if it.path in rows]
    sentences = sorted({concept_text(rows[it.path]) for it, _ in found})
    t = text_embeddings(models, {"concepts": sentences}, work)["concepts"] if sentences else []
    by_text = dict(zip(sentences, t))
    return [(it.key, by_text[concept_text(rows[it.path])], e) for it, e in found]


# ---------------------------------------------------------------- training and scoring


def split_images(emb: dict, frac: float, seed: int):
    """Per class: the first part for meta-training, the rest for early stopping (>= 1 each)."""
    rng = np.random.default_rng(seed)
    a, b = {}, {}
    for c, e in emb.items():
        idx = rng.permutation(len(e))
        n = min(max(1, int(round(frac * len(e)))), len(e) - 1) if len(e) > 1 else 1
        a[c] = e[idx[:n]]
        b[c] = e[idx[n:]] if len(e) > 1 else e[idx[:1]]
    return a, b


def fit_text_proj(g: Synthesizer, emb: dict, texts: dict, lam: float = RIDGE_LAM, concepts=None):
    """text_proj so that P t ~ normalised class mean, least squares over the descriptions; with
    `concepts` (concept_pairs) also P(concept sentence) ~ normalised mean of the images of the
    classes in `emb` that carry that sentence (dermoscopic vocabulary tied to dermoscopic images)."""
    means = meta.class_means(emb)
    cs = [c for c in texts if c in means]
    xs = [texts[c] for c in cs]
    ys = [np.repeat(means[c][None], len(texts[c]), 0) for c in cs]
    groups = {}
    for c, t, e in concepts or []:
        if c in emb:
            groups.setdefault(t.tobytes(), (t, []))[1].append(e)
    for t, es in groups.values():
        m = np.mean(es, 0)
        xs.append(t[None])
        ys.append((m / (np.linalg.norm(m) + 1e-8))[None])
    X = np.concatenate(xs).astype(np.float64)
    Y = np.concatenate(ys).astype(np.float64)
    W = meta.ridge(X, Y, lam)
    with torch.no_grad():
        g.text_proj.weight.copy_(torch.from_numpy(W[:-1].T).float())
        g.text_proj.bias.copy_(torch.from_numpy(W[-1]).float())


def text_features(tm: dict, minilm: dict, desc: dict, fit_classes) -> tuple[dict, Words | None]:
    """class -> [n_desc, D] text features under text map `tm`: the MiniLM embeddings, the word
    features (vocabulary and idf from the descriptions of `fit_classes` only), or both."""
    check_no_novel(list(fit_classes) + list(minilm))
    words = Words.fit([s for c in fit_classes for s in desc[c]], WORDS_MIN_DF) if tm["words"] else None
    out = {}
    for c in minilm:
        parts = ([minilm[c]] if tm["minilm"] else []) + ([words.matrix(desc[c])] if words else [])
        out[c] = np.concatenate(parts, 1).astype(np.float32)
    return out, words


def make_g(cfg: dict, dim: int, text_dim: int = 384) -> Synthesizer:
    g = Synthesizer(dim=dim, text_dim=text_dim, init_scale=10.0, domain=cfg.get("domain", False),
                    calib=cfg.get("calib", False), calib_domain=cfg.get("calib_domain", False))
    g.text_with_images = cfg["text_with_images"]
    g.image_delta = cfg["image_delta"]
    g.derm_pool = bool(cfg.get("derm_pool", g.domain))
    return g


def set_domain(g: Synthesizer, emb: dict) -> None:
    """G's domain reading from the classes it is trained on: dermoscopic against the clinical skin
    photos (all other classes when there are none)."""
    check_no_novel(emb)
    means = meta.class_means(emb)
    derm = [c for c in sorted(means) if is_dermoscopic(c)]
    other = [c for c in sorted(means) if not is_dermoscopic(c) and c.split("/")[0] in SKIN] or \
        [c for c in sorted(means) if not is_dermoscopic(c)]
    g.set_domain(np.stack([means[c] for c in derm]), np.stack([means[c] for c in other]))


def set_memory(g: Synthesizer, emb: dict) -> None:
    """A calibrating G's base-class memory: the L2-normalised means of the skin classes it is
    trained on (never a novel class)."""
    check_no_novel(emb)
    means = meta.class_means(emb)
    keys = [c for c in sorted(means) if c.split("/")[0] in SKIN]
    g.set_memory(keys, np.stack([means[c] for c in keys]))


def train_g(cfg: dict, emb: dict, texts: dict, quick: bool, seed: int, concepts=None, lam: float = RIDGE_LAM) -> Synthesizer:
    dim = next(iter(emb.values())).shape[1]
    torch.manual_seed(seed)  # G's initial weights do not depend on what ran (or was cached) before
    g = make_g(cfg, dim, next(iter(texts.values())).shape[1])
    fit_text_proj(g, emb, texts, lam=lam, concepts=concepts)
    if g.domain or g.calib_domain:
        set_domain(g, emb)
    if g.calib:
        set_memory(g, emb)
    if cfg["train"]:
        tr, va = split_images(emb, 0.8, seed)
        g, _, _ = meta.meta_train(g, tr, va, texts, quick=quick, seed=seed, steps=1500, ridge_lam=lam)
    g.eval()
    return g


def score(g: Synthesizer, held: dict, texts: dict, n_ep: int, seed: int) -> dict:
    """Held-out-class figures: dermoscopic 4-way and skin 5-way, K = 0 (text only), 1, 5 (with text)."""
    fams = {
        "derm": [c for c in held if is_dermoscopic(c)],
        "skin": [c for c in held if c.split("/")[0] in SKIN],
    }
    out = {}
    for fam, cls in fams.items():
        n = min(4 if fam == "derm" else 5, len(cls))
        if n < 2:
            continue
        for k in (0, 1, 5):
            r = episodes.evaluate(g, held, texts, cls, n, k, 15, n_ep, True, seed=seed + 7 * k)
            out[f"{fam}_{k}"] = r["acc"]
            if k > 0:
                r = episodes.evaluate(g, held, texts, cls, n, k, 15, n_ep, False, seed=seed + 7 * k)
                out[f"{fam}_{k}_imgonly"] = r["acc"]
    return out


def fold_score(rows: list[dict], name: str) -> dict:
    def mean(keys):
        v = [r[name][k] for r in rows for k in keys if k in r[name]]
        return float(np.mean(v)) if v else float("nan")

    derm = mean(["derm_1", "derm_5"])
    skin = mean(["skin_1", "skin_5"])
    return {"score": 0.5 * derm + 0.5 * skin, "derm": derm, "skin": skin,
            "derm_0": mean(["derm_0"]), "skin_0": mean(["skin_0"])}


def text_map_check(emb: dict, minilm: dict, desc: dict, concepts: list, quick: bool, seed: int, views=None) -> dict:
    """Descriptions alone (K = 0) on the held-out folds under each of TEXT_MAPS, each fitted on the
    fold's training classes only (the word vocabulary too). Simplest first, a later map replaces
    the current choice only if the mean of dermoscopic 4-way and skin 5-way gains > MIN_GAIN and
    dermoscopy does not lose more than MIN_GAIN."""
    classes = sorted(emb)
    folds = make_folds(classes, 2 if quick else FOLDS, seed)
    n_ep = 10 if quick else 300
    out = {}
    for name, tm in TEXT_MAPS.items():
        if tm["concepts"] and not concepts:
            continue
        fams = {"derm": [], "skin": []}
        for fi, fold in enumerate(folds):
            E, cp = views[fi] if views else (emb, concepts)
            train = [c for c in classes if c not in fold]
            texts, _ = text_features(tm, minilm, desc, train)
            g = make_g(CONFIGS["imprinting"], next(iter(emb.values())).shape[1], next(iter(texts.values())).shape[1])
            fit_text_proj(g, {c: E[c] for c in train}, {c: texts[c] for c in train}, lam=tm["lam"],
                          concepts=cp if tm["concepts"] else None)
            g.eval()
            r = score(g, {c: E[c] for c in fold}, {c: texts[c] for c in fold}, n_ep, 500 + fi)
            for f in fams:
                if f"{f}_0" in r:
                    fams[f].append(r[f"{f}_0"])
        d, k = float(np.mean(fams["derm"])), float(np.mean(fams["skin"]))
        out[name] = {"derm_0": round(d, 4), "skin_0": round(k, 4), "mean": round(0.5 * d + 0.5 * k, 4),
                     "derm_0_per_fold": [round(x, 4) for x in fams["derm"]]}
        log.info("text map %s: %s", name, out[name])
    chosen = choose_simplest(out, "mean", "derm_0")
    out["chosen"] = chosen
    out["maps"] = {n: TEXT_MAPS[n] for n in out if n in TEXT_MAPS}
    out["concept_pairs"] = len(concepts)
    log.info("text map check -> %s", chosen)
    return out


def fold_check(emb: dict, fold_texts: list, quick: bool, seed: int, work: Path, concepts=None, views=None,
               lam: float = RIDGE_LAM) -> dict:
    """`fold_texts[fi]`: every class's text features with the text map fitted without fold fi."""
    classes = sorted(emb)
    folds = make_folds(classes, 2 if quick else FOLDS, seed)
    n_ep = 10 if quick else 300
    ckey = [float(t.sum()) for _, t, _ in concepts or []]
    vkey = [float(E[c].sum()) for E, _ in views or [] for c in classes]
    tkey = [float(t[c].sum()) for t in fold_texts for c in classes]
    if all(tkey[i] == tkey[i % len(classes)] for i in range(len(tkey))):
        tkey = tkey[:len(classes)]  # the same features in every fold (MiniLM only): the earlier runs' cache names
    lkey = [] if lam == RIDGE_LAM else [lam]
    cache = work / f"cond_folds_{_key(n_ep, seed, *classes, *tkey[:len(classes)], json.dumps(CONFIGS), *ckey, *vkey, *tkey[len(classes):], *lkey)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.time()
    rows = []
    for fi, fold in enumerate(folds):
        E, cp = views[fi] if views else (emb, concepts)
        cp = cp if concepts else None
        held = {c: E[c] for c in fold}
        texts = fold_texts[fi]
        train = {c: E[c] for c in classes if c not in fold}
        tr_texts = {c: texts[c] for c in train}
        row = {"fold": fi, "held_out": len(fold), "dermoscopic": [c for c in fold if is_dermoscopic(c)]}
        for name, cfg in CONFIGS.items():
            g = train_g(cfg, train, tr_texts, quick, seed, cp, lam)
            row[name] = {k: round(v, 4) for k, v in score(g, held, {c: texts[c] for c in fold}, n_ep, 500 + fi).items()}
            log.info("fold %d %s: %s (%.0f s)", fi, name, row[name], time.time() - t0)
        rows.append(row)
    means = {name: {k: round(v, 4) for k, v in fold_score(rows, name).items()} for name in CONFIGS}
    chosen = choose_simplest(means)
    report = {"folds": rows, "means": means, "chosen": chosen, "min_gain": MIN_GAIN, "episodes": n_ep,
              "rule": "score = mean over folds and K in {1,5} of 0.5 * dermoscopic 4-way + 0.5 * skin 5-way (with text); "
                      "a configuration replaces the simpler one only if its score is higher by > min_gain and its dermoscopic "
                      "figure is not lower by more than min_gain",
              "seconds": round(time.time() - t0, 1)}
    save_atomic(cache, lambda p: Path(p).write_text(json.dumps(report, indent=1)))
    return report


def calibrate(g: Synthesizer, emb: dict, texts: dict, quick: bool, seed: int, lam: float = RIDGE_LAM) -> dict:
    """Temperature (folded into the scale), refer threshold and ECE on base-condition episodes.
    The text weights are leave-one-class-out (each class's descriptions through a map fitted
    without it), so text is not trusted more than it would be for a user's new class."""
    eps = 10 if quick else 150
    tw = meta.loo_text_weights(emb, texts, lam)
    classes = sorted(emb)
    derm = [c for c in classes if is_dermoscopic(c)]
    skin = [c for c in classes if c.split("/")[0] in SKIN]
    pl = []
    for k in (1, 2, 3, 5):
        for use_text in (True, False):
            pl += episodes.collect_logits(g, emb, texts, derm, min(4, len(derm)), k, 5, eps, use_text, 10 + k, tw)
            pl += episodes.collect_logits(g, emb, texts, skin, min(5, len(skin)), k, 5, eps, use_text, 20 + k, tw)
    temp = episodes.fit_temperature(pl)
    with torch.no_grad():
        g.log_scale.add_(math.log(temp))
    probs, labels = [], []
    for cls, n in ((derm, 4), (skin, 5)):
        for k in (1, 5):
            r = episodes.evaluate(g, emb, texts, cls, min(n, len(cls)), k, 15, eps, True, seed=100 + k, text_weights=tw)
            probs += r["probs"]
            labels += r["labels"]
    return {"temperature_factor": round(temp, 4), "ece": round(episodes.ece(probs, labels), 4),
            "refer": episodes.refer_threshold(probs, labels)}


def run(args, fold_views=None) -> dict:
    """`fold_views` (supervise.fold_views, passed by run.py): each fold's embeddings through the
    supervised stage's encoder trained without that fold; None = the shipped encoder's only."""
    here = Path(__file__).resolve().parent.parent
    models = args.out
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    desc = json.loads((here / "descriptions.json").read_text())["base"]
    t0 = time.time()
    emb, minilm, concepts = load_conditions(models, args.data, work, desc, quick, args.seed)
    log.info("conditions: %d base classes, %d images, %d descriptions (%.0f s)", len(emb),
             sum(len(v) for v in emb.values()), sum(len(v) for v in minilm.values()), time.time() - t0)
    folds = make_folds(sorted(emb), 2 if quick else FOLDS, args.seed)
    views = fold_views(models, args.data, work, folds, quick, args.seed) if fold_views else None
    tm = text_map_check(emb, minilm, desc, concepts, quick, args.seed, views)
    tmap = TEXT_MAPS[tm["chosen"]]
    if not tmap["concepts"]:
        concepts = None
    fold_texts = [text_features(tmap, minilm, desc, [c for c in sorted(emb) if c not in fold])[0] for fold in folds]
    check = fold_check(emb, fold_texts, quick, args.seed, work, concepts, views, tmap["lam"])
    check["text_map"] = tm
    texts, words = text_features(tmap, minilm, desc, sorted(emb))
    check["embeddings"] = ("each fold through the supervised stage's encoder trained without it" if views
                           else "the shipped image encoder (not trained on base labels)")
    log.info("fold check means %s -> %s", json.dumps(check["means"]), check["chosen"])
    cfg = CONFIGS[check["chosen"]]
    g = train_g(cfg, emb, texts, quick, args.seed, concepts, tmap["lam"])
    # calibrate where every class is embedded by an encoder that never saw it (as a user's new class).
    # Approximation: G's text map, and a calibrating G's memory, come from the shipped encoder's
    # embeddings, while these come from the fold encoders (close relatives: same start, other classes);
    # a calibrating G hides each episode's own classes from its memory (episodes.run_g)
    cal_emb = {c: views[fi][0][c] for fi, fold in enumerate(folds) for c in fold} if views else emb
    cal = calibrate(g, cal_emb, texts, quick, args.seed, tmap["lam"])
    cal["on_embeddings"] = check["embeddings"]
    log.info("calibration %s", cal)
    return {"g": g, "check": check, "calibration": cal, "config": check["chosen"], "texts": texts, "concepts": bool(concepts),
            "text_map": tm["chosen"], "words": words,
            "classes": len(emb), "images": int(sum(len(v) for v in emb.values())), "seconds": round(time.time() - t0, 1)}


def export_g(res: dict, models: Path) -> None:
    """Write synthesizer.onnx (checked against PyTorch by onnxruntime), the synthesizer parity
    reference and the manifest's synthesizer / head / provenance entries."""
    g = res["g"]
    syn_path = models / "synthesizer.onnx"
    ref_dir = models / "reference"
    texts_ref = json.loads((ref_dir / "texts.json").read_text())
    tmap = TEXT_MAPS[res.get("text_map", "descriptions")]
    words: Words | None = res.get("words")
    words_path = models / "text_words.json"
    if words is not None:
        export.write_json(words_path, words.to_json())
        # word-feature parity reference for the runtime (src/encoders/words.rs)
        probe = [t["text"] for t in texts_ref] + ["Blue-white VEIL; irregular  streaks (x2) naevus", "", "a b c 42"]
        export.write_json(ref_dir / "words.json", [{"text": t, "vector": [round(float(v), 7) for v in words.vector(t)]} for t in probe])
    else:
        words_path.unlink(missing_ok=True)
        (ref_dir / "words.json").unlink(missing_ok=True)
    text3 = np.concatenate(
        ([np.asarray([t["embedding"] for t in texts_ref[:3]], np.float32)] if tmap["minilm"] else [])
        + ([words.matrix([t["text"] for t in texts_ref[:3]])] if words is not None else []), 1)
    export.export_synth_checked(g, syn_path, ref_dir, text3)

    mf_path = models / "manifest.json"
    mf = json.loads(mf_path.read_text())
    syn = mf["synthesizer"]
    syn["sha256"] = export.sha256(syn_path)
    syn["bytes"] = syn_path.stat().st_size
    syn["text_features"] = {
        "minilm": bool(tmap["minilm"]),
        "words": None if words is None else {
            "file": words_path.name, "sha256": export.sha256(words_path), "bytes": words_path.stat().st_size,
            "dim": words.dim, "min_df": WORDS_MIN_DF},
        "dim": int(text3.shape[1]),
        "order": "MiniLM embedding (if used), then word features (if used)",
        "chosen_by": "provenance.conditions.fold_check.text_map",
    }
    if g.calib:
        syn["parameterisation"] = (
            f"weight = p' + delta(Transformer over class tokens), p' = normalize(p + {g.calib_kappa} / K * n"
            f"{' * [domain reading of p > 0]' if g.calib_domain else ''}), "
            f"p = normalize(masked mean of support), n = softmax({g.calib_temp} * cosine)-weighted mean of the "
            f"{len(g.memory_keys)} base skin-class means (a constant of the graph); normalize(P text) when K = 0")
    else:
        syn["parameterisation"] = ("weight = normalize(masked mean of support) (or normalize(P text) when K = 0) "
                                   "+ delta(Transformer over class tokens)")
    syn["enabled"] = {"text_with_images": bool(g.text_with_images), "image_delta": bool(g.image_delta),
                      "domain": bool(g.domain),
                      "dermoscopic_task_pool": bool(g.derm_pool),
                      "calib": {"memory_classes": len(g.memory_keys), "temperature": g.calib_temp, "kappa": g.calib_kappa,
                                "dermoscopic_only": bool(g.calib_domain)} if g.calib else False,
                      "chosen_by": "class-level folds over the 251 base conditions (provenance.conditions.fold_check)"}
    cal = res["calibration"]
    head = mf["head"]
    head["refer_threshold"] = round(float(cal["refer"]["threshold"]), 4)
    head["ece"] = cal["ece"]
    head["calibration"] = {
        "on": "base-condition episodes (dermoscopic 4-way and skin 5-way, K in 1..5, with and without text; "
              "leave-one-class-out text weights)",
        "temperature_factor": cal["temperature_factor"],
        "refer_rule": "refer when max p < threshold; threshold maximises (+1 correct, -1 wrong, 0 referred) on those episodes",
        "embeddings": cal.get("on_embeddings"),
        "refer_rate": cal["refer"].get("refer_rate"),
        "accepted_accuracy": cal["refer"].get("accepted_accuracy"),
    }
    mf.setdefault("provenance", {})["conditions"] = {
        "stage": "python models/train/run.py --stage conditions",
        "base_classes": res["classes"],
        "images": res["images"],
        "descriptions": "models/train/descriptions.json (base: 3 per class)" + (" + derm7pt seven-point concept sentences" if res.get("concepts") else ""),
        "text_map": res.get("text_map", "descriptions"),
        "image_encoder_sha256": mf["image_encoder"]["variants"]["fp32"]["sha256"],
        "chosen": res["config"],
        "fold_check": {k: v for k, v in res["check"].items() if k != "folds"} | {
            "folds": [{"fold": r["fold"], "held_out": r["held_out"], "dermoscopic": r["dermoscopic"]} | {n: r[n] for n in CONFIGS}
                      for r in res["check"]["folds"]]},
        "seconds": res["seconds"],
    }
    export.write_json(mf_path, mf)
    log.info("wrote %s and %s (synthesizer %s)", syn_path, mf_path, res["config"])
