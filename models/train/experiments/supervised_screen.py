"""Screen a setting of the supervised stage (supervise.EPOCHS / LR / DERM_WEIGHT / SIZE) on a finished
run's start encoder with the stage's own fold check: the same folds, episodes, seeds and rule, each
fold's encoder fine-tuned without the fold's classes and scored by imprinting (and descriptions
alone) on them. The start encoder's rows and the stage's own setting come from the `out/` caches
where that run left them, so a screen pays only for the new fine-tunes (~10 minutes a fold at the
recipe's 3 epochs on 2 cores, proportionally more for more epochs). Every fine-tune checkpoints:
a cut screen goes on where it stopped when run again.

    models/train/.venv/bin/python models/train/experiments/supervised_screen.py --run models/train/out/run34 \
        [--threads 1] epochs=6 [lr=2e-4] [derm_weight=0.6] [size=192] [--folds 0,1]

Prints the fold means of the start encoder, the stage's setting and the screened setting (score,
dermoscopic, skin, K = 0), and per fold. Base classes only (skin_items refuses novel ones).
"""
import argparse
import json
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
import torch  # noqa: E402

from sgps_train import conditions as C, supervise  # noqa: E402

KNOBS = {"epochs": ("EPOCHS", int), "lr": ("LR", float), "derm_weight": ("DERM_WEIGHT", float), "size": ("SIZE", int)}

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--run", type=Path, required=True, help="a finished run's output (run.py --out DIR) with the supervised stage in it")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--folds", default=None, help="comma-separated fold numbers (default: the stage's CHECK_FOLDS)")
ap.add_argument("setting", nargs="+", help="knob=value, knobs: " + ", ".join(KNOBS))
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("sgps_train").setLevel(logging.INFO)
torch.set_num_threads(args.threads)
DATA = HERE.parent.parent.parent / "shared" / "data"
WORK = HERE / "out"

change = {}
for s in args.setting:
    k, _, v = s.partition("=")
    if k not in KNOBS or not v:
        sys.exit(f"{s!r}: expected knob=value with knob one of {list(KNOBS)}")
    change[KNOBS[k][0]] = KNOBS[k][1](v)
if args.folds:
    supervise.CHECK_FOLDS = tuple(int(f) for f in args.folds.split(","))

mf = json.loads((args.run / "manifest.json").read_text())
if not mf.get("provenance", {}).get("supervised_encoder"):
    sys.exit(f"{args.run}: no supervised stage in its manifest")
desc = json.loads((HERE / "descriptions.json").read_text())["base"]
start, start_sha = supervise.start_encoder(args.run, WORK)
classes, items = supervise.skin_items(DATA, False, 0)
pool = supervise.image_pool(DATA, items, WORK)
texts = C.text_embeddings(args.run, {c: desc[c] for c in sorted({it.key for it in items})}, WORK)

base = supervise.fold_check(start, start_sha, classes, items, pool, texts, False, WORK)
for name, value in change.items():
    setattr(supervise, name, value)
new = supervise.fold_check(start, start_sha, classes, items, pool, texts, False, WORK)
label = " ".join(args.setting)
print(json.dumps({"start": base["means"]["start"], "stage setting": base["means"]["finetuned"],
                  label: new["means"]["finetuned"], "folds": list(supervise.CHECK_FOLDS)}, indent=1))
for b, n in zip(base["folds"], new["folds"]):
    print(b["fold"], {"start": b["start"], "stage": b["finetuned"], label: n["finetuned"]})
gain = new["means"]["finetuned"]["score"] - base["means"]["finetuned"]["score"]
derm = new["means"]["finetuned"]["derm"] - base["means"]["finetuned"]["derm"]
print(f"{label}: score {gain:+.2f}, dermoscopic {derm:+.2f} against the stage's setting "
      f"(the rule needs > +{C.MIN_GAIN} and dermoscopic >= -{C.MIN_GAIN})")
