# Score encoder weights by the recipe's held-out rule on this machine, plus the label-free variants
# tried in stop 13 (models/README.md -> "Tried and not shipped"). Not part of the recipe.
#
#   python models/train/experiments/heldout_score.py [options] WEIGHTS.pt|imagenet [...]
#     (several weights)  --average: one encoder with the mean of their weights (a "soup")
#                        --concat: one embedding, the L2-normalised embeddings side by side
#     --bn-reestimate    batch-norm statistics recomputed on the SimCLR pool at --size (un-augmented)
#     --size N           input resolution (default: the recipe's 224)
#
# Prints per variant: the rule's figure (2-way prototype accuracy on heldout.FOLDS, 1 / 5-shot, 600
# episodes, mean of the four; the recipe's ssl_check computes the same numbers), all six pairs of
# ISIC base classes (fair only for label-free steps: those never saw any base label), and ISIC-base
# 4-way. Reads base-class images only; the novel classes are never read.
import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sgps_train import adapt, data, embed, heldout, lite0, recipe  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("weights", nargs="+")
ap.add_argument("--data", type=Path, default=HERE.parents[3] / "shared" / "data")
ap.add_argument("--average", action="store_true")
ap.add_argument("--concat", action="store_true")
ap.add_argument("--bn-reestimate", action="store_true")
ap.add_argument("--size", type=int, default=data.INPUT_SIZE)
ap.add_argument("--episodes", type=int, default=600)
args = ap.parse_args()
torch.set_num_threads(2)
t0 = time.time()

items = data.read_manifest(args.data)
split_a, split_b1, split_b2 = recipe.capped_base_splits(data.base_items(items), 0)
# the recipe's order (ssl_check: A, B2, B1) and its capped splits (capping keeps every ISIC image
# but orders them as the recipe does, which fixes the episodes)
held = [it for s in (split_a, split_b2, split_b1) for it in s if it.key in recipe.ISIC_BASE]
pool = [it for it in items if it.dataset == "isic_unlabelled"] + [it for it in split_a if it.dataset == "isic"]


def load(path: str) -> lite0.Lite0:
    m = lite0.load_imagenet(lite0.pth_path())
    if path != "imagenet":
        m.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return m.eval()


def average(models):
    sds = [m.state_dict() for m in models]
    avg = {k: (sum(sd[k].double() for sd in sds) / len(sds)).to(v.dtype) if v.is_floating_point() else v
           for k, v in sds[0].items()}
    models[0].load_state_dict(avg)
    return models[0]


@torch.no_grad()
def bn_reestimate(m: lite0.Lite0) -> lite0.Lite0:
    """Batch-norm running statistics replaced by the plain mean / variance over the SimCLR pool's
    images, preprocessed as the runtime does (no augmentation)."""
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average
            mod.train()
    for i in range(0, len(pool), 64):
        m.features(torch.from_numpy(embed.load_batch(args.data, pool[i : i + 64], args.size)))
    return m.eval()


@torch.no_grad()
def features(m: lite0.Lite0) -> np.ndarray:
    # through float16 trunk maps, as the recipe's cached trunk (adapt.cache_trunk) does
    return np.concatenate([adapt.top(m, adapt.trunk(m, torch.from_numpy(embed.load_batch(args.data, held[i : i + 32], args.size))).half().float()).numpy()
                           for i in range(0, len(held), 32)])


models = [load(w) for w in args.weights]
if args.average:
    models = [average(models)]
if args.bn_reestimate:
    models = [bn_reestimate(m) for m in models]
fs = [features(m) for m in models]
if args.concat:
    fs = [np.concatenate([f / np.linalg.norm(f, axis=1, keepdims=True) for f in fs], 1)]

for w, f in zip(args.weights if len(fs) > 1 else ["+".join(args.weights)], fs):
    rule = [acc for fold in heldout.FOLDS for acc in heldout.classes_accuracy(f, held, fold, args.episodes).values()]
    pairs = {f"{p[0][5:9]}/{p[1][5:9]}": heldout.classes_accuracy(f, held, p, args.episodes)
             for p in itertools.combinations(recipe.ISIC_BASE, 2)}
    four = heldout.classes_accuracy(f, held, recipe.ISIC_BASE, args.episodes)
    pct = lambda x: round(100 * float(x), 2)  # noqa: E731
    print(f"{w} (size {args.size}{', averaged' if args.average else ''}{', concatenated' if args.concat else ''}"
          f"{', bn re-estimated' if args.bn_reestimate else ''}):")
    print(f"  rule (held-out folds, 1/5-shot each): {[pct(x) for x in rule]} mean {pct(np.mean(rule))}")
    print(f"  six pairs: {' '.join(f'{k} {pct(v[1])}/{pct(v[5])}' for k, v in pairs.items())}"
          f" mean {pct(np.mean([x for v in pairs.values() for x in v.values()]))}")
    print(f"  ISIC-base 4-way: {pct(four[1])} / {pct(four[5])}")
print(f"({time.time() - t0:.0f} s)")
