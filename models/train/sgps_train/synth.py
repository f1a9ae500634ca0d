"""Synthesizer G: (support embeddings, text embeddings) -> cosine classifier (weight, bias, scale).

w_c = base_c + delta_c, base_c = normalize(masked mean of the support) when the class has shots,
otherwise normalize(P text_c) (text-only fallback). delta_c comes from a small Transformer over one
token per class; its output layer is zero-initialised, so an untrained G is exactly prototype
imprinting. Everything is written with elementary ops (no fused attention / LayerNormalization) so
that the ONNX export runs in tract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def l2n(x, eps: float = 1e-8):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


class LN(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.g + self.b


class Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln1 = LN(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = LN(d)
        self.ff1 = nn.Linear(d, 2 * d)
        self.ff2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):  # x: [..., N, d]
        h = self.ln1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        d = q.shape[-1]
        hd = d // self.heads
        # split heads: [..., N, H, hd] -> [..., H, N, hd]
        def sp(t):
            return t.reshape(*t.shape[:-1], self.heads, hd).transpose(-2, -3)

        q, k, v = sp(q), sp(k), sp(v)
        att = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        o = torch.matmul(att, v).transpose(-2, -3)
        o = o.reshape(*o.shape[:-2], d)
        x = x + self.drop(self.out(o))
        x = x + self.drop(self.ff2(F.gelu(self.ff1(self.ln2(x)))))
        return x


class Synthesizer(nn.Module):
    """Identity-agnostic synthesizer.

    Each class is one token of scalar statistics (shots, text present, prototype/text agreement,
    similarity to the other classes, support consistency) - never the raw embedding - so G cannot
    memorise base classes and transfers to a user's new classes. A small Transformer over the
    class tokens outputs, per class, the mixing coefficients of
        w_c = base_c + alpha_c * t_c + beta_c * m,   m = mean_c base_c (task centre),
    a bias b_c, and one task-level log-scale offset. All output layers are zero-initialised: an
    untrained G is exactly prototype imprinting (text-only fallback when K = 0). With `calib`, the
    prototype of a class with K shots is first replaced by normalize(p_c + kappa / K * n_c), n_c the
    softmax-weighted mean of the base-class means nearest to p_c (the mean part of "distribution
    calibration", Yang et al. 2021, as shrinkage toward a prior worth kappa shots); an untrained
    calibrating G is calibrated imprinting.
    """

    N_FEATS = 8

    def __init__(
        self,
        dim: int = 1280,
        text_dim: int = 384,
        d_model: int = 32,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.0,
        init_scale: float = 10.0,
        max_shots: int = 20,
        domain: bool = False,
        calib: bool = False,
        calib_temp: float = 70.0,
        calib_kappa: float = 1.5,
        calib_domain: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.text_dim = text_dim
        self.max_shots = max_shots
        # text -> image-embedding space (fitted by ridge regression on base classes, then frozen)
        self.text_proj = nn.Linear(text_dim, dim)
        # optional ninth class feature: where the class sits between clinical photos (-0.5) and
        # dermoscopy (+0.5), a fixed linear reading of its base weight (set_domain), so G can treat
        # text and corrections differently in the two imaging domains
        self.domain = domain
        # training only (meta.meta_train): dermoscopic tasks drawn from every dermoscopic class, not the
        # ISIC base classes alone; on with the domain reading unless a configuration says otherwise
        self.derm_pool = domain
        # calib_domain: calibrate only the classes the domain reading puts on the dermoscopic side
        # (reading > 0), leaving clinical photos' prototypes as they are
        self.calib_domain = calib and calib_domain
        if domain or self.calib_domain:
            self.register_buffer("domain_w", torch.zeros(dim))
            self.register_buffer("domain_b", torch.zeros(()))
        # optional base-class memory (set_memory): the L2-normalised class means of the base classes
        # G was trained on; a class's prototype is pulled toward the mean of its nearest ones
        # (softmax at calib_temp over cosines) with weight calib_kappa / K before G reads it
        self.calib = calib
        self.calib_temp = calib_temp
        self.calib_kappa = calib_kappa
        self.memory_keys: list[str] = []
        if calib:
            self.register_buffer("memory", torch.zeros(0, dim))
        self.inp = nn.Linear(self.N_FEATS + int(domain), d_model)
        self.blocks = nn.ModuleList([Block(d_model, heads, dropout) for _ in range(layers)])
        self.ln = LN(d_model)
        self.coef = nn.Linear(d_model, 2)  # alpha (text mix), beta (task-centre mix)
        self.bias_head = nn.Linear(d_model, 1)
        self.scale_head = nn.Linear(d_model, 1)
        for lin in (self.coef, self.bias_head, self.scale_head):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        # gates chosen by the held-out-class check (recipe): mix the text into classes that have
        # shots, and apply the learned image-side corrections (task-centre mix, bias, scale offset)
        self.text_with_images = True
        self.image_delta = True

    @torch.no_grad()
    def set_domain(self, derm_means, other_means):
        """Fix the domain reading from L2-normalised class means ([n, D] arrays) of dermoscopic and
        of other classes: the unit direction between the two group means, scaled and shifted so the
        groups' mean projections land on +0.5 and -0.5."""
        d = torch.as_tensor(derm_means, dtype=torch.float32)
        o = torch.as_tensor(other_means, dtype=torch.float32)
        u = d.mean(0) - o.mean(0)
        u = u / u.norm()
        pd, po = float((d @ u).mean()), float((o @ u).mean())
        self.domain_w.copy_(u / (pd - po))
        self.domain_b.fill_(-0.5 * (pd + po) / (pd - po))

    @torch.no_grad()
    def set_memory(self, keys, means):
        """The base-class memory: class keys and their L2-normalised means ([n, D])."""
        self.memory_keys = list(keys)
        self.memory = torch.as_tensor(means, dtype=torch.float32).clone()

    def memory_exclude(self, classes) -> torch.Tensor | None:
        """[B] mask of the memory rows that belong to `classes` (1 = hidden): an episode on base classes
        must not be pulled toward its own classes' means, which a user's new class never has."""
        if not self.calib:
            return None
        cs = set(classes)
        return torch.tensor([1.0 if k in cs else 0.0 for k in self.memory_keys])

    def neighbours(self, base, exclude=None):
        """[..., N, D] -> the softmax-weighted mean of the memory rows nearest to each base weight."""
        # memory @ base^T, transposed: the exported graph holds the memory once, not also its transpose
        sim = torch.matmul(self.memory, base.transpose(-1, -2)).transpose(-1, -2)  # [..., N, B]
        if exclude is not None:
            sim = sim - 1e4 * exclude.unsqueeze(-2)
        return torch.matmul(torch.softmax(self.calib_temp * sim, dim=-1), self.memory)

    def base_weights(self, support, support_mask, text, text_mask, text_weight=None, memory_exclude=None):
        """support [...,N,K,D], masks [...,N,K]/[...,N], text [...,N,T] -> prototype, text weight.

        `text_weight` (training only) replaces normalize(P text) by a precomputed text weight
        (from a projection fitted without that class)."""
        m = support_mask.unsqueeze(-1)
        count = support_mask.sum(-1, keepdim=True)  # [..., N, 1]
        proto = l2n((support * m).sum(-2) / torch.clamp(count, min=1.0))
        if self.calib:  # shrink toward the near base classes, as a prior worth calib_kappa shots
            shrink = self.calib_kappa / torch.clamp(count, min=1.0) * (count > 0.5).to(proto.dtype)
            if self.calib_domain:
                reading = (proto * self.domain_w).sum(-1, keepdim=True) + self.domain_b
                shrink = shrink * (reading > 0).to(proto.dtype)
            proto = l2n(proto + shrink * self.neighbours(proto, memory_exclude))
        tw = l2n(self.text_proj(text)) if text_weight is None else text_weight
        tw = tw * text_mask.unsqueeze(-1)
        has_img = (count > 0.5).to(proto.dtype)
        base = has_img * proto + (1.0 - has_img) * tw
        return proto, tw, base, count, has_img

    def forward(self, support, support_mask, text, text_mask, text_weight=None, memory_exclude=None):
        proto, tw, base, count, has_img = self.base_weights(support, support_mask, text, text_mask, text_weight, memory_exclude)
        tmask = text_mask.unsqueeze(-1)
        # pairwise class similarities without the diagonal
        sim = torch.matmul(base, base.transpose(-1, -2))  # [..., N, N]
        idx = torch.arange(sim.shape[-1], device=base.device)
        eye = (idx.unsqueeze(0) == idx.unsqueeze(1)).to(base.dtype)
        n_cls = torch.ones_like(sim).sum(-1)  # [..., N], = N (traced, so symbolic in ONNX)
        denom = torch.clamp(n_cls - 1.0, min=1.0)
        mean_other = ((sim * (1.0 - eye)).sum(-1) / denom).unsqueeze(-1)
        max_other = (sim - 3.0 * eye).max(-1, keepdim=True)[0]
        max_other = torch.clamp(max_other, min=-1.0)
        agree = (proto * tw).sum(-1, keepdim=True) * has_img * tmask
        # support consistency: mean cosine of each shot to its prototype (1 for K = 1)
        cons = ((support * proto.unsqueeze(-2)).sum(-1) * support_mask).sum(-1, keepdim=True) / torch.clamp(count, min=1.0)
        feats = torch.cat(
            [
                torch.log1p(count) / math.log1p(self.max_shots),
                has_img,
                tmask,
                agree,
                mean_other,
                max_other,
                cons * has_img,
                torch.log(n_cls.unsqueeze(-1)) / math.log(16.0),
            ]
            + ([(base * self.domain_w).sum(-1, keepdim=True) + self.domain_b] if self.domain else []),
            dim=-1,
        )
        h = self.inp(feats)
        for b in self.blocks:
            h = b(h)
        h = self.ln(h)
        ab = self.coef(h)
        alpha = ab[..., 0:1] * tmask * has_img * float(self.text_with_images)
        beta = ab[..., 1:2] * float(self.image_delta)
        centre = base.mean(-2, keepdim=True)
        weight = base + alpha * tw + beta * centre
        bias = self.bias_head(h).squeeze(-1) * float(self.image_delta)
        scale = torch.exp(self.log_scale + self.scale_head(h.mean(-2)) * float(self.image_delta))  # [..., 1]
        return weight, bias, scale


def logits(emb, weight, bias, scale):
    """emb [..., Q, D] (L2-normalised), weight [..., N, D] -> [..., Q, N] cosine logits."""
    w = l2n(weight)
    return scale.unsqueeze(-1) * torch.matmul(emb, w.transpose(-1, -2)) + bias.unsqueeze(-2)


class ExportWrapper(nn.Module):
    """Unbatched interface of the contract: support [N,K,D], support_mask [N,K], text [N,T], text_mask [N]."""

    def __init__(self, g: Synthesizer):
        super().__init__()
        self.g = g

    def forward(self, support, support_mask, text, text_mask):
        return self.g(support, support_mask, text, text_mask)
