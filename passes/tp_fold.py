"""TP-aware dequantization (Hoque et al. 2024): fold down_proj's act_order permutation into gate/up.

Pattern (an FX trace of an MLP module, its child modules as leaves):
    a = gate(x); b = up(x); h = f(a, b) elementwise (act(a) * b, or act(b) without a gate); y = down(h)
  where down is a QuantLinear with an act_order ``perm`` (it computes ``stored @ h[perm]``).
Replacement (offline, on the weights; the graph is unchanged):
    gate.rows, up.rows <- rows in the order perm (codes, scales, zeros, tables, bias alike);
    down.perm <- None.
  f is elementwise, so f(a[perm], b[perm]) = h[perm]: down now reads its input in stored order. Under
  tensor parallelism rank r's slice of h then lines up with its shard of down's columns: no
  AllGather and no runtime permute; on one device it still removes down's index_select.
Guard: every node between the linears and down is elementwise over tensors of h's shape (or scalars);
  gate/up outputs feed nothing else; down's input feeds only down; all three are linear modules
  (QuantLinear or nn.Linear). A module that fails stays as it was and the record says why.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qcompile import lowering
from qcompile.formats.slicing import take_rows
from qcompile.modules import QuantLinear

# elementwise callables an MLP uses between its projections
_ELEMENTWISE_FUNCTIONS = {operator.mul, torch.mul, operator.add, torch.add, operator.truediv, torch.div,
                          torch.nn.functional.silu, torch.nn.functional.gelu, torch.nn.functional.relu,
                          torch.sigmoid, torch.tanh, torch.exp}
_ELEMENTWISE_MODULES = (nn.SiLU, nn.GELU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


@dataclass
class FoldRecord:
    """One MLP: folded or not, and why."""

    path: str
    folded: bool
    reason: str


class _ChildrenAsLeaves(fx.Tracer):
    def __init__(self, root: nn.Module):
        super().__init__()
        self.children = set(map(id, root.children()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.children or super().is_leaf_module(m, qualname)


def _is_activation(m: nn.Module) -> bool:
    # Hugging Face's activation classes (SiLUActivation, GELUActivation, ...) live in transformers.activations
    return isinstance(m, _ELEMENTWISE_MODULES) or type(m).__module__ == "transformers.activations"


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (QuantLinear, nn.Linear))


def find_fold(module: nn.Module) -> tuple[list[str], str] | str:
    """(the input-side linears, the output linear) of `module` if the pattern holds, else why not."""
    try:
        graph = _ChildrenAsLeaves(module).trace(module)
    except Exception as e:  # data-dependent control flow, unsupported inputs (attention): not an MLP
        return f"not an MLP torch.fx can trace ({type(e).__name__})"
    calls = [n for n in graph.nodes if n.op == "call_module"]
    # the output projection: an act_order linear that reads a computed value (gate/up read the input)
    sinks = [n for n in calls if _is_linear(module.get_submodule(n.target)) and
             isinstance(getattr(module.get_submodule(n.target), "perm", None), torch.Tensor) and
             not (isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder")]
    if len(sinks) != 1:
        return "no act_order output projection" if not sinks else "several act_order projections"
    down = sinks[0]
    sources, stack, seen = [], [down.args[0]], set()
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = module.get_submodule(n.target)
            if _is_linear(m):
                sources.append(n)
                continue
            if not _is_activation(m):
                return f"{n.target} ({type(m).__name__}) between the projections is not a known elementwise activation"
        elif n.op != "call_function" or n.target not in _ELEMENTWISE_FUNCTIONS:
            return f"{n.format_node()} between the projections is not elementwise"
        if n.kwargs:
            return f"{n.format_node()} takes keyword arguments the fold does not read"
        stack.extend(a for a in n.args if isinstance(a, fx.Node))
    if not sources:
        return "the output projection's input does not come from linear layers"
    inside = seen - {down.args[0]}
    for n in seen:  # every intermediate value feeds only the chain, so permuting it changes nothing else
        users = set(n.users)
        if not users <= (inside | {down} | {down.args[0]}) or (n is down.args[0] and users != {down}):
            return f"{n.name} is used outside the MLP chain"
    if len({s.args for s in sources}) != 1:
        return "the input-side projections read different inputs"
    return [s.target for s in sources], down.target


def _permute_rows(layer: nn.Module, order: torch.Tensor) -> None:
    if isinstance(layer, QuantLinear):
        device = getattr(layer, layer._tensor_names[0]).device
        layer._set_packed(lowering.pack(take_rows(lowering.unpack(layer.packed_weight()), order), device,
                                        layer.cpu_activations))
    else:
        layer.weight.data = take_rows(layer.weight.data, order)
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.index_select(0, order.to(layer.bias.device))


def fold_permutations(model: nn.Module) -> list[FoldRecord]:
    """Apply the fold to every module of `model` that matches; returns one record per module that
    has an act_order projection fed by other linears (folded, or the reason it was not)."""
    records = []
    for path, module in model.named_modules():
        if not any(isinstance(c, QuantLinear) and c.perm is not None for c in module.children()):
            continue
        found = find_fold(module)
        if isinstance(found, str):
            if found != "no act_order output projection":
                records.append(FoldRecord(path, False, found))
            continue
        sources, down_name = found
        down = module.get_submodule(down_name)
        order = down.perm.long()
        for name in sources:
            _permute_rows(module.get_submodule(name), order)
        down._set_packed(_without_perm(down))
        records.append(FoldRecord(path, True, f"{down_name}'s input order folded into {', '.join(sources)}"))
    return records


def _without_perm(layer: QuantLinear):
    packed = layer.packed_weight()
    return dataclasses.replace(packed, perm=None, meta={**packed.meta, "act_order": False, "act_order_folded": True})
