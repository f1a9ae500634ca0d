# Pack ISIC base + novel + isic_unlabelled as 180x180 JPEG q85 (shorter side 180, centre crop) for
# device_ssl_probe.py: the device call carries at most 64 MiB with the working tree. Written to
# devcarry/ (git-ignored, never committed: the images are not redistributed).
import io, sys, numpy as np
from pathlib import Path
HERE = Path(__file__).resolve().parent
from PIL import Image
sys.path.insert(0, str(HERE.parent))
from sgps_train import data
D = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[3] / "shared" / "data"
items = data.read_manifest(D)
base = [it for it in data.base_items(items) if it.dataset == "isic"]
nov = data.novel_items(items)
unl = [it for it in items if it.dataset == "isic_unlabelled"]
bufs, group, cls = [], [], []
for g, its in ((0, base), (1, nov), (2, unl)):
    for it in its:
        im = data.resize_center_crop(data.load_rgb(D / it.path), 180)
        b = io.BytesIO(); im.save(b, "JPEG", quality=85); bufs.append(np.frombuffer(b.getvalue(), np.uint8))
        group.append(g); cls.append(it.cls or "")
off = np.cumsum([0] + [len(b) for b in bufs])
out = HERE.parents[2] / "devcarry"
out.mkdir(exist_ok=True)
np.savez(out / "pack.npz", buf=np.concatenate(bufs), off=off, group=np.array(group), cls=np.array(cls))
print(len(bufs), off[-1] / 1e6, "MB", {g: group.count(g) for g in (0, 1, 2)})
