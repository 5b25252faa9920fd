"""Rows and columns of a weight in any canonical format, as a weight of the same format.

Tensor parallelism and the TP-aware fold need three operations, exact on the integers:
- `take_rows(w, index)`: output channels in the order `index` (a shard: a range; the fold: a permutation);
- `take_columns(w, start, end)`: stored input columns ``start..end-1`` (a row-parallel shard); the
  range must hold whole quantization groups. The result has no act_order ``perm``: the caller
  feeds it ``x[..., w.perm[start:end]]`` (or an input already in that order);
- `regroup_columns(w, columns, size)`: the stored columns `columns`, regrouped as runs of equal
  length `size` per original group, padded (see the function).
A float weight is a plain ``[N, K]`` tensor here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .int4 import Int4Weight, pack_nibbles, unpack_nibbles
from .int8 import Int8Weight
from .lut import LutWeight
from .quik import QuikWeight


def take_rows(w, index: Tensor):
    """The output channels `index` (int tensor) of `w`, in that order."""
    index = index.to(torch.long)
    if isinstance(w, Tensor):
        return w.index_select(0, index.to(w.device)).contiguous()
    if isinstance(w, Int4Weight):
        return Int4Weight(*(t.index_select(0, index.to(t.device)).contiguous() for t in (w.qweight, w.scales, w.zeros)),
                          w.group_size, w.bits, w.perm)
    if isinstance(w, Int8Weight):
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device)).contiguous()  # noqa: E731
        return Int8Weight(pick(w.qweight), pick(w.scales), pick(w.zeros), w.group_size, w.perm)
    if isinstance(w, LutWeight):
        outliers = None
        if w.outliers is not None:
            rows, cols, vals = w.outliers
            new_row = torch.full((w.out_features,), -1, dtype=torch.long, device=rows.device)
            new_row[index.to(rows.device)] = torch.arange(index.numel(), device=rows.device)
            mapped = new_row[rows.long()]
            keep = mapped >= 0
            outliers = (mapped[keep].to(rows.dtype), cols[keep], vals[keep])
        return LutWeight(w.codes.index_select(0, index.to(w.codes.device)).contiguous(),
                         w.tables.index_select(0, index.to(w.tables.device)).contiguous(), w.bits, outliers)
    if isinstance(w, QuikWeight):
        raise NotImplementedError(
            "tensor parallelism does not shard QUIK weights yet: QUIK quantizes each token's activations "
            "over the whole input row, which a row-parallel shard does not see")
    raise TypeError(f"take_rows: no rule for {type(w).__name__}")


def _check_group_aligned(w, start: int, end: int) -> None:
    g = getattr(w, "group_size", None)
    if g and (start % g or end % g):
        raise ValueError(
            f"columns {start}..{end} of a {w.in_features}-wide layer split its quantization groups of {g}: "
            f"each shard needs a whole number of groups (in_features / world_size divisible by {g}). "
            "Use a world size that divides the group count, or quantize with a smaller group_size.")


def take_columns(w, start: int, end: int):
    """Stored input columns ``start..end-1`` of `w` (whole groups), without a perm (see the module doc)."""
    if isinstance(w, Tensor):
        return w[:, start:end].contiguous()
    if isinstance(w, (Int4Weight, Int8Weight)):
        _check_group_aligned(w, start, end)
    if isinstance(w, Int4Weight):
        if start % 2 or end % 2:
            raise ValueError(f"int4 columns {start}..{end}: shards must start and end on even columns (two codes a byte)")
        g0, g1 = start // w.group_size, end // w.group_size
        return Int4Weight(w.qweight[:, start // 2:end // 2].contiguous(), w.scales[:, g0:g1].contiguous(),
                          w.zeros[:, g0:g1].contiguous(), w.group_size, w.bits)
    if isinstance(w, Int8Weight):
        if w.group_size is None:
            scales, zeros = w.scales, w.zeros
        else:
            g0, g1 = start // w.group_size, end // w.group_size
            scales = w.scales[:, g0:g1].contiguous()
            zeros = None if w.zeros is None else w.zeros[:, g0:g1].contiguous()
        return Int8Weight(w.qweight[:, start:end].contiguous(), scales, zeros, w.group_size)
    if isinstance(w, LutWeight):
        if start % 2 or end % 2:
            raise ValueError(f"lut columns {start}..{end}: shards must start and end on even columns (two codes a byte)")
        outliers = None
        if w.outliers is not None:
            rows, cols, vals = w.outliers
            keep = (cols >= start) & (cols < end)
            outliers = (rows[keep], cols[keep] - start, vals[keep])
        return LutWeight(w.codes[:, start // 2:end // 2].contiguous(), w.tables, w.bits, outliers)
    return take_rows(w, torch.empty(0))  # raises the format's own error (QUIK)


def regroup_columns(w, columns: Tensor, size: int):
    """The stored columns `columns` (ascending) of a grouped int4/int8 weight, regrouped: each
    original group's members become consecutive new groups of `size` columns that repeat the
    group's scale and zero-point, the last one padded with code 0 (the caller feeds zeros there, so
    the pad codes never count). Returns (weight, slot): ``slot[i]`` is the new column of ``columns[i]``.

    This is how a row-parallel act_order layer keeps its own scales without the whole input: a
    rank's columns are scattered over every group, so each group's share becomes its own groups."""
    if not isinstance(w, (Int4Weight, Int8Weight)) or w.group_size is None:
        raise TypeError("regroup_columns applies to grouped int4/int8 weights")
    if size <= 0 or size % 2:
        raise ValueError(f"regroup_columns: size {size} must be even and positive")
    g = w.group_size
    group = columns // g
    counts = torch.bincount(group, minlength=w.in_features // g)
    chunks = (counts + size - 1) // size               # new groups per original group
    first_chunk = torch.cumsum(chunks, 0) - chunks
    rank_in_group = torch.arange(columns.numel(), device=columns.device) - (torch.cumsum(counts, 0) - counts)[group]
    slot = (first_chunk[group] + rank_in_group // size) * size + rank_in_group % size
    origin = torch.repeat_interleave(torch.arange(counts.numel(), device=columns.device), chunks)  # new group -> old
    n, new_k = w.out_features, int(chunks.sum()) * size
    pick = lambda t: None if t is None else t.index_select(1, origin.to(t.device)).contiguous()  # noqa: E731
    if isinstance(w, Int4Weight):
        codes = torch.zeros(n, new_k, dtype=torch.uint8, device=w.qweight.device)
        codes[:, slot] = unpack_nibbles(w.qweight)[:, columns]
        return Int4Weight(pack_nibbles(codes), pick(w.scales), pick(w.zeros), size, w.bits), slot
    q = torch.zeros(n, new_k, dtype=torch.int8, device=w.qweight.device)
    q[:, slot] = w.qweight[:, columns]
    return Int8Weight(q, pick(w.scales), pick(w.zeros), size), slot


def regrouped_bytes(counts: Tensor, size: int, rows: int, code_bits: int, group_bytes: int) -> int:
    """Bytes of `regroup_columns` at `size` for groups holding `counts` columns: codes and pads,
    plus `group_bytes` (scale and zero-point) per new group and row."""
    chunks = int(((counts + size - 1) // size).sum())
    return rows * chunks * (size * code_bits // 8 + group_bytes)


def file_slices(meta: dict, axis: str, start: int, end: int) -> dict[str, tuple] | None:
    """What to read of a layer's file tensors (qcompile's checkpoint layout, `meta` as saved) for
    output rows (axis="rows") or stored input columns (axis="cols") ``start..end-1``: a slice tuple
    per tensor name (absent: read whole), or None where the file layout does not slice that way
    (act_order columns, 3-bit dense lookup codes, sparse outliers, QUIK)."""
    fmt, group = meta.get("format"), meta.get("group_size")
    if fmt not in ("int4", "int8", "lut") or meta.get("outliers"):
        return None
    names = {"int4": ("qweight", "scales", "zeros"), "int8": ("qweight", "scales", "zeros"),
             "lut": ("codes", "tables")}[fmt]
    if axis == "rows":
        return {n: (slice(start, end),) for n in names}
    if meta.get("act_order") or (fmt == "lut" and meta.get("bits") == 3) or start % 2 or end % 2:
        return None
    if group and (start % group or end % group):
        return None
    packed = slice(start // 2, end // 2) if fmt in ("int4", "lut") else slice(start, end)
    out = {names[0]: (slice(None), packed)}
    if fmt != "lut" and group:
        out.update({n: (slice(None), slice(start // group, end // group)) for n in names[1:]})
    return out


def gptq_file_slices(bits: int, groups: int, in_features: int, axis: str, start: int, end: int) -> dict[str, tuple] | None:
    """What to read of a Hugging Face GPTQ layer's tensors (qweight [K·bits/32, N], qzeros
    [G, N·bits/32], scales [G, N], g_idx [K], bias [N]; groups in input order, no act_order) for
    output channels (axis="rows") or input features (axis="cols") ``start..end-1``: a slice tuple per
    tensor name (absent: read whole), or None where the packing does not split there (bounds not on
    32 codes, so that every width's words split, or inside a group). For "cols" the caller
    subtracts the first group's index from the g_idx it reads."""
    if start % 32 or end % 32:
        return None
    words = slice(start * bits // 32, end * bits // 32)
    if axis == "rows":
        return {"qweight": (slice(None), slice(start, end)), "scales": (slice(None), slice(start, end)),
                "qzeros": (slice(None), words), "bias": (slice(start, end),)}
    out = {"qweight": (words,), "g_idx": (slice(start, end),)}
    if groups > 1:
        size = in_features // groups
        if start % size or end % size:
            return None
        out |= {"scales": (slice(start // size, end // size),), "qzeros": (slice(start // size, end // size),)}
    return out
