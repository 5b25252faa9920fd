"""Run sibling quantized layers that read the same input as one op.

Pattern:      y_i = qcompile::<op>(x, *tensors_i, *consts)     i = 1..n, the same x, op and consts
                  (layers quantized ahead of time: q/k/v, gate/up of `qcompile.quantize` / `load`)
Replacement:  y = qcompile::<op>(x, *rows(tensors_1..n), *consts);  y_i = narrow(y, -1, offset_i, n_i)
Check:        each tensor argument of every member is a graph input, and the members' tensors lie
              row after row in one storage (`qcompile.modules.colocate_siblings` lays them out so),
              so the combined weight is a view: no copy, no extra memory. Members are taken in
              storage order. Dynamo reuses a graph for every layer sharing its code; another
              layer's tensors are viewed the same way, or concatenated if they are not end to end.

The linear pass fuses the float layers it quantizes itself (passes/linear.py); this pass does the
same for weights that arrive quantized, so both paths run one op per input.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from qcompile.ops import ROW_BLOCK_OPS
from qcompile.ops.linear import rows_end_to_end, rows_view

from .analysis import module_path
from .context import PassContext


def _tensor_args(node: fx.Node, ctx: PassContext) -> list[fx.Node] | None:
    """The op's tensor arguments after x, if every one is a graph input."""
    args = [a for a in node.args[1:] if isinstance(a, fx.Node)]
    if all(a.op == "placeholder" and isinstance(ctx.values.get(a), torch.Tensor) for a in args):
        return args
    return None


def _combined(values_per_member: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """One tensor per argument position spanning the members' rows: a view when they lie end to
    end, else (another layer's tensors, laid out apart) a concatenation."""
    out = []
    for column in zip(*values_per_member):
        column = list(column)
        out.append(rows_view(column) if rows_end_to_end(column) else torch.cat(column))
    return out


def _fuse(graph: fx.Graph, ctx: PassContext, members: list[tuple[fx.Node, list[fx.Node]]],
          earliest: fx.Node) -> None:
    first_node, first_args = members[0]
    values = [[ctx.values[a] for a in args] for _, args in members]
    sources = [a for _, args in members for a in args]
    ctx.remakes.append((sources, lambda v: _combined([[v[a] for a in args] for _, args in members])))
    inputs = iter([ctx.add_input(graph, f"{a.name}_fused", t) for a, t in zip(first_args, _combined(values))])
    args = [next(inputs) if i > 0 and isinstance(a, fx.Node) else a for i, a in enumerate(first_node.args)]
    paths = [module_path(node, prefix=ctx.path_prefix) for node, _ in members]
    note = "one op for " + "+".join(p.rsplit(".", 1)[-1] for p in paths)
    for entry in ctx.report.linears:
        if entry.path in paths and entry.reason.startswith("quantized ahead of time"):
            entry.notes.append(note)
    with graph.inserting_before(earliest):
        y = graph.call_function(first_node.target, tuple(args), dict(first_node.kwargs))
        offset = 0
        for node, member_args in members:
            width = ctx.values[member_args[0]].shape[0]  # qweight is [out, ...] in every layout
            out = graph.call_function(torch.narrow, (y, -1, offset, width))
            offset += width
            node.replace_all_uses_with(out)
    for node, _ in members:
        graph.erase_node(node)


def fuse_quantized(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Fuse the quantized ops of `gm` that read the same input; returns a one-line summary."""
    if not ctx.fuse_projections:
        return "off (fuse_projections=False)"
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in ROW_BLOCK_OPS and node.args:
            args = _tensor_args(node, ctx)
            if args is not None:
                consts = tuple(a for a in node.args[1:] if not isinstance(a, fx.Node))
                groups[(node.args[0], node.target, consts, len(args))].append((node, args))
    fused = ops = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        # storage order; the check below then says whether the members are one block of rows
        members.sort(key=lambda m: ctx.values[m[1][0]].storage_offset())
        if not all(rows_end_to_end([ctx.values[args[i]] for _, args in members])
                   for i in range(len(members[0][1]))):
            continue
        _fuse(graph, ctx, members, min((n for n, _ in members), key=order.__getitem__))
        fused += len(members)
        ops += 1
    graph.lint()
    gm.recompile()
    return f"{fused} quantized ops fused into {ops}" if ops else "no sibling quantized ops"
