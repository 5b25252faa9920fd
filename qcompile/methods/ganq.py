"""GANQ: per-row lookup-table quantization fitted to calibration data (Zhao & Yuan, ICML 2025).

Each output row i gets a table T_i of 2^bits values and a code per weight, W~[i, j] = T_i[Q[i, j]],
chosen to minimise the layer's output error ||W X - W~ X||^2 = sum_i r_i H r_i^T (r_i = W_i - W~_i,
H = X X^T). Two steps alternate for `iters` rounds:

- T-step (closed form, all rows at once): with S_i the one-hot code matrix of row i,
  T_i = W_i H S_i^T (S_i H S_i^T)^-1, a 2^bits x 2^bits solve per row.
- S-step (back-substitution): with H = L L^T, r H r^T = sum_j (sum_{u >= j} L[u, j] r_u)^2. Going
  from the last column to the first, column j takes the table entry nearest to
  W[i, j] + (1 / L[j, j]) sum_{u > j} r_u L[u, j], which zeroes (or minimises) term j given the
  columns already fixed. Like GPTQ, the sum is kept up to date lazily, a block of columns at a time.

Initial table (the paper leaves it open): per row, 1-D k-means of the row's weights weighted by
diag(H) (the input channels' energy), started from the row's quantiles at the bucket midpoints.
Weighted k-means is the best table for a diagonal H, so the alternation starts from what a
data-aware round-to-nearest would give and only has to account for the correlations of H.
The best (lowest error) iterate is kept: the S-step is greedy, so an iteration can worsen it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..formats import LutWeight, pack_nibbles
from .threads import threads


@dataclass
class GANQResult:
    weight: LutWeight
    errors: list[float]  # output error (r H r^T summed over rows) after init and after each iteration
    damp: float          # the damping actually added to H's diagonal (relative to its mean)


def _cholesky_lower(h: Tensor, damp: float) -> tuple[Tensor, float]:
    """L with L L^T = H + damp * mean(diag H) I; damping raised tenfold until H is positive definite."""
    mean = h.diagonal().mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if info.item() == 0:
            return lower, damp
        damp *= 10
    raise torch.linalg.LinAlgError(f"H is not positive definite even with damping {damp / 10:g} x mean(diag)")


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> Tensor:
    """Per-row r H r^T (the layer's squared output error on the calibration inputs, up to a scale)."""
    r = w - w_hat
    return ((r @ h) * r).sum(1)


def initial_tables(w: Tensor, importance: Tensor, levels: int, iters: int = 6) -> Tensor:
    """Per-row importance-weighted 1-D k-means, started from quantiles. [m, levels] float32."""
    n = w.shape[1]
    at = ((torch.arange(levels, device=w.device) + 0.5) * n / levels).long().clamp_max(n - 1)
    tables = w.sort(dim=1).values[:, at].contiguous()
    imp = importance.clamp_min(1e-12)[None, :].expand_as(w)
    for _ in range(iters):
        codes = nearest(w, tables)
        num = torch.zeros_like(tables).scatter_add_(1, codes, w * imp)
        den = torch.zeros_like(tables).scatter_add_(1, codes, imp)
        tables = torch.where(den > 0, num / den.clamp_min(1e-30), tables)
    return tables.sort(dim=1).values


def nearest(values: Tensor, tables: Tensor) -> Tensor:
    """Index of the nearest entry of each row's SORTED table: values [m, n], tables [m, L] -> int64
    [m, n] (a binary search among the midpoints: no [m, n, L] temporary)."""
    midpoints = (tables[:, 1:] + tables[:, :-1]) / 2
    return torch.searchsorted(midpoints.contiguous(), values.contiguous())


def code_sums(h: Tensor, codes: Tensor, levels: int, previous: tuple[Tensor, Tensor] | None = None,
              chunk: int = 1 << 14) -> Tensor:
    """S_i H for every row i: [m, levels, n], the sum of H's rows j over the columns j that row i
    maps to each code. From scratch it is an [m·levels, n] x [n, n] product; given `previous` =
    (its sums, the codes they were made with), only the codes that changed move their H row from
    one entry to another. The S-step changes a few percent of the codes per iteration, so this
    costs a few percent of the product (the T-step's cost on CPU)."""
    m, n = codes.shape
    if previous is None:
        onehot = torch.zeros(m, levels, n, dtype=h.dtype, device=h.device)
        onehot.scatter_(1, codes[:, None, :], 1.0)
        return (onehot.reshape(m * levels, n) @ h).reshape(m, levels, n)
    sums, old = previous
    flat = sums.reshape(m * levels, n)
    rows, cols = (codes != old).nonzero(as_tuple=True)
    for r, c in zip(rows.split(chunk), cols.split(chunk)):
        src = h.index_select(0, c)
        flat.index_add_(0, r * levels + codes[r, c], src)
        flat.index_add_(0, r * levels + old[r, c], src, alpha=-1)
    return sums


def update_tables(w: Tensor, h: Tensor, codes: Tensor, tables: Tensor, wh: Tensor,
                  sums: Tensor | None = None) -> Tensor:
    """T-step: T_i = W_i H S_i^T (S_i H S_i^T)^-1 for every row (`sums` = S H from `code_sums`, made
    here if not given). Unused entries keep their value (a tiny proximal term makes the
    2^b x 2^b systems non-singular without moving used entries)."""
    m, n = w.shape
    levels = tables.shape[1]
    if sums is None:
        sums = code_sums(h, codes, levels)
    onehot = torch.zeros(m, levels, n, dtype=w.dtype, device=w.device)
    onehot.scatter_(1, codes[:, None, :], 1.0)
    gram = torch.bmm(sums, onehot.transpose(1, 2))                   # S H S^T   [m, L, L]
    rhs = torch.zeros(m, levels, dtype=w.dtype, device=w.device).scatter_add_(1, codes, wh)  # W H S^T
    ridge = 1e-7 * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None]
    gram = gram + torch.diag_embed(ridge.expand(m, levels))
    return torch.linalg.solve(gram, rhs + ridge * tables)


def assign_codes(w: Tensor, tables: Tensor, lower: Tensor, block: int = 128) -> Tensor:
    """S-step: back-substitution from the last column, in lazy blocks. int64 codes [m, n].


    Works on transposed copies (column j of W is row j there) so each step touches contiguous
    memory; the per-column loop is the reference's, the cross-block update one matmul. `tables`
    must be sorted per row. Rows that share H (q/k/v, gate/up) are best done in one call."""
    m, n = w.shape
    wt = w.t().contiguous()
    lower_t = lower.t().contiguous()  # lower_t[j, u] = L[u, j]
    codes_t = torch.empty(n, m, dtype=torch.long, device=w.device)
    carry = torch.zeros(n, m, dtype=w.dtype, device=w.device)  # sum_{u > j, u done} r_u L[u, j]
    inv_diag = (1.0 / lower.diagonal()).tolist()
    midpoints = ((tables[:, 1:] + tables[:, :-1]) / 2).contiguous()  # tables are sorted per row
    flat = tables.reshape(-1)
    offsets = torch.arange(m, device=w.device) * tables.shape[1]
    with threads(1):  # hundreds of tiny ops per block: threads cost more than they give
        for end in range(n, 0, -block):
            start = max(0, end - block)
            resid = torch.empty(end - start, m, dtype=w.dtype, device=w.device)
            for j in range(end - 1, start - 1, -1):
                target = torch.add(wt[j], carry[j], alpha=inv_diag[j])
                c = (target[:, None] > midpoints).sum(1)  # nearest entry of a sorted table
                codes_t[j] = c
                r = torch.sub(wt[j], flat[offsets + c], out=resid[j - start])
                if j > start:  # within the block: the columns still to do
                    carry[start:j].addmm_(lower_t[start:j, j, None], r[None, :])  # (addr_ is slow here)
            if start > 0:  # the whole block at once for every earlier column
                carry[:start].addmm_(lower_t[:start, start:end], resid)
    return codes_t.t().contiguous()


@torch.no_grad()
def ganq_quantize(weight: Tensor, hessian: Tensor, bits: int = 4, iters: int = 10, damp: float = 0.01,
                  table_dtype: torch.dtype = torch.float16, block: int = 128) -> GANQResult:
    """Quantize weight [out, in] given H = X X^T [in, in] (float32 or float64) to a `LutWeight`."""
    if bits not in (3, 4):
        raise ValueError(f"GANQ: bits={bits} is not supported; use 3 or 4")
    if weight.shape[1] != hessian.shape[0] or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"GANQ: weight {tuple(weight.shape)} and Hessian {tuple(hessian.shape)} do not match")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = h.diagonal() == 0  # inputs never active in calibration: nothing to fit there
    h[dead, dead] = 1
    w[:, dead] = 0
    lower, used_damp = _cholesky_lower(h, damp)
    h_damped = lower @ lower.t()
    levels = 2**bits
    tables = initial_tables(w, h.diagonal(), levels)
    wh = w @ h_damped
    codes = nearest(w, tables)
    best = (output_error(w, tables.gather(1, codes), h_damped).sum().item(), tables, codes)
    errors = [best[0]]
    sums = None  # S H of the last iteration's codes, kept up to date incrementally
    for _ in range(iters):
        new_codes = assign_codes(w, tables, lower, block)
        sums = code_sums(h_damped, new_codes, levels, None if sums is None else (sums, codes))
        codes = new_codes
        tables, order = update_tables(w, h_damped, codes, tables, wh, sums).sort(dim=1)
        codes = order.argsort(dim=1).gather(1, codes)
        sums = sums.gather(1, order[:, :, None].expand_as(sums))  # entries follow the sorted tables
        err = output_error(w, tables.gather(1, codes), h_damped).sum().item()
        errors.append(err)
        if err < best[0]:
            best = (err, tables, codes)
    _, tables, codes = best
    lut = LutWeight(pack_nibbles(codes), tables.to(table_dtype), bits)
    return GANQResult(lut, errors, used_damp)


def nearest_table_quantize(weight: Tensor, bits: int = 4, table_dtype: torch.dtype = torch.float16) -> LutWeight:
    """Data-free baseline on the same format: each row's k-means table (uniform importance) and
    nearest codes. What layers outside the calibrated blocks get under a GANQ config."""
    w = weight.detach().to(torch.float32)
    tables = initial_tables(w, torch.ones(w.shape[1], device=w.device), 2**bits)
    return LutWeight(pack_nibbles(nearest(w, tables)), tables.to(table_dtype), bits)
