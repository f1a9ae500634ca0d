"""Screen for the domain-aware G (conditions.CONFIGS "text_and_image_delta+domain") while the fold
encoders are not built: the conditions stage's own fold check (same folds, episodes, seeds, rule)
on embeddings from the ImageNet EfficientNet-Lite0 (sqrt of the pooled features, L2-normalised),
an encoder that never saw a base label, so every fold is held out for it as well as for G. It is a
weaker encoder than the shipped one: the screen says whether the domain reading helps G in
principle, not by how much it will on the shipped encoder's folds. Text: the shipped text map
(word features, ridge lambda 3, each fold's vocabulary from its training descriptions).
Base classes only (conditions.chosen_items refuses novel ones).

    models/train/.venv/bin/python models/train/experiments/domain_screen.py [CONFIG ...]

With CONFIG names (conditions.CONFIGS keys), only those are trained and scored, in the stage's
order (e.g. `imprinting text_and_image_delta text_and_image_delta+calib` for the calibrating G).

    ... domain_screen.py --run DIR [CONFIG ...]

scores on the recipe's own fold encoders instead: DIR is a finished run's output (`run.py --out DIR`
with the supervised stage shipped in it, e.g. `models/train/out/run34`), and each fold is embedded
by the supervised stage's encoder fine-tuned without it, exactly as the conditions stage does
(`supervise.fold_views`; the fold encoders and their embeddings come from the `out/` caches, nothing
is retrained if they are there). Stop 34 found that ImageNet-feature screens do not carry over to
the fold encoders (the calibrating G: +1.0 on dermoscopy here, -1.3 there), so screen this way
where the caches exist.
"""
import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sgps_train import conditions as C, export, lite0, supervise  # noqa: E402
from sgps_train.cache import save_atomic  # noqa: E402

logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("sgps_train").setLevel(logging.INFO)
torch.set_num_threads(2)
DATA = HERE.parent.parent.parent / "shared" / "data"
WORK = HERE / "out" / "domain_screen"
WORK.mkdir(parents=True, exist_ok=True)

args = sys.argv[1:]
run_dir = None
if args[:1] == ["--run"]:
    if len(args) < 2:
        sys.exit("--run needs a finished run's output directory (run.py --out DIR)")
    run_dir, args = Path(args[1]), args[2:]
if args:
    unknown = sorted(set(args) - set(C.CONFIGS))
    if unknown:
        sys.exit(f"unknown configurations {unknown}; known: {list(C.CONFIGS)}")
    C.CONFIGS = {n: c for n, c in C.CONFIGS.items() if n in args}
items = C.chosen_items(DATA, False, 0)
classes = sorted({it.key for it in items})
folds = C.make_folds(classes)
views = None
if run_dir is not None:
    views = supervise.fold_views(run_dir, DATA, HERE / "out", folds, False, 0)
    if views is None:
        sys.exit(f"{run_dir}: its image encoder is not the supervised stage's (no fold encoders to screen on)")
    by = views[0][0]  # the class keys; every fold is scored on its own view
    views = [(E, None) for E, _ in views]
else:
    cache = WORK / f"imagenet_{C._key(*[it.path for it in items])}.npy"
    if cache.exists():
        emb = np.load(cache)
    else:
        # the supervised stage's decoded pool (deployed resize + crop, cached in out/) and its embedding
        enc = export.ImageEncoder(lite0.load_imagenet(lite0.pth_path("lite0"), "lite0"), None, power=True).eval()
        emb = supervise.embed(enc, supervise.image_pool(DATA, items, HERE / "out"), np.arange(len(items))).astype(np.float32)
        save_atomic(cache, lambda p: np.save(open(p, "wb"), emb))
    by = C.group_by_class(items, emb)
desc = json.loads((HERE / "descriptions.json").read_text())["base"]
tmap = C.TEXT_MAPS["words_lam3"]
names = {c: None for c in classes}  # text_features reads only the keys when the map has no MiniLM part
fold_texts = [C.text_features(tmap, names, desc, [c for c in classes if c not in f])[0] for f in folds]
rep = C.fold_check(by, fold_texts, False, 0, WORK, None, views, tmap["lam"])
print(json.dumps({"means": rep["means"], "chosen": rep["chosen"], "seconds": rep["seconds"]}, indent=1))
for r in rep["folds"]:
    print(r["fold"], {n: {k: r[n][k] for k in ("derm_1", "derm_5", "skin_1", "skin_5")} for n in C.CONFIGS})
