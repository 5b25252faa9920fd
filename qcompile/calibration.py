"""Calibration for methods that learn from data (GPTQ): the calibration token windows, and the
sequential pass that quantizes a decoder model one block at a time.

Each block is calibrated on the outputs of the blocks before it, already quantized, as in the
GPTQ reference: capture what the first block receives (hidden states and the keyword arguments
the model passes, e.g. the rotary ``position_embeddings`` of transformers 5), then per block:
collect the Hessians of one group of its linears (those reading one input: q/k/v), quantize them,
re-run the block for the next group's inputs (true-sequential), run the quantized block to make
the next block's inputs, and swap in `QuantLinear`s. Peak memory: the calibration activations of
one block plus the Hessians of one group of layers.

Ctrl-C at any point leaves a consistent model: the layers done so far are `QuantLinear`s, the rest
float, and ``model.qcompile_report`` says which is which.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import GPTQConfig, is_output_head
from .methods import gptq, plan_linear, quantize_linear
from .quantize import float_report, install, linear_modules, untie
from .report import GraphReport, LinearReport, Report

DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"


def default_text() -> str:
    """The calibration text that ships with qcompile (English prose; see data/SOURCES.md)."""
    return DEFAULT_TEXT.read_text(encoding="utf-8")


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
    `qcompile.models.load_model` loads them)."""
    path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", "")
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"no tokenizer loads from the model's folder {path}: pass tokenizer=") from e
    raise ValueError("calibration texts need a tokenizer: pass tokenizer= (qcompile.models.load_model "
                     "returns it beside the model), or give calibration= as token ids")


def _check_ids(t: Tensor) -> Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"calibration token ids must be an integer tensor, got {t.dtype}")
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"calibration token ids must be [seqlen] or [n, seqlen], got {tuple(t.shape)}")
    return t.long()


def calibration_ids(calibration, *, model: nn.Module, tokenizer=None, nsamples: int = 64,
                    seqlen: int = 512) -> tuple[list[Tensor], str]:
    """(1-D id tensors, a description) from what `qcompile.quantize(calibration=...)` accepts:
    None (the text that ships with qcompile), a text or list of texts (joined, tokenized, cut
    into `nsamples` windows of `seqlen`), a LongTensor [n, seqlen], or a list of id tensors
    (used as given)."""
    source = "texts"
    if calibration is None:
        calibration, source = [default_text()], "qcompile's default text"
    if isinstance(calibration, str):
        calibration = [calibration]
    if isinstance(calibration, Tensor):
        rows = list(_check_ids(calibration))
        return rows, f"{len(rows)} windows given as token ids"
    if isinstance(calibration, (list, tuple)) and calibration:
        if all(isinstance(c, str) for c in calibration):
            ids = _tokenize("\n\n".join(calibration), tokenizer or model_tokenizer(model))
            rows = windows(ids, nsamples, seqlen)
            return rows, f"{len(rows)} x {seqlen} tokens from {source} ({ids.numel()} tokens)"
        if all(isinstance(c, Tensor) for c in calibration):
            rows = [r for c in calibration for r in _check_ids(c)]
            return rows, f"{len(rows)} windows given as token ids"
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


def collect_hessians(block: nn.Module, mods: dict[str, nn.Module], inputs: list[BlockInput]) -> dict[str, gptq.Hessian]:
    """Hessians of `mods`' inputs over every calibration batch. Layers that read the same tensor
    share one Hessian object. Each forward stops as soon as every layer has been reached."""
    hessians: dict[str, gptq.Hessian] = {}
    seen: dict[str, Tensor] = {}

    def add(name, x):
        if name in seen:
            return
        for other, t in seen.items():
            if t is x and other in hessians:
                hessians.setdefault(name, hessians[other])
                break
        else:
            hessians.setdefault(name, gptq.Hessian(x.shape[-1], x.device)).add(x)
        seen[name] = x
        if len(seen) == len(mods):
            raise _Stop

    hooks = _hook_inputs(mods, add)
    try:
        for inp in inputs:
            seen.clear()
            try:
                run_block(block, inp)
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return hessians


# --- the sequential pass ---------------------------------------------------------------------------
def _gptq_note(inv: gptq.InverseHessian) -> list[str]:
    notes = []
    if inv.damp_raised:
        notes.append(f"damping raised from {inv.damp_requested:g} to {inv.damp_percent:g}: Cholesky failed")
    dead = int(inv.dead.sum())
    if dead:
        notes.append(f"{dead} dead inputs (always zero on the calibration data)")
    return notes


@torch.no_grad()
def quantize_with_calibration(model: nn.Module, config: GPTQConfig, calibration=None, *, tokenizer=None,
                              progress: bool = True) -> nn.Module:
    """GPTQ over a decoder model, block by block (see the module docstring); `qcompile.quantize`
    calls this for configs that need calibration. Layers outside the decoder blocks follow the
    config's rule (int8 lm_head by default). Ctrl-C leaves done layers quantized, the rest float."""
    if not isinstance(config, GPTQConfig):
        raise TypeError(f"calibration-based quantization needs a GPTQConfig, got {type(config).__name__}")
    gptq.require_format(config.bits)
    blocks_path, blocks = decoder_blocks(model)
    rows, described = calibration_ids(calibration, model=model, tokenizer=tokenizer,
                                      nsamples=config.nsamples, seqlen=config.seqlen)
    batches = _batches(rows, config.batch_size)
    device = next(model.parameters()).device
    report = GraphReport(index=0, device=str(device), notes=[f"calibration: {described}"])
    shapes = [(path, w.shape) for path, _, w in linear_modules(model)]
    entries: dict[str, LinearReport] = {}
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    group_size = lambda plan: None if config.group_size is None else plan.group_size  # noqa: E731
    pending: list = []  # (path, module, format, plan) quantized in the current block, not yet swapped

    def flush():
        while pending:
            path, mod, fmt, plan = pending.pop(0)
            entries[path] = install(model, path, mod, fmt, plan, input_emb)

    was_training = model.training
    model.eval()
    finished = False
    try:
        inputs = capture_block_inputs(model, blocks[0], batches)
        order = None
        for i, block in enumerate(tqdm(blocks, desc="gptq", unit="block", disable=not progress)):
            prefix = f"{blocks_path}.{i}." if blocks_path else f"{i}."
            lins = {name: (mod, w) for name, mod, w in linear_modules(block)}
            plans = {name: plan_linear(config, prefix + name, w, w.device) for name, (_, w) in lins.items()}
            for name, plan in plans.items():
                if not plan.quantized:
                    entries[prefix + name] = float_report(plan, lins[name][1])
            if order is None:  # blocks are identical: the grouping of the first serves all
                order = sequential_groups(block, {n: m for n, (m, _) in lins.items()}, inputs[0])
            groups = order if config.true_sequential else [[n for g in order for n in g]]
            for group in groups:
                names = [n for n in group if n in plans and plans[n].quantized]
                if not names:
                    continue
                hessians = collect_hessians(block, {n: lins[n][0] for n in names}, inputs)
                inverses: dict[int, gptq.InverseHessian] = {}
                for n in names:
                    h = hessians[n]
                    if id(h) not in inverses:
                        inverses[id(h)] = gptq.invert(h.h, act_order=config.act_order,
                                                      damp_percent=config.damp_percent, name=prefix + n)
                    inv = inverses[id(h)]
                    mod, w = lins[n]
                    plan = plans[n]
                    result = gptq.gptq_quantize(
                        w, inv, bits=config.bits, group_size=group_size(plan), sym=config.sym,
                        static_groups=config.static_groups, clip_search=config.clip_search,
                        block_size=config.block_size, scale_dtype=config.scale_dtype)
                    plan.reason += f", damp {inv.damp_percent:g}"
                    plan.notes += _gptq_note(inv)
                    # Until the block is done, the layer computes with its dequantized weight in
                    # float: the same values as the quantized kernel, without its act_order
                    # input gather (the next groups' inputs and the next block's are made this way).
                    w.copy_(result.dequantize(w.dtype))
                    pending.append((prefix + n, mod, gptq.to_format(result), plan))
                del hessians, inverses
            for inp in inputs:  # the quantized block makes the next block's inputs
                inp.hidden = run_block(block, inp)
            del lins
            flush()
        del inputs
        for path, mod, w in linear_modules(model):  # outside the decoder blocks (lm_head)
            if path in entries or path.startswith(f"{blocks_path}."):
                continue
            plan = plan_linear(config, path, w, w.device)
            if not plan.quantized:
                entries[path] = float_report(plan, w)
                continue
            if plan.data_free:
                q = quantize_linear(config, plan, w)
            else:
                q = gptq.to_format(gptq.rtn_quantize(w, bits=config.bits, group_size=group_size(plan), sym=config.sym,
                                                     clip_search=config.clip_search, scale_dtype=config.scale_dtype))
                plan.reason = (plan.reason.split(", gptq")[0] + ", round to nearest on the GPTQ grid "
                               "(outside the decoder blocks: no calibration inputs)")
            entries[path] = install(model, path, mod, q, plan, input_emb)
        finished = True
    finally:
        flush()
        model.train(was_training)
        why = "not reached by the calibration forward" if finished else "calibration stopped before this layer"
        report.linears = [entries.get(p) or LinearReport(p, s[1], s[0], None, why, [], 2 * s.numel())
                          for p, s in shapes]
        if any(is_output_head(p) and e.op for p, e in entries.items()):
            untie(model)
        model.qcompile_report = Report(config=config.to_dict(), graphs=[report])
    return model
