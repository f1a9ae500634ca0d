"""Word features of a description: TF-IDF over a vocabulary learned from the base descriptions.

The runtime computes the same vector (src/encoders/words.rs); the definition is kept small so both
sides agree exactly:

- tokens: the text lower-cased, split into maximal runs of alphanumeric characters (Unicode; a
  hyphen, slash or apostrophe splits), runs shorter than 2 characters dropped;
- vocabulary: tokens found in at least `min_df` of the fitting descriptions, sorted;
- idf(w) = ln((1 + n) / (1 + df(w))) + 1 over the n fitting descriptions (scikit-learn's smooth idf);
- vector: (1 + ln count) * idf for each vocabulary word present, then L2-normalised (all zero when
  no word of the text is in the vocabulary).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np


def tokens(text: str) -> list[str]:
    out, cur = [], []
    for ch in text.lower():
        if ch.isalnum():
            cur.append(ch)
        else:
            if len(cur) >= 2:
                out.append("".join(cur))
            cur = []
    if len(cur) >= 2:
        out.append("".join(cur))
    return out


class Words:
    def __init__(self, vocab: list[str], idf: np.ndarray):
        self.vocab = list(vocab)
        self.idf = np.asarray(idf, np.float64)
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def fit(cls, docs: list[str], min_df: int = 2) -> "Words":
        df = Counter()
        for d in docs:
            df.update(set(tokens(d)))
        vocab = sorted(w for w, n in df.items() if n >= min_df)
        n = len(docs)
        idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in vocab])
        return cls(vocab, idf)

    @property
    def dim(self) -> int:
        return len(self.vocab)

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(self.dim, np.float64)
        for w, c in Counter(tokens(text)).items():
            i = self.index.get(w)
            if i is not None:
                v[i] = (1.0 + math.log(c)) * self.idf[i]
        n = np.linalg.norm(v)
        return (v / n if n > 0 else v).astype(np.float32)

    def matrix(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.vector(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    def to_json(self) -> dict:
        return {"format": 1, "tokens": "lower-case runs of alphanumeric characters, 2 or more long",
                "weight": "(1 + ln count) * idf, L2-normalised", "vocabulary": self.vocab,
                "idf": [round(float(x), 7) for x in self.idf]}

    @classmethod
    def from_json(cls, d: dict) -> "Words":
        return cls(d["vocabulary"], np.asarray(d["idf"], np.float64))
