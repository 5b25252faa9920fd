"""`qcompile.quantize`: convert a model's linear layers in place, before compiling."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import DLQATConfig, QuantConfig, default_config
from .methods.calibration import quantize_with_calibration
from .methods import plan_linear, quantize_linear
from .modules import colocate_siblings, float_report, install, linear_modules, untie  # noqa: F401  (linear_modules: public here too)
from .report import GraphReport, Report


@torch.no_grad()
def norm_gains(model: nn.Module, example_inputs=None) -> dict[str, torch.Tensor]:
    """Data-free channel importance: for each linear fed directly by a norm module, that norm's
    squared gain (found by running `example_inputs`, or the model's dummy inputs, once)."""
    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None)
        if example_inputs is None:
            return {}
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(norm output) -> (output, gain)
    gains: dict[str, torch.Tensor] = {}
    hooks = []
    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        is_norm = isinstance(w, torch.Tensor) and w.dim() == 1 and not isinstance(mod, nn.Embedding)
        if is_norm:
            hooks.append(mod.register_forward_hook(lambda m, i, o: outputs.__setitem__(id(o), (o, m.weight))))
    for path, mod, _ in linear_modules(model):
        def pre(m, args, path=path):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor):
                for t in (x, x._base):  # the norm's output itself, or a slice of it (lm_head)
                    hit = outputs.get(id(t)) if t is not None else None
                    if hit is not None and hit[0] is t and hit[1].shape[0] == x.shape[-1]:
                        gains[path] = hit[1].detach().float().square()
                        break
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        device = next(model.parameters()).device
        if isinstance(example_inputs, dict):
            model(**{k: v.to(device) for k, v in example_inputs.items()})
        else:
            model(*[v.to(device) if isinstance(v, torch.Tensor) else v for v in example_inputs])
    finally:
        for h in hooks:
            h.remove()
    return gains


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig | None = None, *, example_inputs=None,
             calibration=None, tokenizer=None, progress: bool = True) -> nn.Module:
    """Quantize `model`'s linear layers in place and free the float weights they replace.

    Args:
        model: a float model (Hugging Face or any nn.Module with nn.Linear / Conv1D layers).
        config: a method config (`qcompile.RTNConfig`, `qcompile.GPTQConfig`, `qcompile.DLQATConfig`,
            ...); None takes the default recipe.
        example_inputs: inputs for one forward pass (a tuple, or a dict of keyword arguments)
            used to find which norm feeds which layer; Hugging Face models supply their own.
        calibration: for methods that learn from data (GPTQ; DL-QAT trains on it): a list of texts, a LongTensor
            [n, seqlen] of token ids, or a list of id tensors; None uses the text that ships with
            qcompile. See `qcompile.methods.calibration`.
        tokenizer: turns calibration texts into ids; by default the model's own (from the folder
            it was loaded from).
        progress: show a progress bar.

    Returns the same model; ``model.qcompile_report`` holds the per-layer report.
    Interrupting (Ctrl-C) leaves the layers done so far quantized and the rest in float.
    """
    config = config or default_config(model)
    config.validate()
    if isinstance(config, DLQATConfig):
        from .qat import quantize_dlqat

        return quantize_dlqat(model, config, calibration, tokenizer=tokenizer, progress=progress)
    if config.needs_calibration:
        quantize_with_calibration(model, config, calibration, tokenizer=tokenizer, progress=progress)
        colocate_siblings(model)
        return model
    if calibration is not None or tokenizer is not None:
        raise ValueError(f"{type(config).__name__} is data-free: it takes no calibration= or tokenizer=")
    gains = norm_gains(model, example_inputs) if getattr(config, "norm_weighting", False) else {}
    report = GraphReport(index=0, device="")
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    layers = linear_modules(model)
    for path, mod, weight in tqdm(layers, desc="quantize", disable=not progress):
        report.device = str(weight.device)
        plan = plan_linear(config, path, weight, weight.device)
        if not plan.quantized:
            report.linears.append(float_report(plan, weight))
            continue
        importance = gains.get(path)
        if importance is not None and plan.format == "int4":
            plan.notes.append("error weighted by its input norm's gain")
        report.linears.append(install(model, path, mod, quantize_linear(config, plan, weight, importance),
                                      plan, input_emb))
    untie(model)
    colocate_siblings(model)  # q/k/v, gate/up: one op each in the compiled graph
    model.qcompile_report = Report(config=config.to_dict(), graphs=[report])
    return model
