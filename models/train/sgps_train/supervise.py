"""The supervised encoder stage: every layer of the image encoder fine-tuned on the base skin conditions.

The encoder stage (recipe.run) trains Lite0 self-supervised and checks label adaptation on the 16 original
base classes only, too few to generalise. This stage starts from the encoder that stage exported
(`image_encoder.onnx`, rebuilt in PyTorch: batch norm is folded into the convolutions there, so each BN is
an identity carrying the folded bias and stays frozen) and fine-tunes every layer on the skin conditions of
all base datasets (ISIC base, dermnet, sd198, derm7pt): a cosine classifier on the deployed embedding
(sqrt, centre, L2), class-balanced sampling with the dermoscopic classes (ISIC base + derm7pt) given half
of the mass, the SimCLR views (ssl.augment) at SIZE px, AdamW one-cycle.

Selection is by the conditions stage's class-level folds: for each fold in CHECK_FOLDS the encoder is
fine-tuned without the fold's classes, and both encoders are scored on the held-out classes as the
conditions stage scores G (imprinting; dermoscopic 4-way and skin 5-way, K = 1, 5; the same seeds). The
fine-tuned encoder is shipped only if its fold score beats the start by more than conditions.MIN_GAIN and
its dermoscopic figure does not lose more than that. The novel ISIC classes are never read
(`conditions.check_no_novel`).

    python models/train/run.py --stage supervised     # then --stage conditions (run.py --stage all runs both)
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import conditions as C
from . import data, export, lite0, ssl
from .cache import save_atomic

log = logging.getLogger("sgps_train.supervise")

SIZE = 160  # training resolution (the deployed input is 224; 160 px is what two CPU cores afford)
EPOCHS = 3
LR = 1e-4
BATCH = 64
# a fine-tune writes its whole training state every this many steps (a few minutes on 2 cores),
# so a run cut by the end of a session goes on from there
CHECKPOINT_EVERY = 40
DERM_WEIGHT = 0.5
SCALE = 16.0
CHECK_FOLDS = tuple(range(C.FOLDS))  # the conditions stage's folds (each check is a ~12-minute fine-tune here)
CENTRE_IMAGES = 1200
N_EP = 300
# Candidate "finetuned_anchor": the same fine-tuning plus a dermoscopy anchor, so that learning the
# clinical-photo conditions does not erode what the self-supervised step learned about dermoscopy:
# on a batch of `batch` isic_unlabelled images (labels never exist; resized to SIZE, not augmented)
# per step, `weight` x (1 - cosine) between the encoder's deployed embedding (with the start's
# centre) and the start encoder's. It replaces the plain fine-tune only by the fold rule.
# Off (None): with {"weight": 1.0, "batch": 32} it lost 0.6 on three of the four folds (stop 29,
# HISTORY "Tried and not shipped"), and each check costs one more fine-tune per fold.
ANCHOR: dict | None = None
ANCHOR_TRIED = {"weight": 1.0, "batch": 32}


def settings() -> dict:
    return {"size": SIZE, "epochs": EPOCHS, "lr": LR, "batch": BATCH, "derm_weight": DERM_WEIGHT, "scale": SCALE,
            "label_smoothing": 0.1, "crop_area": list(ssl.CROP_AREA), "jitter": ssl.JITTER}


# ---------------------------------------------------------------- the start encoder


def rebuild(path: Path) -> export.ImageEncoder:
    """PyTorch ImageEncoder equal to the exported ONNX `path` (BN folded into the convs; the embedding
    post-processing - sqrt or not, centre - read from the graph)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i).copy() for i in m.graph.initializer}
    convs = [(init[n.input[1]], init[n.input[2]]) for n in m.graph.node if n.op_type == "Conv"]
    try:
        variant = lite0.variant_of([w.shape for w, _ in convs])
    except RuntimeError as e:
        raise RuntimeError(f"{path} is not an EfficientNet-Lite export of this recipe: {e}") from e
    net = lite0.Lite0(variant=variant)
    pairs = [(net._conv_stem, net._bn0)]
    for b in net._blocks:
        if b.expand != 1:
            pairs.append((b._expand_conv, b._bn0))
        pairs += [(b._depthwise_conv, b._bn1), (b._project_conv, b._bn2)]
    pairs.append((net._conv_head, net._bn1))
    if len(pairs) != len(convs):
        raise RuntimeError(f"{path} is not a Lite0 export of this recipe ({len(convs)} convolutions, expected {len(pairs)})")
    with torch.no_grad():
        for (conv, bn), (w, b) in zip(pairs, convs):
            conv.weight.copy_(torch.from_numpy(w))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(b))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    center = torch.from_numpy(init["center"]) if "center" in init else None
    power = sum(n.op_type == "Sqrt" for n in m.graph.node) >= 2  # one is the L2 norm's
    return export.ImageEncoder(net, center, power=power).eval()


def start_encoder(models: Path, work: Path) -> tuple[Path, str]:
    """The encoder this stage starts from: `models/image_encoder.onnx` as the encoder stage wrote it. Once
    this stage has replaced that file, the start is the copy it kept in `work` (by SHA-256)."""
    work.mkdir(parents=True, exist_ok=True)
    mf = json.loads((models / "manifest.json").read_text())
    done = mf.get("provenance", {}).get("supervised_encoder")
    cur = models / "image_encoder.onnx"
    if done and done.get("shipped") and export.sha256(cur) == done.get("output_sha256"):
        sha = done["start_sha256"]
        kept = work / f"image_encoder.start_{sha[:16]}.onnx"
        if not kept.exists():
            raise RuntimeError(
                f"{cur} is already this stage's fine-tuned encoder and its start (the encoder stage's export, "
                f"SHA-256 {sha[:16]}...) is not in {work}: run the whole recipe (run.py --stage all)")
        return kept, sha
    sha = export.sha256(cur)
    kept = work / f"image_encoder.start_{sha[:16]}.onnx"
    if not kept.exists():
        save_atomic(kept, lambda p: shutil.copyfile(cur, p))
    return kept, sha


# ---------------------------------------------------------------- images


def skin_items(data_dir: Path, quick: bool, seed: int):
    """(every base class key - the folds' universe, the skin-condition items used here)."""
    base = data.all_base_items(data.read_manifest(data_dir))
    classes = sorted({it.key for it in base})
    items = [it for it in base if it.dataset in C.SKIN]
    if quick:
        by = data.by_class(items)
        keep = sorted(by)[:: max(1, len(by) // 24)] + [c for c in sorted(by) if C.is_dermoscopic(c)][:8]
        items = [it for c in sorted(set(keep)) for it in data.subsample(by[c], 4, seed)]
    C.check_no_novel({it.key for it in items})
    return classes, items


def image_pool(data_dir: Path, items, work: Path) -> torch.Tensor:
    """uint8 [n, 3, 224, 224]: the deployed resize + centre crop of every item, cached in `work`."""
    path = work / f"sup_pool224_{C._key(*[it.path for it in items])}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    t0 = time.time()
    pool = ssl.load_pool(data_dir, items, data.INPUT_SIZE)
    save_atomic(path, lambda p: np.save(open(p, "wb"), pool.numpy()))
    log.info("decoded %d images at 224 px (%.0f s)", len(items), time.time() - t0)
    return pool


def uncentred(enc: export.ImageEncoder, f: torch.Tensor) -> torch.Tensor:
    """The embedding before centring and L2 (sqrt of the pooled features where the export has it)."""
    return torch.sqrt(f + 1e-6) if enc.power else f


@torch.no_grad()
def uncentred_pool(enc: export.ImageEncoder, pool: torch.Tensor, idx: np.ndarray, batch: int = 96) -> torch.Tensor:
    out = []
    for i in range(0, len(idx), batch):
        x = ssl.normalise(pool[idx[i : i + batch]].float() / 255.0).contiguous(memory_format=torch.channels_last)
        out.append(uncentred(enc, enc.backbone.features(x)))
    return torch.cat(out) if out else torch.zeros(0, lite0.FEATURE_DIM)


def embed(enc, pool, idx) -> np.ndarray:
    return F.normalize(uncentred_pool(enc, pool, idx) - enc.center, dim=-1).cpu().numpy()


# ---------------------------------------------------------------- fine-tuning


def sampling(keys: list[str]):
    """(classes, label per item, probability per item): class-balanced, dermoscopic classes DERM_WEIGHT of the mass."""
    classes = sorted(set(keys))
    ci = {c: j for j, c in enumerate(classes)}
    y = np.asarray([ci[k] for k in keys])
    derm = np.asarray([C.is_dermoscopic(k) for k in keys])
    nd = len({k for k in keys if C.is_dermoscopic(k)})
    counts = np.bincount(y).astype(np.float64)
    w = np.where(derm, DERM_WEIGHT / max(nd, 1), (1 - DERM_WEIGHT) / max(len(classes) - nd, 1)) / counts[y]
    return classes, y, w / w.sum()


def anchor_items(data_dir: Path, quick: bool):
    """The isic_unlabelled images (label-free dermoscopy) the anchor reads."""
    items = [it for it in data.read_manifest(data_dir) if it.dataset == "isic_unlabelled"]
    return items[:8] if quick else items


def _anchor_views(pool_a: torch.Tensor, idx) -> torch.Tensor:
    x = F.interpolate(pool_a[idx].float() / 255.0, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return ssl.normalise(x).contiguous(memory_format=torch.channels_last)


def finetune(enc: export.ImageEncoder, items, pool: torch.Tensor, idx: np.ndarray, seed: int, quick: bool,
             anchor_pool: torch.Tensor | None = None, checkpoint: Path | None = None,
             checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    """Fine-tune `enc` in place on pool[idx]; then re-centre it on CENTRE_IMAGES of those images.
    With `anchor_pool` (uint8 isic_unlabelled images), add the ANCHOR term. With `checkpoint`, the
    training state (weights, head, optimiser, schedule, both random generators) is written there
    every `checkpoint_every` steps, and a run that finds it goes on after that step: a cut run loses
    at most that many steps, and the resumed weights equal an uncut run's."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    classes, y, w = sampling([items[i].key for i in idx])
    if len(classes) < 2:
        raise ValueError("supervised fine-tuning needs at least 2 classes")
    enc.backbone.to(memory_format=torch.channels_last)
    sub = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:40] for c in range(len(classes))])
    dev = enc.center.device  # the CPU in the recipe; a GPU in the device probe (forward in bf16 there)
    e0 = torch.from_numpy(embed(enc, pool, idx[sub])).to(dev)
    head = torch.nn.Parameter(F.normalize(torch.stack([e0[y[sub] == c].mean(0) for c in range(len(classes))]), dim=-1))
    params = [p for n, p in enc.backbone.named_parameters() if not n.startswith("_fc.")]
    opt = torch.optim.AdamW([{"params": params, "lr": LR, "weight_decay": 1e-4},
                             {"params": [head], "lr": LR * 10, "weight_decay": 0}])
    steps = 2 if quick else int(EPOCHS * len(idx) / BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[LR, LR * 10], total_steps=steps, pct_start=0.1)
    ty = torch.from_numpy(y).to(dev)
    enc.eval()  # BN frozen (folded identities); gradients still flow through every layer
    if anchor_pool is not None:
        centre0 = enc.center.detach().clone()
        with torch.no_grad():
            target = torch.cat([F.normalize(uncentred(enc, enc.backbone.features(_anchor_views(anchor_pool, np.arange(i, min(i + 96, len(anchor_pool)))))) - centre0, dim=-1)
                                for i in range(0, len(anchor_pool), 96)])
    t0, tl, first = time.time(), 0.0, 1
    if checkpoint is not None and checkpoint.exists():
        st = torch.load(checkpoint, map_location=dev, weights_only=False)
        enc.load_state_dict(st["enc"])
        with torch.no_grad():
            head.copy_(st["head"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        first = st["step"] + 1
        log.info("supervised: resumed from %s after step %d/%d", checkpoint.name, st["step"], steps)
    with ssl.keep_freed_memory():
        for s in range(first, steps + 1):
            b = rng.choice(len(y), size=min(BATCH, len(y)), p=w)
            x = ssl.augment(pool[idx[b]], SIZE, gen).contiguous(memory_format=torch.channels_last)
            with ssl.bf16_on_gpu(dev):
                f = enc.backbone.features(x)
            e = F.normalize(uncentred(enc, f.float()) - enc.center, dim=-1)
            loss = F.cross_entropy(SCALE * e @ F.normalize(head, dim=-1).T, ty[b], label_smoothing=0.1)
            if anchor_pool is not None:
                ba = rng.choice(len(anchor_pool), size=min(ANCHOR["batch"], len(anchor_pool)), replace=False)
                with ssl.bf16_on_gpu(dev):
                    fa = enc.backbone.features(_anchor_views(anchor_pool, ba))
                ea = F.normalize(uncentred(enc, fa.float()) - centre0, dim=-1)
                loss = loss + ANCHOR["weight"] * (1.0 - (ea * target[ba]).sum(-1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tl += loss.item()
            if s % 25 == 0 or s == steps:
                log.info("supervised step %d/%d loss %.4f (%.0f s)", s, steps, tl / (s - 25 * ((s - 1) // 25)), time.time() - t0)
                tl = 0.0
            if checkpoint is not None and s % checkpoint_every == 0 and s < steps:
                st = {"enc": enc.state_dict(), "head": head.detach().clone(), "opt": opt.state_dict(),
                      "sched": sched.state_dict(), "rng": rng.bit_generator.state, "gen": gen.get_state(), "step": s}
                save_atomic(checkpoint, lambda p: torch.save(st, p))
    enc.backbone.to(memory_format=torch.contiguous_format)
    if enc.center.abs().sum() > 0:  # a centred export stays centred, on the new features
        centre_idx = np.random.default_rng(seed).permutation(idx)[:CENTRE_IMAGES]
        with torch.no_grad():
            enc.center.copy_(uncentred_pool(enc, pool, centre_idx).mean(0))
    info = {"steps": steps, "classes": len(classes), "images": len(idx), "seconds": round(time.time() - t0, 1)}
    return info | ({"anchor": ANCHOR | {"images": len(anchor_pool)}} if anchor_pool is not None else {})


def finetuned_cached(start: Path, start_sha: str, items, pool, idx, seed: int, quick: bool, work: Path, tag: str,
                     anchor_pool: torch.Tensor | None = None):
    extra = [] if anchor_pool is None else [json.dumps(ANCHOR, sort_keys=True), len(anchor_pool), float(anchor_pool[:64].float().sum())]
    key = C._key(start_sha, json.dumps(settings(), sort_keys=True), seed, quick, *[items[i].path for i in idx], *extra)
    tag = tag + ("_anchor" if anchor_pool is not None else "")
    path, rpath = work / f"sup_{tag}_{key}.pt", work / f"sup_{tag}_{key}.json"
    enc = rebuild(start)
    if path.exists() and rpath.exists():
        log.info("cache hit %s", path.name)
        enc.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return enc.eval(), json.loads(rpath.read_text())
    resume = work / f"sup_{tag}_{key}.resume.pt"
    info = finetune(enc, items, pool, idx, seed, quick, anchor_pool, checkpoint=resume)
    save_atomic(path, lambda p: torch.save(enc.state_dict(), p))
    save_atomic(rpath, lambda p: Path(p).write_text(json.dumps(info)))
    resume.unlink(missing_ok=True)
    return enc.eval(), info


# ---------------------------------------------------------------- selection


def score_encoder(enc, items, pool, held_idx, train_idx, texts, n_ep: int, fold: int) -> dict:
    """Imprinting (and descriptions alone through a ridge map fitted on CENTRE_IMAGES of the training
    classes' images) on the held-out classes, with conditions.fold_check's episode seeds."""
    tr_idx = np.random.default_rng(fold).permutation(train_idx)[:CENTRE_IMAGES]

    def group(idx):
        out = {}
        for e, i in zip(embed(enc, pool, idx), idx):
            out.setdefault(items[i].key, []).append(e)
        return {c: np.stack(v) for c, v in out.items()}

    held, tr = group(held_idx), group(tr_idx)
    g = C.make_g(C.CONFIGS["imprinting"], lite0.FEATURE_DIM)
    C.fit_text_proj(g, tr, {c: texts[c] for c in tr})
    g.eval()
    return {k: round(v, 4) for k, v in C.score(g, held, {c: texts[c] for c in held}, n_ep, 500 + fold).items()}


def fold_check(start: Path, start_sha: str, classes, items, pool, texts, quick: bool, work: Path,
               anchor_pool: torch.Tensor | None = None) -> dict:
    folds = C.make_folds(classes, 2 if quick else C.FOLDS)
    n_ep = 10 if quick else N_EP
    rows = []
    for fi in (CHECK_FOLDS[:1] if quick else CHECK_FOLDS):
        fold = set(folds[fi])
        held_idx = np.asarray([i for i, it in enumerate(items) if it.key in fold])
        train_idx = np.asarray([i for i, it in enumerate(items) if it.key not in fold])
        key = C._key(start_sha, json.dumps(settings(), sort_keys=True), n_ep, quick, *[it.path for it in items])
        cache = work / f"sup_fold{fi}_{key}.json"
        if cache.exists():
            rows.append(json.loads(cache.read_text()))
            _anchor_row(rows[-1], start, start_sha, items, pool, held_idx, train_idx, texts, n_ep, fi, quick, work, key, anchor_pool)
            continue
        t0 = time.time()
        row = {"fold": fi, "held_out": len({items[i].key for i in held_idx}), "train_images": len(train_idx),
               "dermoscopic": sorted({items[i].key for i in held_idx if C.is_dermoscopic(items[i].key)})}
        row["start"] = score_encoder(rebuild(start), items, pool, held_idx, train_idx, texts, n_ep, fi)
        enc, info = finetuned_cached(start, start_sha, items, pool, train_idx, fi, quick, work, f"fold{fi}")
        row["finetuned"] = score_encoder(enc, items, pool, held_idx, train_idx, texts, n_ep, fi)
        row["train"] = info
        log.info("supervised fold %d: start %s finetuned %s (%.0f s)", fi, row["start"], row["finetuned"], time.time() - t0)
        save_atomic(cache, lambda p: Path(p).write_text(json.dumps(row, indent=1)))
        rows.append(row)
        _anchor_row(row, start, start_sha, items, pool, held_idx, train_idx, texts, n_ep, fi, quick, work, key, anchor_pool)
    names = ["start", "finetuned"] + (["finetuned_anchor"] if anchor_pool is not None else [])
    means = {n: {k: round(v, 4) for k, v in C.fold_score(rows, n).items()} for n in names}
    chosen = C.choose_simplest(means)
    return {"folds": rows, "means": means, "chosen": chosen, "min_gain": C.MIN_GAIN, "episodes": n_ep,
            "anchor": ANCHOR if anchor_pool is not None else None,
            "rule": "imprinting on held-out classes, score = mean over the checked folds and K in {1,5} of 0.5 * "
                    "dermoscopic 4-way + 0.5 * skin 5-way; start, fine-tuned, fine-tuned with the dermoscopy anchor "
                    "in that order, each replacing the current choice only if the score gains > min_gain and "
                    "dermoscopic does not lose more than min_gain"}


def _anchor_row(row, start, start_sha, items, pool, held_idx, train_idx, texts, n_ep, fi, quick, work, key, anchor_pool):
    """Add the dermoscopy-anchor candidate's held-out scores to a fold row (cached on its own)."""
    if anchor_pool is None:
        return
    cache = work / f"sup_fold{fi}_anchor_{C._key(key, json.dumps(ANCHOR, sort_keys=True), len(anchor_pool))}.json"
    if cache.exists():
        row.update(json.loads(cache.read_text()))
        return
    t0 = time.time()
    enc, info = finetuned_cached(start, start_sha, items, pool, train_idx, fi, quick, work, f"fold{fi}", anchor_pool)
    add = {"finetuned_anchor": score_encoder(enc, items, pool, held_idx, train_idx, texts, n_ep, fi), "train_anchor": info}
    log.info("supervised fold %d: finetuned %s finetuned_anchor %s (%.0f s)", fi, row["finetuned"], add["finetuned_anchor"], time.time() - t0)
    save_atomic(cache, lambda p: Path(p).write_text(json.dumps(add, indent=1)))
    row.update(add)


# ---------------------------------------------------------------- the fold encoders' views, for the conditions stage


def fold_views(models: Path, data_dir: Path, work: Path, folds: list, quick: bool, seed: int):
    """(Passed to conditions.run by run.py.) When the shipped image encoder is the supervised
    stage's (trained on every base skin condition), the folds must not be scored with it: for each fold, (embeddings by class, concept pairs) of every
    chosen image through that fold's encoder, fine-tuned without the fold's classes (the supervised
    stage's cached check encoders). None when the encoder was not trained on the base labels."""
    mf = json.loads((models / "manifest.json").read_text())
    sup = mf.get("provenance", {}).get("supervised_encoder")
    if not (sup and sup.get("shipped")):
        return None
    start, start_sha = start_encoder(models, work)
    _, skin = skin_items(data_dir, quick, seed)
    chosen = C.chosen_items(data_dir, quick, seed)
    pool_skin, pool = image_pool(data_dir, skin, work), image_pool(data_dir, chosen, work)
    anchored = sup.get("fold_check", {}).get("chosen") == "finetuned_anchor"
    anchor_pool = image_pool(data_dir, anchor_items(data_dir, quick), work) if anchored else None
    views = []
    for fi, fold in enumerate(folds):
        fold = set(fold)
        train_idx = np.asarray([i for i, it in enumerate(skin) if it.key not in fold])
        enc, _ = finetuned_cached(start, start_sha, skin, pool_skin, train_idx, fi, quick, work, f"fold{fi}", anchor_pool)
        cache = work / f"cond_foldenc_{C._key(fi, *[float(p.sum()) for p in enc.state_dict().values()], *[it.path for it in chosen])}.npy"
        if cache.exists():
            flat = np.load(cache)
        else:
            t0 = time.time()
            flat = embed(enc, pool, np.arange(len(chosen))).astype(np.float32)
            save_atomic(cache, lambda p: np.save(open(p, "wb"), flat))
            log.info("fold %d: %d images embedded by its encoder (%.0f s)", fi, len(chosen), time.time() - t0)
        views.append((C.group_by_class(chosen, flat), C.concept_pairs(models, data_dir, chosen, flat, work)))
    return views



# ---------------------------------------------------------------- export


def export_encoder(enc: export.ImageEncoder, models: Path, pool: torch.Tensor, work: Path, seed: int) -> dict:
    """Write image_encoder.onnx (+ int8 variant), checked against PyTorch by onnxruntime, and refresh the
    image parity references (same input images, new embeddings)."""
    img_path = models / "image_encoder.onnx"
    tmp = work / "image_encoder.supervised.onnx"
    export.export_image_encoder(enc, tmp)
    ref_dir = models / "reference"
    refs = json.loads((ref_dir / "images.json").read_text())
    x = np.concatenate([np.load(ref_dir / r["input"]) for r in refs])
    with torch.no_grad():
        torch_emb = enc(torch.from_numpy(x)).numpy()
    ort_emb = export.ort_session(tmp).run(["embedding"], {"image": x})[0]
    cos = export.cos_rows(torch_emb, ort_emb)
    if cos.min() < 0.9999:
        raise RuntimeError(f"image encoder ONNX disagrees with PyTorch (min cosine {cos.min()})")
    shutil.move(tmp, img_path)
    for i, r in enumerate(refs):
        export.save_npy(ref_dir / r["embedding"], ort_emb[i : i + 1])
        export.save_npy(ref_dir / r["embedding_torch"], torch_emb[i : i + 1])
    out = {"fp32_min_cosine_to_torch": round(float(cos.min()), 6)}
    int8_path = models / "image_encoder.int8.onnx"
    if not int8_path.exists():  # not shipped; refreshed only where the encoder stage built it (--int8-image)
        return out
    rng = np.random.default_rng(seed)
    calib_idx = rng.permutation(len(pool))[:128]
    calib = [ssl.normalise(pool[calib_idx[i : i + 16]].float() / 255.0).numpy() for i in range(0, len(calib_idx), 16)]
    try:
        export.quantize_image_int8(img_path, int8_path, calib)
        q = export.ort_session(int8_path).run(["embedding"], {"image": x})[0]
        out["int8_mean_cosine_to_fp32"] = round(float(export.cos_rows(ort_emb, q).mean()), 4)
    except Exception as e:  # noqa: BLE001
        log.warning("int8 image encoder failed: %s", e)
        if int8_path.exists():
            int8_path.unlink()
    return out


def run(args) -> dict:
    models, work, quick = args.out, args.work, args.quick
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    here = Path(__file__).resolve().parent.parent
    desc = json.loads((here / "descriptions.json").read_text())["base"]
    start, start_sha = start_encoder(models, work)
    classes, items = skin_items(args.data, quick, args.seed)
    pool = image_pool(args.data, items, work)
    texts = C.text_embeddings(models, {c: desc[c] for c in sorted({it.key for it in items})}, work)
    anchor_pool = image_pool(args.data, anchor_items(args.data, quick), work) if ANCHOR else None
    check = fold_check(start, start_sha, classes, items, pool, texts, quick, work, anchor_pool)
    log.info("supervised fold check means %s -> %s", json.dumps(check["means"]), check["chosen"])
    report = {"stage": "python models/train/run.py --stage supervised", "start_sha256": start_sha,
              "settings": settings(), "classes": len({it.key for it in items}), "images": len(items),
              "fold_check": check, "shipped": check["chosen"] != "start"}
    mf_path = models / "manifest.json"
    if report["shipped"]:
        anchored = anchor_pool if check["chosen"] == "finetuned_anchor" else None
        enc, info = finetuned_cached(start, start_sha, items, pool, np.arange(len(items)), args.seed, quick, work, "all", anchored)
        report["train"] = info
        report["export"] = export_encoder(enc, models, pool, work, args.seed)
    else:  # the encoder stage's export stays (restored if an earlier run of this stage had replaced it)
        if export.sha256(models / "image_encoder.onnx") != start_sha:
            shutil.copyfile(start, models / "image_encoder.onnx")
    mf = json.loads(mf_path.read_text())
    ie = mf["image_encoder"]["variants"]
    for e in ie.values():  # every variant of a refreshed file (a float16 one shares the fp32 file)
        f = models / e["file"]
        if f.exists():
            e["sha256"], e["bytes"] = export.sha256(f), f.stat().st_size
    if "int8" in ie and "int8_mean_cosine_to_fp32" in report.get("export", {}):
        ie["int8"]["mean_cosine_to_fp32_on_reference"] = report["export"]["int8_mean_cosine_to_fp32"]
    report["output_sha256"] = ie["fp32"]["sha256"]
    report["seconds"] = round(time.time() - t0, 1)
    mf.setdefault("provenance", {})["supervised_encoder"] = report
    export.write_json(mf_path, mf)
    log.info("supervised stage: %s (%.0f s)", "fine-tuned encoder shipped" if report["shipped"] else "start kept", time.time() - t0)
    return report
