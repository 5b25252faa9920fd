"""The development evaluation set: fixed windows of English documentation, split three ways.

`qcompile/data/dev/` holds excerpts of 21 documents (licence texts, the Python 3.11 documentation,
Debian project documents; `manifest.json` gives each one's source and licence, and
`benchmarks/build_devset.py` how they were cut). Each document belongs to one split:

- ``"report"`` (9 documents, 3 kinds, 52 windows of 512 SmolLM2 tokens = 26.6k tokens): what
  `qcompile eval` and every benchmark table report. Nothing is chosen on it.
- ``"tune"`` (6 documents, 28 windows): where defaults and hyperparameters are chosen.
- ``"calib"`` (6 documents, 32 windows): stands in for the calibration text a user passes.

None of them shares text with the calibration text that ships with qcompile
(`qcompile.methods.calibration.default_text`). Windows never cross documents: each document gives its
first ``min(max_windows, tokens // seqlen)`` windows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEV_DIR = Path(__file__).parents[1] / "data" / "dev"
SPLITS = ("report", "tune", "calib")


@dataclass(frozen=True)
class Document:
    name: str
    split: str
    kind: str        # "legal", "python-docs" or "debian-project"
    max_windows: int
    text: str


@dataclass(frozen=True)
class Windows:
    """Token windows [n, seqlen] and, per window, the document it came from."""

    ids: torch.Tensor
    documents: tuple[str, ...]
    kinds: tuple[str, ...]

    def __len__(self) -> int:
        return self.ids.shape[0]


def documents(split: str = "report") -> list[Document]:
    """The documents of one split, in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"dev set split {split!r}: use one of {SPLITS}")
    manifest = json.loads((DEV_DIR / "manifest.json").read_text())
    return [Document(m["name"], m["split"], m["kind"], m["max_windows"], (DEV_DIR / f"{m['name']}.txt").read_text())
            for m in manifest if m["split"] == split]


def windows(tokenizer, split: str = "report", seqlen: int = 512, per_document: int | None = None) -> Windows:
    """Fixed evaluation windows of `split` for `tokenizer`: from each document, its first
    min(max_windows, per_document, tokens // seqlen) windows of `seqlen` tokens (the remainder
    dropped). `per_document=1` gives a quick sample covering every document."""
    rows, names, kinds = [], [], []
    for doc in documents(split):
        ids = tokenizer(doc.text, return_tensors="pt").input_ids[0]
        n = min(doc.max_windows, ids.numel() // seqlen, per_document or doc.max_windows)
        rows += [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]
        names += [doc.name] * n
        kinds += [doc.kind] * n
    if not rows:
        raise ValueError(f"no document of the {split!r} split has {seqlen} tokens: use a smaller seqlen")
    return Windows(torch.stack(rows), tuple(names), tuple(kinds))
