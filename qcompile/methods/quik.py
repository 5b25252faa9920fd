"""QUIK's offline step (Ashkboos et al., 2024; IST-DASLab/QUIK): choose the outlier input
channels of a layer from its calibration max|x|, and quantize the other columns with GPTQ on a
symmetric grid, the outlier columns placed last so that GPTQ's error feedback flows into them.

As in the reference (`fake_quant/quik_utils.py`): one ascending sort of max|x| is both the split
(the last k channels stay float) and GPTQ's column order; no act_order. Layers that read one input
(q/k/v, gate/up) share the statistic and so their outlier channels (and index tensors), which lets
the compiled graph quantize their input once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..formats import QuikWeight
from . import gptq


def outlier_split(absmax: Tensor, outliers: int, group_size: int | None) -> tuple[Tensor, Tensor]:
    """(int_idx, fp_idx): the input channels in ascending order of max|x|, the last ones float.
    The float count is raised until the integer columns split into whole groups."""
    k = absmax.numel()
    k_int = k - outliers
    if group_size:
        k_int -= k_int % group_size
    order = torch.argsort(absmax.float(), stable=True)
    return order[:k_int], order[k_int:]


def _to_format(codes: Tensor, scales: Tensor, fp_weight: Tensor, int_idx: Tensor, fp_idx: Tensor, bits: int,
               act_bits: int) -> QuikWeight:
    half = 2 ** (bits - 1)  # symmetric grid: zero-point 2^(bits-1), so the signed code is q - half
    if fp_weight is None:  # no float columns
        fp_weight = scales.new_zeros(codes.shape[0], 0)
    return QuikWeight((codes - half).to(torch.int8), scales, int_idx, fp_idx, fp_weight.to(torch.float16),
                      bits, act_bits)


def quik_quantize(weight: Tensor, h: Tensor, absmax: Tensor, *, outliers: int, bits: int, act_bits: int,
                  group_size: int | None, damp_percent: float = 0.01, clip_search: bool = True, block_size: int = 128,
                  scale_dtype: torch.dtype = torch.bfloat16, split: tuple[Tensor, Tensor] | None = None,
                  ) -> tuple[QuikWeight, QuikWeight, gptq.InverseHessian]:
    """(GPTQ's QuikWeight, round to nearest's on the same split and grid, the inverse Hessian used)
    for `weight` [N, K] given its input's Hessian `h` [K, K] and per-channel max|x| `absmax` [K].
    `split` (int_idx, fp_idx) reuses a sibling's outlier channels."""
    int_idx, fp_idx = split if split is not None else outlier_split(absmax, outliers, group_size)
    order = torch.cat([int_idx, fp_idx])
    w = weight.detach().float()[:, order]
    inv = gptq.invert(h[order][:, order], act_order=False, damp_percent=damp_percent)
    result = gptq.gptq_quantize(w, inv, bits=bits, group_size=group_size, sym=True, clip_search=clip_search,
                                block_size=block_size, scale_dtype=scale_dtype, float_columns=fp_idx.numel())
    q = _to_format(result.codes, result.scales, result.float_tail, int_idx, fp_idx, bits, act_bits)
    rtn = gptq.rtn_quantize(w[:, :int_idx.numel()], bits=bits, group_size=group_size, sym=True,
                            clip_search=clip_search, scale_dtype=scale_dtype)
    r = _to_format(rtn.codes, rtn.scales, w[:, int_idx.numel():], int_idx, fp_idx, bits, act_bits)
    return q, r, inv
