"""Calibration for methods that learn from data (GPTQ, GANQ): the calibration token windows, and
the sequential pass that quantizes a decoder model one block at a time.

Each block is calibrated on the outputs of the blocks before it, already quantized, as in the
GPTQ reference: capture what the first block receives (hidden states and the keyword arguments
the model passes, e.g. the rotary ``position_embeddings`` of transformers 5), then per block:
collect the Hessians of one group of its linears (those reading one input: q/k/v), quantize them,
re-run the block for the next group's inputs (true-sequential), run the quantized block to make
the next block's inputs, and swap in `QuantLinear`s. Peak memory: the calibration activations of
one block (including the recorded inputs of `SubmoduleReplay`) plus the Hessians of one group of
layers. `fit_layers` is the only method-specific step.

Ctrl-C at any point leaves a consistent model: the layers done so far are `QuantLinear`s, the rest
float, and ``model.qcompile_report`` says which is which.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import GANQConfig, GPTQConfig, QUIKConfig, is_output_head
from . import ganq, gptq, plan_linear, quantize_linear, quik
from ..modules import float_report, install, linear_modules, untie
from ..report import GraphReport, LinearReport, Report

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "calibration.txt"


def default_text() -> str:
    """The calibration text that ships with qcompile (English prose; see data/SOURCES.md)."""
    return DEFAULT_TEXT.read_text(encoding="utf-8")


def training_text() -> str:
    """The text DL-QAT trains on by default: the calibration text, then ~100k more tokens of
    documentation (data/qat_text.txt; training needs more text than calibration does)."""
    return default_text() + "\n\n" + (DEFAULT_TEXT.parent / "qat_text.txt").read_text(encoding="utf-8")


# --- calibration ids ----------------------------------------------------------------------------
def windows(ids: Tensor, nsamples: int, seqlen: int) -> list[Tensor]:
    """`nsamples` windows of `seqlen` tokens spread evenly over `ids` (disjoint when the text is
    long enough, overlapping when it is not)."""
    total = ids.numel()
    if total < seqlen:
        raise ValueError(f"calibration text has {total} tokens, fewer than one window of seqlen={seqlen}: "
                         "give more text or a smaller GPTQConfig(seqlen=...)")
    starts = torch.linspace(0, total - seqlen, nsamples).round().long().tolist()
    return [ids[s : s + seqlen] for s in starts]


def _tokenize(text: str, tokenizer) -> Tensor:
    out = tokenizer(text, return_tensors="pt")
    ids = out["input_ids"] if isinstance(out, Mapping) else out.input_ids
    return torch.as_tensor(ids).reshape(-1).long()


def model_tokenizer(model: nn.Module):
    """The tokenizer saved beside a Hugging Face model loaded from a local folder (as
    `qcompile.tools.models.load_model` loads them)."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"no tokenizer loads from the model's folder {path}: pass tokenizer=") from e
    raise ValueError("calibration texts need a tokenizer: pass tokenizer= (qcompile.tools.models.load_model "
                     "returns it beside the model), or give calibration= as token ids")


def _check_ids(t: Tensor) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be an integer tensor, got {t.dtype}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"calibration token ids must be [seqlen] or [n, seqlen], got {tuple(t.shape)}")
    return t.long()


def heldout_positions(count: int) -> list[int]:
    """Which of `count` calibration windows (or chunks) are held out for the check against round to
    nearest: every 9th, starting at the 5th (spread over the text); none under 9."""
    return list(range(4, count, 9)) if count >= 9 else []


def fit_and_heldout_windows(ids: Tensor, nsamples: int, heldout: int, seqlen: int,
                            cap: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """(fit windows, held-out windows) of `seqlen` tokens from one token stream. A held-out window
    never shares a token with a fit window (the check against round to nearest would favour GPTQ
    otherwise). A text with room for all of them gets `nsamples + heldout` disjoint windows spread
    evenly, every 9th held out; a shorter one is cut into disjoint chunks, every 9th chunk held out
    (none under 9 chunks) and the fit windows taken from the rest. `cap` (automatic nsamples) keeps
    the fit windows disjoint too, taking fewer of them rather than repeating tokens."""
    total = ids.numel()
    if total >= (nsamples + heldout) * seqlen or not heldout:
        rows = windows(ids, min(nsamples + heldout, max(total // seqlen, 1)) if cap else nsamples + heldout, seqlen)
        held = set(heldout_positions(len(rows))) if heldout else set()
        return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
    chunks = total // seqlen
    held = heldout_positions(chunks)[:heldout]
    rest, start = [], 0
    for c in held:  # the tokens between held-out chunks, joined (a fit window may span a gap)
        rest.append(ids[start : c * seqlen])
        start = (c + 1) * seqlen
    rest = torch.cat(rest + [ids[start:]])
    n = min(nsamples, rest.numel() // seqlen) if cap else nsamples
    return windows(rest, n, seqlen), [ids[c * seqlen : (c + 1) * seqlen] for c in held]


def calibration_ids(calibration, *, model: nn.Module, tokenizer=None, nsamples: int = 64, seqlen: int = 512,
                    heldout: int = 0, cap: bool = False) -> tuple[list[Tensor], list[Tensor], str]:
    """(fit id tensors, held-out id tensors, a description) from what
    `qcompile.quantize(calibration=...)` accepts: None (the text that ships with qcompile), a text
    or list of texts (joined, tokenized, cut into `nsamples` fit and `heldout` held-out windows of
    `seqlen`, see `fit_and_heldout_windows`), a LongTensor [n, seqlen], or a list of id tensors
    (used as given, nothing held out)."""
    source = "texts"
    if calibration is None:
        calibration, source = [default_text()], "qcompile's default text"
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, Tensor):
        rows = list(_check_ids(calibration))
        return rows, [], f"{len(rows)} windows given as token ids"
    if isinstance(calibration, (list, tuple)) and calibration:
        if all(isinstance(c, str) for c in calibration):
            ids = _tokenize("\n\n".join(calibration), tokenizer or model_tokenizer(model))
            rows, held = fit_and_heldout_windows(ids, nsamples, heldout, seqlen, cap)
            what = f"{len(rows)} x {seqlen} tokens from {source} ({ids.numel()} tokens"
            what += f"; {nsamples} asked, fewer to keep the windows disjoint)" if len(rows) < nsamples else ")"
            if held:
                what += f", {len(held)} more x {seqlen} held out to check against round to nearest"
            elif heldout:
                what += ", too short to hold windows out for the check against round to nearest"
            return rows, held, what
        if all(isinstance(c, Tensor) for c in calibration):
            rows = [r for c in calibration for r in _check_ids(c)]
            return rows, [], f"{len(rows)} windows given as token ids"
    if isinstance(calibration, (list, tuple)) and not calibration:
        raise ValueError("calibration is empty: give texts or token ids, or None for the default text")
    raise TypeError("calibration must be None, a text, a list of texts, a LongTensor [n, seqlen] or a "
                    f"list of token-id tensors; got {type(calibration).__name__}")


def _batches(rows: list[Tensor], batch_size: int) -> list[Tensor]:
    """Consecutive rows of equal length stacked, at most `batch_size` a batch."""
    out, cur = [], []
    for r in rows:
        if cur and (len(cur) == batch_size or r.shape[0] != cur[0].shape[0]):
            out.append(torch.stack(cur))
            cur = []
        cur.append(r)
    if cur:
        out.append(torch.stack(cur))
    return out


# --- decoder blocks ------------------------------------------------------------------------------
def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, blocks): the largest nn.ModuleList of identical layers that hold linears, i.e. the
    decoder blocks of a Hugging Face decoder (``model.layers``, ``transformer.h``, ...)."""
    best = None
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1 and linear_modules(mod[0]):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[2]:
                best = (path, mod, size)
    if best is None:
        raise ValueError(
            f"calibration runs a model's decoder blocks one at a time, but {type(model).__name__} has no "
            "nn.ModuleList of identical layers holding linears (like model.layers of Llama/Qwen or "
            "transformer.h of GPT-2); quantize it with a data-free config (qcompile.RTNConfig) instead"
        )
    return best[0], best[1]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


@dataclass
class BlockInput:
    """What one calibration batch feeds a decoder block: hidden states and the other arguments."""

    hidden: Tensor
    args: tuple
    kwargs: dict


def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[Tensor]) -> list[BlockInput]:
    """Run the model on each batch up to its first decoder block and keep what the block receives."""
    device = next(model.parameters()).device
    captured: list[BlockInput] = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.append(BlockInput(hidden, tuple(rest), kwargs))
        raise _Stop

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                continue
            raise RuntimeError(f"{type(model).__name__}'s forward never called its first decoder block")
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inp: BlockInput) -> Tensor:
    out = block(inp.hidden, *inp.args, **inp.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _hook_inputs(mods: dict[str, nn.Module], fn) -> list:
    return [m.register_forward_pre_hook(lambda m, args, name=name: fn(name, args[0])) for name, m in mods.items()]


def sequential_groups(block: nn.Module, mods: dict[str, nn.Module], inp: BlockInput) -> list[list[str]]:
    """The block's linears grouped by the input tensor they read, in the order the forward reaches
    them: [[q, k, v], [o], [gate, up], [down]] for a Llama block. Layers never called are left out."""
    seen: list[tuple[Tensor, list[str]]] = []

    def record(name, x):
        for t, group in seen:
            if t is x:
                if name not in group:
                    group.append(name)
                return
        if not any(name in g for _, g in seen):
            seen.append((x, [name]))

    hooks = _hook_inputs(mods, record)
    try:
        run_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    return [g for _, g in seen]


def layer_inputs(block: nn.Module, mods: dict[str, nn.Module], inp: BlockInput) -> dict[str, Tensor]:
    """The tensor each of `mods` reads on one calibration batch, in forward order; the forward
    stops as soon as every layer has been reached."""
    seen: dict[str, Tensor] = {}

    def add(name, x):
        seen.setdefault(name, x)
        if len(seen) == len(mods):
            raise _Stop

    hooks = _hook_inputs(mods, add)
    try:
        run_block(block, inp)
    except _Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return seen


def _owners(xs: dict[str, Tensor]) -> dict[str, str]:
    """{layer: the first layer reading the same tensor} (q/k/v share one input, so one Hessian)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(x), n) for n, x in xs.items()}


def collect_hessians(block: nn.Module, mods: dict[str, nn.Module], inputs) -> dict[str, gptq.Hessian]:
    """Hessians of `mods`' inputs over every calibration batch. Layers that read the same tensor
    share one Hessian object."""
    hessians: dict[str, gptq.Hessian] = {}
    for inp in inputs:
        xs = layer_inputs(block, mods, inp)
        for n, owner in _owners(xs).items():
            if owner != n:
                hessians.setdefault(n, hessians[owner])
            else:
                hessians.setdefault(n, gptq.Hessian(xs[n].shape[-1], xs[n].device)).add(xs[n])
    return hessians


def replayable_children(block: nn.Module, lins: dict[str, tuple[nn.Module, Tensor]],
                        inp: BlockInput) -> dict[str, tuple[str, int | None]]:
    """{child: (its tail linear, tuple length or None)} for the block's direct children whose output is exactly the output
    of one of their own linears (``self_attn`` -> ``o_proj``, ``mlp`` -> ``down_proj`` in Llama),
    alone or first in a tuple of Nones. Found by running the block once and comparing tensors by
    identity, so an architecture that does anything after its last linear is left out."""
    outputs: dict[str, object] = {}
    hooks = [m.register_forward_hook(lambda m, a, out, name=name: outputs.setdefault(name, out))
             for name, m in [*block.named_children(), *((n, mod) for n, (mod, _) in lins.items())]]
    try:
        run_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    tails = {}
    for child, _ in block.named_children():
        out = outputs.get(child)
        first = out[0] if isinstance(out, tuple) and all(o is None for o in out[1:]) else out
        for n in lins:
            if n.startswith(child + ".") and outputs.get(n) is first and isinstance(first, Tensor):
                tails[child] = (n, len(out) if isinstance(out, tuple) else None)
    return tails


class SubmoduleReplay:
    """Skips recomputing a block's sub-modules (attention, MLP) once only their tail linear can
    still change.

    When every linear of a child except its tail (``o_proj`` of ``self_attn``) is quantized, and
    (groups go in forward order) every linear before it too, the tail's input no longer changes:
    it is recorded per calibration batch in the pass that collects the tail's Hessian, and later
    passes of the block compute the child's output as tail(recorded input). A Llama block then
    runs its attention twice per block instead of four times, and gate/up once less."""

    def __init__(self, block: nn.Module, lins: dict[str, tuple[nn.Module, Tensor]],
                 tails: dict[str, tuple[str, int | None]]):
        self.block, self.lins, self.tails = block, lins, tails
        self.inputs: dict[str, list[Tensor]] = {}   # tail -> its input per batch
        self.hooks: list = []
        self.replaying: list[str] = []
        self.batch, self.batches = 0, None

    def update(self, done: set[str]) -> None:
        """Record the tails whose child is otherwise done; replay the children whose tail input is
        recorded for every batch."""
        for child, (tail, arity) in self.tails.items():
            others = [n for n in self.lins if n.startswith(child + ".") and n != tail]
            if tail in self.inputs:
                if child not in self.replaying and self.inputs[tail] and len(self.inputs[tail]) == self.batches:
                    self.replaying.append(child)
                    self.block.get_submodule(child).forward = self._replay(tail, arity)
            elif all(n in done for n in others):
                self.inputs[tail] = []
                self.hooks.append(self.lins[tail][0].register_forward_pre_hook(self._record(tail)))

    def _record(self, tail: str):
        def hook(module, args):
            if self.batch == len(self.inputs[tail]):
                self.inputs[tail].append(args[0])
        return hook

    def _replay(self, tail: str, arity: int | None):
        module = self.lins[tail][0]

        def run(*args, **kwargs):
            out = module(self.inputs[tail][self.batch])
            return out if arity is None else (out, *([None] * (arity - 1)))
        return run

    def passes(self, inputs: list[BlockInput]):
        """(input) for one pass over the calibration batches, keeping track of the batch index."""
        self.batches = len(inputs)
        for i, inp in enumerate(inputs):
            self.batch = i
            yield inp

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for child in self.replaying:
            del self.block.get_submodule(child).forward  # back to the class's forward
        self.hooks, self.replaying, self.inputs = [], [], {}


def collect_float_targets(float_block: nn.Module, block: nn.Module, names: list[str], float_inputs: list[BlockInput],
                          inputs) -> tuple[dict[str, gptq.Hessian], dict[str, Tensor]]:
    """`collect_hessians` for the quantized stream `inputs`, plus {layer: C}, C the running mean of
    2·x_float x_quantᵀ: the input a layer gets in the float model (`float_block` on `float_inputs`)
    against the one it gets in the model being quantized, on the same tokens."""
    hessians: dict[str, gptq.Hessian] = {}
    cross: dict[str, Tensor] = {}
    for inp, finp in zip(inputs, float_inputs):
        xq = layer_inputs(block, {n: block.get_submodule(n) for n in names}, inp)
        xf = layer_inputs(float_block, {n: float_block.get_submodule(n) for n in names}, finp)
        for n, owner in _owners(xq).items():
            if owner != n:
                hessians[n], cross[n] = hessians[owner], cross[owner]
                continue
            h = hessians.setdefault(n, gptq.Hessian(xq[n].shape[-1], xq[n].device))
            q, f = (t.reshape(-1, t.shape[-1]).float() for t in (xq[n], xf[n]))
            c = cross.setdefault(n, torch.zeros_like(h.h))
            c.mul_(h.tokens / (h.tokens + q.shape[0])).addmm_(f.t(), q, alpha=2 / (h.tokens + q.shape[0]))
            h.add(q)
    return hessians, cross


# Ridge of the float-target refit, as a fraction of H's mean diagonal: kept apart from GPTQ's
# damping, since the refit solves a full least-squares problem that overfits the calibration windows
# with the light damping GPTQ's own solve wants (0.01 made tiny models worse than no refit).
REFIT_DAMP = 0.3


def refit_to_float_outputs(w: Tensor, cross: Tensor, h: Tensor, damp_percent: float) -> Tensor:
    """argmin_W* ||W X_float − W* X_quant||² + λ||W* − W||² = W + W (C − H)(H + λI)⁻¹, with λ
    GPTQ's damping (the ridge pulls toward W, so W* = W when the inputs agree). Up to the ridge,
    quantizing W* against H then minimises the error to the float outputs (orthogonality)."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damped = h + damp_percent * h.diagonal().mean() * eye
    wf = w.detach().to(h.dtype)
    return (wf + torch.linalg.solve(damped, (cross - h).t() @ wf.t()).t()).to(w.dtype)


# --- the sequential pass ---------------------------------------------------------------------------
def _gptq_note(inv: gptq.InverseHessian) -> list[str]:
    notes = []
    if inv.damp_raised:
        notes.append(f"damping raised from {inv.damp_requested:g} to {inv.damp_percent:g}: Cholesky failed")
    dead = int(inv.dead.sum())
    if dead:
        notes.append(f"{dead} dead inputs (always zero on the calibration data)")
    return notes


def _sharing(hessians: dict[str, gptq.Hessian], names: list[str]) -> list[list[str]]:
    """`names` grouped by the Hessian object they share (q/k/v read one input), in order."""
    groups: dict[int, list[str]] = {}
    for n in names:
        groups.setdefault(id(hessians[n]), []).append(n)
    return list(groups.values())


def fit_layers(config: GPTQConfig | GANQConfig | QUIKConfig, h: Tensor, weights: list[Tensor], plans: list,
               name: str, absmax: Tensor | None = None) -> list[tuple[Tensor, object, object]]:
    """Quantize layers that share the Hessian `h` of their input: (dequantized weight, format,
    round to nearest's format on the same grid or None) per layer. Adds what was used (damping)
    to the plans' reasons and notes. A GPTQ layer whose calibration output error exceeds round
    to nearest's on the same grid gets round to nearest instead, and its reason says so."""
    if isinstance(config, GANQConfig):  # one batched fit: the rows of all layers together
        result = ganq.ganq_quantize(torch.cat([w.detach() for w in weights]), h, bits=config.bits,
                                    iters=config.iters, damp=config.damp_percent,
                                    table_dtype=config.table_dtype)
        out, row = [], 0
        for w, plan in zip(weights, plans):
            part = result.weight.rows(row, row + w.shape[0])
            row += w.shape[0]
            plan.reason += f", damp {result.damp:g}"
            plan.notes.append(f"table {part.tables.numel() * part.tables.element_size()} bytes "
                              f"({part.tables.shape[1]} entries x {part.tables.shape[0]} rows)")
            out.append((part.dequantize(w.dtype), part, None))
        if result.errors[0] > 0:
            plans[0].notes.append(f"output error {min(result.errors) / result.errors[0]:.2f}x the initial "
                                  f"table's after {config.iters} iterations (shared by {len(weights)} layers)")
        return out
    if isinstance(config, QUIKConfig):
        return _fit_quik(config, h, absmax, weights, plans)
    inv = gptq.invert(h, act_order=config.act_order, damp_percent=config.damp_percent, name=name)
    out = []
    for w, plan in zip(weights, plans):
        group = None if config.group_size is None else plan.group_size
        result = gptq.gptq_quantize(
            w, inv, bits=config.bits, group_size=group, sym=config.sym, static_groups=config.static_groups,
            clip_search=config.clip_search, block_size=config.block_size, scale_dtype=config.scale_dtype)
        rtn = gptq.rtn_quantize(w, bits=config.bits, group_size=group, sym=config.sym,
                                clip_search=config.clip_search, scale_dtype=config.scale_dtype)
        plan.reason += f", damp {inv.damp_percent:g}"
        plan.notes += _gptq_note(inv)
        q, rtn_q = result.dequantize(w.dtype), rtn.dequantize(w.dtype)
        ratio = output_error(w, q, h) / max(output_error(w, rtn_q, h), 1e-30)
        if ratio > 1:  # GPTQ must not be worse than round to nearest on its own calibration inputs
            plan.reason = plan.reason.replace(", gptq", ", round to nearest (GPTQ's calibration error was "
                                              f"{ratio:.2f}x round to nearest's)", 1)
            out.append((rtn_q, gptq.to_format(rtn), None))
        else:
            plan.notes.append(f"calibration output error {ratio:.2f}x round to nearest's")
            out.append((q, gptq.to_format(result), gptq.to_format(rtn)))
    return out


def _fit_quik(config: QUIKConfig, h: Tensor, absmax: Tensor, weights: list[Tensor], plans: list) -> list:
    """QUIK for layers sharing an input: one outlier split for all (`qcompile.methods.quik`)."""
    out, split = [], {}
    for w, plan in zip(weights, plans):
        bits, act_bits = config.layer_bits(plan.path)
        k = config.outlier_count(plan.path, w.shape[1])
        q, rtn, inv = quik.quik_quantize(
            w, h, absmax, outliers=k, bits=bits, act_bits=act_bits, group_size=config.group_size,
            damp_percent=config.damp_percent, clip_search=config.clip_search, block_size=config.block_size,
            scale_dtype=config.scale_dtype, split=split.get(k))
        split[k] = (q.int_idx, q.fp_idx)  # siblings: the same index tensors (one quantized input)
        plan.reason += f", {q.fp_idx.numel()} float outlier columns, damp {inv.damp_percent:g}"
        plan.notes += _gptq_note(inv)
        dq, rtn_dq = q.dequantize(w.dtype), rtn.dequantize(w.dtype)
        ratio = output_error(w, dq, h) / max(output_error(w, rtn_dq, h), 1e-30)
        if ratio > 1:  # never worse than round to nearest on the same split and grid
            plan.reason = plan.reason.replace("quik (gptq", f"quik (round to nearest: GPTQ's calibration error was "
                                              f"{ratio:.2f}x its", 1)
            out.append((rtn_dq, rtn, None))
        else:
            plan.notes.append(f"calibration output error {ratio:.2f}x round to nearest's")
            out.append((dq, q, None))
    return out


def output_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """tr((W − Q) H (W − Q)ᵀ): the layer's squared output error on the inputs H was built from."""
    d = (w - q).float()
    return ((d @ h.float()) * d).sum().item()


@torch.no_grad()
def heldout_nll(model: nn.Module, rows: list[Tensor]) -> float:
    """Mean next-token NLL of a causal LM over held-out calibration windows."""
    from ..tools.evaluate import window_nll

    return torch.cat([window_nll(model, r[None], progress=False) for r in rows]).mean().item()  # rows may differ in length


def split_heldout(rows: list[Tensor], config) -> tuple[list[Tensor], list[Tensor]]:
    """(fit rows, held-out rows): every 9th window (spread over the text) is held out to check
    the result against round to nearest; fewer than 9 windows: none."""
    if not isinstance(config, GPTQConfig):
        return rows, []
    held = set(heldout_positions(len(rows)))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def check_against_rtn(model: nn.Module, fallback: dict, heldout: list[Tensor], entries: dict, report) -> None:
    """Compare the GPTQ model with round to nearest on the same grid over held-out calibration
    windows; if round to nearest is better, keep it instead and warn (never a silently worse model)."""
    import warnings

    from .. import lowering

    gptq_nll = heldout_nll(model, heldout)
    mods = {p: model.get_submodule(p) for p in fallback}
    kept = {p: m.packed_weight() for p, m in mods.items()}
    for p, m in mods.items():
        m._set_packed(lowering.pack(fallback[p], next(m.buffers()).device))
    rtn_nll = heldout_nll(model, heldout)
    note = (f"held-out calibration NLL: GPTQ {gptq_nll:.4f}, round to nearest on the same grid {rtn_nll:.4f} "
            f"({len(heldout)} windows)")
    if rtn_nll < gptq_nll:
        for p in mods:
            e = entries[p]
            e.reason = e.reason.replace(", gptq", ", round to nearest (GPTQ was worse on held-out calibration "
                                        "text)", 1)
        report.notes.append(note + ": GPTQ was worse, round to nearest kept")
        warnings.warn(f"GPTQ gave a worse model than round to nearest on the same grid ({note}); "
                      "the round-to-nearest weights were kept. Try GPTQConfig(float_targets=True), more "
                      "or more varied calibration text, or a larger damp_percent.", stacklevel=3)
    else:
        for p, m in mods.items():
            m._set_packed(kept[p])
        report.notes.append(note)


@torch.no_grad()
def quantize_with_calibration(model: nn.Module, config: GPTQConfig | GANQConfig, calibration=None, *, tokenizer=None,
                              progress: bool = True) -> nn.Module:
    """GPTQ or GANQ over a decoder model, block by block (see the module docstring);
    `qcompile.quantize` calls this for configs that need calibration. Layers outside the decoder blocks follow the
    config's rule (int8 lm_head by default). Ctrl-C leaves done layers quantized, the rest float."""
    if not isinstance(config, (GPTQConfig, GANQConfig, QUIKConfig)):
        raise TypeError("calibration-based quantization needs a GPTQConfig, GANQConfig or QUIKConfig, "
                        f"got {type(config).__name__}")
    if isinstance(config, GPTQConfig):
        gptq.require_format(config.bits)
    blocks_path, blocks = decoder_blocks(model)
    from_text = calibration is None or isinstance(calibration, str) or (
        isinstance(calibration, (list, tuple)) and bool(calibration) and all(isinstance(c, str) for c in calibration))
    extra = (config.samples + 7) // 8  # windows cut from a text beyond nsamples, held out for the RTN check
    extra = extra if isinstance(config, GPTQConfig) and from_text and config.samples + extra >= 9 else 0
    rows, heldout, described = calibration_ids(calibration, model=model, tokenizer=tokenizer, nsamples=config.samples,
                                               seqlen=config.seqlen, heldout=extra, cap=config.nsamples is None)
    if not from_text:
        rows, heldout = split_heldout(rows, config)
        if heldout:
            described += f"; {len(heldout)} of them held out to check against round to nearest"
    batches = _batches(rows, config.batch_size)
    fallback: dict[str, object] = {}  # path -> round to nearest's format, for the held-out check
    device = next(model.parameters()).device
    report = GraphReport(index=0, device=str(device), notes=[f"calibration: {described}"])
    shapes = [(path, w.shape) for path, _, w in linear_modules(model)]
    entries: dict[str, LinearReport] = {}
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    pending: list = []  # (path, module, format, plan) quantized in the current block, not yet swapped

    def flush():
        while pending:
            path, mod, fmt, plan = pending.pop(0)
            entries[path] = install(model, path, mod, fmt, plan, input_emb)

    was_training = model.training
    model.eval()
    finished = False
    replay = None
    try:
        inputs = capture_block_inputs(model, blocks[0], batches)
        float_targets = config.uses_float_targets
        float_inputs = [BlockInput(inp.hidden, inp.args, inp.kwargs) for inp in inputs] if float_targets else []
        order = None
        for i, block in enumerate(tqdm(blocks, desc=config.method, unit="block", disable=not progress)):
            prefix = f"{blocks_path}.{i}." if blocks_path else f"{i}."
            lins = {name: (mod, w) for name, mod, w in linear_modules(block)}
            plans = {name: plan_linear(config, prefix + name, w, w.device) for name, (_, w) in lins.items()}
            for name, plan in plans.items():
                if not plan.quantized:
                    entries[prefix + name] = float_report(plan, lins[name][1])
            if order is None:  # blocks are identical: the grouping of the first serves all
                order = sequential_groups(block, {n: m for n, (m, _) in lins.items()}, inputs[0])
                tails = replayable_children(block, lins, inputs[0])
            groups = order if config.true_sequential else [[n for g in order for n in g]]
            float_block = copy.deepcopy(block) if float_targets else None  # before any layer changes
            replay = SubmoduleReplay(block, lins, tails)
            done = {n for n, plan in plans.items() if not plan.quantized}
            for group in groups:
                names = [n for n in group if n in plans and plans[n].quantized]
                replay.update(done)
                done.update(group)
                if not names:
                    continue
                if float_targets:
                    hessians, cross = collect_float_targets(float_block, block, names, float_inputs,
                                                            replay.passes(inputs))
                else:
                    hessians, cross = collect_hessians(block, {n: lins[n][0] for n in names}, replay.passes(inputs)), {}
                for members in _sharing(hessians, names):
                    weights = [lins[n][1] for n in members]
                    for n, w in zip(members, weights):
                        if n in cross:
                            w.copy_(refit_to_float_outputs(w, cross[n], hessians[n].h, REFIT_DAMP))
                            plans[n].notes.append("fitted to the float model's outputs (float_targets)")
                    results = fit_layers(config, hessians[members[0]].h, weights, [plans[n] for n in members],
                                         prefix + members[0], hessians[members[0]].absmax)
                    for n, w, (dequantized, fmt, rtn_fmt) in zip(members, weights, results):
                        if rtn_fmt is not None:
                            fallback[prefix + n] = rtn_fmt
                        # Until the block is done, the layer computes with its dequantized weight
                        # in float: the same values as the quantized kernel (without an act_order
                        # input gather); the next groups' inputs and the next block's come from it.
                        w.copy_(dequantized)
                        pending.append((prefix + n, lins[n][0], fmt, plans[n]))
                del hessians, cross
            replay.update(done)
            for inp in replay.passes(inputs):  # the quantized block makes the next block's inputs
                inp.hidden = run_block(block, inp)
            replay.close()
            for inp in float_inputs if float_targets else ():
                inp.hidden = run_block(float_block, inp)
            del lins
            flush()
        del inputs, float_inputs
        for path, mod, w in linear_modules(model):  # outside the decoder blocks (lm_head)
            if path in entries or path.startswith(f"{blocks_path}."):
                continue
            plan = plan_linear(config, path, w, w.device)
            if plan.quantized and not plan.data_free and isinstance(config, QUIKConfig):
                plan.format = None
                plan.reason = "outside the decoder blocks: no calibration inputs to choose QUIK's outlier columns"
            if not plan.quantized:
                entries[path] = float_report(plan, w)
                continue
            if plan.data_free:
                q = quantize_linear(config, plan, w)
            elif isinstance(config, GANQConfig):
                q = ganq.nearest_table_quantize(w, config.bits, config.table_dtype)
                plan.reason = (plan.reason.split(", ganq")[0] + ", nearest entry of a per-row k-means table "
                               "(outside the decoder blocks: no calibration inputs)")
            else:
                q = gptq.to_format(gptq.rtn_quantize(w, bits=config.bits, group_size=plan.group_size, sym=config.sym,
                                                     clip_search=config.clip_search, scale_dtype=config.scale_dtype))
                plan.reason = (plan.reason.split(", gptq")[0] + ", round to nearest on the GPTQ grid "
                               "(outside the decoder blocks: no calibration inputs)")
            entries[path] = install(model, path, mod, q, plan, input_emb)
        if heldout and fallback:
            check_against_rtn(model, fallback, heldout, entries, report)
        finished = True
    finally:
        if replay is not None:  # stopped mid-block: the sub-modules compute again
            replay.close()
        flush()
        model.train(was_training)
        why = "not reached by the calibration forward" if finished else "calibration stopped before this layer"
        report.linears = [entries.get(p) or LinearReport(p, s[1], s[0], None, why, [], 2 * s.numel())
                          for p, s in shapes]
        if any(is_output_head(p) and e.op for p, e in entries.items()):
            untie(model)
        model.qcompile_report = Report(config=config.to_dict(), graphs=[report])
    return model
