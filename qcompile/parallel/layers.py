"""The row-parallel linear: this rank's columns of a layer, then one all_reduce.

Collectives are the functional ``torch.ops._c10d_functional`` ops, each followed by ``wait_tensor``
(what `torch.distributed._functional_collectives` calls, without its eager wrapper), so
``torch.compile(fullgraph=True)`` traces them as graph nodes and the report can count them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


_c10d = torch.ops._c10d_functional


def all_reduce_sum(x: Tensor, group_name: str) -> Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x, "sum", group_name))


def all_gather_last_dim(x: Tensor, world_size: int, group_name: str) -> Tensor:
    """Every rank's `x` side by side along the last dimension, rank order."""
    stacked = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), world_size, group_name))
    return stacked.view(world_size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], world_size * x.shape[-1])


class RowParallelLinear(nn.Module):
    """``y = all_reduce(local(x')) + bias`` where x' is what this rank's columns read:

    - ``gather=False, input_index=None``: x' = x, this rank's slice of the input as it comes;
    - ``input_index`` (int32): x' = x[..., input_index], with ``pad=True`` a zero column appended to
      x first (the padding of regrouped act_order columns points there);
    - ``gather=True`` (the naive act_order path): x is first all-gathered along the last dimension
      (every rank's slice), then indexed as above.

    `local` is a QuantLinear or nn.Linear without bias; the bias is added once, after the sum.
    ``reduce_float32``: half-precision partial sums travel as float32 (gloo cannot sum bf16,
    pytorch #111131)."""

    qcompile_sharded = True  # checkpoint loaders: this module's tensors are set, not read as float ones

    def __init__(self, local: nn.Module, bias: Tensor | None, group_name: str, world_size: int, *,
                 input_index: Tensor | None = None, pad: bool = False, gather: bool = False,
                 reduce_float32: bool = False):
        super().__init__()
        self.local = local
        self.in_features = getattr(local, "in_features", None)
        self.out_features = local.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_buffer("input_index", input_index)
        self.group_name, self.world_size = group_name, world_size
        self.pad, self.gather, self.reduce_float32 = pad, gather, reduce_float32

    def forward(self, x: Tensor) -> Tensor:
        if self.gather:
            x = all_gather_last_dim(x, self.world_size, self.group_name)
        if self.input_index is not None:
            if self.pad:
                x = nn.functional.pad(x, (0, 1))
            x = x.index_select(-1, self.input_index)
        y = self.local(x)
        if self.world_size > 1:
            dtype = y.dtype
            half = self.reduce_float32 and dtype in (torch.float16, torch.bfloat16)
            y = all_reduce_sum(y.float() if half else y, self.group_name).to(dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        how = "all_gather -> " if self.gather else ""
        how += ("pad+index -> " if self.pad else "index -> ") if self.input_index is not None else ""
        return f"{how}local columns -> all_reduce over {self.world_size} ranks, bias={self.bias is not None}"

