"""`qcompile.explain`: run the passes on a model's graphs and report what they did, and why."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from . import _compat
from .backend import Backend
from .config import AttentionConfig, QuantConfig
from .modules import QuantLinear
from .report import Report


@torch.no_grad()
def explain(model_or_fn, *example_inputs, config: QuantConfig | None = None,
            fuse_projections: bool = True, attention: AttentionConfig | bool | None = None,
            quantize_linears: bool = True, **example_kwargs) -> Report:
    """Trace `model_or_fn(*example_inputs, **example_kwargs)` with Dynamo, run qcompile's passes on
    every graph, and return the report: per linear layer its module path, the op chosen (None:
    stays float) and the reason; per attention site the pattern, the rewrite or why not; per graph
    the code before and after each pass. `attention` / `quantize_linears` switch those passes.

    Nothing is compiled by Inductor; `model_or_fn` itself is not changed (weights a float model
    would get are quantized into the backend's cache, which a later compile reuses).
    """
    reports: list = []
    backend = Backend(config, fuse_projections=fuse_projections, inductor=False, reports=reports,
                      attention=attention, quantize_linears=quantize_linears)
    compiled = torch.compile(model_or_fn, backend=backend)
    compiled(*example_inputs, **example_kwargs)
    model = _compat.uncompiled(model_or_fn)  # its module paths are the report's (no "_orig_mod." prefix)
    report = Report(config=backend.describe(), graphs=reports, parallel=getattr(model, "qcompile_parallel", None))
    if isinstance(model, nn.Module):
        _check_paths(report, model)
        _describe_prequantized(report, model)
    return report


def _check_paths(report: Report, model: nn.Module) -> None:
    """Every path the report names must be one of the model's modules: skip patterns and the
    lm_head rule match on them. A mismatch means Dynamo's records changed under a new release."""
    names = {p for p, _ in model.named_modules()}
    unknown = sorted({x.path for g in report.graphs for x in g.linears} - names)
    if unknown:
        warnings.warn(
            f"qcompile: report paths {unknown[:3]} are not modules of {type(model).__name__}: "
            f"skip= patterns and the lm_head rule will not match them (torch {torch.__version__}). "
            "Please report this with your torch and transformers versions.", RuntimeWarning, stacklevel=3)


def _describe_prequantized(report: Report, model: nn.Module) -> None:
    """Fill in the format of layers that arrived already quantized, from their modules."""
    modules = {p: m for p, m in model.named_modules() if isinstance(m, QuantLinear)}
    prev = getattr(model, "qcompile_report", None)
    reasons = {x.path: x for x in prev.linears} if isinstance(prev, Report) else {}
    for graph in report.graphs:
        for lin in graph.linears:
            mod = modules.get(lin.path)
            if mod is None or lin.op is None:
                continue
            meta = mod.format_meta
            g = meta.get("group_size")
            lin.reason = f"quantized ahead of time: {meta['format']}" + (f" g{g}" if g else " per channel")
            if lin.path in reasons:
                lin.reason = f"quantized ahead of time: {reasons[lin.path].reason}"
                lin.notes = list(reasons[lin.path].notes) + [n for n in lin.notes if n not in reasons[lin.path].notes]
            if meta.get("act_order"):
                lin.notes.append("act_order: the input is gathered (index_select) before the op")
