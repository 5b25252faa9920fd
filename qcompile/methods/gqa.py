"""MHA -> GQA conversion: merge key/value heads into fewer shared heads (Ainslie et al. 2023).

    report = qcompile.convert_to_gqa(model, qcompile.GQAConfig(num_kv_heads=4, grouping="similarity"),
                                     calibration=[{"input_ids": ..., "attention_mask": ...}, ...])

Each attention layer's Hkv key/value heads are split into G groups of equal size; a group's new K
(and V) projection is the mean of its members' projection rows and biases (mean pooling, as the GQA
paper converts checkpoints). The query heads a merged head serves are made adjacent (q projection
rows and output projection columns permuted by head, which changes nothing by itself), and the
attention module is told its new group count (`num_key_value_groups`), so Hugging Face's attention
repeats the G heads (`repeat_kv`) or calls SDPA with enable_gqa, and the KV cache holds G heads.
Under `torch.compile(backend=qcompile)` the attention pass then reads the G heads in place.

Grouping:
  "contiguous"  heads [0, m), [m, 2m), ... (m = Hkv / G); needs no data.
  "similarity"  heads whose K and V outputs on calibration data are alike share a group. The cost of
                merging a set of heads by their mean is the spread of their outputs around that mean,
                sum_tokens sum_{i in g} ||x_i - mean_g||^2 = (1/m) sum_{i<j in g} ||x_i - x_j||^2
                (exactly what mean pooling loses on the calibration tokens, for K and V alike). So
                C[i, j] = ||K_i - K_j||^2 / E_K + ||V_i - V_j||^2 / E_V (E: mean head energy, so K and V
                weigh the same), computed from per-layer Gram matrices of the head outputs, and the
                grouping minimises sum_g sum_{i<j in g} C[i, j] over balanced partitions: a greedy
                agglomerative start (closest free pair, then grow by the head closest to the group), then
                pairwise swaps between groups while any lowers the cost; the contiguous partition is
                improved the same way, and the cheaper result is kept, so on the calibration data the
                similarity grouping never loses to the contiguous one. (Cosine similarity ignores the
                head norms, which mean pooling does not; the squared distance is its cost exactly.)
Merging (GQAConfig.merge):
  "mean"  the GQA paper's conversion (above); needs no data.
  "pca"   (opt-in, needs calibration) a group's m heads, stacked [m*D], are replaced by their top-D
          principal directions P on the calibration tokens (uncentred second moments, so biases too):
          merged head z = P^T x, member i ~ z P_i^T. The maps fold back exactly: the query heads of
          member i get q P_i (scores q.k_i ~ (q P_i).z), the output projection's columns O_h P_i. The
          best rank-D fit, so never worse than the mean on the calibration tokens. Under rotary
          embeddings (rotate_half layout) K maps must commute with RoPE: per frequency, the members'
          (x, y) pairs as complex numbers get a rank-1 complex fit (`_rope_basis`), still exact to fold.
Not handled (specific errors): fused qkv projections (GPT-2 c_attn, BLOOM query_key_value), per-head
key norms (Qwen3 k_norm: the mean of normalised keys is not the norm of the mean), attention
implementations that ignore `num_key_value_groups` (BERT's eager attention: load with sdpa).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations

import torch
from torch import nn


class GQAConversionError(ValueError):
    """The model (or one of its attention layers) cannot be converted as asked."""


@dataclass(frozen=True)
class GQAConfig:
    """MHA -> GQA conversion.

    Attributes:
        num_kv_heads: key/value heads per layer after conversion (divides the current count).
        grouping: "contiguous" or "similarity" (needs `calibration` in `convert_to_gqa`).
        merge: how a group's heads become one: "mean" (mean-pooled projections, the GQA paper's
            conversion) or "pca" (needs calibration): the group's K (V) outputs, stacked, are replaced
            by their best rank-head_dim approximation on the calibration tokens; the per-head maps back
            fold into the query (K) and output (V) projections. K is merged this way only in models
            without rotary embeddings (RoPE does not commute with those maps); V always.
        max_calibration_tokens: tokens per layer used for the statistics.
    """

    num_kv_heads: int
    grouping: str = "contiguous"
    merge: str = "mean"
    max_calibration_tokens: int = 16384

    def validate(self) -> None:
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 1:
            raise ValueError(f"GQAConfig(num_kv_heads={self.num_kv_heads!r}): use an integer >= 1")
        if self.grouping not in ("contiguous", "similarity"):
            raise ValueError(f"GQAConfig(grouping={self.grouping!r}): use 'contiguous' or 'similarity'")
        if self.merge not in ("mean", "pca"):
            raise ValueError(f"GQAConfig(merge={self.merge!r}): use 'mean' or 'pca'")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GQALayerReport:
    path: str
    q_heads: int
    kv_heads_before: int
    kv_heads_after: int
    groups: list[list[int]]           # old K/V heads merged into each new head
    cost: float | None = None         # calibration cost of the groups (None: no data)
    contiguous_cost: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class GQAReport:
    config: dict
    layers: list[GQALayerReport] = field(default_factory=list)
    kv_bytes_per_token_before: int = 0
    kv_bytes_per_token_after: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"GQA conversion {self.config}: KV cache {self.kv_bytes_per_token_before} -> "
                 f"{self.kv_bytes_per_token_after} bytes/token"]
        for x in self.layers:
            cost = "" if x.cost is None else f"  cost {x.cost:.4g} (contiguous {x.contiguous_cost:.4g})"
            lines.append(f"{x.path}: {x.kv_heads_before} -> {x.kv_heads_after} K/V heads, groups {x.groups}{cost}")
        return "\n".join(lines)


# --- finding attention layers -------------------------------------------------------------------------
@dataclass
class _Layer:
    path: str
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    head_dim: int

    @property
    def q_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim


_NAMES = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "k_proj", "v_proj", "out_proj"),
          ("query", "key", "value", None))


def attention_layers(model: nn.Module) -> list[_Layer]:
    """The attention modules with separate q/k/v/output linears that this conversion can rewrite."""
    modules = dict(model.named_modules())
    layers = []
    for path, mod in modules.items():
        for qn, kn, vn, on in _NAMES:
            q, k, v = (getattr(mod, n, None) for n in (qn, kn, vn))
            if not all(isinstance(x, nn.Linear) for x in (q, k, v)):
                continue
            if on is None:  # BERT: the output projection is <parent>.output.dense
                o = modules.get(path.rsplit(".", 1)[0] + ".output.dense") if "." in path else None
            else:
                o = getattr(mod, on, None)
            head_dim = getattr(mod, "head_dim", None) or getattr(mod, "attention_head_size", None)
            if not isinstance(o, nn.Linear) or not isinstance(head_dim, int):
                raise GQAConversionError(f"{path}: attention with {qn}/{kn}/{vn} but no output projection or "
                                         "head_dim found")
            if getattr(mod, "k_norm", None) is not None:
                raise GQAConversionError(f"{path}: per-head key norm (k_norm): mean-pooled projections would "
                                         "not pool the normalised keys")
            layers.append(_Layer(path, mod, q, k, v, o, head_dim))
            break
    if not layers:
        fused = [p for p, m in modules.items() if hasattr(m, "c_attn") or hasattr(m, "query_key_value")]
        detail = f" (fused qkv projection at {fused[0]})" if fused else ""
        raise GQAConversionError(f"{type(model).__name__}: no attention layer with separate q/k/v projections{detail}")
    return layers


# --- grouping -------------------------------------------------------------------------------------------
def contiguous_groups(heads: int, groups: int) -> list[list[int]]:
    m = heads // groups
    return [list(range(g * m, (g + 1) * m)) for g in range(groups)]


def grouping_cost(cost: torch.Tensor, groups: list[list[int]]) -> float:
    """sum over groups of sum_{i<j in g} cost[i, j]."""
    return float(sum(cost[i, j] for g in groups for i, j in combinations(g, 2)))


def _improve_by_swaps(cost: torch.Tensor, groups: list[list[int]]) -> list[list[int]]:
    groups = [list(g) for g in groups]
    while True:
        best, best_delta = None, -1e-12
        for a, b in combinations(range(len(groups)), 2):
            for i in groups[a]:
                for j in groups[b]:
                    ra = [x for x in groups[a] if x != i]
                    rb = [x for x in groups[b] if x != j]
                    delta = (sum(cost[j, x] for x in ra) + sum(cost[i, x] for x in rb)
                             - sum(cost[i, x] for x in ra) - sum(cost[j, x] for x in rb))
                    if delta < best_delta:
                        best, best_delta = (a, b, i, j), delta
        if best is None:
            return [sorted(g) for g in groups]
        a, b, i, j = best
        groups[a][groups[a].index(i)] = j
        groups[b][groups[b].index(j)] = i


def similarity_groups(cost: torch.Tensor, groups: int) -> list[list[int]]:
    """Balanced partition of heads into `groups` groups with low sum of in-group pairwise cost."""
    n = cost.shape[0]
    m = n // groups
    if m == 1 or groups == 1:
        return contiguous_groups(n, groups)
    cost = cost.double()
    free = set(range(n))
    greedy = []
    while free:
        pair = min(combinations(sorted(free), 2), key=lambda p: cost[p[0], p[1]].item())
        group = list(pair)
        free -= set(pair)
        while len(group) < m:
            h = min(sorted(free), key=lambda x: sum(cost[x, y].item() for y in group))
            group.append(h)
            free.remove(h)
        greedy.append(group)
    candidates = [_improve_by_swaps(cost, greedy), _improve_by_swaps(cost, contiguous_groups(n, groups))]
    best = min(candidates, key=lambda g: grouping_cost(cost, g))
    return sorted(best, key=min)


class _HeadStats:
    """Gram matrices of one layer's per-head K and V outputs over calibration tokens."""

    def __init__(self, heads: int, head_dim: int, limit: int, moments: bool = False):
        self.heads, self.head_dim, self.limit = heads, head_dim, limit
        self.gram = {"k": torch.zeros(heads, heads, dtype=torch.float64),
                     "v": torch.zeros(heads, heads, dtype=torch.float64)}
        # full second moments [H*D, H*D] (merge="pca" only: 2 * (H*D)^2 doubles per layer)
        n = heads * head_dim
        self.moment = {w: torch.zeros(n, n, dtype=torch.float64) for w in "kv"} if moments else None
        self.tokens = {"k": 0, "v": 0}

    def add(self, which: str, out: torch.Tensor, keep: torch.Tensor | None) -> None:
        x = out.detach().reshape(-1, self.heads, self.head_dim).double()
        if keep is not None:
            x = x[keep.reshape(-1)]
        x = x[: max(0, self.limit - self.tokens[which])]
        self.gram[which] += torch.einsum("thd,tgd->hg", x, x)
        if self.moment is not None:
            flat = x.reshape(x.shape[0], -1)
            self.moment[which] += flat.t() @ flat
        self.tokens[which] += x.shape[0]

    def cost(self) -> torch.Tensor:
        total = 0
        for g in self.gram.values():
            d = g.diagonal()
            dist = d[:, None] + d[None, :] - 2 * g     # sum_t ||x_i - x_j||^2
            total = total + dist / d.mean().clamp(min=1e-30)
        return total.clamp(min=0)


@torch.no_grad()
def _calibrate(model: nn.Module, layers: list[_Layer], calibration, limit: int,
               moments: bool = False) -> list[_HeadStats]:
    stats = [_HeadStats(x.kv_heads, x.head_dim, limit, moments) for x in layers]
    keep = {"mask": None}
    hooks = []
    for layer, st in zip(layers, stats):
        for which, lin in (("k", layer.k), ("v", layer.v)):
            hooks.append(lin.register_forward_hook(
                lambda mod, args, out, st=st, which=which: st.add(which, out, keep["mask"])))
    try:
        for batch in calibration:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            mask = batch.get("attention_mask")
            keep["mask"] = mask.bool() if mask is not None else None
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    if any(st.tokens["k"] == 0 for st in stats):
        raise GQAConversionError("calibration data reached no attention layer (empty calibration?)")
    return stats


# --- conversion -------------------------------------------------------------------------------------------
def _head_rows(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    return w.reshape(-1, head_dim, *w.shape[1:])


def _pca_basis(moment: torch.Tensor, members: list[int], d: int) -> torch.Tensor:
    """[m*d, d]: the top-d principal directions of the members' stacked outputs (uncentred, so biases
    are approximated too). Rows p*d:(p+1)*d map the merged head back to member p."""
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in members])
    _, vectors = torch.linalg.eigh(moment[idx][:, idx])
    return vectors[:, -d:].flip(-1)


def _rope_basis(moment: torch.Tensor, members: list[int], d: int) -> torch.Tensor:
    """Like `_pca_basis`, restricted to maps that commute with rotary embeddings (rotate_half pairs
    (j, j + d/2) rotate by one angle): per frequency j the members' pairs, as complex numbers
    k_a = x_a + i y_a, are fitted by k_a ~ u_a z with z = sum_a conj(u_a) k_a, u the top eigenvector
    of E[k k^H] (rank 1 over the group for each frequency). Multiplying by a complex number commutes
    with the rotation, so the query fold q -> conj(u_a) q is exact under RoPE."""
    half, m = d // 2, len(members)
    basis = torch.zeros(m * d, d, dtype=torch.float64)
    for j in range(half):
        xs = [h * d + j for h in members]
        ys = [h * d + j + half for h in members]
        mxx, myy = moment[xs][:, xs], moment[ys][:, ys]
        cross = moment[ys][:, xs] - moment[xs][:, ys]       # E[y_a x_b - x_a y_b]
        hermitian = torch.complex(mxx + myy, cross)          # E[k_a conj(k_b)]
        u = torch.linalg.eigh(hermitian)[1][:, -1]
        for a in range(m):
            ur, ui = u[a].real, u[a].imag
            basis[a * d + j, j], basis[a * d + j + half, j] = ur, ui
            basis[a * d + j, j + half], basis[a * d + j + half, j + half] = -ui, ur
    return basis


def _rotary(layer: _Layer) -> str | None:
    """None (no rotary embeddings), "rotate_half" (HF Llama convention, full head), or "other"."""
    import inspect
    import sys

    if "position_embeddings" not in inspect.signature(layer.module.forward).parameters:
        return None
    module = sys.modules.get(type(layer.module).__module__)
    config = getattr(layer.module, "config", None)
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    return "rotate_half" if hasattr(module, "rotate_half") and partial == 1.0 and layer.head_dim % 2 == 0 else "other"


@torch.no_grad()
def _merge(layer: _Layer, groups: list[list[int]], merge: str = "mean", stats: _HeadStats | None = None) -> list[str]:
    """Merge the K/V heads of `layer` by `groups` in place; returns notes (what was merged how)."""
    d, hq, hkv = layer.head_dim, layer.q_heads, layer.kv_heads
    reps = hq // hkv
    notes = []
    q_maps: dict[int, torch.Tensor] = {}  # original K/V head -> [d, d] map folded into its query heads
    o_maps: dict[int, torch.Tensor] = {}  # ... folded into the output projection
    rotary = _rotary(layer)
    for which, lin in (("k", layer.k), ("v", layer.v)):
        pca = merge == "pca" and not (which == "k" and rotary == "other")
        if merge == "pca" and not pca:
            notes.append("K mean-pooled (rotary embeddings of an unknown layout)")
        fit = _rope_basis if which == "k" and rotary == "rotate_half" else _pca_basis
        if merge == "pca" and fit is _rope_basis:
            notes.append("K merged per rotary frequency (complex rank-1 fit)")
        w = _head_rows(lin.weight, d).double()
        b = lin.bias.reshape(-1, d).double() if lin.bias is not None else None
        new_w, new_b = [], []
        for g in groups:
            if pca:
                basis = fit(stats.moment[which], g, d)                  # [m*d, d]
                new_w.append(basis.t() @ w[g].reshape(len(g) * d, -1))
                new_b.append(basis.t() @ b[g].reshape(-1) if b is not None else None)
                for p, h in enumerate(g):
                    (q_maps if which == "k" else o_maps)[h] = basis[p * d:(p + 1) * d]
            else:
                new_w.append(w[g].mean(0))
                new_b.append(b[g].mean(0) if b is not None else None)
        new = torch.cat(new_w).to(lin.weight.dtype)
        merged = nn.Linear(lin.in_features, new.shape[0], bias=b is not None, device=new.device, dtype=new.dtype)
        merged.weight.copy_(new)
        if b is not None:
            merged.bias.copy_(torch.cat(new_b).to(lin.bias.dtype))
        lin.weight, lin.bias, lin.out_features = merged.weight, merged.bias, new.shape[0]
    # fold the per-head maps: score q_h . k_i ~ (q_h P_i) . z;  output v_i ~ z P_i^T, so O_h -> O_h P_i
    q_w = _head_rows(layer.q.weight, d).double()
    q_b = layer.q.bias.reshape(hq, d).double() if layer.q.bias is not None else None
    o_w = layer.o.weight.reshape(layer.o.out_features, hq, d).double()
    for h in range(hq):
        i = h // reps
        if i in q_maps:
            q_w[h] = q_maps[i].t() @ q_w[h]
            if q_b is not None:
                q_b[h] = q_maps[i].t() @ q_b[h]
        if i in o_maps:
            o_w[:, h] = o_w[:, h] @ o_maps[i]
    # query heads served by each merged head, in order; the output projection's columns follow
    order = torch.tensor([h * reps + r for g in groups for h in g for r in range(reps)])
    layer.q.weight.copy_(q_w[order].reshape(hq * d, -1))
    if q_b is not None:
        layer.q.bias.copy_(q_b[order].reshape(-1))
    layer.o.weight.copy_(o_w[:, order].reshape(layer.o.out_features, -1))
    mod = layer.module
    mod.num_key_value_groups = hq // len(groups)
    if hasattr(mod, "num_key_value_heads"):
        mod.num_key_value_heads = len(groups)
    return notes


def kv_bytes_per_token(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes one token adds to the KV cache: K and V, every attention layer."""
    total = 0
    for layer in attention_layers(model):
        size = torch.empty((), dtype=dtype or layer.k.weight.dtype).element_size()
        total += 2 * layer.kv_heads * layer.head_dim * size
    return total


def convert_to_gqa(model: nn.Module, config: GQAConfig, calibration=None) -> GQAReport:
    """Merge each attention layer's K/V heads into `config.num_kv_heads` groups, in place.

    `calibration`: an iterable of model inputs (dicts of tensors, or input_ids tensors), needed for
    grouping="similarity"; padding tokens (attention_mask == 0) are left out of the statistics.
    """
    config.validate()
    layers = attention_layers(model)
    for x in layers:
        if x.kv_heads % config.num_kv_heads:
            raise GQAConversionError(f"{x.path}: {x.kv_heads} K/V heads cannot be split into "
                                     f"{config.num_kv_heads} equal groups")
    if (config.grouping == "similarity" or config.merge == "pca") and calibration is None:
        raise GQAConversionError(f"grouping={config.grouping!r}, merge={config.merge!r} needs calibration data "
                                 "(convert_to_gqa(..., calibration=...))")
    report = GQAReport(config.to_dict(), kv_bytes_per_token_before=kv_bytes_per_token(model))
    stats = _calibrate(model, layers, calibration, config.max_calibration_tokens, config.merge == "pca") \
        if calibration is not None else [None] * len(layers)
    for layer, st in zip(layers, stats):
        cost = st.cost() if st is not None else None
        before = layer.kv_heads
        contiguous = contiguous_groups(before, config.num_kv_heads)
        groups = similarity_groups(cost, config.num_kv_heads) if config.grouping == "similarity" else contiguous
        report.layers.append(GQALayerReport(
            layer.path, layer.q_heads, before, config.num_kv_heads, groups,
            None if cost is None else grouping_cost(cost, groups),
            None if cost is None else grouping_cost(cost, contiguous)))
        report.layers[-1].notes = _merge(layer, groups, config.merge, st)
    if hasattr(model, "config") and hasattr(model.config, "num_key_value_heads"):
        model.config.num_key_value_heads = config.num_kv_heads
    report.kv_bytes_per_token_after = kv_bytes_per_token(model)
    _check_runs(model)
    return report


@torch.no_grad()
def _check_runs(model: nn.Module) -> None:
    """One tiny forward: an attention implementation that ignores num_key_value_groups fails here."""
    try:
        device = next(model.parameters()).device
        model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device))
    except RuntimeError as e:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", "?")
        raise GQAConversionError(
            f"the converted model does not run with attn_implementation={impl!r} ({e}); its attention may not "
            "repeat K/V heads for num_key_value_groups: load the model with attn_implementation='sdpa'") from e
