"""How each quantized op runs: CPU kernels, Triton kernels, Inductor lowerings.

`pack(weight, device)` turns a canonical format (`qcompile.formats`) into the layout the device's
kernel reads (a `qcompile.ops.PackedLinear`); `unpack` turns it back. Lowering knows ops and
formats, never passes or methods.
"""
from __future__ import annotations

import torch

from qcompile.formats import Int4Weight, Int8Weight
from qcompile.ops import PackedLinear

from . import cpu_int4

# CUDA path of qcompile::int4_mm (Triton kernel + Inductor lowering). Without a working triton the
# CPU path is unaffected, and on CUDA the op runs its reference implementation.
try:
    from . import inductor_int4, triton_int4
except Exception as _e:  # no triton (silently), or a broken install (with a warning)
    if not (isinstance(_e, ImportError) and _e.name == "triton"):
        import warnings

        warnings.warn(f"qcompile: Triton int4 kernel unavailable ({type(_e).__name__}: {_e})", stacklevel=2)


def unsupported_reason(fmt: str, out_features: int, in_features: int, group_size: int | None,
                       device: torch.device) -> str | None:
    """Why no kernel on `device` can run this weight, or None if one can."""
    if fmt == "int4":
        if in_features % 2:
            return f"int4 packs two codes per byte: in_features must be even (got {in_features})"
        if device.type == "cpu":
            return cpu_int4.unsupported_reason(out_features, in_features, group_size or in_features)
        if "triton_int4" in globals():
            try:
                triton_int4.int4_mm_configs(1, in_features, group_size or in_features)
            except NotImplementedError as e:
                return str(e)
        return None
    if fmt == "int8":
        return None
    return f"no kernel for format {fmt!r}"


def pack(weight: Int4Weight | Int8Weight, device: torch.device | str) -> PackedLinear:
    """The layout `device`'s kernel reads, on that device."""
    device = torch.device(device)
    if isinstance(weight, Int4Weight):
        if device.type == "cpu":
            return cpu_int4.pack(_to(weight, device))
        w = _to(weight, device)
        return PackedLinear("int4", w.tensors(), (w.group_size,), w.in_features, w.out_features, w.meta())
    if isinstance(weight, Int8Weight):
        w = _to(weight, device)
        return PackedLinear("int8", w.tensors(), (), w.in_features, w.out_features, w.meta())
    raise TypeError(f"no kernel layout for {type(weight).__name__}")


def unpack(packed: PackedLinear) -> Int4Weight | Int8Weight:
    """The canonical format back from a kernel layout (on the layout's device)."""
    if packed.layout == "int4_cpu":
        return cpu_int4.unpack(packed)
    if packed.layout == "int4":
        t = packed.tensors
        return Int4Weight(t["qweight"], t["scales"], t["zeros"], packed.consts[0])
    if packed.layout == "int8":
        return Int8Weight(packed.tensors["qweight"], packed.tensors["scales"])
    raise ValueError(f"unknown layout {packed.layout!r}")


def _to(weight, device):
    return type(weight)(**{k: v.to(device) for k, v in weight.tensors().items()},
                        **({"group_size": weight.group_size} if isinstance(weight, Int4Weight) else {}))
