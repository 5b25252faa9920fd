"""Perplexity with the standard convention, and the held-out text it is measured on.

Convention: tokenize the whole text, cut it into non-overlapping windows of `seqlen` tokens
(dropping the remainder), and report exp(mean next-token NLL over all windows).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

HELD_OUT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def held_out_text() -> str:
    """Held-out English text: the GPL-3 licence that every Debian machine carries."""
    if not HELD_OUT_TEXT.exists():
        raise FileNotFoundError(
            f"{HELD_OUT_TEXT} is missing (it ships with Debian's base-files); "
            "pass your own text to qcompile.evaluate.perplexity(...)"
        )
    return HELD_OUT_TEXT.read_text()


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | None = None, *, ids: torch.Tensor | None = None,
               seqlen: int = 512, max_tokens: int | None = 1024, progress: bool = True) -> float:
    """exp(mean NLL) of `model` over non-overlapping `seqlen` windows of `text` (or token `ids`).

    `model` is any callable returning an object with ``.logits`` (a Hugging Face causal LM, compiled
    or not). `max_tokens` caps the text (the first 1024 tokens by default; None for all of it).
    """
    if ids is None:
        if tokenizer is None or text is None:
            raise ValueError("perplexity needs either ids= or both a tokenizer and a text")
        ids = tokenizer(text, return_tensors="pt").input_ids
    ids = ids.reshape(1, -1)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    n_windows = ids.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}")
    device = next((p.device for p in getattr(model, "parameters", lambda: [])()), torch.device("cpu"))
    nll, count = 0.0, 0
    for i in tqdm(range(n_windows), desc="perplexity", disable=not progress, leave=False):
        window = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
        logits = model(window).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1], window[0, 1:], reduction="sum"
        )
        nll += loss.item()
        count += seqlen - 1
    return math.exp(nll / count)


DATA = Path(__file__).parent / "data"


def sentences(which: str = "heldout") -> list[str]:
    """Varied English sentences shipped with qcompile: "heldout" (50, for evaluation) or "calibration" (50)."""
    if which not in ("heldout", "calibration"):
        raise ValueError(f"sentences({which!r}): use 'heldout' or 'calibration'")
    return (DATA / f"sentences_{which}.txt").read_text().splitlines()


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean of the last hidden states over each text's real tokens (sentence-transformers' mean pooling)."""
    out = []
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        weight = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * weight).sum(1) / weight.sum(1))
    return torch.cat(out)
