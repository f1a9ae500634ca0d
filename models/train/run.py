#!/usr/bin/env python3
"""sgps training recipe: one entry point that regenerates every shipped model in models/.

    python models/train/run.py --data ../shared/data --out models/            # full recipe
    python models/train/run.py --data ../shared/data --out /tmp/x --quick     # code-path check (CI)

Stages (--stage all runs the three in order, --stage supervised the last two; each heavy step is cached in --work, so a cut run resumes):
  recipe      ImageNet Lite0 check -> self-supervised encoder -> adaptation checks on the 16 original base
              classes -> text encoder export (f16w) -> ONNX export, verification, references, manifest.json
  supervised  every layer of that encoder fine-tuned on the 235+ base skin conditions, kept only if
              class-level folds say so (sgps_train/supervise.py)
  conditions  text map and synthesizer G learned from all 251 base conditions, chosen by class-level
              folds, calibrated (sgps_train/conditions.py)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sgps_train import recipe  # noqa: E402


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=here.parent.parent.parent / "shared" / "data",
                    help="image collection with manifest.csv (default ../shared/data)")
    ap.add_argument("--out", type=Path, default=here.parent, help="where to write the models (default models/)")
    ap.add_argument("--work", type=Path, default=here / "out", help="scratch dir for caches/intermediates")
    ap.add_argument("--quick", action="store_true", help="tiny run on a handful of images (CI code-path check)")
    ap.add_argument("--no-ssl", action="store_true", help="skip the self-supervised (SimCLR) training of the encoder on isic_unlabelled")
    ap.add_argument("--no-adapt", action="store_true", help="keep the unadapted encoder (no supervised adaptation)")
    ap.add_argument("--no-meta", action="store_true", help="untrained G (= prototype imprinting)")
    ap.add_argument("--encoder", choices=["lite0", "lite1", "lite2"], default="lite0",
                    help="EfficientNet-Lite variant of the image encoder (shipped: lite0; lite1 led a device screen, "
                         "models/train/HISTORY.md; the stages' checks then decide as for lite0)")
    ap.add_argument("--ssl-recompute", choices=["auto", "on", "off"], default="auto",
                    help="self-supervised step: recompute activations in the backward pass (same weights, less "
                         "memory, slower); auto = for lite1/lite2 (21 GB a step without it). A checkpoint resumes "
                         "in either mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--int8-image", action="store_true",
                    help="also build the static int8 image encoder (not shipped: tract runs it ~35x slower than onnxruntime)")
    ap.add_argument("--stage", choices=["all", "supervised", "conditions", "text"], default="all",
                    help="all: the encoder recipe, then the supervised stage, then the conditions stage; supervised: "
                         "the many-condition fine-tuning of the encoder already in --out, then the conditions stage; "
                         "conditions: only the synthesizer stage over all 251 base conditions, on the image encoder in --out; "
                         "text: only re-export the text encoder (and its reference) into the models in --out")
    ap.add_argument("--novel-check", action="store_true",
                    help="after everything is frozen, print a Python-side novel-class sanity figure")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("sgps_train").setLevel(logging.INFO)
    from sgps_train import ssl

    ssl.LOW_MEMORY = {"auto": None, "on": True, "off": False}[args.ssl_recompute]
    if args.stage == "text":
        recipe.run_text(args)
        return 0
    if args.stage == "all":
        recipe.run(args)
    from sgps_train import conditions, supervise

    if args.stage in ("all", "supervised"):
        supervise.run(args)

    res = conditions.run(args, supervise.fold_views)
    conditions.export_g(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
