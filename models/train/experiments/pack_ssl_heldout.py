# Pack the images the recipe's SimCLR step and its held-out-pair check read - isic_unlabelled plus
# the ISIC base images with their recipe split (A / B2 / B1, recipe.py's split and seed 0) - as
# 180 px JPEG q85 for device_ssl_aug_probe.py (a device call carries at most 64 MiB). No novel-class
# image is packed. Written to devcarry/ (git-ignored, never committed: the images are not
# redistributed).
#
#   python models/train/experiments/pack_ssl_heldout.py [../shared/data]
import io
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sgps_train import data, recipe  # noqa: E402

D = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"
items = data.read_manifest(D)
base = data.base_items(items)
split_a, split_b1, split_b2 = recipe.capped_base_splits(base, 0)
unl = [it for it in items if it.dataset == "isic_unlabelled"]
# role: 0 unlabelled, 1 split A (SSL pool and held-out check), 2 B2, 3 B1 (held-out check only)
groups = [(0, unl)] + [(r, [it for it in s if it.dataset == "isic"]) for r, s in ((1, split_a), (2, split_b2), (3, split_b1))]
bufs, role, key = [], [], []
for r, its in groups:
    for it in its:
        im = data.resize_center_crop(data.load_rgb(D / it.path), 180)
        b = io.BytesIO()
        im.save(b, "JPEG", quality=85)
        bufs.append(np.frombuffer(b.getvalue(), np.uint8))
        role.append(r)
        key.append(it.key if it.cls else "")
off = np.cumsum([0] + [len(b) for b in bufs])
out = HERE.parents[2] / "devcarry"
out.mkdir(exist_ok=True)
np.savez(out / "pack_heldout.npz", buf=np.concatenate(bufs), off=off, role=np.array(role), key=np.array(key))
print(len(bufs), round(off[-1] / 1e6, 1), "MB", {r: role.count(r) for r in range(4)})
