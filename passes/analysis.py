"""Read-only helpers over Dynamo graphs: find linear layers, their weights, their module paths.

A Dynamo graph (torch >= 2.5) lifts parameters to placeholders; `nn.Linear` shows up as
``torch._C._nn.linear(x, w, b)`` and Hugging Face `Conv1D` as ``torch.addmm(b, x, w)`` with w
stored [in, out]. Graphs at the aten level (export) use aten.linear/addmm/mm with ``t(w)``.

Models also multiply by parameters directly: ``x @ w.T`` (recorded as ``getattr(w, "T")``),
``w.mT``, ``w.t()``, ``w.transpose(0, 1)``, ``w.permute(1, 0)``, ``torch.einsum("bsi,oi->bso", x, w)``,
and Mixture-of-Experts blocks multiply by 3-D expert parameters (``torch.bmm``, ``grouped_mm``,
``w[expert] @ ...``). `matmul_sites` finds every matmul that reads a parameter in one walk: the ones
a linear rewrite can take, and the others with the reason they stay float.
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
MM_TARGETS = {torch.mm, aten.mm.default}
MATMUL_TARGETS = {torch.matmul, operator.matmul, aten.matmul.default}
BMM_TARGETS = {torch.bmm, aten.bmm.default}
BADDBMM_TARGETS = {torch.baddbmm, aten.baddbmm.default}
EINSUM_TARGETS = {torch.einsum, aten.einsum.default}
# matmuls that no rewrite handles: found only to be reported when they read a parameter
OTHER_MATMUL_TARGETS = {torch.mv, torch.addmv, torch.addbmm, torch.tensordot, torch.inner, torch.dot,
                        torch.outer, torch.chain_matmul, torch.linalg.multi_dot, torch.nn.functional.bilinear,
                        aten.mv.default, aten.addmv.default, aten.addbmm.default}
_MATMUL_METHODS = {"matmul": "matmul", "__matmul__": "matmul", "mm": "mm", "bmm": "bmm"}
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
    weight_name: str | None = None  # the parameter's name in the module when it is not `weight`
    form: str = ""           # the matmul as written, e.g. "x @ weight.T", "einsum('bsi,oi->bso', x, w)"


@dataclass
class FloatMatmul:
    """A matmul against a parameter (or a >= 2-D buffer) that no rewrite handles, and why."""

    node: fx.Node
    params: tuple[fx.Node, ...]          # the placeholders the weight operand is computed from
    path: str
    weight_names: tuple[str | None, ...]  # per parameter, as in LinearSite.weight_name
    form: str
    reason: str
    in_features: int
    out_features: int


# --- Pattern: the weight operand ---------------------------------------------------------------
# Every node computed from parameters alone gets an _Origin: which parameters, the expression as
# the model wrote it, and (for a 2-D parameter) whether it is that parameter or its transpose.

_TRANSPOSES = {"t", "transpose", "swapaxes", "swapdims", "permute"}
_IDENTITIES = {"contiguous", "clone", "detach", "alias", "lift_fresh", "lift_fresh_copy"}
_CASTS = {"to", "_to_copy", "float", "half", "bfloat16", "double", "type", "type_as"}
# ops that read a part, a view or a copy of their first argument (other arguments: indices, sizes)
_FOLLOW = _TRANSPOSES | _IDENTITIES | _CASTS | {
    "getattr", "getitem", "__getitem__", "index", "index_select", "select", "slice", "narrow", "view",
    "reshape", "_unsafe_view", "expand", "expand_as", "flatten", "unflatten", "squeeze", "unsqueeze",
    "chunk", "split", "unbind", "movedim", "repeat", "gather", "take_along_dim"}


@dataclass(frozen=True)
class _Origin:
    params: tuple[fx.Node, ...]
    expr: str
    transposed: bool | None  # 2-D parameter: False = itself, True = its transpose; None = anything else


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return getattr(t, "__name__", str(t))


def _value(node) -> object:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _is_tensorish(node: fx.Node) -> bool:
    v = _value(node)
    return isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and v and isinstance(v[0], torch.Tensor))


def _weight_kind(node: fx.Node, values: dict | None) -> str | None:
    """"parameter", "buffer" (2-D or more: a weight kept as a buffer) or None for a placeholder."""
    v = values.get(node) if values is not None else None
    if v is None:
        v = _value(node)
    if isinstance(v, torch.nn.Parameter):
        return "parameter"
    src = source_name(node) or ""
    if isinstance(v, torch.Tensor) and v.dim() >= 2 and "._buffers[" in src:
        return "buffer"
    return None


def _swap_of(node: fx.Node) -> bool | None:
    """For a transpose-like node on a 2-D tensor: True if it swaps the two dimensions, False if it
    leaves them as they are, None if it does something else."""
    name, args = _target_name(node), list(node.args[1:])
    if name == "t":
        return True
    if name == "getattr":
        return True if args[0] in ("T", "mT") else None
    if name in ("transpose", "swapaxes", "swapdims"):
        dims = args or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
    elif name == "permute":
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = dims or list(node.kwargs.get("dims", ()))
    else:
        return None
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    if name == "permute":
        return {(1, 0): True, (0, 1): False}.get((dims[0] % 2, dims[1] % 2))
    return dims[0] % 2 != dims[1] % 2


def _step_expr(node: fx.Node, base: str) -> str:
    """`base` with `node`'s op applied, as the model wrote it: "gate_up_proj[...].transpose(-2, -1)"."""
    name, args = _target_name(node), node.args[1:]
    if name == "getattr":
        return f"{base}.{args[0]}"
    if name in ("getitem", "__getitem__", "index"):
        return f"{base}[...]"
    if name in _TRANSPOSES:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        return f"{base}.{name}({', '.join(map(str, dims))})"
    if name in _CASTS and (dtype := getattr(_value(node), "dtype", None)) is not None:
        return f"{base}.to({str(dtype).removeprefix('torch.')})"
    return f"{base}.{name}(...)"


def _origin(node: fx.Node, origins: dict, values: dict | None) -> _Origin | None:
    """How `node` is computed from parameters alone (None: it reads an activation, or is a matmul)."""
    if node.op == "placeholder":
        if _weight_kind(node, values) is None:
            return None
        return _Origin((node,), _param_name(node), False if _rank(node) == 2 else None)
    if node.op not in ("call_function", "call_method") or _matmul_kind(node) or not _is_tensorish(node):
        return None
    name = _target_name(node)
    first = node.args[0] if node.args else None
    if name in _FOLLOW:
        base = origins.get(first)
        if base is None:
            return None
        step = _step_expr(node, base.expr)
        if base.transposed is None:                  # already something other than W or W.T
            return _Origin(base.params, step, None)
        if name in _TRANSPOSES or name == "getattr":
            swap = _swap_of(node)
            return _Origin(base.params, step, None if swap is None else base.transposed ^ swap)
        if name in _IDENTITIES or (name in _CASTS and _same_dtype(node, first)):
            return base                              # the same values: still W or W.T
        return _Origin(base.params, step, None)
    inputs = [n for n in node.all_input_nodes if _is_tensorish(n)]
    if not inputs or any(n not in origins for n in inputs):
        return None
    params = tuple(dict.fromkeys(p for n in inputs for p in origins[n].params))
    return _Origin(params, f"{name}({', '.join(origins[n].expr for n in inputs)})", None)


def _same_dtype(a: fx.Node, b: fx.Node) -> bool:
    va, vb = _value(a), _value(b)
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device)


def _param_name(node: fx.Node) -> str:
    """A parameter as a report names it in an expression: "gate_up_proj", "q_proj.weight"."""
    src = source_name(node)
    if not src:
        return node.name
    parts = _clean_path(src).split(".")
    return ".".join(parts[-2:]) if parts[-1] in ("weight", "bias") else parts[-1]


# --- Pattern: the matmul ----------------------------------------------------------------------

def _matmul_kind(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return _MATMUL_METHODS.get(node.target)
    if node.op != "call_function":
        return None
    t = node.target
    for kind, targets in (("linear", LINEAR_TARGETS), ("addmm", ADDMM_TARGETS), ("mm", MM_TARGETS),
                          ("matmul", MATMUL_TARGETS), ("bmm", BMM_TARGETS), ("baddbmm", BADDBMM_TARGETS),
                          ("einsum", EINSUM_TARGETS)):
        if t in targets:
            return kind
    if t in OTHER_MATMUL_TARGETS:
        return "other"
    return "grouped_mm" if "grouped_mm" in _target_name(node) else None


_FORMS = {"linear": "F.linear({x}, {w})", "addmm": "torch.addmm(b, {x}, {w})", "mm": "torch.mm({x}, {w})",
          "matmul": "{x} @ {w}", "bmm": "torch.bmm({x}, {w})", "baddbmm": "torch.baddbmm(b, {x}, {w})",
          "grouped_mm": "grouped_mm({x}, {w}, offs)"}
_SUPPORTED = "only W, W.t(), W.T, W.mT, W.transpose(0, 1) and W.permute(1, 0) of a 2-D parameter are rewritten"


_ARG_NAMES = {"linear": ("input", "weight", "bias"), "addmm": ("input", "mat1", "mat2"),
              "baddbmm": ("input", "batch1", "batch2"), "mm": ("input", "mat2"), "bmm": ("input", "mat2"),
              "matmul": ("input", "other"), "grouped_mm": ("input", "weight")}


def _operands(node: fx.Node, kind: str):
    """(activation, weight operand, bias, other keyword args) of a matmul, positional or by name."""
    kw = dict(node.kwargs)
    names = _ARG_NAMES[kind]
    vals = [node.args[i] if i < len(node.args) else kw.pop(n, None) for i, n in enumerate(names)]
    if kind == "linear":
        return vals[0], vals[1], vals[2], kw
    if kind in ("addmm", "baddbmm"):
        return vals[1], vals[2], vals[0], kw
    return vals[0], vals[1], None, kw


def _einsum_contraction(x_sub: list, w_sub: list, out: list) -> tuple[str | None, str]:
    """("io" / "oi": the weight operand's layout, "") for a plain linear contraction, else (None, why)."""
    if len(w_sub) != 2 or "..." in w_sub:
        return None, f"the weight operand has subscripts {''.join(w_sub)!r}, not two letters"
    if len(set(x_sub)) != len(x_sub) or w_sub[0] == w_sub[1]:
        return None, "a repeated subscript takes a diagonal"
    shared = [s for s in w_sub if s in x_sub]
    if len(shared) != 1:
        return None, f"the weight shares {len(shared)} subscripts with the activation, not one"
    c = shared[0]
    o = w_sub[1] if w_sub[0] == c else w_sub[0]
    if x_sub[-1] != c:
        return None, f"it contracts {c!r}, which is not the activation's last dimension"
    if out != x_sub[:-1] + [o]:
        return None, (f"the output {''.join(out)!r} is not the activation's subscripts with {c!r} "
                      f"replaced by {o!r} at the end")
    return ("io" if w_sub[0] == c else "oi"), ""


def _einsum_features(eq, ops: list, i: int) -> tuple[int, int] | None:
    """(in, out) of operand `i` of an einsum: the sizes of its subscripts the others share, the rest."""
    if not isinstance(eq, str) or len(ops) != 2 or not (shape := shape_of(ops[i])):
        return None
    subs, _ = _einsum_subscripts(eq, 2)
    if subs is None or "..." in subs[i] or len(subs[i]) != len(shape):
        return None
    k = n = 1
    for s, size in zip(subs[i], shape):
        if s in subs[1 - i]:
            k *= size
        else:
            n *= size
    return k, n


def _einsum_subscripts(eq: str, n: int):
    """Tokenised subscripts of an einsum equation ("..." one token), implicit output filled in."""
    lhs, arrow, rhs = eq.replace(" ", "").partition("->")
    tok = lambda part: re.findall(r"\.\.\.|[A-Za-z]", part)
    ins = [tok(part) for part in lhs.split(",")]
    if len(ins) != n:
        return None, None
    if arrow:
        return ins, tok(rhs)
    flat = [t for s in ins for t in s if t != "..."]
    return ins, (["..."] if any("..." in s for s in ins) else []) + sorted(t for t in set(flat) if flat.count(t) == 1)


def matmul_sites(graph: fx.Graph, values: dict | None = None,
                 prefix: str = "") -> tuple[list[LinearSite], list[FloatMatmul]]:
    """Every matmul that reads a parameter, in graph order and in one walk: the ones a linear
    rewrite can take (`LinearSite`) and the others with the reason they stay float (`FloatMatmul`).

    `values` maps placeholders to the tensors Dynamo passed (parameters vs buffers; without it
    the placeholders' example values decide). `prefix`: the graph's root module path (`root_prefix`).
    """
    sites: list[LinearSite] = []
    floats: list[FloatMatmul] = []
    origins: dict[fx.Node, _Origin] = {}
    for node in graph.nodes:
        if (origin := _origin(node, origins, values)) is not None:
            origins[node] = origin
            continue
        kind = _matmul_kind(node)
        found = _classify(node, kind, origins, values, prefix) if kind else None
        if isinstance(found, LinearSite):
            sites.append(found)
        elif found is not None:
            floats.append(found)
    return sites, floats


def linear_sites(graph: fx.Graph, prefix: str = "", values: dict | None = None) -> list[LinearSite]:
    """Every matmul of an activation with a rewritable parameter weight, in graph order (`prefix`:
    the path of the graph's root module, see `root_prefix`)."""
    return matmul_sites(graph, values, prefix)[0]


# --- Check: which sites a linear rewrite can take ---------------------------------------------

_LABELS = {"bmm": "batched matmul (bmm)", "baddbmm": "batched matmul (baddbmm)", "matmul": "matmul",
           "grouped_mm": "grouped matmul (grouped_mm)"}


def _features(kind: str, shape, weight_first: bool = False) -> tuple[int, int]:
    """(in_features, out_features) of a weight operand of `shape` ([..., in, out] for x @ W)."""
    if not shape:
        return 0, 0
    if len(shape) == 1:
        return int(shape[0]), 1
    if kind in ("linear", "einsum") or weight_first:
        return int(shape[-1]), int(shape[-2])
    return int(shape[-2]), int(shape[-1])


def _classify(node: fx.Node, kind: str, origins: dict, values: dict | None, prefix: str):
    """A LinearSite if a linear rewrite can take this matmul, a FloatMatmul (with the reason) if it
    reads a parameter but cannot be rewritten, None if it reads no parameter."""

    def floating(origin: _Origin, form: str, reason: str, features: tuple[int, int]) -> FloatMatmul:
        path = _site_path(node, origin.params[0], prefix)[0]
        names = tuple(_site_path(node, q, prefix)[1] for q in origin.params)
        return FloatMatmul(node, origin.params, path, names, form, reason, *features)

    if kind == "einsum":
        return _classify_einsum(node, origins, values, floating, prefix)
    if kind == "other":
        found = [origins[n] for n in node.all_input_nodes if n in origins]
        if not found:
            return None
        name = _target_name(node)
        return floating(found[0], f"{name}(..., {found[0].expr}, ...)",
                        f"{name} against a parameter: no quantized op for {name}",
                        _features(kind, shape_of(found[0].params[0])))
    x, wop, bias, extra = _operands(node, kind)
    wo, xo = origins.get(wop), origins.get(x)
    if wo is None and xo is None:
        return None
    form = _FORMS[kind].format(x=xo.expr if xo else "x", w=wo.expr if wo else "x")
    if wo is not None and xo is not None:
        return floating(wo, form, "both operands are computed from parameters: no activation to feed a "
                        "quantized op", _features(kind, shape_of(wop)))
    if wo is None:
        features = _features(kind, shape_of(x), weight_first=True)
        if (why := _weight_blocker(xo, _LABELS.get(kind, kind), values)) is not None:
            return floating(xo, form, f"{why} (and the parameter is the first operand, W @ x)", features)
        return floating(xo, form, "the parameter is the first operand (W @ x): the quantized ops compute "
                        "x @ W.T with the activation first", features)
    features = _features(kind, shape_of(wop))
    if (why := _weight_blocker(wo, _LABELS.get(kind, kind), values)) is not None:
        return floating(wo, form, why, features)
    if extra:
        args = ", ".join(f"{k}={v}" for k, v in extra.items())
        return floating(wo, form, f"{kind} with {args}: the quantized op has no such argument", features)
    if kind in ("bmm", "baddbmm", "grouped_mm"):  # a 2-D weight here is a 2-D x 3-D or grouped product
        return floating(wo, form, f"{kind} against a 2-D parameter: no rewrite for {kind}", features)
    in_out = (kind != "linear") ^ wo.transposed   # x @ W reads W as [in, out], linear as [out, in]
    w = wo.params[0]
    return LinearSite(node, x, w, bias, in_out, *_site_path(node, w, prefix), form)


def _weight_blocker(wo: _Origin, label: str, values: dict | None) -> str | None:
    """Why the weight operand cannot feed a quantized op, or None: a 2-D parameter or its transpose."""
    if len(wo.params) > 1:
        names = ", ".join(_param_name(p) for p in wo.params)
        return (f"the weight {wo.expr} combines {len(wo.params)} parameters ({names}) in the graph: "
                "no rewrite for a weight computed at run time")
    p = wo.params[0]
    shape = list(shape_of(p) or ())
    via = f" as {wo.expr}" if wo.expr != _param_name(p) else ""
    if _weight_kind(p, values) == "buffer":
        return f"the weight {_param_name(p)} {shape} is a buffer, not an nn.Parameter: only parameters are quantized"
    if len(shape) >= 3:
        return (f"{label} against a {len(shape)}-D parameter {shape}{via} (stacked experts): no quantized op "
                "for stacked experts yet")
    if len(shape) < 2:
        return f"{label} against a {len(shape)}-D parameter {shape}{via}: a vector, not a weight matrix"
    if wo.transposed is None:
        return f"the weight operand is {wo.expr}, computed from the parameter {shape}: {_SUPPORTED}"
    return None


def _classify_einsum(node: fx.Node, origins: dict, values: dict | None, floating, prefix: str):
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    found = [(i, origins[o]) for i, o in enumerate(ops) if isinstance(o, fx.Node) and o in origins]
    if not found:
        return None
    i, wo = found[0]
    features = _einsum_features(eq, ops, i) or _features("einsum", shape_of(ops[i]))
    form = f"einsum({eq!r}, {', '.join(origins[o].expr if o in origins else 'x' for o in ops)})"
    if not isinstance(eq, str):
        return floating(wo, form, "einsum in sublist form: no rewrite", features)
    if len(ops) != 2:
        return floating(wo, form, f"einsum of {len(ops)} operands: only an activation times a parameter "
                        "is rewritten", features)
    if len(found) == 2:
        return floating(wo, form, "both operands are computed from parameters: no activation to feed a "
                        "quantized op", features)
    rank = len(shape_of(wo.params[0]) or ())
    if rank >= 3 and len(wo.params) == 1 and _weight_kind(wo.params[0], values) == "parameter":
        return floating(wo, form, f"einsum {eq!r} against a {rank}-D parameter {list(shape_of(wo.params[0]))}: "
                        "only an activation times a 2-D parameter, contracting the activation's last "
                        "dimension, is rewritten", features)
    if (why := _weight_blocker(wo, f"einsum {eq!r}", values)) is not None:
        return floating(wo, form, why, features)
    subs, out = _einsum_subscripts(eq, 2)
    if subs is None:
        return floating(wo, form, f"einsum {eq!r} does not match its 2 operands", features)
    layout, why = _einsum_contraction(subs[1 - i], subs[i], out)
    if layout is None:
        return floating(wo, form, f"einsum {eq!r} is not a plain linear contraction: {why}", features)
    x, w = ops[1 - i], wo.params[0]
    in_out = (layout == "io") ^ wo.transposed
    return LinearSite(node, x, w, None, in_out, *_site_path(node, w, prefix), form)


def _site_path(node: fx.Node, param: fx.Node, prefix: str) -> tuple[str, str | None]:
    """(module path, parameter name) of a matmul reading `param`.

    The path is the module that calls the matmul (the parameter's owner at the root, where Dynamo
    records no module stack). The name is None for the module's own `weight` (or a tied one read
    from elsewhere, like an lm_head tied to the embedding); otherwise the parameter's path inside
    the module ("gate_up_proj" of MoE experts, "decoder.weight" of a child), so that a module with
    several matmul parameters lists each.
    """
    src = source_name(param)
    full = _clean_path(src) if src else param.name
    owner, _, leaf = full.rpartition(".")
    if not node.meta.get("nn_module_stack"):
        return prefix + owner, None if leaf == "weight" else leaf
    mod = _module_path(node)
    inside = not mod or full.startswith(mod + ".")
    rel = full[len(mod) + 1:] if mod and inside else full
    if leaf == "weight" and (owner == mod or not inside):
        return prefix + mod, None
    return prefix + mod, rel


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


_INDEX_SELECT = {torch.index_select, torch.ops.aten.index_select.default}


def collective_counts(graph: fx.Graph) -> dict[str, int]:
    """The collectives a graph runs, by kind (``_c10d_functional`` ops other than wait_tensor), and
    its runtime permutes (``runtime_index``: index_select of an activation, act_order's gather)."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if n.op != "call_function" and n.op != "call_method":
            continue
        name = getattr(n.target, "_qualified_op_name", None) or str(getattr(n.target, "__name__", n.target))
        if n.op == "call_function" and "_c10d_functional" in str(name):
            kind = str(name).split("::")[-1].split(".")[0]
            if kind != "wait_tensor":
                counts[kind] = counts.get(kind, 0) + 1
        elif n.target in _INDEX_SELECT or n.target == "index_select":
            counts["runtime_index"] = counts.get("runtime_index", 0) + 1
    return counts
