"""Run sibling quantized layers that read the same input as one op.

Pattern:      y_i = qcompile::<op>(x, *tensors_i, *consts)     i = 1..n, the same x, op and consts
                  (layers quantized ahead of time: q/k/v, gate/up of `qcompile.quantize` / `load`)
Replacement:  y = qcompile::<op>(x, *rows(tensors_1..n), *consts);  y_i = narrow(y, -1, offset_i, n_i)
Check:        each tensor argument of every member is a graph input, and the members' tensors lie
              row after row in one storage (`qcompile.modules.colocate_siblings` lays them out so),
              so the combined weight is a view: no copy, no extra memory. Members are taken in
              storage order. Dynamo reuses a graph for every layer sharing its code; another
              layer's tensors are viewed the same way, or concatenated if they are not end to end.

act_order siblings (GPTQ's q/k/v, gate/up: one Hessian, one input order) hold one perm tensor
(`colocate_siblings`), which Dynamo passes as one graph input (guarding that it stays one object);
their gathers ``index_select(x, -1, perm)`` are first merged into one, so they read the same input.

The linear pass fuses the float layers it quantizes itself (passes/linear.py); this pass does the
same for weights that arrive quantized, so both paths run one op per input.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from qcompile.ops import ROW_BLOCK_OPS
from qcompile.ops.quik import QUIK_MM
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


def _emit(graph: fx.Graph, ctx: PassContext, nodes: list[fx.Node], rows: list[list[fx.Node]], args_from,
          widths: list[int], earliest: fx.Node) -> None:
    """Replace `nodes` by one call of their op: `rows[i]` are node i's row tensors (combined into new
    graph inputs, `args_from(those inputs)` the call's arguments), its output split by `widths`."""
    ctx.remakes.append(([a for r in rows for a in r], lambda v: _combined([[v[a] for a in r] for r in rows])))
    inputs = [ctx.add_input(graph, f"{a.name}_fused", t)
              for a, t in zip(rows[0], _combined([[ctx.values[a] for a in r] for r in rows]))]
    paths = [module_path(node, prefix=ctx.path_prefix) for node in nodes]
    note = "one op for " + "+".join(p.rsplit(".", 1)[-1] for p in paths)
    for entry in ctx.report.linears:
        if entry.path in paths and entry.reason.startswith("quantized ahead of time"):
            entry.notes.append(note)
    with graph.inserting_before(earliest):
        y = graph.call_function(nodes[0].target, tuple(args_from(inputs)), dict(nodes[0].kwargs))
        offset = 0
        for node, width in zip(nodes, widths):
            out = graph.call_function(torch.narrow, (y, -1, offset, width))
            offset += width
            node.replace_all_uses_with(out)
    for node in nodes:
        graph.erase_node(node)


def _fuse(graph: fx.Graph, ctx: PassContext, members: list[tuple[fx.Node, list[fx.Node]]],
          earliest: fx.Node) -> None:
    first = members[0][0]

    def args_from(inputs):
        it = iter(inputs)
        return [next(it) if i > 0 and isinstance(a, fx.Node) else a for i, a in enumerate(first.args)]

    widths = [ctx.values[args[0]].shape[0] for _, args in members]  # qweight is [out, ...] in every layout
    _emit(graph, ctx, [n for n, _ in members], [args for _, args in members], args_from, widths, earliest)


# QUIK (qcompile::quik_mm on a blocked weight): the siblings share x's outlier split (the index tensors,
# one object: `modules._share_indices`), their row tensors lie end to end (`modules._colocate_quik`), and the
# last argument, out_features, adds up. One op then quantizes x once for q/k/v or gate/up.
QUIK_ROWS = (1, 2, 3, 6)  # qweight, scales, rowsum, fp_weight
QUIK_SHARED = (4, 5)      # int_idx, fp_idx


def _quik_groups(graph: fx.Graph, ctx: PassContext) -> list[list[fx.Node]]:
    groups: dict = defaultdict(list)
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not QUIK_MM or len(node.args) != 9:
            continue
        values = [ctx.values.get(a) if isinstance(a, fx.Node) and a.op == "placeholder" else None
                  for a in node.args[1:7]]
        if any(v is None for v in values) or values[0].dim() != 3:
            continue
        shared = tuple((ctx.values[node.args[i]].data_ptr(), ctx.values[node.args[i]].numel()) for i in QUIK_SHARED)
        groups[(node.args[0], node.args[7], shared)].append(node)
    return [m for m in groups.values() if len(m) > 1]


def _fuse_quik(graph: fx.Graph, ctx: PassContext, members: list[fx.Node], earliest: fx.Node) -> bool:
    members.sort(key=lambda n: ctx.values[n.args[1]].storage_offset())
    if any(n.args[8] % 16 for n in members[:-1]) or not all(
            rows_end_to_end([ctx.values[n.args[i]] for n in members]) for i in QUIK_ROWS):
        return False
    rows = [[n.args[i] for i in QUIK_ROWS] for n in members]
    first = members[0]

    def args_from(inputs):
        fused = dict(zip(QUIK_ROWS, inputs))
        return [fused.get(i, a) for i, a in enumerate(first.args[:8])] + [sum(n.args[8] for n in members)]

    _emit(graph, ctx, members, rows, args_from, [n.args[8] for n in members], earliest)
    return True


def _merge_gathers(graph: fx.Graph) -> int:
    """One node for identical activation gathers (same input, dim and index node); returns how many
    were merged away."""
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        is_gather = (node.op == "call_method" and node.target == "index_select") or \
            (node.op == "call_function" and node.target in (torch.index_select, torch.ops.aten.index_select.default))
        if not is_gather or node.kwargs:
            continue
        key = (node.op, node.target, node.args)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def fuse_quantized(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Fuse the quantized ops of `gm` that read the same input; returns a one-line summary."""
    if not ctx.fuse_projections:
        return "off (fuse_projections=False)"
    graph = gm.graph
    gathers = _merge_gathers(graph)
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
    for members in _quik_groups(graph, ctx):
        if _fuse_quik(graph, ctx, members, min(members, key=order.__getitem__)):
            fused += len(members)
            ops += 1
    graph.lint()
    gm.recompile()
    merged = f"; {gathers} act_order gathers merged" if gathers else ""
    return (f"{fused} quantized ops fused into {ops}" if ops else "no sibling quantized ops") + merged
