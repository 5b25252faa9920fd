"""Linear pass: float matmuls with a parameter weight become qcompile quantized ops.

Pattern:      y = linear(x, W, b)   (also addmm/mm with W or W.T; HF Conv1D)
Replacement:  y = qcompile::<layout op>(x, *packed(W)) + b
              siblings reading the same x (q/k/v, gate/up) share one op over their stacked
              weights, and each takes its slice of the output.
Check:        W is an nn.Parameter; `methods.plan_linear` accepts the layer (config, shape, dtype,
              a kernel for this device); otherwise the node stays float and the report says why.
Already-quantized layers (`qcompile.quantize`) arrive as qcompile ops and are only reported.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from qcompile import lowering
from qcompile.formats import Int4Weight, Int8Weight
from qcompile.methods import LinearPlan, plan_linear, quantize_linear
from qcompile.ops import QUANTIZED_LINEAR_OPS
from qcompile.report import LinearReport

from .analysis import LinearSite, shape_of, input_scale, linear_sites, module_path
from .context import PassContext
from .dead_code import erase_unused


def _float_bytes(n: int, k: int) -> int:
    return 2 * n * k  # measured against bf16, the usual baseline for weight-only quantization


def _record(ctx: PassContext, plan: LinearPlan, op: str | None, quant_bytes: int | None = None, notes=()):
    ctx.report.linears.append(LinearReport(plan.path, plan.in_features, plan.out_features, op, plan.reason,
                                           list(plan.notes) + list(notes), _float_bytes(plan.out_features, plan.in_features),
                                           quant_bytes))


def _report_prequantized(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZED_LINEAR_OPS:
            k = (shape_of(node.args[0]) or (0,))[-1]
            n = (shape_of(node) or (0,))[-1]
            quant = sum(t.numel() * t.element_size() for a in node.args[1:]
                        if isinstance(a, fx.Node) and isinstance(t := ctx.values.get(a), torch.Tensor))
            plan = LinearPlan(module_path(node, prefix=ctx.path_prefix), k, n, reason="quantized ahead of time (qcompile.quantize / load)")
            _record(ctx, plan, str(node.target.name()), quant)
            count += 1
    return count


def _weight_oi(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    return w.t() if site.weight_is_in_out else w


def quantize_linears(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Rewrite every accepted linear of `gm` into a quantized op; returns a one-line summary."""
    graph = gm.graph
    pre = _report_prequantized(gm, ctx)
    accepted: list[tuple[LinearSite, LinearPlan]] = []
    for site in linear_sites(graph, ctx.path_prefix):
        w = ctx.values.get(site.weight)
        if not isinstance(w, torch.nn.Parameter):
            n, k = shape_of(site.weight)[-2:]
            n, k = (k, n) if site.weight_is_in_out else (n, k)
            _record(ctx, LinearPlan(site.path, k, n, reason="weight is not an nn.Parameter (a buffer or plain tensor)"), None)
            continue
        plan = plan_linear(ctx.config, site.path, _weight_oi(site, w), ctx.device)
        if plan.quantized:
            accepted.append((site, plan))
        else:
            _record(ctx, plan, None)

    groups: dict = defaultdict(list)
    for site, plan in accepted:
        key = (site.x, plan.format, plan.group_size) if ctx.fuse_projections else (site.node,)
        groups[key].append((site, plan))

    order = {n: i for i, n in enumerate(graph.nodes)}
    orphaned: list[fx.Node] = []
    for members in groups.values():
        orphaned += _rewrite(graph, ctx, members, min((s.node for s, _ in members), key=order.__getitem__))
    erase_unused(graph, orphaned)
    gm.recompile()
    return f"{len(accepted)} linears quantized in {len(groups)} ops, {pre} already quantized"


def _importance(ctx: PassContext, site: LinearSite, plan: LinearPlan):
    """Data-free channel importance: the squared gain of the norm feeding the layer, if any."""
    gamma = input_scale(site.x)
    if gamma is None or plan.format != "int4" or not getattr(ctx.config, "norm_weighting", False):
        return None
    plan.notes.append("error weighted by its input norm's gain")
    return ctx.values[gamma].detach().float().square()


def _quantize_group(ctx: PassContext, members, importances) -> object:
    weights = []
    for (site, plan), importance in zip(members, importances):
        w = _weight_oi(site, ctx.values[site.weight])
        weights.append(quantize_linear(ctx.config, plan, w, importance))
    fmt = Int4Weight if isinstance(weights[0], Int4Weight) else Int8Weight
    return lowering.pack(fmt.cat(weights) if len(weights) > 1 else weights[0], ctx.device)


def _rewrite(graph: fx.Graph, ctx: PassContext, members, first: fx.Node) -> list[fx.Node]:
    """Replace the members' matmuls by one op; returns the nodes only they read (weight transposes)."""
    params = tuple(ctx.values[site.weight] for site, _ in members)
    key = (ctx.config, str(ctx.device), members[0][1].format, members[0][1].group_size,
           tuple(s.weight_is_in_out for s, _ in members))
    importances = [_importance(ctx, site, plan) for site, plan in members]
    packed = ctx.store.get(params, key, lambda: _quantize_group(ctx, members, importances))
    x = members[0][0].x
    base = "qc_" + members[0][1].path.replace(".", "_")
    inputs = [ctx.add_input(graph, f"{base}_{name}", t) for name, t in packed.tensors.items()]
    with graph.inserting_before(first):
        y = graph.call_function(packed.op, (x, *inputs, *packed.consts))
        offset = 0
        fused_with = [p.path.rsplit(".", 1)[-1] for _, p in members]
        for site, plan in members:
            out = y
            if len(members) > 1:
                out = graph.call_function(torch.narrow, (y, -1, offset, plan.out_features))
            offset += plan.out_features
            if site.bias is not None:
                out = graph.call_function(operator.add, (out, site.bias))
            site.node.replace_all_uses_with(out)
            notes = ["one op for " + "+".join(fused_with)] if len(members) > 1 else []
            share = plan.out_features / packed.out_features
            _record(ctx, plan, str(packed.op.name()), int(packed.nbytes * share), notes)
    orphaned = []
    for site, _ in members:
        orphaned += site.node.all_input_nodes
        graph.erase_node(site.node)
    return orphaned
