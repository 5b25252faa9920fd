"""How each quantized op runs: CPU kernels, Triton kernels, Inductor lowerings.

The kernels read the canonical formats (`qcompile.formats`) as saved, so `pack(weight, device)`
only moves the tensors and wraps them with their op (a `qcompile.ops.PackedLinear`), and
`unpack` unwraps them. Lowering knows ops and formats, never passes or methods.
"""
from __future__ import annotations

import warnings

import torch

from qcompile.formats import Int4Weight, Int8Weight, LutWeight, QuikWeight
from qcompile.ops import KERNEL_LOADERS, PackedLinear
from qcompile.ops.quik import block_weight, unblock_weight

from . import cpu_kernels

# CPU path of the ops: C++ kernels built and loaded at first use (the ops' float reference if no
# compiler is found).
KERNEL_LOADERS["cpu"] = cpu_kernels.load

# CUDA path of qcompile::int4_mm (Triton kernel + Inductor lowering). Without a working triton the
# CPU path is unaffected, and on CUDA the op runs its reference implementation.
try:
    from . import inductor_int4, triton_int4
except Exception as _e:  # no triton (silently), or a broken install (with a warning)
    if not (isinstance(_e, ImportError) and _e.name == "triton"):
        warnings.warn(f"qcompile: Triton int4 kernel unavailable ({type(_e).__name__}: {_e})", stacklevel=2)
# qcompile::gqa_attention under Inductor: on CPU decomposed into aten SDPA (no Python per call).
from . import inductor_attention  # noqa: E402

inductor_attention.register()
# CUDA path of qcompile::gqa_attention (Triton flash-attention kernel over shared K/V heads); without
# triton the op runs its SDPA path on CUDA.
try:
    from . import triton_attention
except Exception as _e:
    if not (isinstance(_e, ImportError) and _e.name == "triton"):
        warnings.warn(f"qcompile: Triton attention kernel unavailable ({type(_e).__name__}: {_e})", stacklevel=2)

# CUDA path of qcompile::int8_gemm (QUIK's integer GEMM, Triton); without triton the op runs its reference.
try:
    from . import triton_int8_gemm
except Exception as _e:
    if not (isinstance(_e, ImportError) and _e.name == "triton"):
        warnings.warn(f"qcompile: Triton int8 GEMM unavailable ({type(_e).__name__}: {_e})", stacklevel=2)

# CUDA path of qcompile::lut_mm (LUT-mpGEMM Triton kernel + Inductor lowering), the same way.
try:
    from . import inductor_lut, triton_lut
except Exception as _e:
    if not (isinstance(_e, ImportError) and _e.name == "triton"):
        warnings.warn(f"qcompile: Triton lut kernel unavailable ({type(_e).__name__}: {_e})", stacklevel=2)


def unsupported_reason(fmt: str, out_features: int, in_features: int, group_size: int | None,
                       device: torch.device) -> str | None:
    """Why no kernel on `device` can run this weight, or None if one can."""
    if fmt == "int4":
        group = group_size or in_features
        if in_features % 2 or group % 2:
            return f"int4 packs two codes per byte: in_features and the group must be even (got {in_features}, {group})"
        if device.type == "cuda" and "triton_int4" in globals():
            try:
                triton_int4.int4_mm_configs(1, in_features, group)
            except NotImplementedError as e:
                return str(e)
        return None
    if fmt == "int8":
        if group_size is not None and (group_size <= 0 or in_features % group_size):
            return f"int8 group size {group_size} does not divide in_features {in_features}"
        return None
    if fmt == "lut":
        return None if in_features % 2 == 0 else f"lut codes pack two per byte: in_features {in_features} must be even"
    if fmt == "quik":
        return None  # CPU: qcompile::quik_linear (or oneDNN's int8 GEMM); elsewhere int8_gemm (Triton / reference)
    return f"no kernel for format {fmt!r}"


def pack(weight: Int4Weight | Int8Weight | LutWeight | QuikWeight, device: torch.device | str,
         cpu_activations: str = "float") -> PackedLinear:
    """The weight on `device`, with the op that multiplies by it. cpu_activations="int8" picks the
    int8-activation op where a CPU kernel serves the weight (`PackedLinear.activations`)."""
    device = torch.device(device)
    if isinstance(weight, Int4Weight):
        w = Int4Weight(*(t.to(device) for t in (weight.qweight, weight.scales, weight.zeros)), weight.group_size,
                       weight.bits, None if weight.perm is None else weight.perm.to(device))
        tensors = {n: t for n, t in w.tensors().items() if n != "perm"}
        return PackedLinear("int4", tensors, (w.group_size,), w.in_features, w.out_features, w.meta(), w.perm,
                            cpu_activations)
    if isinstance(weight, Int8Weight):
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        w = Int8Weight(move(weight.qweight), move(weight.scales), move(weight.zeros), weight.group_size,
                       move(weight.perm))
        tensors = {n: t for n, t in w.tensors().items() if n != "perm"}  # op(x, qweight, scales[, zeros])
        return PackedLinear("int8", tensors, (), w.in_features, w.out_features, w.meta(), w.perm, cpu_activations)
    if isinstance(weight, LutWeight):
        if weight.outliers is not None:
            raise NotImplementedError("no kernel runs lookup-table weights with a sparse outlier part yet")
        w = LutWeight(weight.codes.to(device), weight.tables.to(device), weight.bits)
        return PackedLinear("lut", w.tensors(), (), w.in_features, w.out_features, w.meta())
    if isinstance(weight, QuikWeight):
        w = QuikWeight(*(t.to(device) for t in (weight.qweight, weight.scales, weight.int_idx, weight.fp_idx,
                                                 weight.fp_weight)), weight.bits, weight.act_bits)
        # float columns in the compute dtype of the device (fp16 matmuls are slow on CPU)
        fp = w.fp_weight.float() if device.type == "cpu" else w.fp_weight
        qweight, scales, rowsum, consts = w.qweight, w.scales, w.rowsum(), (w.act_bits,)
        run = 8 if w.bits <= 4 else 4
        if device.type == "cpu" and (w.group_size is None or w.group_size % run == 0) and cpu_kernels.load():
            # the layout qcompile::quik_linear's CPU kernel reads (4-bit codes two a byte)
            qweight, scales, rowsum, fp = block_weight(qweight, scales, rowsum, fp, w.bits)
            consts = (w.act_bits, w.out_features)
        tensors = {"qweight": qweight, "scales": scales, "rowsum": rowsum, "int_idx": w.int_idx,
                   "fp_idx": w.fp_idx, "fp_weight": fp}
        return PackedLinear("quik", tensors, consts, w.in_features, w.out_features,
                            w.meta() | {"dtype_fp": str(w.fp_weight.dtype), "dtype_scales": str(w.scales.dtype)})
    raise TypeError(f"no kernel layout for {type(weight).__name__}")


def unpack(packed: PackedLinear) -> Int4Weight | Int8Weight | LutWeight | QuikWeight:
    """The canonical format back (on the layout's device)."""
    t = packed.tensors
    if packed.layout == "int4":
        return Int4Weight(t["qweight"], t["scales"], t["zeros"], packed.consts[0], packed.meta.get("bits", 4),
                          packed.perm)
    if packed.layout == "int8":
        return Int8Weight(t["qweight"], t["scales"], t.get("zeros"), packed.meta.get("group_size"), packed.perm)
    if packed.layout == "lut":
        return LutWeight(t["codes"], t["tables"], packed.meta["bits"])
    if packed.layout == "quik":
        dtype = lambda key: getattr(torch, packed.meta[key].removeprefix("torch."))  # noqa: E731
        qweight, scales, fp = t["qweight"], t["scales"], t["fp_weight"]
        if qweight.dim() == 3:  # blocked for the CPU kernel
            qweight, scales, _, fp = unblock_weight(qweight, scales, t["rowsum"], fp, packed.out_features,
                                                    t["int_idx"].numel())
        return QuikWeight(qweight, scales.to(dtype("dtype_scales")), t["int_idx"], t["fp_idx"],
                          fp.to(dtype("dtype_fp")), packed.meta["bits"], packed.consts[0])
    raise ValueError(f"unknown layout {packed.layout!r}")
