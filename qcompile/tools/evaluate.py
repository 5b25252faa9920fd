"""Perplexity on fixed windows with its spread, and the float vs quantized comparison behind
``qcompile eval``.

Convention: a window is `seqlen` tokens; its NLL is the mean next-token negative log-likelihood of
its last seqlen − 1 tokens; perplexity is exp(mean NLL over windows) (all windows have the same
length, so this is the per-token mean). The spread is the standard error over windows (delta
method for the perplexity). A quantized model is compared to float on the same windows, pairwise:
ratio = exp(mean(NLL_q − NLL_f)) ± its standard error, which is much tighter than the two
perplexities' own spreads. By default the windows are the development set's "report" split
(`qcompile.tools.devset`, 26.6k tokens of three kinds of English documentation); a text of your own is
cut into non-overlapping windows (the remainder dropped).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


def token_ids(tokenizer, text: str | list[str]) -> torch.Tensor:
    """[1, T] token ids of `text`; a list of texts is joined with blank lines (as wikitext is)."""
    if not isinstance(text, str):
        text = "\n\n".join(text)
    return tokenizer(text, return_tensors="pt").input_ids


def cut_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n, seqlen] non-overlapping windows of token ids [1, T] (first `max_tokens`, remainder dropped)."""
    if seqlen < 2:
        raise ValueError(f"seqlen={seqlen}: a window needs at least 2 tokens (one to predict from, one to predict)")
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}: "
                         "give a longer text or a smaller seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, *, progress: bool = True, desc: str = "perplexity") -> torch.Tensor:
    """Mean next-token NLL of each window [n, seqlen] under `model` (float64 [n]).

    `model` is any callable returning an object with ``.logits`` (a Hugging Face causal LM: float,
    quantized, or compiled with backend=qcompile). Ctrl-C stops it (KeyboardInterrupt)."""
    device = next((p.device for p in getattr(model, "parameters", lambda: [])()), torch.device("cpu"))
    out = []
    for row in tqdm(windows, desc=desc, disable=not progress, leave=False, unit="window"):
        w = row[None].to(device)
        logits = model(w).logits.float()
        out.append(torch.nn.functional.cross_entropy(logits[0, :-1], w[0, 1:]).double().item())
    return torch.tensor(out, dtype=torch.float64)


@dataclass(frozen=True)
class Perplexity:
    """Per-window NLLs and what is reported from them."""

    nll: torch.Tensor  # float64 [n]

    @property
    def ppl(self) -> float:
        return math.exp(self.nll.mean().item())

    @property
    def se(self) -> float:
        """Standard error of the perplexity over windows (delta method; 0 for one window)."""
        n = self.nll.numel()
        return self.ppl * self.nll.std().item() / math.sqrt(n) if n > 1 else 0.0

    def ratio_to(self, base: "Perplexity") -> tuple[float, float]:
        """(ppl / base.ppl, its standard error), paired over the same windows."""
        if self.nll.shape != base.nll.shape:
            raise ValueError(f"ratio of perplexities over different windows ({self.nll.numel()} vs {base.nll.numel()})")
        d = self.nll - base.nll
        r = math.exp(d.mean().item())
        return r, (r * d.std().item() / math.sqrt(d.numel()) if d.numel() > 1 else 0.0)


def paired_ratio_text(nll: list[float], base_nll: list[float]) -> str:
    """"r.rrrx ± s.sss": perplexity of `nll` over `base_nll`'s, paired over the same windows (tables)."""
    r, se = Perplexity(torch.tensor(nll, dtype=torch.float64)).ratio_to(
        Perplexity(torch.tensor(base_nll, dtype=torch.float64)))
    return f"{r:.3f}x ± {se:.3f}"


def perplexity(model, tokenizer=None, text: str | list[str] | None = None, *, ids: torch.Tensor | None = None,
               seqlen: int = 512, max_tokens: int | None = None, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean NLL) of `model` over windows: `ids` [n, seqlen] (n > 1: used as they are, e.g.
    `qcompile.tools.devset.windows(tok)`), or non-overlapping `seqlen` windows of token `ids` [1, T] or of
    `text` (a list of texts is joined with blank lines) — the first `max_tokens`, remainder dropped.
    See `window_nll` for the spread."""
    if ids is None:
        if tokenizer is None or text is None:
            raise ValueError("perplexity needs either ids= or both a tokenizer and a text")
        ids = token_ids(tokenizer, text)
    windows = ids if ids.dim() == 2 and ids.shape[0] > 1 else cut_windows(ids, seqlen, max_tokens)
    return Perplexity(window_nll(model, windows, progress=progress, desc=desc)).ppl


def resolve_quantization(spec: str):
    """`--config` of ``qcompile eval``: ("config", QuantConfig or None) or ("checkpoint", Path).

    "default": the default recipe; "minmax": RTN with a plain min/max grid; any method name of
    `qcompile.config.CONFIGS` ("rtn", ...) with its defaults; an existing directory: a checkpoint
    (qcompile's or Hugging Face GPTQ) for the same architecture.
    """
    from ..config import CONFIGS, RTNConfig

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


def model_bytes(model) -> dict:
    """Bytes of all tensors (shared ones once) and of the linear layers' weights."""
    from ..modules import QuantLinear

    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    linear = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            linear += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantLinear):
            linear += sum(getattr(m, n).numel() * getattr(m, n).element_size() for n in m._tensor_names)
    return {"total": total, "linear": linear}


@torch.no_grad()
def compare(model_name: str, quantization: str = "default", *, text: str | None = None, seqlen: int = 512,
            max_tokens: int | None = None, compile: bool = False, progress: bool = True,
            results: dict | None = None) -> dict:
    """Perplexity and weight bytes of `model_name` in float and quantized (`resolve_quantization`),
    on the same windows: the development set's report split (`qcompile.tools.devset`), or `text` (the
    first `max_tokens`). `compile` runs the quantized model through torch.compile(backend=qcompile).
    Rows land in `results` as they finish, so a caller interrupted by Ctrl-C keeps the rows done.
    Returns {"float": row, "quantized": row, "ratio": (r, se), "tokens", "windows", "text", ...},
    row = {ppl, se, nll, seconds, total, linear}.
    """
    import qcompile

    from . import devset
    from .models import load_model

    results = {} if results is None else results
    kind, what = resolve_quantization(quantization)
    model, tok = load_model(model_name)
    if text is None:
        dev = devset.windows(tok, "report", seqlen)
        windows, results["text"], results["kinds"] = dev.ids, "development set (report split)", dev.kinds
    else:
        windows, results["text"] = cut_windows(token_ids(tok, text), seqlen, max_tokens), "--text"
    results["tokens"], results["windows"] = windows.numel(), windows.shape[0]
    results["quantization"] = str(what) if kind == "checkpoint" else (what.to_dict() if what else "default recipe")

    def measure(m, desc):
        t0 = time.perf_counter()
        p = Perplexity(window_nll(m, windows, progress=progress, desc=desc))
        return p, dict(ppl=p.ppl, se=p.se, nll=p.nll.tolist(), seconds=time.perf_counter() - t0)

    f, results["float"] = measure(model, "float")
    results["float"].update(dtype=str(next(model.parameters()).dtype), **model_bytes(model))

    if kind == "checkpoint":
        model = load_model(model_name)[0]  # a fresh copy of the architecture for the checkpoint's weights
        qcompile.load(model, what)
    else:
        qcompile.quantize(model, what, progress=progress)
    qbytes = model_bytes(model)
    # the model is quantized already: compile its quantized ops, leave its float layers as they are
    run = torch.compile(model, backend=qcompile.backend(quantize_linears=False)) if compile else model
    q, results["quantized"] = measure(run, "quantized")
    results["quantized"].update(compiled=compile, **qbytes)
    results["ratio"] = q.ratio_to(f)
    return results


def format_comparison(results: dict, model_name: str, seqlen: int) -> str:
    """The side-by-side table ``qcompile eval`` prints (rows not measured yet show as '-').
    Perplexities carry their standard error over windows; the ratio is paired (same windows)."""
    f, q = results.get("float"), results.get("quantized")
    mib = 2**20

    def cell(row, key, scale=1.0, fmt=".2f"):
        return f"{row[key] / scale:>16{fmt}}" if row else f"{'-':>16}"

    def ppl(row):
        return f"{row['ppl']:>9.2f} ± {row['se']:<4.2f}" if row else f"{'-':>16}"

    def ratio(key):
        return f"{q[key] / f[key]:>15.3f}x" if f and q else f"{'-':>16}"

    r = results.get("ratio")
    head = f"quantized ({'torch.compile, backend=qcompile' if q and q.get('compiled') else 'eager'})"
    lines = [
        "",
        f"{model_name}: {results.get('text', '')}, {results.get('tokens', 0)} tokens in "
        f"{results.get('windows', 0)} windows of {seqlen}; quantization: {results.get('quantization')}",
        f"{'':28}{'float':>16}{'quantized':>16}{'ratio':>16}",
        f"{'perplexity':28}{ppl(f)}{ppl(q)}" + (f"{r[0]:>9.3f} ± {r[1]:.3f}" if r else f"{'-':>16}"),
    ]
    if f and q and results.get("kinds"):
        kinds = results["kinds"]
        for k in dict.fromkeys(kinds):
            idx = [i for i, x in enumerate(kinds) if x == k]
            pf = Perplexity(torch.tensor([f["nll"][i] for i in idx], dtype=torch.float64))
            pq = Perplexity(torch.tensor([q["nll"][i] for i in idx], dtype=torch.float64))
            rk = pq.ratio_to(pf)
            lines.append(f"{'  ' + k + f' ({len(idx)} windows)':28}{pf.ppl:>9.2f} ± {pf.se:<4.2f}"
                         f"{pq.ppl:>9.2f} ± {pq.se:<4.2f}{rk[0]:>9.3f} ± {rk[1]:.3f}")
    lines += [
        f"{'weight bytes, all (MiB)':28}{cell(f, 'total', mib, '.1f')}{cell(q, 'total', mib, '.1f')}{ratio('total')}",
        f"{'weight bytes, linears (MiB)':28}{cell(f, 'linear', mib, '.1f')}{cell(q, 'linear', mib, '.1f')}{ratio('linear')}",
        f"{'seconds':28}{cell(f, 'seconds', 1, '.1f')}{cell(q, 'seconds', 1, '.1f')}",
        f"(± standard error over windows; the ratio is paired over the same windows. float: "
        f"{f['dtype'] if f else '-'}; {head})",
    ]
    return "\n".join(lines)


DATA = Path(__file__).parents[1] / "data"


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
