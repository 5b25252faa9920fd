"""DL-QAT: low-rank quantization-aware training, merged into the plain int4 format.

    qat = qcompile.qat.prepare(model, qcompile.DLQATConfig(bits=3))   # post-training grid + trainable parts
    qcompile.qat.train(qat, teacher)                                  # or your own loop over qat's trainable parameters
    qcompile.qat.convert(qat)                                         # QuantLinear int4 layers again: no adapter

`qcompile.quantize(model, DLQATConfig(...))` runs the three (with a float copy of the model as the
teacher). The trained form of each layer is in `qcompile.qat.fake_quant`; the loop in
`qcompile.qat.distill`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import lowering
from ..config import DLQATConfig
from ..methods import LinearPlan, gptq, plan_linear, quantize_linear
from ..methods.calibration import quantize_with_calibration
from ..modules import QuantLinear, colocate_siblings, float_report, install, linear_modules, untie
from ..report import GraphReport, Report
from .fake_quant import FrozenQuantLinear, QATLinear
from .distill import TrainResult, train

__all__ = ["prepare", "train", "convert", "trainable_parameters", "QATLinear", "TrainResult"]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


@torch.no_grad()
def _rtn_init(model: nn.Module, config, progress: bool) -> None:
    """Round to nearest on GPTQ's min/max grid (clip search on), every layer as `config` plans it."""
    report = GraphReport(index=0, device="")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for path, mod, w in tqdm(linear_modules(model), desc="rtn init", disable=not progress):
        report.device = str(w.device)
        plan = plan_linear(config, path, w, w.device)
        if not plan.quantized:
            report.linears.append(float_report(plan, w))
            continue
        if plan.data_free:
            q = quantize_linear(config, plan, w)
        else:
            q = gptq.to_format(gptq.rtn_quantize(w, bits=config.bits, group_size=plan.group_size, sym=config.sym,
                                                 clip_search=config.clip_search, scale_dtype=config.scale_dtype))
            plan.reason = plan.reason.split(", gptq")[0] + ", round to nearest (min/max grid, clip search)"
        report.linears.append(install(model, path, mod, q, plan, emb))
    untie(model)
    model.qcompile_report = Report(config=config.to_dict(), graphs=[report])


def prepare(model: nn.Module, config: DLQATConfig | None = None, *, calibration=None, tokenizer=None,
            progress: bool = True) -> nn.Module:
    """Quantize `model` (float) to `config`'s initial grid, in place, and make its int4 layers trainable.

    Every int4 layer becomes a `QATLinear` (frozen codes and grid; trainable per-group magnitudes and
    LoRA factors); other quantized layers (the int8 lm_head) compute with their dequantized weight,
    frozen; every other parameter is frozen. Before any step the model computes what the initial
    post-training model does. `calibration` / `tokenizer` feed a GPTQ init (as in `qcompile.quantize`).
    Returns the model; `trainable_parameters(model)` lists what to optimise."""
    config = config or DLQATConfig()
    config.validate()
    if not isinstance(config, DLQATConfig):
        raise TypeError(f"qcompile.qat.prepare needs a DLQATConfig, got {type(config).__name__}")
    if any(isinstance(m, (QuantLinear, QATLinear)) for m in model.modules()):
        raise ValueError("qcompile.qat.prepare needs the float model (DL-QAT starts from its weights); this one is "
                         "already quantized or prepared: load the float checkpoint again")
    float_weights = {path: w.detach().clone() for path, _, w in linear_modules(model)}  # GPTQ edits them in place
    ptq = config.gptq_config()
    torch.manual_seed(config.seed)
    if config.init == "gptq":
        quantize_with_calibration(model, ptq, calibration, tokenizer=tokenizer, progress=progress)
    else:  # data-free: calibration text, if any, is for training
        _rtn_init(model, ptq, progress)
    generator_state = torch.get_rng_state()
    torch.manual_seed(config.seed)
    entries = {e.path: e for e in model.qcompile_report.graphs[0].linears}
    for path, mod in list(model.named_modules()):
        if not isinstance(mod, QuantLinear):
            continue
        weight = lowering.unpack(mod.packed_weight())
        if weight.format_name == "int4":
            qat = QATLinear(weight, float_weights[path], mod.bias, rank=config.rank, lora_alpha=config.lora_alpha,
                            scale_dtype=config.scale_dtype, compile=config.compile, init=config.init)
            entries[path].notes.append(f"DL-QAT: training from {entries[path].reason}")
            _set_module(model, path, qat.to(weight.qweight.device))
        else:
            _set_module(model, path, FrozenQuantLinear(mod, weight.dequantize(torch.float32)))
    torch.set_rng_state(generator_state)
    del float_weights
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(model):
        p.requires_grad_(True)
    model.qcompile_qat_config = config
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DL-QAT trains: each QATLinear's magnitudes and LoRA factors."""
    out = []
    for m in model.modules():
        if isinstance(m, QATLinear):
            out += [p for p in (m.magnitude, m.lora_a, m.lora_b) if p is not None]
    return out


def trainable_fraction(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, parameters of the model as it deploys: float parameters + one per
    quantized weight)."""
    trained = sum(p.numel() for p in trainable_parameters(model))
    total = 0
    for m in model.modules():
        if isinstance(m, QATLinear):
            total += m.in_features * m.out_features
        elif isinstance(m, FrozenQuantLinear):
            total += m.weight.numel()
        total += sum(p.numel() for p in m.parameters(recurse=False)
                     if not isinstance(m, QATLinear) or p is m.bias)
    return trained, total


@torch.no_grad()
def convert(model: nn.Module, *, progress: bool = False) -> nn.Module:
    """Merge every QATLinear into a plain int4 `QuantLinear` (codes clamp(round(Φ0 + (α/r)·B·A)),
    scales bf16(m·s0), the initial zero-points and permutation) and restore the frozen layers; in
    place. The report says how each layer was trained."""
    config = getattr(model, "qcompile_qat_config", None)
    if config is None:
        raise ValueError("qcompile.qat.convert: this model was not prepared by qcompile.qat.prepare")
    report = model.qcompile_report.graphs[0]
    entries = {e.path: i for i, e in enumerate(report.linears)}
    trained = getattr(model, "qcompile_qat_trained", "not trained (converted right after prepare)")
    for path, mod in tqdm(list(model.named_modules()), desc="convert", disable=not progress):
        if isinstance(mod, FrozenQuantLinear):
            _set_module(model, path, mod.original[0])
        elif isinstance(mod, QATLinear):
            old = report.linears[entries[path]]
            plan = LinearPlan(path, mod.in_features, mod.out_features, "int4", mod.group_size,
                              reason=(f"{mod.bits}-bit {'per channel' if mod.group_size == mod.in_features else f'g{mod.group_size}'}"
                                      f", dl-qat (rank {mod.rank}, magnitude per group; from {mod.init} init"
                                      f"{', act_order' if mod.perm is not None else ''})"),
                              notes=[n for n in old.notes if not n.startswith("DL-QAT:")]
                              + [f"initial grid: {old.reason}", f"trained: {trained}"],
                              data_free=False, cpu_activations=config.cpu_activations)
            report.linears[entries[path]] = install(model, path, mod, mod.merged_weight(), plan, None)
    colocate_siblings(model)
    model.qcompile_report = Report(config=config.to_dict(), graphs=[report])
    for attr in ("qcompile_qat_config", "qcompile_qat_trained"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def quantize_dlqat(model: nn.Module, config: DLQATConfig, calibration=None, *, tokenizer=None,
                   progress: bool = True) -> nn.Module:
    """`qcompile.quantize` for a DLQATConfig: a float copy as the teacher, prepare, train, convert."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    prepare(model, config, calibration=calibration, tokenizer=tokenizer, progress=progress)
    train(model, teacher, calibration=calibration, tokenizer=tokenizer, progress=progress)
    del teacher
    return convert(model)
