"""The torch.compile backend: Dynamo graph -> qcompile passes -> Inductor."""
from __future__ import annotations

import functools
import itertools
import os
import warnings
from pathlib import Path

import torch

from . import _compat
from .config import AttentionConfig, QuantConfig, default_config
from .report import GraphReport, PassRecord, dump

_graph_counter = itertools.count()


def _device_of(example_inputs) -> torch.device:
    for t in example_inputs:
        if isinstance(t, torch.nn.Parameter):
            return t.device
    for t in example_inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


class Backend:
    """A torch.compile backend that quantizes linear layers, then hands the graph to Inductor.

    Use the module itself (``backend=qcompile``) for the default recipe, or
    ``backend=qcompile.backend(config)`` for another. ``mode=``/``options=`` of torch.compile are
    passed on to Inductor.
    """

    _qcompile_backend = True  # lets qcompile recognise its own compiled modules

    def __init__(self, config: QuantConfig | None = None, *, fuse_projections: bool = True,
                 inductor: bool = True, reports: list | None = None,
                 attention: AttentionConfig | bool | None = None, quantize_linears: bool = True):
        # no config: the default recipe, chosen per compiled model (`default_config`)
        self.explicit_config = config is not None
        self.config = config or default_config()
        self.config.validate()
        # attention: an AttentionConfig, or True/None (the default one) / False (pass off)
        self.attention = (attention if isinstance(attention, AttentionConfig)
                          else AttentionConfig(enabled=attention is not False))
        self.attention.validate()
        self.quantize_linears = quantize_linears
        if self.config.needs_calibration:
            raise ValueError(
                f"{type(self.config).__name__} needs calibration data, which a torch.compile backend "
                "never sees: run qcompile.quantize(model, config, calibration=...) first, then "
                "torch.compile(model, backend=qcompile)"
            )
        self.fuse_projections = fuse_projections
        self.inductor = inductor
        self.reports = reports  # GraphReports are appended here when given (explain)
        self.__name__ = "qcompile"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        from qcompile.passes import PASSES, PassContext
        from qcompile.passes.analysis import collective_counts, placeholder_values, root_prefix

        mode, options = kwargs.pop("mode", None), kwargs.pop("options", None) or {}
        gm = _own_copy(gm)
        if kwargs:
            raise TypeError(f"qcompile backend got unexpected torch.compile arguments {sorted(kwargs)}")
        device = _device_of(example_inputs)
        report = GraphReport(index=next(_graph_counter), device=str(device))
        values = placeholder_values(gm.graph, example_inputs)
        config = self.config if self.explicit_config else default_config(_compat.compiled_calling_module())
        if config != self.config and config.bits == 8:
            report.notes.append(f"default recipe for a model that does not generate text: {config.method} "
                                f"int{config.bits} per channel")
        elif config.int8 and not self.explicit_config:
            report.notes.append(f"default recipe: int4 g{config.group_size}, the last decoder block "
                                f"({', '.join(config.int8)}) int8 per channel")
        ctx = PassContext(config, device, values, report, fuse_projections=self.fuse_projections,
                          attention=self.attention, path_prefix=root_prefix(gm.graph, values))
        switched_off = {"linear": not self.quantize_linears, "attention": not self.attention.enabled}
        for name, run_pass in PASSES:
            if switched_off.get(name):
                report.passes.append(PassRecord(name, "off", gm.code, gm.code))
                continue
            before = gm.code
            summary = run_pass(gm, ctx)
            report.passes.append(PassRecord(name, summary, before, gm.code))
        report.collectives = collective_counts(gm.graph)
        if note := _training_copies_note(gm, example_inputs):
            report.notes.append(note)
            warnings.warn(f"qcompile: {note}", stacklevel=2)
        if self.reports is not None:
            self.reports.append(report)
        if debug_dir := os.environ.get("QCOMPILE_DEBUG_DIR"):
            dump(report, self.describe(), debug_dir)

        extra = ctx.new_inputs
        position = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        if not self.inductor:
            return _append_inputs(gm.forward, extra, ctx.remakes, position, example_inputs)
        patches = {**_compat.mode_options(mode), "post_grad_custom_post_pass": _cache_salt(), **options}
        compiled = _compat.compile_with_inductor(gm, list(example_inputs) + extra, patches, len(extra))
        return _append_inputs(compiled, extra, ctx.remakes, position, example_inputs)

    def describe(self) -> dict:
        """The config as the report shows it: the quantization recipe and the pass switches."""
        return {**self.config.to_dict(), "quantize_linears": self.quantize_linears,
                "attention": self.attention.to_dict()}


def _training_copies_note(gm: torch.fx.GraphModule, example_inputs) -> str | None:
    """What it costs when a graph that mutates its inputs in place (a static KV cache's index_copy_) is
    compiled with grad mode on and parameters that require grad: AOTAutograd builds a training graph that
    copies every mutated input on each call and writes it back (SmolLM2, a 207-position cache: 3.4 ms of a
    ~12 ms decode step). A decode loop written without torch.no_grad() does this; generate() does not."""
    if not torch.is_grad_enabled() or not any(isinstance(x, torch.Tensor) and x.requires_grad
                                              for x in example_inputs):
        return None
    from qcompile.passes.dead_code import mutates

    mutated = []
    for n in gm.graph.nodes:
        if (n.op in ("call_method", "call_function") and mutates(n) and n.args and isinstance(n.args[0], torch.fx.Node)
                and n.args[0].op == "placeholder" and n.args[0].name not in mutated):
            mutated.append(n.args[0].name)
    if not mutated:
        return None
    shown = ", ".join(mutated[:3]) + (f" and {len(mutated) - 3} more" if len(mutated) > 3 else "")
    return (f"this graph mutates {len(mutated)} of its inputs in place ({shown}: e.g. a static KV cache) and is "
            "compiled for training (grad mode is on and parameters require grad), so every call copies them; "
            "for inference run it under torch.no_grad() or torch.inference_mode()")


@functools.cache
def _source_digest() -> str:
    import qcompile.lowering

    here = Path(__file__).parent
    lowering = Path(qcompile.lowering.__file__).parent
    files = [*(here / "ops").glob("*.py"), here / "_compat.py", *lowering.glob("*.py"),
             *lowering.glob("*.cpp")]
    return _compat.digest_files([str(f) for f in files])


def _cache_salt():
    """Inductor's graph cache key gets qcompile's source and the module settings its ops read while a
    graph is traced (which kernel a decomposition picks)."""
    from .ops import attention, linear

    return _compat.cache_salt_pass(f"{_source_digest()}:{attention.DECODE_MAX_ROWS}:{linear.A8_MAX_ROWS}")


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A GraphModule with its own graph (Dynamo reads the original's placeholders after we return);
    node metadata is copied shallowly and attributes are shared, so no tensor is duplicated.
    Dynamo's input sources come along (`_compat.copy_dynamo_sources`): without them Inductor
    treats no input as static, and CUDA graphs would copy every weight and skip graphs that
    update a static KV cache in place."""
    graph = torch.fx.Graph()
    nodes: dict = {}
    out = graph.graph_copy(gm.graph, nodes)
    graph.output(out)
    new = torch.fx.GraphModule(gm, graph)
    new.meta.update(getattr(gm, "meta", {}))
    _compat.copy_dynamo_sources(gm, new, nodes)
    return new


def _append_inputs(compiled, extra: list, remakes: list, position: dict, example_inputs):
    """Feed the quantized weights the passes added as graph inputs on every call.

    Dynamo calls one compiled graph for every module that shares its code (after a graph break
    inside a decoder layer, the rest of the layer is one graph for all layers), passing each
    call's own parameters. The weights added for the parameters seen at compile time are fed only
    when those same parameters come in; other parameters get their own quantized weights (made
    once, then cached), so no layer ever computes with another layer's weights."""
    if not extra:
        return compiled
    watched = sorted({position[n] for sources, _ in remakes for n in sources})
    known = {tuple(id(example_inputs[i]) for i in watched): extra}

    def weights_for(args):
        key = tuple(id(args[i]) for i in watched)
        tensors = known.get(key)
        if tensors is None:
            values = {n: args[i] for n, i in position.items() if i < len(args)}
            tensors = [t for _, remake in remakes for t in remake(values)]
            known[key] = tensors
        return tensors

    def run(*args):  # compile_fx's result takes positional args (its _boxed_call flag is inherited, not real)
        return compiled(*args, *weights_for(args))

    return run


def backend(config: QuantConfig | None = None, **options) -> Backend:
    """A torch.compile backend for `config`: ``torch.compile(model, backend=qcompile.backend(cfg))``."""
    return Backend(config, **options)


DEFAULT = Backend()
entry_point = DEFAULT  # torch_dynamo_backends entry point: backend="qcompile"
