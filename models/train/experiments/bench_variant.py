# Per-capture cost of a larger EfficientNet-Lite as the image encoder, for `sgps bench` (issue 16 item 5:
# "kept only if ... the per-capture cost on a Pi-class board stays sensible"). Copies models/ to OUT_DIR
# and replaces the fp32 image encoder by the variant's, exported the way the recipe exports Lite0
# (export.ImageEncoder: sqrt, centre, L2; 224 px) from its ImageNet weights - the cost does not depend on
# the weights. The int8 variant is dropped from the copy's manifest. Then:
#   cargo run --release -- --models OUT_DIR bench
#
#   python models/train/experiments/bench_variant.py lite1 path/to/efficientnet-lite1.pth /tmp/models_lite1
import json
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from sgps_train import export, lite0  # noqa: E402

variant, pth, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
models = HERE.parents[2] / "models"
if out.exists():
    shutil.rmtree(out)
shutil.copytree(models, out, ignore=shutil.ignore_patterns("train", "image_encoder*.onnx"))
net = lite0.load_imagenet(pth, variant)
with torch.no_grad():
    f = net.features(torch.rand(8, 3, 224, 224)).clamp_min(0)
enc = export.ImageEncoder(net, torch.sqrt(f + 1e-6).mean(0), power=True).eval()
path = out / "image_encoder.onnx"
export.export_image_encoder(enc, path)
mf = json.loads((out / "manifest.json").read_text())
ie = mf["image_encoder"]["variants"]
ie.pop("int8", None)
ie["fp32"].update(sha256=export.sha256(path), bytes=path.stat().st_size)
export.write_json(out / "manifest.json", mf)
print(variant, path, path.stat().st_size, "bytes", sum(p.numel() for n, p in net.named_parameters() if not n.startswith("_fc.")), "parameters")
