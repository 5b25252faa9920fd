"""GPTQ (Frantar et al., ICLR 2023): quantize a linear layer's weight one input column at a time
and push each column's rounding error onto the columns not yet quantized, through the inverse
Hessian of the layer's calibration inputs, so that ||W X - Q X|| stays small where it matters.

Follows the reference code (IST-DASLab/gptq, ``gptq.py`` and ``quant.py``): float32 Hessian
H = 2 X Xᵀ as a running mean; dead inputs (diag 0) get H[d, d] = 1 and W[:, d] = 0; damping
``damp_percent · mean(diag H)``; the upper Cholesky factor of H⁻¹; lazy blocks of 128 columns;
act_order (columns in order of decreasing diag H), with or without static groups; the min/max
grid with integer zero-point and its optional clip search (shrink the range by p = 1 - i/100,
i < 80, keep the lowest Σ|q - w|^2.4). Where we differ, it is on purpose:

- A group's grid (without static_groups) is fitted on its columns as the column-by-column
  algorithm has updated them. The reference reads them from W, which lags behind the updates made
  inside the current lazy block; the two agree when groups start at block starts.
- Symmetric grids span [-max|w|, max|w|] on every row. The reference keeps xmin = 0 on a row with
  no negative weight, which then clips its positive half at 7/15 of the maximum (4 bits).
- Grids are fitted after dead inputs are zeroed (a weight on an input that is always zero cannot
  matter), and scales are rounded to their storage dtype before use, so the error feedback sees
  the values that are saved.
- If the Cholesky factorisation fails, the damping is raised ×10 (up to `MAX_DAMP_RAISES` times)
  and the damping actually used is returned, instead of failing.
- H is a mean over tokens (the reference counts sequences); its scale cancels in every step.

Output: codes 0..2^bits-1 with scales/zeros per group (`GPTQResult`), turned into
`qcompile.formats.Int4Weight` (bits 2-4) or the grouped `Int8Weight` (bits 8) by `to_format`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import per_channel_as_none
from ..formats import Int4Weight, Int8Weight, pack_nibbles
from .threads import threads

BITS = (2, 3, 4, 8)
MAX_DAMP_RAISES = 5
ZERO_DTYPE = torch.float16  # zero-points are small integers (in code units): exact in fp16
CLIP_NORM, CLIP_GRID, CLIP_MAX_SHRINK = 2.4, 100, 0.8
CLIP_CHUNK_ELEMENTS = 1 << 20  # shrink factors tried at once: keeps the [P, R, C] trials in cache


class Hessian:
    """Running mean of 2·x xᵀ over a layer's calibration tokens, in float32 (the reference's update)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)  # per input channel (QUIK)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, self.h.shape[0]).to(self.h)
        b = x.shape[0]
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        self.h *= self.tokens / (self.tokens + b)
        self.tokens += b
        x = x * math.sqrt(2 / self.tokens)
        self.h.addmm_(x.t(), x)


@dataclass
class InverseHessian:
    """What GPTQ needs from a layer's inputs. Layers that read the same input share one, and so
    one act_order permutation (which lets a backend fuse q/k/v into one matmul)."""

    hinv: Tensor            # upper Cholesky factor of the damped H⁻¹, in `perm` order [K, K]
    perm: Tensor | None     # act_order: input channels by decreasing diag(H); None: identity
    dead: Tensor            # bool [K]: inputs that were always zero
    damp_percent: float     # damping actually used, as a fraction of mean(diag H)
    damp_requested: float

    @property
    def damp_raised(self) -> bool:
        return self.damp_percent != self.damp_requested


def invert(h: Tensor, *, act_order: bool, damp_percent: float = 0.01, name: str = "layer") -> InverseHessian:
    """Dead inputs, act_order permutation, damping (raised ×10 while Cholesky fails), and the upper
    Cholesky factor of H⁻¹. Computes in h's dtype (float32 from `Hessian`; float64 for tests)."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: Hessian must be square, got {tuple(h.shape)}")
    if not torch.isfinite(h).all():
        raise ValueError(f"{name}: the Hessian of its calibration inputs has NaN/Inf values "
                         "(the inputs overflowed): check the model in float and the calibration data")
    h = h.clone()
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1
    perm = None
    if act_order:
        perm = torch.argsort(diag, descending=True, stable=True)
        h = h[perm][:, perm]
    mean_diag = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    # The reference takes cholesky(cholesky_inverse(cholesky(H)), upper=True). The same factor in
    # one factorisation and one triangular solve: with J the reversal, if J H J = M Mᵀ (M lower),
    # then H = R Rᵀ with R = J M J upper, H⁻¹ = R⁻ᵀ R⁻¹, and the upper Cholesky factor of H⁻¹ is
    # R⁻¹ = J M⁻¹ J.
    flipped = h.flip(0, 1)
    damp = damp_percent
    for _ in range(MAX_DAMP_RAISES + 1):
        low, info = torch.linalg.cholesky_ex(flipped + damp * mean_diag * eye)
        if info.item() == 0:
            upper = torch.linalg.solve_triangular(low, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper.diagonal()).all():
                return InverseHessian(upper, perm, dead, damp, damp_percent)
        damp *= 10
    raise RuntimeError(f"{name}: Cholesky of the Hessian failed even with damping raised to "
                       f"{damp / 10:g} x mean(diag): the calibration inputs of this layer are degenerate")


def fit_grid(w: Tensor, bits: int, sym: bool, *, clip_search: bool = False,
             scale_dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(scale, zero) [R, 1] of each row of `w` [R, C]: min/max range widened to hold 0, integer
    zero-point (2^(bits-1) if sym); the scale rounded to `scale_dtype`, returned in w's dtype."""
    maxq = 2**bits - 1
    lo = w.amin(dim=1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=1, keepdim=True).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)

    def grid(lo, hi):
        s = (hi - lo) / maxq
        z = torch.full_like(s, (maxq + 1) // 2) if sym else torch.round(-lo / s)
        return s, z

    scale, zero = grid(lo, hi)
    if clip_search:  # the reference's loop over shrink factors, a chunk of factors at a time
        shrinks = 1 - torch.arange(int(CLIP_MAX_SHRINK * CLIP_GRID), dtype=w.dtype, device=w.device) / CLIP_GRID
        best = torch.full_like(scale, float("inf"))
        step = max(1, CLIP_CHUNK_ELEMENTS // max(w.numel(), 1))
        for p in shrinks.split(step):
            s, z = grid(p[:, None, None] * lo, p[:, None, None] * hi)            # [P, R, 1]
            # |s (clamp(round(w/s) + z) - z) - w|^2.4 = s^2.4 |clamp(round(u), -z, maxq - z) - u|^2.4, u = w/s
            u = w / s                                                             # [P, R, C]
            e = torch.round(u).clamp_(-z, maxq - z).sub_(u).abs_()
            e = e.log_().mul_(CLIP_NORM).exp_()  # e^2.4: twice as fast as pow_ on CPU (0 stays 0)
            err, i = (e.sum(dim=2, keepdim=True) * s.pow(CLIP_NORM)).min(dim=0)
            s, z = s.gather(0, i[None]).squeeze(0), z.gather(0, i[None]).squeeze(0)  # first minimum
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    scale = scale.to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.finfo(scale_dtype).tiny)  # an underflow in fp16
    return scale.to(w.dtype), zero


@dataclass
class GPTQResult:
    """A quantized weight as GPTQ leaves it: w = scales·(codes − zeros) per group.

    Codes are in storage order: ``codes[:, j]`` is input ``perm[j]`` when `perm` is set (act_order
    with groups fitted in that order, so groups are contiguous in storage), else input j."""

    codes: Tensor   # [N, K] integral floats, 0..2^bits-1 ([N, K - float_columns] with float columns)
    scales: Tensor  # [N, K // group_size] in the storage dtype
    zeros: Tensor   # [N, K // group_size] integral, fp16
    group_size: int
    bits: int
    perm: Tensor | None = None
    damp_percent: float | None = None
    float_tail: Tensor | None = None  # [N, float_columns]: the last columns, kept float (QUIK's outliers)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [N, K] in the layer's own input order."""
        s = self.scales.to(dtype).repeat_interleave(self.group_size, dim=1)
        z = self.zeros.to(dtype).repeat_interleave(self.group_size, dim=1)
        w = s * (self.codes.to(dtype) - z)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


def _check(weight: Tensor, bits: int, group_size: int | None) -> int:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got {tuple(weight.shape)}")
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported: use one of {BITS}")
    k = weight.shape[1]
    g = group_size or k
    if k % g:
        raise ValueError(f"group_size {g} does not divide in_features {k}")
    return g


def gptq_quantize(weight: Tensor, inv: InverseHessian, *, bits: int = 4, group_size: int | None = 128,
                  sym: bool = True, static_groups: bool = False, clip_search: bool = False,
                  block_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16,
                  float_columns: int = 0) -> GPTQResult:
    """Quantize `weight` [N, K] given its layer's `InverseHessian` (see `invert`).

    group_size None (or -1): one grid per output row, fitted up front. static_groups: every group's grid
    is fitted up front on the original column blocks (input i is in group i // group_size, and
    the codes are stored in the layer's order). Otherwise a group's grid is fitted when the loop
    reaches its first column, in act_order order if `inv.perm` is set.

    float_columns: the last columns (in the order of `weight`; `inv` without act_order) are not
    quantized but take the error feedback of the others (QUIK's outlier columns), returned in
    `float_tail`; groups and the per-channel grid cover the quantized columns only.

    Works on Wᵀ (one input column = one contiguous row), which keeps the per-column rank-1
    update a fast contiguous BLAS call."""
    group_size = per_channel_as_none(group_size)
    n, k = weight.shape
    if float_columns and inv.perm is not None:
        raise ValueError("gptq_quantize: float_columns needs the columns in working order (no act_order perm)")
    k_int = k - float_columns
    g = _check(weight[:, :k_int], bits, group_size)
    if inv.hinv.shape != (k, k):
        raise ValueError(f"inverse Hessian is {tuple(inv.hinv.shape)}, weight has {k} inputs")
    maxq = 2**bits - 1
    hinv, perm = inv.hinv, inv.perm
    w = weight.detach().to(hinv.dtype).clone()
    w[:, inv.dead] = 0
    ngroups = k_int // g
    fit = lambda cols: fit_grid(cols, bits, sym, clip_search=clip_search, scale_dtype=scale_dtype)  # noqa: E731
    upfront = group_size is None or static_groups
    if upfront:
        s, z = fit(w[:, :k_int].reshape(n * ngroups, g))
        scales, zeros = s.reshape(n, ngroups).t().contiguous(), z.reshape(n, ngroups).t().contiguous()
        # the group of each working column: its original input's block
        col_group = ((perm if perm is not None else torch.arange(k, device=w.device)) // g).tolist()
    else:
        scales, zeros = w.new_empty(ngroups, n), w.new_empty(ngroups, n)
        col_group = [j // g for j in range(k)]
    wt = (w.t() if perm is None else w.t()[perm]).contiguous()  # [K, N], rows in working order
    del w
    q_all = torch.empty_like(wt[:k_int])
    for i1 in range(0, k_int, block_size):
        i2 = min(i1 + block_size, k_int)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        with threads(1):  # the column loop's ops are too small to split
            for i in range(i2 - i1):
                j = i1 + i
                if not upfront and j % g == 0:
                    cols = w1[i : i + g]
                    if j + g > i2:  # the group runs past this block: bring its later columns up to date
                        cols = torch.cat([cols, wt[i2 : j + g] - hinv[i1:j, i2 : j + g].t() @ err1[:i]])
                    s, z = fit(cols.t())
                    scales[j // g], zeros[j // g] = s[:, 0], z[:, 0]
                s, z = scales[col_group[j]], zeros[col_group[j]]
                row = w1[i]
                q = torch.clamp(torch.round(row / s) + z, 0, maxq)
                q_all[j] = q
                e = (row - s * (q - z)) / h1[i, i]
                w1[i:].addr_(h1[i, i:], e, alpha=-1)
                err1[i] = e
        wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1)
    codes = q_all.t()
    stored_perm = perm
    if perm is not None and upfront:  # groups follow the original column blocks: store in layer order
        codes = codes[:, torch.argsort(perm)]
        stored_perm = None
    return GPTQResult(codes.contiguous(), scales.t().to(scale_dtype).contiguous(),
                      zeros.t().to(ZERO_DTYPE).contiguous(), g, bits, stored_perm, inv.damp_percent,
                      wt[k_int:].t().contiguous() if float_columns else None)


def rtn_quantize(weight: Tensor, *, bits: int = 4, group_size: int | None = 128, sym: bool = True,
                 clip_search: bool = False, scale_dtype: torch.dtype = torch.bfloat16) -> GPTQResult:
    """Round to nearest on GPTQ's grid, with no error feedback: the baseline GPTQ improves on, and
    what layers with no calibration inputs get under a GPTQ config."""
    group_size = per_channel_as_none(group_size)
    g = _check(weight, bits, group_size)
    n, k = weight.shape
    w = weight.detach().float().reshape(n * (k // g), g)
    s, z = fit_grid(w, bits, sym, clip_search=clip_search, scale_dtype=scale_dtype)
    q = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
    return GPTQResult(q.reshape(n, k), s.reshape(n, -1).to(scale_dtype), z.reshape(n, -1).to(ZERO_DTYPE), g, bits)


def int8_supports_groups() -> bool:
    """Whether `Int8Weight` carries zero-points, groups and an input order (needed for 8-bit GPTQ)."""
    names = {f.name for f in dataclasses.fields(Int8Weight)}
    return {"zeros", "group_size", "perm"} <= names


def require_format(bits: int) -> None:
    """Raise now, before any calibration work, if no weight format can hold `bits`-bit GPTQ output."""
    if bits == 8 and not int8_supports_groups():
        raise NotImplementedError(
            "8-bit GPTQ needs qcompile.formats.Int8Weight with zero-points, groups and an input order "
            "(Int8Weight(qweight, scales, zeros=, group_size=, perm=)); this version's Int8Weight is "
            "symmetric per channel only. Use bits=2, 3 or 4."
        )


def _int8_weight(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, perm: Tensor | None) -> Int8Weight:
    """8-bit codes 0..255 as int8 (codes − 128, zero-points shifted alike): w = s·(qweight − zeros)."""
    require_format(8)
    per_channel = group_size == codes.shape[1]
    if per_channel:  # Int8Weight keeps one scale per row as a vector
        scales, zeros = scales[:, 0], zeros[:, 0]
    return Int8Weight(qweight=(codes - 128).to(torch.int8), scales=scales, zeros=zeros - 128,
                      group_size=None if per_channel else group_size, perm=perm)


def to_format(result: GPTQResult) -> Int4Weight | Int8Weight:
    """The canonical format of a GPTQ result: Int4Weight for 2-4 bits, Int8Weight for 8."""
    if result.bits <= 4:
        return Int4Weight(pack_nibbles(result.codes), result.scales, result.zeros, result.group_size,
                          bits=result.bits, perm=result.perm)
    return _int8_weight(result.codes, result.scales, result.zeros, result.group_size, result.perm)
