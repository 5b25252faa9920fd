"""Quantization methods: offline math that turns a float weight into a format.

`plan_linear` decides, per layer, whether and how a config quantizes it (or why it stays float);
`quantize_linear` then does it. Both the backend's linear pass and `qcompile.quantize` use them,
so a layer gets the same decision on either path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import lowering
from ..config import GANQConfig, GPTQConfig, QuantConfig, QUIKConfig, RTNConfig, choose_group_size, cpu_activations_for
from ..formats import Int4Weight, Int8Weight
from . import rtn


@dataclass
class LinearPlan:
    """What will happen to one linear layer."""

    path: str
    in_features: int
    out_features: int
    format: str | None = None         # "int4", "int8", "lut", "quik", or None: stays float
    group_size: int | None = None
    reason: str = ""                  # why it stays float, or what quantizes it
    notes: list[str] = field(default_factory=list)
    data_free: bool = True            # False: the method needs calibration inputs (GPTQ)
    cpu_activations: str = "float"    # "int8": CPU decode with int8 activations (config.cpu_activations_for)

    @property
    def quantized(self) -> bool:
        return self.format is not None


def plan_linear(config: QuantConfig, path: str, weight: Tensor, device: torch.device) -> LinearPlan:
    """Decide how `config` treats the linear at `path` whose weight is [out, in]."""
    if weight.dim() != 2:
        return LinearPlan(path, 0, 0, reason=f"weight has {weight.dim()} dimensions, expected 2")
    n, k = weight.shape
    plan = LinearPlan(path, k, n)
    if (why := config.skip_reason(path)) is not None:
        plan.reason = why
        return plan
    if not weight.is_floating_point():
        plan.reason = f"weight dtype {weight.dtype} is not a float type"
        return plan
    if min(n, k) < config.min_features:
        plan.reason = f"smaller than min_features={config.min_features}"
        return plan
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(
            f"weight of {path} [{n}x{k}] has {bad} NaN/Inf values: the float model is already broken "
            "here (a failed load or overflow); fix the weights or skip the layer with "
            f"skip=({path!r},) in the config"
        )
    int8_reason = config.int8_reason(path)
    head_int8 = int8_reason is not None
    if head_int8 or (isinstance(config, RTNConfig) and config.bits == 8):
        fmt, group = "int8", None  # per channel, symmetric
    elif isinstance(config, GANQConfig):  # one table per output row: no groups
        fmt, group = "lut", None
    elif isinstance(config, QUIKConfig):  # groups (if any) of the integer columns, fixed at calibration
        fmt, group = "quik", config.group_size
    else:
        fmt = "int8" if getattr(config, "bits", 4) == 8 else "int4"
        group, note = choose_group_size(getattr(config, "group_size", 64), k)
        if group is None:
            plan.reason = f"no supported group size (32, 64, 128, 256) divides in_features {k}"
            return plan
        if note:
            plan.notes.append(note)
    if (why := lowering.unsupported_reason(fmt, n, k, group, device)) is not None:
        plan.reason = why
        return plan
    plan.format, plan.group_size = fmt, group
    plan.cpu_activations = cpu_activations_for(config.cpu_activations, path, fmt)
    if device.type == "cpu" and plan.cpu_activations != config.cpu_activations:
        plan.notes.append("decode keeps float activations (int8 ones: int4 layers and the lm_head)")
    plan.reason = int8_reason if head_int8 else describe(config, fmt, group, k, path)
    plan.data_free = head_int8 or not config.needs_calibration
    return plan


def describe(config: QuantConfig, fmt: str, group: int | None, in_features: int, path: str = "") -> str:
    if isinstance(config, QUIKConfig):
        wb, ab = config.layer_bits(path)
        return (f"W{wb}A{ab} {'per channel' if group is None else f'g{group}'} sym, activations per token "
                f"asym, quik (gptq{', clip search' if config.clip_search else ''})")
    if isinstance(config, GANQConfig):
        return (f"{config.bits}-bit lookup table per row ({2**config.bits} "
                f"{str(config.table_dtype).removeprefix('torch.')} entries), ganq")
    if isinstance(config, GPTQConfig):
        g = "per channel" if group == in_features and config.group_size is None else f"g{group}"
        order = ", act_order" + (" (static groups)" if config.static_groups and config.group_size else "")
        return (f"{config.bits}-bit {g} {'sym' if config.sym else 'asym'}, gptq"
                f"{order if config.act_order else ''}{', clip search' if config.clip_search else ''}")
    if fmt == "int8":
        return "int8 per channel, symmetric" + (" (default recipe for a model that does not generate)"
                                                  if config == RTNConfig(bits=8) else "")
    if isinstance(config, RTNConfig):
        g = "per channel" if group == in_features and config.group_size is None else f"g{group}"
        return f"int4 {g} {'sym' if config.sym else 'asym'}, {config.method} ({config.search} grid)"
    return f"int4 g{group}, {config.method}"


def quantize_linear(config: QuantConfig, plan: LinearPlan, weight: Tensor,
                    importance: Tensor | None = None) -> Int4Weight | Int8Weight:
    """Quantize a float weight [out, in] as planned (data-free methods only)."""
    if plan.format == "int8" and plan.data_free:
        return rtn.quantize_int8(weight, scale_dtype=config.scale_dtype)
    if isinstance(config, RTNConfig):
        return rtn.quantize_int4(weight, plan.group_size, sym=config.sym, search=config.search,
                                 scale_dtype=config.scale_dtype,
                                 importance=importance if config.norm_weighting else None)
    raise NotImplementedError(
        f"{type(config).__name__} needs calibration data: call "
        "qcompile.quantize(model, config, calibration=...) before torch.compile"
    )
