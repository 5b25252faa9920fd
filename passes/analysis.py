"""Read-only helpers over Dynamo graphs: find linear layers, their weights, their module paths.

A Dynamo graph (torch >= 2.5) lifts parameters to placeholders; `nn.Linear` shows up as
``torch._C._nn.linear(x, w, b)`` and Hugging Face `Conv1D` as ``torch.addmm(b, x, w)`` with w
stored [in, out]. Graphs at the aten level (export) use aten.linear/addmm/mm with ``t(w)``.
"""
from __future__ import annotations

import itertools
import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile import _compat

aten = torch.ops.aten

LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, aten.linear.default}
ADDMM_TARGETS = {torch.addmm, aten.addmm.default}
MM_TARGETS = {torch.mm, torch.matmul, operator.matmul, aten.mm.default}
TRANSPOSE_TARGETS = {torch.t, aten.t.default, aten.permute.default, aten.transpose.int, torch.transpose}
# ops that pass a tensor through without mixing its channels (used to find a layer's input norm)
_CHANNEL_PRESERVING = {"to", "contiguous", "float", "type_as", "clone"}
_CHANNEL_PRESERVING_FNS = {operator.getitem, aten._to_copy.default, aten.clone.default, torch.nn.functional.dropout}


@dataclass
class LinearSite:
    """One matmul with a weight: ``y = x @ W.T (+ bias)`` where W is [out, in]."""

    node: fx.Node
    x: fx.Node
    weight: fx.Node          # the placeholder holding the weight
    bias: fx.Node | None
    weight_is_in_out: bool   # stored [in, out] (Conv1D, or mm(x, w)) rather than [out, in]
    path: str                # module path, e.g. "model.layers.0.self_attn.q_proj"


def _is_transpose(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target in ("t", "transpose", "permute"):
        return node.target == "t" or list(node.args[1:]) in ([1, 0], [0, 1], [[1, 0]], [-1, -2], [-2, -1])
    if node.op == "call_function" and node.target in TRANSPOSE_TARGETS:
        return node.target in (torch.t, aten.t.default) or list(node.args[1:]) in ([1, 0], [0, 1], [[1, 0]], [-1, -2], [-2, -1])
    return False


def _weight_operand(node) -> tuple[fx.Node | None, bool]:
    """(placeholder, stored_in_out) for a matmul's second operand, or (None, _) if it is not one."""
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return node, True
    if _is_transpose(node) and node.args[0].op == "placeholder":
        return node.args[0], False
    return None, False


def linear_sites(graph: fx.Graph, prefix: str = "") -> list[LinearSite]:
    """Every matmul of an activation with a placeholder weight, in graph order (`prefix`: the
    path of the graph's root module, see `root_prefix`)."""
    sites = []

    def module_path(node, w):
        return prefix + _module_path(node, w)

    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LINEAR_TARGETS:
            x, w = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if isinstance(w, fx.Node) and w.op == "placeholder":
                sites.append(LinearSite(node, x, w, bias, False, module_path(node, w)))
        elif node.target in ADDMM_TARGETS and not node.kwargs:
            bias, x, wop = node.args[:3]
            w, in_out = _weight_operand(wop)
            if w is not None:
                sites.append(LinearSite(node, x, w, bias, in_out, module_path(node, w)))
        elif node.target in MM_TARGETS and len(node.args) == 2 and not node.kwargs:
            x, wop = node.args
            w, in_out = _weight_operand(wop)
            if w is not None and _rank(w) == 2:
                sites.append(LinearSite(node, x, w, None, in_out, module_path(node, w)))
    return sites


def _rank(node: fx.Node) -> int | None:
    v = node.meta.get("example_value", node.meta.get("val"))
    return v.dim() if isinstance(v, torch.Tensor) else None


_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\['([^']+)'\]|\[(\d+)\]|\.(\w+)")
# The expression Dynamo reached the root module by: a local or global, then subscripts, closure
# cells or bound-method hops, up to the first attribute that names a child. The frame differs by
# release and entry point: `L['self']` (forward, or `model.forward = torch.compile(model.forward)`),
# `L['args'][0]` (transformers >= 5.25 wraps `forward` in `*args` decorators), `G['model']` (a
# compiled function calling a global model), `L['model']` (a model passed as an argument).
_ROOT = re.compile(r"^(?:[LG]\['[^']+'\]|\w+)(?:\[\d+\]|\['[^']+'\]|\.(?:cell_contents|__self__|__func__)|\.__closure__\[\d+\])*")


def _clean_path(name: str) -> str:
    """A Dynamo source or module-stack key as a module path relative to the root module.

    "L['self']._modules['model']._modules['layers']._modules['0']._modules['q_proj']",
    "L['args'][0].model.layers.0.q_proj" and "L['self'].model.layers[0].q_proj" all give
    "model.layers.0.q_proj".
    """
    head = _ROOT.match(name)
    rest = name[head.end():] if head else name
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_PART.finditer(rest)]
    return ".".join(parts)


def source_name(node: fx.Node) -> str | None:
    """The Python expression Dynamo read a placeholder from (e.g. "L['self'].lm_head.weight")."""
    arg = node.meta.get("grapharg")
    src = getattr(arg, "source", None)
    if src is None:
        return None
    return _compat.source_name(src)


def module_path(node: fx.Node, weight: fx.Node | None = None, prefix: str = "") -> str:
    """The module path of the layer a node belongs to (`prefix`: see `root_prefix`)."""
    return prefix + _module_path(node, weight)


def _module_path(node: fx.Node, weight: fx.Node | None = None) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        key, _ = list(stack.values())[-1]
        return _clean_path(key)
    if weight is not None:
        src = source_name(weight)
        if src:
            path = _clean_path(src)
            return path.rsplit(".", 1)[0] if path.endswith((".weight", ".bias")) else path
        return weight.name
    return node.name


def root_prefix(graph: fx.Graph, values: dict) -> str:
    """The path of the graph's root module inside the module the user compiled, with a final ".".

    Usually "": the graph starts at the compiled module. After a graph break Dynamo compiles the
    rest of an inner module's forward as its own graph (rooted at, say, `model.layers.3`): its
    records then read "self_attn.q_proj". The compiled module is the outermost module whose frame
    runs Dynamo-compiled code (or the one `torch.compile(module)` wrapped); a parameter of the
    graph, found there by identity, gives the root's path.
    """
    top = _compat.compiled_calling_module()
    if top is None:
        return ""
    names = {id(t): n for n, t in itertools.chain(top.named_parameters(remove_duplicate=False),
                                                   top.named_buffers(remove_duplicate=False))}
    for node in graph.nodes:
        if node.op != "placeholder" or id(values.get(node)) not in names:
            continue
        full, src = names[id(values[node])], source_name(node)
        rel = _clean_path(src) if src else None
        if rel and (full == rel or full.endswith("." + rel)):
            return full[: len(full) - len(rel)]
    return ""


def input_scale(x: fx.Node) -> fx.Node | None:
    """The placeholder of a per-channel gain applied to `x` just before it (a norm's weight), if any.

    Looks through dtype casts and slicing for ``mul(gamma, h)`` with gamma a 1-D placeholder of
    x's width, or a layer_norm/rms_norm call with a weight.
    """
    width = _last_dim(x)
    node = x
    for _ in range(8):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_method" and node.target in _CHANNEL_PRESERVING:
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in _CHANNEL_PRESERVING_FNS:
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target in (operator.mul, torch.mul, aten.mul.Tensor):
            for a in node.args[:2]:
                if isinstance(a, fx.Node) and a.op == "placeholder" and shape_of(a) == (width,):
                    return a
            return None
        if node.op == "call_function" and node.target in (torch.nn.functional.layer_norm, torch.layer_norm,
                                                          getattr(torch.nn.functional, "rms_norm", None)):
            w = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
            return w if isinstance(w, fx.Node) and w.op == "placeholder" else None
        return None
    return None


def shape_of(node: fx.Node):
    v = node.meta.get("example_value", node.meta.get("val"))
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _last_dim(node) -> int | None:
    s = shape_of(node) if isinstance(node, fx.Node) else None
    return s[-1] if s else None


def placeholder_values(graph: fx.Graph, example_inputs) -> dict[fx.Node, object]:
    """Map each placeholder to the real value Dynamo passed for it."""
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    return dict(zip(phs, example_inputs))
