"""Linear pass: float matmuls with a parameter weight become qcompile quantized ops.

Pattern:      y = linear(x, W, b)             W [out, in]   (nn.Linear)
              y = addmm(b, x, W)              W [in, out]   (HF Conv1D)
              y = x @ W' | matmul(x, W') | mm(x, W')
                  with W' = W [in, out], or W.t() / W.T / W.mT / W.transpose(0, 1) /
                  W.permute(1, 0) of W [out, in]   (any dim spelling; a same-dtype cast,
                  contiguous() or clone() in between is looked through)
              y = einsum("...i,oi->...o", x, W)   a plain linear contraction, either storage
                  and either operand order ("bsi,io->bso", "oi,bi->bo", ...)
Replacement:  y = qcompile::<layout op>(x, *packed(W [out, in])) + b   (on CPU with cpu_activations="int8":
                  the int8-activation op of the layout, `PackedLinear.activations`)
              siblings reading the same x (q/k/v, gate/up) share one op over their stacked
              weights, and each takes its slice of the output.
Check:        W is a 2-D nn.Parameter; `methods.plan_linear` accepts the layer (config, shape,
              dtype, a kernel for this device); otherwise the node stays float and the report says why.
Reported, never silently skipped: every other matmul that reads a parameter (or a >= 2-D buffer) —
3-D expert parameters under bmm / matmul / grouped_mm or indexed first, a weight reshaped, cast
or combined in the graph, a parameter as the first operand, einsums that are not a plain linear
contraction, a buffer — is listed in the report with op None and the form it saw
(`analysis.matmul_sites` finds both kinds in one walk).
Already-quantized layers (`qcompile.quantize`) arrive as qcompile ops and are only reported.
"""
from __future__ import annotations

import dataclasses
import operator
from collections import defaultdict

import torch
import torch.fx as fx

from qcompile import _compat, lowering
from qcompile.formats import Int4Weight, Int8Weight
from qcompile.methods import LinearPlan, plan_linear, quantize_linear
from qcompile.ops import A8_OPS, QUANTIZED_LINEAR_OPS, QUIK_MM
from qcompile.report import LinearReport

from .analysis import FloatMatmul, LinearSite, input_scale, matmul_sites, module_path, shape_of
from .context import PassContext
from .dead_code import erase_unused


def _float_bytes(n: int, k: int) -> int:
    return 2 * n * k  # measured against bf16, the usual baseline for weight-only quantization


def _record(ctx: PassContext, plan: LinearPlan, op: str | None, quant_bytes: int | None = None, notes=(),
            weight: str | None = None, activations: str | None = None):
    ctx.report.linears.append(LinearReport(plan.path, plan.in_features, plan.out_features, op, plan.reason,
                                           list(plan.notes) + list(notes), _float_bytes(plan.out_features, plan.in_features),
                                           quant_bytes, weight, activations))


def _record_reuse(ctx: PassContext, members, params) -> None:
    """Report the layers a graph is called for after its compile (the graph of one module, reused
    for the others that share its code): the same decision, under their own paths."""
    top = _compat.compiled_calling_module()
    names = {id(p): n for n, p in top.named_parameters(remove_duplicate=False)} if top is not None else {}
    done = {x.path: x for x in ctx.report.linears}
    for (site, plan), p in zip(members, params):
        name = names.get(id(p))
        path = name.rsplit(".", 1)[0] if name and name.endswith(".weight") else name
        if path is None or path in done or plan.path not in done:
            continue
        first = done[plan.path]
        ctx.report.linears.append(dataclasses.replace(
            first, path=path, notes=list(first.notes) + [f"same compiled graph as {plan.path}"]))


def _record_float_matmuls(ctx: PassContext, floats: list[FloatMatmul]) -> int:
    """Each parameter of a matmul no rewrite takes, once per graph: op None, the form seen, why."""
    seen = set()
    for f in floats:
        for param, name in zip(f.params, f.weight_names):
            key = (f.path, name, f.reason)
            if key in seen:
                continue
            seen.add(key)
            t = ctx.values.get(param)
            nbytes = 2 * t.numel() if isinstance(t, torch.Tensor) else _float_bytes(f.out_features, f.in_features)
            ctx.report.linears.append(LinearReport(f.path, f.in_features, f.out_features, None, f.reason,
                                                   [f"as written: {f.form}"], nbytes, None, name))
    return len(seen)


def _form_notes(site: LinearSite) -> list[str]:
    """The form a rewritten matmul was written in, when it is not nn.Linear or Conv1D."""
    plain = site.form.startswith(("F.linear(", "torch.addmm("))
    return [] if plain else [f"as written: {site.form}"]


def _report_prequantized(gm: fx.GraphModule, ctx: PassContext) -> int:
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZED_LINEAR_OPS:
            k = (shape_of(node.args[0]) or (0,))[-1]
            n = (shape_of(node) or (0,))[-1]
            quant = sum(t.numel() * t.element_size() for a in node.args[1:]
                        if isinstance(a, fx.Node) and isinstance(t := ctx.values.get(a), torch.Tensor))
            plan = LinearPlan(module_path(node, prefix=ctx.path_prefix), k, n, reason="quantized ahead of time (qcompile.quantize / load)")
            _record(ctx, plan, str(node.target.name()), quant,
                    activations=_activations(node, ctx))
            count += 1
    return count


def _activations(node: fx.Node, ctx: PassContext) -> str:
    if node.target is QUIK_MM:
        return f"int{node.args[7]}"  # act_bits (out_features follows on a blocked weight)
    return "int8" if node.target in A8_OPS.values() else "float"


def _weight_oi(site: LinearSite, w: torch.Tensor) -> torch.Tensor:
    return w.t() if site.weight_is_in_out else w


def quantize_linears(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Rewrite every accepted linear of `gm` into a quantized op; returns a one-line summary."""
    graph = gm.graph
    pre = _report_prequantized(gm, ctx)
    sites, floats = matmul_sites(graph, ctx.values, ctx.path_prefix)
    accepted: list[tuple[LinearSite, LinearPlan]] = []
    for site in sites:
        plan = plan_linear(ctx.config, site.path, _weight_oi(site, ctx.values[site.weight]), ctx.device)
        plan.notes += _form_notes(site)
        if plan.quantized:
            accepted.append((site, plan))
        else:
            _record(ctx, plan, None, weight=site.weight_name)
    left_float = _record_float_matmuls(ctx, floats)

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
    return (f"{len(accepted)} linears quantized in {len(groups)} ops, {pre} already quantized, "
            f"{left_float} other matmuls against parameters left float")


def _importance_input(ctx: PassContext, site: LinearSite, plan: LinearPlan) -> fx.Node | None:
    """The placeholder of the norm gain that weights the layer's error (data-free), if any."""
    gamma = input_scale(site.x)
    if gamma is None or plan.format != "int4" or not getattr(ctx.config, "norm_weighting", False):
        return None
    plan.notes.append("error weighted by its input norm's gain")
    return gamma


def _quantize_group(ctx: PassContext, members, importances) -> object:
    weights = []
    for (site, plan), importance in zip(members, importances):
        w = _weight_oi(site, ctx.values[site.weight])
        weights.append(quantize_linear(ctx.config, plan, w, importance))
    fmt = Int4Weight if isinstance(weights[0], Int4Weight) else Int8Weight
    return lowering.pack(fmt.cat(weights) if len(weights) > 1 else weights[0], ctx.device,
                         members[0][1].cpu_activations)


def _unique_input_name(graph: fx.Graph, base: str, keys) -> str:
    """`base`, or `base_2`, ...: the prefix of new inputs `{prefix}_{key}` that no placeholder has
    (a layer called on several inputs, or one parameter read by several matmuls, adds its packed
    weights once per op, and placeholder names must differ)."""
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    name, i = base, 1
    while any(f"{name}_{k}" in taken for k in keys):
        i += 1
        name = f"{base}_{i}"
    return name


def _rewrite(graph: fx.Graph, ctx: PassContext, members, first: fx.Node) -> list[fx.Node]:
    """Replace the members' matmuls by one op; returns the nodes only they read (weight transposes)."""
    key = (ctx.config, str(ctx.device), members[0][1].format, members[0][1].group_size,
           tuple(s.weight_is_in_out for s, _ in members))
    gammas = [_importance_input(ctx, site, plan) for site, plan in members]

    def make(values: dict):
        """The packed weight of these members for the given values of the graph's inputs."""
        params = tuple(values[site.weight] for site, _ in members)
        importances = [None if g is None else values[g].detach().float().square() for g in gammas]
        c = dataclasses.replace(ctx, values=values)
        if values is not ctx.values:
            _record_reuse(ctx, members, params)
        def describe():  # what the packed weight depends on, for the on-disk cache
            plans = [(p.path, p.in_features, p.out_features, p.format, p.group_size, p.data_free,
                      p.cpu_activations) for _, p in members]
            return repr((key, plans)), [*params, *(values[g] for g in gammas if g is not None)]

        return ctx.store.get(params, key, lambda: _quantize_group(c, members, importances), describe, ctx.device)

    packed = make(ctx.values)
    ctx.remakes.append(([site.weight for site, _ in members] + [g for g in gammas if g is not None],
                        lambda values: list(make(values).tensors.values())))
    x = members[0][0].x
    base = _unique_input_name(graph, "qc_" + members[0][1].path.replace(".", "_"), packed.tensors)
    inputs = [ctx.add_input(graph, f"{base}_{name}", t) for name, t in packed.tensors.items()]
    with graph.inserting_before(first):
        y = graph.call_function(packed.op, (x, *inputs, *packed.op_consts))
        offset = 0
        fused_with = [s.weight_name or p.path.rsplit(".", 1)[-1] for s, p in members]
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
            _record(ctx, plan, str(packed.op.name()), int(packed.nbytes * share), notes, site.weight_name,
                    packed.activations)
    orphaned = []
    for site, _ in members:
        orphaned += site.node.all_input_nodes
        graph.erase_node(site.node)
    return orphaned
