"""Modules that replace float layers once a model is quantized ahead of compilation.

`QuantLinear` holds a weight in its kernel's layout as buffers (so `torch.compile` sees them as
ordinary graph inputs, `.to()` moves them and `state_dict` lists them) and calls the layout's op.
`QuantEmbedding` reads the int8 table of a tied lm_head, so a tied model keeps one table.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import lowering
from .config import is_output_head
from .ops import LAYOUT_OPS, PackedLinear
from .report import LinearReport


class QuantLinear(nn.Module):
    """A linear layer whose weight is quantized; ``forward(x) = op(x, *packed) + bias``."""

    def __init__(self, packed: PackedLinear, bias: Tensor | None = None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self._set_packed(packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_packed(self, packed: PackedLinear) -> None:
        for name in getattr(self, "_tensor_names", ()):
            delattr(self, name)
        self.layout, self.consts, self.format_meta = packed.layout, packed.consts, packed.meta
        self._tensor_names = tuple(packed.tensors)
        for name, t in packed.tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("perm", packed.perm)  # act_order input order, or None

    def packed_weight(self) -> PackedLinear:
        return PackedLinear(self.layout, {n: getattr(self, n) for n in self._tensor_names}, self.consts,
                            self.in_features, self.out_features, self.format_meta, self.perm)

    @property
    def layout_op(self):
        return LAYOUT_OPS[self.layout]

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:  # act_order: gather the K inputs, not the N x K weight
            x = x.index_select(-1, self.perm)
        y = self.layout_op(x, *(getattr(self, n) for n in self._tensor_names), *self.consts)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):
        # Moving to another device re-packs for that device's kernel; dtype casts (model.half())
        # leave the packed weight alone: its dtypes belong to the kernel, not to the model.
        current = getattr(self, self._tensor_names[0]).device
        target = fn(torch.empty(0, device=current)).device
        if target != current:
            self._set_packed(lowering.pack(lowering.unpack(self.packed_weight()), target))
        if self.bias is not None:
            self.bias = nn.Parameter(fn(self.bias.data), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        g = self.format_meta.get("group_size")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format_meta['format']}, group_size={g}, layout={self.layout}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """An embedding that reads rows of an int8 lm_head's table (weights tied in the float model)."""

    def __init__(self, lm_head: QuantLinear, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        if lm_head.layout != "int8":
            raise ValueError("QuantEmbedding shares an int8 lm_head's table only")
        self.num_embeddings, self.embedding_dim = lm_head.out_features, lm_head.in_features
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.lm_head = [lm_head]  # a list: not a submodule, so the table is not registered twice

    def forward(self, ids: Tensor) -> Tensor:
        head = self.lm_head[0]
        rows = torch.ops.qcompile.int8_embedding(ids, head.qweight, head.scales, self.dtype, getattr(head, "zeros", None))
        if head.perm is None:
            return rows
        # act_order table: stored column j is the embedding's column perm[j]
        return torch.empty_like(rows).index_copy_(-1, head.perm.long(), rows)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 table shared with the lm_head"


# --- swapping layers in a model (qcompile.quantize, the calibration pass, checkpoint loading) ---
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except ImportError:
        return None


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(path, module, weight [out, in]) for every nn.Linear and Hugging Face Conv1D of `model`."""
    conv1d = _conv1d_type()
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found.append((path, mod, mod.weight))
        elif conv1d is not None and isinstance(mod, conv1d):
            found.append((path, mod, mod.weight.t()))  # Conv1D stores [in, out]
    return found


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def float_report(plan, weight: torch.Tensor) -> LinearReport:
    """The report line of a layer that stays float (`plan.reason` says why)."""
    return LinearReport(plan.path, plan.in_features, plan.out_features, None, plan.reason, plan.notes,
                        2 * weight.numel())


def install(model: nn.Module, path: str, mod: nn.Module, weight, plan, input_emb: nn.Module | None) -> LinearReport:
    """Replace the layer at `path` by a QuantLinear holding `weight` (a canonical format), on the
    layer's device; an int8 lm_head tied to the input embedding shares its table with it."""
    float_bytes = 2 * plan.in_features * plan.out_features
    device = getattr(mod, "weight").device
    packed = lowering.pack(weight, device)
    qlinear = QuantLinear(packed, mod.bias)
    tied = input_emb is not None and getattr(input_emb, "weight", None) is mod.weight
    _set_module(model, path, qlinear)
    if tied and is_output_head(path) and packed.layout == "int8":
        _set_module(model, _path_of(model, input_emb),
                    QuantEmbedding(qlinear, input_emb.weight.dtype, getattr(input_emb, "padding_idx", None)))
        plan.notes.append("tied input embedding reads the same int8 table")
    elif tied:
        plan.notes.append("tied input embedding keeps its float table")
    return LinearReport(path, plan.in_features, plan.out_features, str(packed.op.name()), plan.reason,
                        plan.notes, float_bytes, packed.nbytes)


def untie(model: nn.Module) -> None:
    """The float tie of lm_head and embedding is gone once either is replaced; stop HF re-tying."""
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is target)
