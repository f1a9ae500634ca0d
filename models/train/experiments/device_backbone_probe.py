# Device probe (not part of the recipe; run on a lent GPU machine, stop 25): is EfficientNet-Lite1 or
# Lite2 a better image encoder than the shipped Lite0, by the supervised stage's own rule? (Issue 16,
# item 5.) For each variant, from its ImageNet weights: the recipe's SimCLR (ssl.train itself: 48 epochs,
# 128 px, batch 256, on the recipe's pool - isic_unlabelled + the ISIC images of encoder split A, labels
# unread) on the GPU in bf16; the embedding post-processing of the shipped encoder (sqrt, centre, L2;
# centre from 1,200 pool images, label-free); then the supervised stage's fold check exactly as
# supervise.fold_check runs it (supervise.finetune per class-level fold without the fold's classes,
# supervise.score_encoder on the held-out conditions: imprinting, dermoscopic 4-way and skin 5-way,
# K = 1 / 5, 300 episodes, the recipe's seeds; plus descriptions alone through the ridge map). The score
# is conditions.fold_score's: mean over folds and K of 0.5 dermoscopic + 0.5 skin.
# Inputs are 160 px WebP re-encodes (pack_backbones.py), upsampled to the deployed 224 px on the GPU,
# so compare variants with each other here, not with the recipe's CPU figures. No novel-class image or
# description is packed or read.
#
#   python models/train/experiments/pack_backbones.py ../shared/data lite1.pth lite2.pth   # devcarry/
#   BUDGET=540 python3 models/train/experiments/device_backbone_probe.py
#   (QUICK=1: a few classes, 1 epoch, 10 episodes - the CPU smoke test; VARIANTS=lite1,lite2 SEEDS=2
#   FIRST_SEED=1 SMOKE=0: only the second seeds, without the start-up smoke test - the stop-25 second call)
import copy
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from probe_log import OUT, T0, log  # noqa: E402
from sgps_train import conditions as C  # noqa: E402
from sgps_train import data, export, lite0, ssl, supervise  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
BUDGET = float(os.environ.get("BUDGET", "540"))
VARIANTS = os.environ.get("VARIANTS", "lite0,lite2,lite1").split(",")
SEEDS = int(os.environ.get("SEEDS", "2"))
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

z = np.load("devcarry/pack_backbones.npz")
buf, off, n_skin = z["buf"], z["off"], int(z["n_skin"])
keys = [str(k) for k in z["key"]]
classes = [str(c) for c in z["classes"]]
texts = {str(c): z["texts"][j] for j, c in enumerate(z["text_classes"])}
ssl_idx = z["ssl_idx"]
C.check_no_novel(set(keys) | set(classes) | set(texts))
sel = np.arange(len(off) - 1)
if QUICK:  # 12 classes (4 dermoscopic) x 6 images, 64 pool images
    by = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    ks = [k for k in sorted(by) if C.is_dermoscopic(k)][:4] + [k for k in sorted(by) if not C.is_dermoscopic(k)][:8]
    skin_sel = np.array(sorted(i for k in ks for i in by[k][:6]))
    extra = [int(j) for j in ssl_idx[:64] if j not in set(skin_sel.tolist())]
    sel = np.concatenate([skin_sel, np.array(extra, dtype=np.int64)])
    remap = {int(j): i for i, j in enumerate(sel)}
    ssl_idx = np.array([remap[int(j)] for j in ssl_idx[:64]])
    keys = [keys[j] for j in skin_sel]
    n_skin = len(skin_sel)


def decode(i):
    return np.asarray(Image.open(io.BytesIO(buf[off[i]:off[i + 1]].tobytes())).convert("RGB"))


with ThreadPoolExecutor(16) as ex:
    X = torch.from_numpy(np.stack(list(ex.map(decode, sel)))).permute(0, 3, 1, 2).contiguous().to(dev)


def resized(x, size):
    out = [F.interpolate(x[i:i + 512].float(), size=(size, size), mode="bilinear", align_corners=False)
           .round().clamp(0, 255).to(torch.uint8) for i in range(0, len(x), 512)]
    return torch.cat(out)


X224 = resized(X, data.INPUT_SIZE)  # the deployed input size (the recipe's supervised pool)
SSL_POOL = resized(X[torch.from_numpy(ssl_idx).to(dev)], ssl.STORE)  # the recipe's SimCLR store size
del X
items = [data.Item(str(i), *k.split("/", 1)) for i, k in enumerate(keys)]
folds = C.make_folds(classes, 2 if QUICK else C.FOLDS)
if QUICK:
    folds = [[c for c in f if c in set(keys)] for f in folds]
    ssl.EPOCHS = 1
    supervise.EPOCHS = 1
N_EP = 10 if QUICK else supervise.N_EP


def fast_score(g, held: dict, texts: dict, n_ep: int, seed: int) -> dict:
    """conditions.score for the imprinting configuration (what score_encoder uses), on the same episodes
    (the same random draws in the same order) without running G per episode: with shots a class's weight
    is its normalised shot mean, without shots its projected description, and imprinting's scale and zero
    bias do not change the argmax. 60x faster; checked equal to conditions.score by check_fast_score."""
    from sgps_train import episodes

    fams = {"derm": [c for c in held if C.is_dermoscopic(c)], "skin": [c for c in held if c.split("/")[0] in C.SKIN]}
    t_dim = next(iter(texts.values())).shape[1]
    out = {}
    with torch.no_grad():
        W = g.text_proj.weight.numpy().astype(np.float32)
        bias = g.text_proj.bias.numpy().astype(np.float32)
    for fam, cls in fams.items():
        n = min(4 if fam == "derm" else 5, len(cls))
        if n < 2:
            continue
        for k in (0, 1, 5):
            rng = np.random.default_rng(seed + 7 * k)
            accs = []
            for _ in range(n_ep):
                sup, qx, y, chosen = episodes.sample_episode(rng, held, cls, n, k, 15)
                t, _, _ = episodes.text_for(chosen, texts, rng, True, t_dim)
                w = sup.mean(1) if k > 0 else t @ W.T + bias
                w = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-8)
                accs.append(float(((qx @ w.T).argmax(-1) == y).mean()))
            out[f"{fam}_{k}"] = float(np.mean(accs))
    return out


def check_fast_score():
    rng = np.random.default_rng(0)
    held = {(f"isic/c{i}" if i < 5 else f"dermnet/c{i}"): rng.normal(size=(12, 64)).astype(np.float32) for i in range(12)}
    held = {c: e / np.linalg.norm(e, axis=1, keepdims=True) for c, e in held.items()}
    tx = {c: rng.normal(size=(3, 384)).astype(np.float32) for c in held}
    g = C.make_g(C.CONFIGS["imprinting"], 64)
    C.fit_text_proj(g, held, tx)
    g.eval()
    slow, fast = C.score(g, held, tx, 40, 3), fast_score(g, held, tx, 40, 3)
    bad = {k: (slow[k], v) for k, v in fast.items() if abs(slow[k] - v) > 1e-9}
    if bad:
        raise RuntimeError(f"fast_score differs from conditions.score: {bad}")
    log("fast_score equals conditions.score on", sorted(fast))


check_fast_score()
C.score = fast_score  # supervise.score_encoder calls C.score
log("decoded", tuple(X224.shape), "ssl pool", tuple(SSL_POOL.shape), dev, "skin images", n_skin,
    "classes", len(set(keys)), "folds", [len(f) for f in folds], "variants", VARIANTS)
RESULTS = []


def save():
    json.dump(RESULTS, open(f"{OUT}/results.json", "w"), indent=1)


def start_encoder(variant: str, seed: int) -> export.ImageEncoder:
    net = lite0.Lite0(variant=variant)
    sd = {k: v.float() for k, v in torch.load(f"devcarry/{variant}.pt", map_location="cpu", weights_only=True).items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("_fc.") for k in missing):
        raise RuntimeError(f"{variant}: weights do not match ({missing[:3]} {unexpected[:3]})")
    t = time.time()
    net = ssl.train(net.to(dev), SSL_POOL, epochs=ssl.EPOCHS, seed=seed)
    enc = export.ImageEncoder(net, None, power=True).to(dev).eval()
    cidx = np.random.default_rng(seed).permutation(ssl_idx)[: supervise.CENTRE_IMAGES]
    with torch.no_grad():
        enc.center.copy_(supervise.uncentred_pool(enc, X224, cidx).mean(0))
    log(f"{variant} s{seed}: SimCLR {ssl.EPOCHS} epochs ({time.time() - t:.0f} s)")
    return enc


def run(variant: str, seed: int):
    t = time.time()
    enc = start_encoder(variant, seed)
    rows = []
    for fi, fold in enumerate(folds):
        fold = set(fold)
        held_idx = np.asarray([i for i, k in enumerate(keys) if k in fold])
        train_idx = np.asarray([i for i, k in enumerate(keys) if k not in fold])
        tf = time.time()
        row = {"fold": fi, "start": supervise.score_encoder(enc, items, X224, held_idx, train_idx, texts, N_EP, fi)}
        fine = copy.deepcopy(enc)
        row["train"] = supervise.finetune(fine, items, X224, train_idx, fi, QUICK)
        row["finetuned"] = supervise.score_encoder(fine, items, X224, held_idx, train_idx, texts, N_EP, fi)
        rows.append(row)
        log(f"{variant} s{seed} fold {fi}: start {C.fold_score([row], 'start')['score']:.4f} finetuned "
            f"{C.fold_score([row], 'finetuned')['score']:.4f} ({time.time() - tf:.0f} s)")
    means = {n: {k: round(v, 4) for k, v in C.fold_score(rows, n).items()} for n in ("start", "finetuned")}
    RESULTS.append({"variant": variant, "seed": seed, "means": means, "folds": rows, "seconds": round(time.time() - t, 1)})
    save()
    log(f"{variant} s{seed}: means {json.dumps(means)} ({time.time() - t:.0f} s)")
    return time.time() - t


def smoke():
    """Every step of a run on a handful of images (2 SimCLR steps, 2 fine-tuning steps, 10 episodes), so
    that a failure on the device shows in seconds, not minutes in."""
    t = time.time()
    net = lite0.Lite0()
    net.load_state_dict({k: v.float() for k, v in torch.load("devcarry/lite0.pt", weights_only=True).items()}, strict=False)
    net = ssl.train(net.to(dev), SSL_POOL[:64], epochs=1, seed=0, max_steps=2)
    enc = export.ImageEncoder(net, None, power=True).to(dev).eval()
    fold = set(folds[0])
    held = np.asarray([i for i, k in enumerate(keys) if k in fold])
    train = np.asarray([i for i, k in enumerate(keys) if k not in fold])
    supervise.finetune(enc, items, X224, train, 0, True)
    r = supervise.score_encoder(enc, items, X224, held, train, texts, 10, 0)
    log(f"smoke test passed ({time.time() - t:.0f} s): {r}")


if os.environ.get("SMOKE", "1") == "1":
    smoke()
took = {}
for seed in range(int(os.environ.get("FIRST_SEED", "0")), SEEDS):
    for v in VARIANTS:
        est = took.get(v, took.get("lite0", 0.0) * {"lite1": 1.5, "lite2": 2.0}.get(v, 1.0))
        if time.time() - T0 + est > BUDGET:
            log(f"budget: stop before {v} s{seed} (would take ~{est:.0f} s)")
            continue
        took[v] = run(v, seed)
for v in VARIANTS:
    rs = [r for r in RESULTS if r["variant"] == v]
    if rs:
        m = {n: {k: round(float(np.mean([r["means"][n][k] for r in rs])), 4) for k in rs[0]["means"][n]} for n in ("start", "finetuned")}
        log(f"{v}: mean of {len(rs)} seed(s) {json.dumps(m)}")
log("done")
