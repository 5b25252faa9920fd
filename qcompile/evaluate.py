"""Perplexity with the standard convention, the held-out text it is measured on, and the float vs
quantized comparison behind ``qcompile eval``.

Convention: tokenize the whole text (several texts are joined with blank lines), cut it into
non-overlapping windows of `seqlen` tokens (dropping the remainder), and report
exp(mean next-token NLL over all windows). The unquantized baseline is always measured by the same
code on the same tokens.
"""
from __future__ import annotations

import math
import time
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


def token_ids(tokenizer, text: str | list[str]) -> torch.Tensor:
    """[1, T] token ids of `text`; a list of texts is joined with blank lines (as wikitext is)."""
    if not isinstance(text, str):
        text = "\n\n".join(text)
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | list[str] | None = None, *, ids: torch.Tensor | None = None,
               seqlen: int = 512, max_tokens: int | None = 1024, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean NLL) of `model` over non-overlapping `seqlen` windows of `text` (or token `ids`).

    `model` is any callable returning an object with ``.logits`` (a Hugging Face causal LM: float,
    quantized, or compiled with backend=qcompile). `text` may be a list of texts. `max_tokens` caps
    the tokens (the first 1024 by default; None for all of them). Ctrl-C stops it (KeyboardInterrupt).
    """
    if ids is None:
        if tokenizer is None or text is None:
            raise ValueError("perplexity needs either ids= or both a tokenizer and a text")
        ids = token_ids(tokenizer, text)
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    ids = ids.reshape(1, -1)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    n_windows = ids.shape[1] // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {ids.shape[1]} tokens, fewer than one window of seqlen={seqlen}: "
                         "give a longer text or a smaller seqlen")
    device = next((p.device for p in getattr(model, "parameters", lambda: [])()), torch.device("cpu"))
    nll, count = 0.0, 0
    for i in tqdm(range(n_windows), desc=desc, disable=not progress, leave=False, unit="window"):
        window = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
        logits = model(window).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[0, :-1], window[0, 1:], reduction="sum"
        )
        nll += loss.item()
        count += seqlen - 1
    return math.exp(nll / count)


def resolve_quantization(spec: str):
    """`--config` of ``qcompile eval``: ("config", QuantConfig or None) or ("checkpoint", Path).

    "default": the default recipe; "minmax": RTN with a plain min/max grid; any method name of
    `qcompile.config.CONFIGS` ("rtn", ...) with its defaults; an existing directory: a checkpoint
    (qcompile's or Hugging Face GPTQ) for the same architecture.
    """
    from .config import CONFIGS, RTNConfig

    if Path(spec).is_dir():
        return "checkpoint", Path(spec)
    if spec == "default":
        return "config", None
    if spec == "minmax":
        return "config", RTNConfig(search="minmax")
    if spec in CONFIGS:
        return "config", CONFIGS[spec]()
    raise ValueError(f"--config {spec!r} is neither a method ({', '.join(['default', 'minmax', *CONFIGS])}) "
                     "nor a checkpoint directory")


@torch.no_grad()
def compare(model_name: str, quantization: str = "default", *, text: str | None = None, seqlen: int = 512,
            max_tokens: int | None = 1024, compile: bool = False, progress: bool = True,
            results: dict | None = None) -> dict:
    """Perplexity and weight bytes of `model_name` in float and quantized (`resolve_quantization`),
    on the same tokens of `text` (default: the held-out GPL-3). `compile` runs the quantized model
    through torch.compile(backend=qcompile). Rows land in `results` as they finish, so a caller
    interrupted by Ctrl-C keeps the rows done. Returns
    {"float": row, "quantized": row, "tokens": n, "windows": w}, row = {ppl, seconds, total, linear}.
    """
    import qcompile

    from .demo import model_bytes
    from .models import load_model

    results = {} if results is None else results
    kind, what = resolve_quantization(quantization)
    model, tok = load_model(model_name)
    ids = token_ids(tok, held_out_text() if text is None else text)
    if max_tokens is not None:
        ids = ids[:, :max_tokens]
    results["tokens"] = ids.shape[1] // seqlen * seqlen
    results["windows"] = ids.shape[1] // seqlen
    results["quantization"] = str(what) if kind == "checkpoint" else (what.to_dict() if what else "default recipe")

    t0 = time.perf_counter()
    ppl = perplexity(model, ids=ids, seqlen=seqlen, max_tokens=None, progress=progress, desc="float")
    results["float"] = dict(ppl=ppl, seconds=time.perf_counter() - t0, dtype=str(next(model.parameters()).dtype),
                            **model_bytes(model))

    if kind == "checkpoint":
        model = load_model(model_name)[0]  # a fresh copy of the architecture for the checkpoint's weights
        qcompile.load(model, what)
        config = None
    else:
        config = what
        qcompile.quantize(model, config, progress=progress)
    qbytes = model_bytes(model)
    # the model is quantized already: compile its quantized ops, leave its float layers as they are
    run = torch.compile(model, backend=qcompile.backend(quantize_linears=False)) if compile else model
    t0 = time.perf_counter()
    ppl = perplexity(run, ids=ids, seqlen=seqlen, max_tokens=None, progress=progress, desc="quantized")
    results["quantized"] = dict(ppl=ppl, seconds=time.perf_counter() - t0, compiled=compile, **qbytes)
    return results


def format_comparison(results: dict, model_name: str, seqlen: int) -> str:
    """The side-by-side table ``qcompile eval`` prints (rows not measured yet show as '-')."""
    f, q = results.get("float"), results.get("quantized")
    mib = 2**20

    def cell(row, key, scale=1.0, fmt=".2f"):
        return f"{row[key] / scale:>14{fmt}}" if row else f"{'-':>14}"

    def ratio(key):
        return f"{q[key] / f[key]:>9.3f}x" if f and q else f"{'-':>10}"

    head = f"quantized ({'torch.compile, backend=qcompile' if q and q.get('compiled') else 'eager'})"
    lines = [
        "",
        f"{model_name}: {results.get('tokens', 0)} tokens in {results.get('windows', 0)} windows of {seqlen}; "
        f"quantization: {results.get('quantization')}",
        f"{'':28}{'float':>14}{'quantized':>14}{'ratio':>10}",
        f"{'perplexity':28}{cell(f, 'ppl')}{cell(q, 'ppl')}{ratio('ppl')}",
        f"{'weight bytes, all (MiB)':28}{cell(f, 'total', mib, '.1f')}{cell(q, 'total', mib, '.1f')}{ratio('total')}",
        f"{'weight bytes, linears (MiB)':28}{cell(f, 'linear', mib, '.1f')}{cell(q, 'linear', mib, '.1f')}{ratio('linear')}",
        f"{'seconds':28}{cell(f, 'seconds', 1, '.1f')}{cell(q, 'seconds', 1, '.1f')}",
        f"(float: {f['dtype'] if f else '-'}; {head})",
    ]
    return "\n".join(lines)


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
