# Which image encoder ships: the rule between two complete recipe runs that differ in the encoder
# (e.g. `run.py --encoder lite1 --out models/train/out/lite1_models` against the shipped models/).
# Each run's supervised stage scored its chosen encoder on the same class-level folds with the same
# seeds (manifest.json -> provenance.supervised_encoder.fold_check); the candidate replaces the
# shipped encoder only if its fold score is higher by more than conditions.MIN_GAIN and its
# dermoscopic figure is not lower by more than that - the rule every recipe step uses.
#
#   python models/train/experiments/compare_encoders.py models/manifest.json models/train/out/lite1_models/manifest.json
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sgps_train.conditions import MIN_GAIN  # noqa: E402


def chosen(path: str) -> tuple[str, dict]:
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such manifest (a recipe run writes it into its --out folder)")
    mf = json.loads(Path(path).read_text())
    sup = mf.get("provenance", {}).get("supervised_encoder")
    if not sup:
        raise SystemExit(f"{path}: no supervised stage in its provenance (run the recipe to its end first)")
    fc = sup["fold_check"]
    name = mf["provenance"].get("upstream", {}).get("image_encoder", {}).get("package", "?")
    return name, fc["means"][fc["chosen"]]


def main() -> int:
    (a_name, a), (b_name, b) = chosen(sys.argv[1]), chosen(sys.argv[2])
    for n, m in ((a_name, a), (b_name, b)):
        print(f"{n:40s} fold score {100 * m['score']:.2f}  dermoscopic {100 * m['derm']:.2f}  skin {100 * m['skin']:.2f}")
    ship = b["score"] > a["score"] + MIN_GAIN and b["derm"] >= a["derm"] - MIN_GAIN
    print(f"gain {100 * (b['score'] - a['score']):+.2f}, dermoscopic {100 * (b['derm'] - a['derm']):+.2f} -> "
          + ("ship the candidate" if ship else "keep the shipped encoder"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
