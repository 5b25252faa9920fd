"""Attention pass: attention over repeated K/V heads becomes `qcompile::gqa_attention` on the shared heads.

Patterns (Dynamo graphs of Hugging Face models):
  sdpa      y = scaled_dot_product_attention(q, rep(k), rep(v), mask, 0.0, is_causal, scale[, enable_gqa])
  eager     y = matmul(P, rep(v)),  P = dropout0(to?(softmax(matmul(q, rep(k)^T) [* or / c] [+ mask], -1)))
  bloom     y = bmm(view(P), v3),   P as above on view(baddbmm(alibi, q3, k3^T, beta=1, alpha=c))
  rep(x)    Hugging Face `repeat_kv`: reshape(expand(x[:, :, None], B, Hkv, r, S, D), B, Hkv*r, S, D),
            or repeat_interleave(x, r, dim=1), or nothing (MHA, or SDPA's enable_gqa=True).
  alibi     to?(repeat(s[H,1,1] * pos[S], B, 1, 1)) or to?(reshape(s[H,1] * pos[B,1,S], B*H, 1, S)): BLOOM's
            bias slope[h] * pos[b, j] (pos: key index, or the cumsum of the padding mask).
Replacement:  y = qcompile::gqa_attention(q, k, v, mask, slopes, positions, scale, is_causal) on the
              un-repeated k, v; the repeat nodes die with their last user.
Guard: dropout off (p = 0 or not training), a numeric scale, the attention weights used only by the
       value matmul (not returned: output_attentions), head counts that divide, one dtype. A site that
       fails stays as it was and the report says why. MHA sites without ALiBi have nothing to gain and
       are kept unless AttentionConfig(mha="rewrite").
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompile.ops.attention import GQA_ATTENTION
from qcompile.report import AttentionReport

from .analysis import module_path, shape_of
from .context import PassContext
from .dead_code import erase_unused

aten = torch.ops.aten

SDPA_TARGETS = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention,
                aten.scaled_dot_product_attention.default}
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
MATMUL_TARGETS = {torch.matmul, operator.matmul, torch.bmm}
SOFTMAX_TARGETS = {torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax}
DROPOUT_TARGETS = {torch.nn.functional.dropout}
_MUL = {operator.mul, torch.mul}
_DIV = {operator.truediv, torch.div}
_ADD = {operator.add, torch.add}


class Unsupported(Exception):
    """An attention site the pass leaves alone; the message is the report's reason."""


@dataclass
class AttentionSite:
    """One attention computation, in the op's terms."""

    output: fx.Node              # the node whose value the op replaces
    q: fx.Node                   # [B, Hq, L, D]
    k: fx.Node                   # [B, Hkv, S, D] (un-repeated)
    v: fx.Node
    pattern: str
    kv_repeat: str
    mask: fx.Node | tuple | None = None    # a tuple: several additive terms, summed when inserted
    scale: float | None = None
    is_causal: bool = False
    alibi_slopes: fx.Node | None = None     # [H, 1, 1] or [H, 1] (reshaped to [H])
    alibi_positions: fx.Node | None = None  # [S] or [B, 1, S] (reshaped to [B|1, S])
    flatten_output: bool = False            # the replaced node is [B*H, L, Dv] (bloom)
    notes: list[str] = field(default_factory=list)


# --- small matchers ------------------------------------------------------------------------------
def _is_call(node, targets=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in targets
    return node.op == "call_method" and node.target in methods


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(node: fx.Node) -> list:
    """Integer dims given to expand/reshape/view/repeat (as varargs or one tuple)."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return list(dims)


def _static(x):
    return x if isinstance(x, int) else None


def _same(a, b) -> bool:
    """Equal sizes, comparing symbolic ones by expression (no shape guard is added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _shape(node) -> tuple | None:
    return shape_of(node) if isinstance(node, fx.Node) else None


def _dtype(node):
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _single_user(node: fx.Node) -> fx.Node:
    if len(node.users) != 1:
        raise Unsupported(f"attention weights ({node.name}) are used outside the attention "
                          "(output_attentions?): the op does not produce them")
    return next(iter(node.users))


def match_repeat_kv(node) -> tuple[fx.Node, int, str] | None:
    """(un-repeated source [B, Hkv, S, D], repeats, how) if `node` repeats K/V heads, else None."""
    if _is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
        reps = _arg(node, 1, "repeats")
        dim = _arg(node, 2, "dim")
        src = node.args[0]
        s = _shape(src)
        if isinstance(reps, int) and s is not None and len(s) == 4 and dim in (1, -3):
            return src, reps, "repeat_interleave"
        return None
    if not _is_call(node, (torch.reshape,), ("reshape", "view")):
        return None
    expand = node.args[0]
    if not _is_call(expand, (), ("expand",)):
        return None
    unsq = expand.args[0]
    src = None
    if _is_call(unsq, (operator.getitem,)) and isinstance(unsq.args[1], tuple):
        idx = unsq.args[1]
        full = slice(None, None, None)
        if len(idx) >= 3 and idx[0] == full and idx[1] == full and idx[2] is None and all(i == full for i in idx[3:]):
            src = unsq.args[0]
    elif _is_call(unsq, (torch.unsqueeze,), ("unsqueeze",)) and _arg(unsq, 1, "dim") in (2, -3):
        src = unsq.args[0]
    s_src, s_exp, s_out = _shape(src), _shape(expand), _shape(node)
    if src is None or s_src is None or len(s_src) != 4 or s_exp is None or len(s_exp) != 5 or s_out is None:
        return None
    hkv, reps = _static(s_exp[1]), _static(s_exp[2])
    if hkv is None or reps is None or hkv != _static(s_src[1]) or _static(s_out[1]) != hkv * reps:
        return None
    return src, reps, "expand+reshape"


def _unrepeat(node: fx.Node) -> tuple[fx.Node, str]:
    hit = match_repeat_kv(node)
    return (hit[0], hit[2]) if hit else (node, "none")


# --- pattern: SDPA --------------------------------------------------------------------------------
def _parse_sdpa(node: fx.Node) -> AttentionSite:
    args = {name: _arg(node, i, name) for i, name in enumerate(_SDPA_ARGS)}
    q, k, v = args["query"], args["key"], args["value"]
    dropout = args["dropout_p"] or 0.0
    if not isinstance(dropout, (int, float)) or dropout != 0:
        raise Unsupported(f"dropout_p={dropout}: the op has no dropout")
    causal = args["is_causal"] or False
    if not isinstance(causal, bool):
        raise Unsupported("is_causal is not a constant")
    scale = args["scale"]
    if scale is not None and not isinstance(scale, (int, float)):
        raise Unsupported("scale is not a constant")
    k_src, how_k = _unrepeat(k)
    v_src, how_v = _unrepeat(v)
    if how_k != how_v:
        raise Unsupported(f"K is repeated by {how_k} and V by {how_v}")
    enable_gqa = bool(args["enable_gqa"])
    if enable_gqa:
        if how_k != "none":
            raise Unsupported("enable_gqa=True on K/V that were repeated already")
        how_k = "enable_gqa"
    pattern = "sdpa(enable_gqa)" if enable_gqa else "sdpa"
    return AttentionSite(node, q, k_src, v_src, pattern, how_k, args["attn_mask"], scale, causal)


# --- pattern: matmul -> [scale] -> [+ mask] -> softmax -> [to] -> [dropout] -> matmul ----------------
def _is_last_dim(dim, rank: int | None) -> bool:
    return dim == -1 or (rank is not None and dim == rank - 1)


def _is_kt(node, rank: int) -> fx.Node | None:
    """x if node is x transposed on its last two dims."""
    if _is_call(node, (torch.transpose,), ("transpose",)):
        d = sorted(a % rank if isinstance(a, int) else a for a in node.args[1:3])
        if d == [rank - 2, rank - 1]:
            return node.args[0]
    return None


def _scores_chain(x: fx.Node):
    """Walk back from softmax's input: ([additive terms], scale or None, the raw-score node)."""
    terms, scale = [], None
    while True:
        if _is_call(x, _ADD, ("add", "__add__")) and len(x.args) == 2 and not x.kwargs:
            a, b = x.args
            # the score side is the operand that leads to the matmul; the other is an additive term
            if _leads_to_scores(a):
                terms.append(b)
                x = a
            elif _leads_to_scores(b):
                terms.append(a)
                x = b
            else:
                raise Unsupported("softmax input is a sum with no q @ k^T in it")
            continue
        if _is_call(x, _MUL | _DIV, ("mul", "div", "__mul__", "__truediv__")) and len(x.args) == 2 and not x.kwargs:
            a, b = x.args
            const, other = (b, a) if not isinstance(b, fx.Node) else (a, b)
            if isinstance(const, fx.Node):
                raise Unsupported("scores are scaled by a tensor, not a constant")
            if scale is not None:
                raise Unsupported("scores are scaled twice")
            divide = _is_call(x, _DIV, ("div", "__truediv__"))
            if divide and const is a:
                raise Unsupported("constant divided by the scores")
            scale = 1.0 / const if divide else float(const)
            x = other
            continue
        return terms, scale, x


def _leads_to_scores(x, depth: int = 8) -> bool:
    """Whether x is q @ k^T, possibly scaled, shifted or reshaped (the score side of an add)."""
    if depth == 0 or not isinstance(x, fx.Node):
        return False
    if _is_call(x, MATMUL_TARGETS | {torch.baddbmm}, ("matmul", "bmm", "baddbmm", "__matmul__")):
        return True
    if _is_call(x, _MUL | _DIV | _ADD, ("mul", "div", "add", "__mul__", "__truediv__", "__add__")):
        return any(_leads_to_scores(a, depth - 1) for a in x.args[:2])
    if _is_call(x, (torch.reshape,), ("view", "reshape")):
        return _leads_to_scores(x.args[0], depth - 1)
    return False


def _after_softmax(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """From softmax to the value matmul: (the matmul node, the node feeding it)."""
    x = node
    while True:
        user = _single_user(x)
        if _is_call(user, (), ("to", "type", "float", "half", "bfloat16")):
            x = user
            continue
        if _is_call(user, DROPOUT_TARGETS):
            p = _arg(user, 1, "p", 0.5)
            training = _arg(user, 2, "training", True)
            if not (p == 0 or training is False):
                raise Unsupported(f"attention dropout p={p} in training mode: the op has no dropout")
            x = user
            continue
        if _is_call(user, (), ("view", "reshape")) or _is_call(user, (torch.reshape,)):
            x = user
            continue
        if _is_call(user, MATMUL_TARGETS, ("matmul", "bmm", "__matmul__")) and user.args[0] is x:
            return user, x
        raise Unsupported(f"softmax output reaches {user.format_node()[:80]} rather than a matmul with V")


def _parse_eager(softmax: fx.Node) -> AttentionSite:
    rank = len(_shape(softmax) or ())
    dim = _arg(softmax, 1, "dim")
    if not _is_last_dim(dim, rank):
        raise Unsupported(f"softmax over dim {dim}, not the last")
    terms, scale, raw = _scores_chain(softmax.args[0])
    pv, _ = _after_softmax(softmax)
    if _is_call(raw, (), ("view", "reshape")) and _is_call(raw.args[0], (torch.baddbmm,), ("baddbmm",)):
        return _parse_bloom(softmax, raw.args[0], terms, scale, pv)
    if not _is_call(raw, MATMUL_TARGETS, ("matmul", "__matmul__")) or rank != 4:
        raise Unsupported("softmax input does not come from a 4-D q @ k^T")
    q, kt = raw.args[:2]
    k = _is_kt(kt, 4)
    if k is None:
        raise Unsupported("the key operand is not k transposed on its last two dims")
    k_src, how_k = _unrepeat(k)
    v_src, how_v = _unrepeat(pv.args[1])
    if how_k != how_v:
        raise Unsupported(f"K is repeated by {how_k} and V by {how_v}")
    site = AttentionSite(pv, q, k_src, v_src, "eager matmul-softmax-matmul", how_k, scale=1.0 if scale is None else scale)
    site.mask = _sum_terms(terms)
    return site


def _sum_terms(terms: list):
    """The additive mask: None, one node, or a tuple of nodes that `_insert` sums before the op."""
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]
    return tuple(terms)  # several: summed when the op is inserted


def _source_4d(node: fx.Node, bh: int | None) -> fx.Node:
    """x [B, H, T, D] if node is x reshaped to [B*H, T, D]."""
    if _is_call(node, (torch.reshape,), ("reshape", "view")):
        src = node.args[0]
        s = _shape(src)
        if s is not None and len(s) == 4 and bh is not None and _static(s[0]) is not None and _static(s[1]) is not None \
                and s[0] * s[1] == bh:
            return src
    raise Unsupported("bmm operands are not [batch*heads, seq, head_dim] views of 4-D tensors")


def _parse_bloom(softmax, baddbmm: fx.Node, terms, scale, pv: fx.Node) -> AttentionSite:
    if scale is not None:
        raise Unsupported("scores scaled both inside and after baddbmm")
    bias, q3, kt3 = (_arg(baddbmm, 0, "input") if baddbmm.op == "call_function" else baddbmm.args[0],
                     _arg(baddbmm, 1, "batch1"), _arg(baddbmm, 2, "batch2"))
    beta, alpha = baddbmm.kwargs.get("beta", 1), baddbmm.kwargs.get("alpha", 1)
    if beta != 1 or not isinstance(alpha, (int, float)):
        raise Unsupported(f"baddbmm with beta={beta}, alpha={alpha}: expected beta=1 and a constant alpha")
    bh = _static((_shape(q3) or (None,))[0])
    k3 = _is_kt(kt3, 3)
    if k3 is None:
        raise Unsupported("baddbmm's second batch is not k transposed")
    q = _source_4d(q3, bh)
    k_src, how_k = _unrepeat(_source_4d(k3, bh))
    v_src, how_v = _unrepeat(_source_4d(pv.args[1], bh))
    if how_k != how_v:
        raise Unsupported(f"K is repeated by {how_k} and V by {how_v}")
    heads = _static(_shape(q)[1])
    site = AttentionSite(pv, q, k_src, v_src, "bloom baddbmm-softmax-bmm", how_k, scale=float(alpha),
                         flatten_output=True)
    site.mask = _sum_terms(terms)
    alibi = match_alibi(bias, heads)
    if alibi is None:
        raise Unsupported("baddbmm's bias is not an ALiBi construction (slope[h] * position)")
    site.alibi_slopes, site.alibi_positions = alibi
    if _dtype(bias) not in (None, torch.float32):
        site.notes.append(f"ALiBi bias computed in float32 (the model rounds it to {_dtype(bias)})")
    return site


def match_alibi(bias: fx.Node, heads: int | None) -> tuple[fx.Node, fx.Node] | None:
    """(slopes, positions) if `bias` [B*H, 1, S] is slope[h] * pos[b, j] built as BLOOM builds it."""
    x = bias
    while _is_call(x, (), ("to", "type", "contiguous")):
        x = x.args[0]
    if _is_call(x, (), ("repeat",)):
        rep, x = _dims(x), x.args[0]
        if len(rep) != 3 or rep[1:] != [1, 1]:
            return None
        layout = "heads-first"      # [H, 1, S] repeated over the batch: index b*H + h
    elif _is_call(x, (torch.reshape,), ("reshape", "view")):
        x = x.args[0]
        layout = "batch-first"      # [B, H, S] flattened: index b*H + h
    else:
        return None
    if not _is_call(x, _MUL, ("mul", "__mul__")) or len(x.args) != 2:
        return None
    for s, p in (x.args, x.args[::-1]):
        ss, ps = _shape(s), _shape(p)
        if ss is None or ps is None or _static(ss[0]) != heads:
            continue
        if layout == "heads-first" and ss[1:] == (1, 1) and len(ps) == 1:
            return s, p
        if layout == "batch-first" and ss[1:] == (1,) and len(ps) == 3 and ps[1] == 1:
            return s, p
    return None


# --- the pass ----------------------------------------------------------------------------------------
def _heads(site: AttentionSite) -> tuple[int | None, int | None, int | None]:
    qs, ks = _shape(site.q), _shape(site.k)
    if qs is None or ks is None or len(qs) != 4 or len(ks) != 4:
        return None, None, None
    return _static(qs[1]), _static(ks[1]), _static(qs[3])


def _repeated_bytes(site: AttentionSite, hq: int, hkv: int) -> int | None:
    ks, vs = _shape(site.k), _shape(site.v)
    if site.kv_repeat in ("none", "enable_gqa") or hq == hkv:
        return 0 if site.kv_repeat == "none" else None
    elem = site.k.meta["example_value"].element_size() if "example_value" in site.k.meta else 4
    sizes = [ks[0], hq, ks[2], ks[3], vs[3]]
    if not all(isinstance(d, int) for d in sizes):
        return None
    return elem * ks[0] * hq * ks[2] * (ks[3] + vs[3])


def _decide(site: AttentionSite, ctx: PassContext) -> str | None:
    """Why the site stays as it is, or None to rewrite it."""
    hq, hkv, d = _heads(site)
    if hq is None or hkv is None:
        return "q/k shapes unknown or not 4-D [batch, heads, seq, head_dim]"
    if hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} K/V heads"
    dtypes = {_dtype(site.q), _dtype(site.k), _dtype(site.v)}
    if len(dtypes) != 1 or None in dtypes:
        return f"q, k, v dtypes differ or are unknown: {sorted(map(str, dtypes))}"
    if site.mask is not None and not isinstance(site.mask, tuple):
        md = _dtype(site.mask)
        if md is not None and md != torch.bool and not md.is_floating_point:
            return f"mask dtype {md} is neither bool nor float"
    out, vs, qs = _shape(site.output), _shape(site.v), _shape(site.q)
    expected = ((qs[0] * hq, qs[2]) if site.flatten_output else (qs[0], hq, qs[2])) + (vs[3],)
    if out is None or len(out) != len(expected) or not all(_same(a, b) for a, b in zip(out, expected)):
        return f"the value matmul's output {out} is not [batch, heads, q_len, head_dim] of q and v"
    if hq == hkv and site.alibi_slopes is None and ctx.attention.mha == "keep":
        return "multi-head (Hq == Hkv), no ALiBi: no repeated K/V to remove; left to SDPA/Inductor"
    return None


def _describe(site: AttentionSite, hq: int, hkv: int) -> str:
    if site.kv_repeat == "enable_gqa":
        return (f"already GQA-native (HF calls SDPA with enable_gqa=True); now the op: {hq}/{hkv} heads, "
                "each K/V head read in place on every device")
    if site.kv_repeat != "none":
        return f"{hkv} K/V heads read in place by {hq} query heads (was {site.kv_repeat} to {hq} heads)"
    if site.alibi_slopes is not None:
        return "ALiBi from per-head slopes (no [B*H, 1, S] bias read)" + ("" if hq == hkv else f"; {hq}/{hkv} heads")
    return "multi-head attention through the op (AttentionConfig(mha='rewrite'))"


def _insert(graph: fx.Graph, site: AttentionSite) -> fx.Node:
    with graph.inserting_before(site.output):
        mask = site.mask
        if isinstance(mask, tuple):
            total = mask[0]
            for t in mask[1:]:
                total = graph.call_function(operator.add, (total, t))
            mask = total
        slopes = positions = None
        if site.alibi_slopes is not None:
            slopes = graph.call_method("reshape", (site.alibi_slopes, -1))
            p = site.alibi_positions
            positions = graph.call_method("reshape", (p, 1, -1) if len(_shape(p)) == 1 else (p, _shape(p)[0], -1))
        out = graph.call_function(GQA_ATTENTION, (site.q, site.k, site.v, mask, slopes, positions, site.scale,
                                                  site.is_causal))
        if site.flatten_output:
            out = graph.call_function(torch.flatten, (out, 0, 1))
    site.output.replace_all_uses_with(out)
    return out


def rewrite_attention(gm: fx.GraphModule, ctx: PassContext) -> str:
    """Rewrite each accepted attention site of `gm`; returns a one-line summary."""
    graph = gm.graph
    candidates = [n for n in graph.nodes if _is_call(n, SDPA_TARGETS) or _is_call(n, SOFTMAX_TARGETS, ("softmax",))]
    rewritten = native = 0
    repeats: list[fx.Node] = []
    replaced: list[fx.Node] = []
    for node in candidates:
        path = module_path(node, prefix=ctx.path_prefix)
        pattern = "sdpa" if _is_call(node, SDPA_TARGETS) else "eager matmul-softmax-matmul"
        try:
            site = _parse_sdpa(node) if pattern == "sdpa" else _parse_eager(node)
        except Unsupported as e:
            ctx.report.attention.append(AttentionReport(path, pattern, None, None, None, "?", None, str(e)))
            continue
        hq, hkv, d = _heads(site)
        reason = _decide(site, ctx)
        record = AttentionReport(path, site.pattern, hq, hkv, d, site.kv_repeat, None, reason or "",
                                 list(site.notes))
        ctx.report.attention.append(record)
        if reason is not None:
            continue
        _insert(graph, site)
        replaced.append(site.output)
        record.op = str(GQA_ATTENTION.name())
        record.reason = _describe(site, hq, hkv)
        record.repeated_kv_bytes = _repeated_bytes(site, hq, hkv)
        rewritten += 1
        native += site.kv_repeat == "enable_gqa"
        if site.kv_repeat in ("expand+reshape", "repeat_interleave"):
            repeats.append((record, site))
    erase_unused(graph, replaced)
    for record, site in repeats:  # a repeat that another node still reads is still made
        alive = [u for src in (site.k, site.v) for u in src.users if match_repeat_kv(u) is not None]
        if alive:
            record.notes.append(f"repeated K/V still made for another user ({alive[0].name})")
    gm.recompile()
    kept = len(candidates) - rewritten
    return (f"{len(candidates)} attention sites: {rewritten} rewritten to {GQA_ATTENTION.name()}"
            f" ({native} already GQA-native), {kept} kept")


def repeated_kv_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes that repeat K/V heads (what the pass removes); for tests and the report."""
    return [n for n in graph.nodes if match_repeat_kv(n) is not None]

