# Pack what device_backbone_probe.py reads (a device call carries at most 64 MiB with the repository):
# every base skin-condition image of the supervised stage (supervise.skin_items: ISIC base, dermnet,
# sd198, derm7pt; 6,793 images) and the recipe's self-supervised pool (isic_unlabelled + the ISIC images
# of the encoder split A), each once, as STORE px WebP q80 (2.6 KB an image) (shorter side resized, centre crop); the
# description embeddings of those classes by the shipped default text encoder (int8 at stop 25, f16w since stop 26); and the ImageNet weights of
# EfficientNet-Lite0/1/2 without the ImageNet classifier, in fp16. No novel-class image or description is
# packed (conditions.check_no_novel). Written to devcarry/ (git-ignored, never committed: the images are
# not redistributed).
#
#   python models/train/experiments/pack_backbones.py [../shared/data] [lite1.pth lite2.pth]
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sgps_train import conditions as C  # noqa: E402
from sgps_train import data, lite0, recipe, supervise  # noqa: E402

STORE = 160
D = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"
ROOT = HERE.parents[2]
out = ROOT / "devcarry"
out.mkdir(exist_ok=True)

classes, skin = supervise.skin_items(D, False, 0)
items = data.read_manifest(D)
split_a, _, _ = recipe.capped_base_splits(data.base_items(items), 0)
ssl_items = [it for it in items if it.dataset == "isic_unlabelled"] + [it for it in split_a if it.dataset == "isic"]
C.check_no_novel({it.key for it in skin} | {it.key for it in ssl_items if it.cls})
order = list(skin) + [it for it in ssl_items if it.path not in {s.path for s in skin}]
index = {it.path: i for i, it in enumerate(order)}
bufs = []
for it in order:
    im = data.resize_center_crop(data.load_rgb(D / it.path), STORE)
    b = io.BytesIO()
    im.save(b, "WEBP", quality=80)
    bufs.append(np.frombuffer(b.getvalue(), np.uint8))
off = np.cumsum([0] + [len(b) for b in bufs])
desc = json.loads((HERE.parent / "descriptions.json").read_text())["base"]
skin_classes = sorted({it.key for it in skin})
texts = C.text_embeddings(ROOT / "models", {c: desc[c] for c in skin_classes}, Path("/tmp/sgps_pack_work"))
np.savez(out / "pack_backbones.npz", buf=np.concatenate(bufs), off=off,
         key=np.array([it.key for it in skin]), n_skin=len(skin),
         ssl_idx=np.array([index[it.path] for it in ssl_items]), classes=np.array(classes),
         text_classes=np.array(skin_classes), texts=np.stack([texts[c] for c in skin_classes]))
print(len(order), "images", round(off[-1] / 1e6, 1), "MB; skin", len(skin), "ssl", len(ssl_items), "classes", len(classes))
pths = [lite0.pth_path()] + sys.argv[2:4]
for v, p in zip(("lite0", "lite1", "lite2"), pths):
    m = lite0.load_imagenet(p, v)  # strict: the shapes are checked here
    sd = {k: t.half() for k, t in m.state_dict().items() if not k.startswith("_fc.")}
    torch.save(sd, out / f"{v}.pt")
    print(v, round((out / f"{v}.pt").stat().st_size / 1e6, 1), "MB")
