"""Modules that replace float layers once a model is quantized ahead of compilation.

`QuantLinear` holds a weight in its kernel's layout as buffers (so `torch.compile` sees them as
ordinary graph inputs, `.to()` moves them and `state_dict` lists them) and calls the layout's op.
`QuantEmbedding` reads the int8 table of a tied lm_head, so a tied model keeps one table.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from . import lowering
from .config import is_output_head
from .ops import PackedLinear
from .ops.linear import ROW_BLOCK_OPS, layout_op, rows_end_to_end
from .report import LinearReport


class QuantLinear(nn.Module):
    """A linear layer whose weight is quantized; ``forward(x) = op(x, *packed) + bias``.

    ``cpu_activations`` ("int8" or "float", the packed weight's own by default) is kept across
    moves: on CPU the op is the int8-activation one where a kernel serves the layout, elsewhere
    the float one (`PackedLinear.activations`); ``activations`` says which runs now."""

    def __init__(self, packed: PackedLinear, bias: Tensor | None = None, cpu_activations: str | None = None):
        super().__init__()
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.cpu_activations = cpu_activations or packed.cpu_activations
        self._set_packed(packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def _set_packed(self, packed: PackedLinear) -> None:
        """Hold `packed`'s tensors; the op follows this layer's cpu_activations, not packed's."""
        for name in getattr(self, "_tensor_names", ()):
            delattr(self, name)
        packed = dataclasses.replace(packed, cpu_activations=self.cpu_activations)
        self.layout, self.consts, self.format_meta = packed.layout, packed.consts, packed.meta
        # resolved once here (what the op is depends on the device and the layout); the op itself is
        # looked up per call: an OpOverload in the module's __dict__ would make it unpicklable
        self.activations, self._op_consts = packed.activations, packed.op_consts
        self._tensor_names = tuple(packed.tensors)
        for name, t in packed.tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("perm", packed.perm)  # act_order input order, or None

    def set_cpu_activations(self, value: str) -> None:
        """Switch the activations of CPU decode ("int8" or "float") without re-quantizing."""
        packed = dataclasses.replace(self.packed_weight(), cpu_activations=value)  # checks the value
        self.cpu_activations = value
        self._set_packed(packed)

    def packed_weight(self) -> PackedLinear:
        return PackedLinear(self.layout, {n: getattr(self, n) for n in self._tensor_names}, self.consts,
                            self.in_features, self.out_features, self.format_meta, self.perm, self.cpu_activations)

    @property
    def layout_op(self):
        return layout_op(self.layout, self.activations)

    def forward(self, x: Tensor) -> Tensor:
        if self.perm is not None:  # act_order: gather the K inputs, not the N x K weight
            x = x.index_select(-1, self.perm)
        y = self.layout_op(x, *(getattr(self, n) for n in self._tensor_names), *self._op_consts)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn, recurse=True):
        # Moving to another device re-packs for that device's kernel (and activations: int8 ones
        # only on CPU); dtype casts (model.half()) leave the packed weight alone: its dtypes belong
        # to the kernel, not to the model.
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
                f"format={self.format_meta['format']}, group_size={g}, layout={self.layout}, "
                f"activations={self.activations}, bias={self.bias is not None}")


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


def _sibling_key(layer: QuantLinear):
    tensors = [getattr(layer, n) for n in layer._tensor_names]
    return (layer.layout, layer.consts, layer.in_features, layer.activations, layer._tensor_names,
            tuple((t.dtype, t.device, tuple(t.shape[1:])) for t in tensors), None if layer.perm is None else id(layer.perm))


def colocate_siblings(model: nn.Module) -> int:
    """Store the packed tensors of QuantLinears that share a parent, a layout and an input width
    end to end in one buffer each (a layer's tensors become row slices of it).

    Nothing changes in what a layer computes; the backend then runs siblings that read the same
    input (q/k/v, gate/up) as one op over the combined rows (`qcompile.passes.fuse_quantized`)
    without copying a weight. Returns the number of layers moved into shared buffers. Moving the
    model to another device (`.to()`) repacks each layer on its own: call this again after.
    """
    moved = 0
    for parent in model.modules():
        quik = [c for c in parent.children() if isinstance(c, QuantLinear) and c.layout == "quik"]
        _share_indices(quik)
        moved += _colocate_quik(quik)
        _share_perms([c for c in parent.children() if isinstance(c, QuantLinear) and c.perm is not None])
        groups: dict = {}
        for child in parent.children():
            # act_order siblings join when they gather x by one perm (GPTQ: one Hessian, one order);
            # QUIK: its index tensors are not rows
            if isinstance(child, QuantLinear) and child.layout_op in ROW_BLOCK_OPS:
                groups.setdefault(_sibling_key(child), []).append(child)
        for layers in groups.values():
            moved += _lay_end_to_end(layers, layers[0]._tensor_names)
    return moved


def _lay_end_to_end(layers: list[QuantLinear], names) -> int:
    """Store the tensors `names` of `layers` row after row in one buffer each; the number moved."""
    if len(layers) < 2 or all(rows_end_to_end([getattr(m, n) for m in layers]) for n in names):
        return 0
    for name in names:
        whole, start = torch.cat([getattr(m, name) for m in layers]), 0
        for m in layers:
            rows = getattr(m, name).shape[0]
            setattr(m, name, whole[start:start + rows])  # a registered buffer: stays one
            start += rows
    return len(layers)


QUIK_ROW_TENSORS = ("qweight", "scales", "rowsum", "fp_weight")  # blocked: dim 0 is blocks of 16 channels


def _colocate_quik(layers: list[QuantLinear]) -> int:
    """colocate_siblings for QUIK layers blocked for the CPU kernel: siblings that share their index
    tensors (one input) store their row tensors end to end; whole blocks of 16 channels only."""
    groups: dict = {}
    for m in layers:
        if m.qweight.dim() == 3 and m.out_features % 16 == 0:
            key = (id(m.int_idx), id(m.fp_idx), m.consts[0],
                   tuple((getattr(m, n).dtype, getattr(m, n).device, tuple(getattr(m, n).shape[1:]))
                         for n in QUIK_ROW_TENSORS))
            groups.setdefault(key, []).append(m)
    return sum(_lay_end_to_end(members, QUIK_ROW_TENSORS) for members in groups.values())


def _share_indices(layers: list[QuantLinear]) -> None:
    """QUIK siblings with the same outlier channels hold one pair of index tensors, so the compiled
    graph sees one input and quantizes the shared activation once."""
    for i, m in enumerate(layers):
        for first in layers[:i]:
            if first.int_idx is not m.int_idx and first.int_idx.shape == m.int_idx.shape and \
                    torch.equal(first.int_idx, m.int_idx) and torch.equal(first.fp_idx, m.fp_idx):
                m.int_idx, m.fp_idx = first.int_idx, first.fp_idx
                break


def _share_perms(layers: list[QuantLinear]) -> None:
    """act_order siblings with equal input orders (q/k/v and gate/up under GPTQ: they share a Hessian)
    hold one perm tensor, so the compiled graph gathers x once for all of them."""
    for i, m in enumerate(layers):
        for first in layers[:i]:
            if first.perm is not m.perm and first.perm.shape == m.perm.shape and torch.equal(first.perm, m.perm):
                m.perm = first.perm
                break


def _end_to_end(layers) -> bool:
    """True if every packed tensor of `layers` already lies row after row in one storage."""
    from .ops.linear import rows_end_to_end
    return all(rows_end_to_end([getattr(m, n) for m in layers]) for n in layers[0]._tensor_names)


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


def holds_own_tensors(module: nn.Module) -> bool:
    """A module a loader filled as a whole (a QuantLinear, a tensor-parallel shard): its tensors are
    not read again as float parameters."""
    return isinstance(module, QuantLinear) or getattr(module, "qcompile_sharded", False)


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
    device = next(t.device for t in (*mod.parameters(), *mod.buffers()))
    packed = lowering.pack(weight, device, plan.cpu_activations)
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
                        plan.notes, float_bytes, packed.nbytes, activations=packed.activations)


def untie(model: nn.Module) -> None:
    """The float tie of lm_head and embedding is gone once either is replaced; stop HF re-tying."""
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False


def _path_of(model: nn.Module, target: nn.Module) -> str:
    return next(p for p, m in model.named_modules() if m is target)
