"""The torch internals qcompile leans on, each wrapped once (they move between releases).

Checked on torch 2.11 (the GPU image) and 2.13 (CPU).
"""
from __future__ import annotations

import functools
import weakref

import torch


def source_name(source) -> str:
    """A Dynamo Source's expression: `.name` is a method before torch 2.12, a property after."""
    name = source.name
    return name() if callable(name) else name


def uncompiled(module):
    """`module` itself, or the module a `torch.compile(module)` wrapper (`OptimizedModule`) holds."""
    from torch._dynamo.eval_frame import OptimizedModule

    return module._orig_mod if isinstance(module, OptimizedModule) else module


def compiled_calling_module():
    """The module the user compiled, seen from inside a backend call: the one an `OptimizedModule`
    on the Python stack wraps, else the outermost module whose frame runs Dynamo-compiled code
    (a graph break inside `model.forward = torch.compile(model.forward)`) or whose bound method a
    Dynamo context is calling (`compiled.generate(...)` routed through the compiled `_call_impl`;
    the first graph of `torch.compile(model.forward)`); None when none of these.
    `torch._dynamo.utils.orig_code_map` (compiled code -> original code) and the `fn` local of
    `_TorchDynamoContext.__call__`'s wrapper exist in 2.11 and 2.13."""
    import sys

    from torch._dynamo.eval_frame import OptimizedModule, _TorchDynamoContext
    from torch._dynamo.utils import orig_code_map

    top, frame = None, sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, OptimizedModule):
            return owner._orig_mod
        if isinstance(owner, torch.nn.Module) and frame.f_code in orig_code_map:
            top = owner
        elif isinstance(owner, _TorchDynamoContext):
            wrapped = getattr(frame.f_locals.get("fn"), "__self__", None)
            if isinstance(wrapped, torch.nn.Module):
                top = wrapped
        frame = frame.f_back
    return top


def compile_with_inductor(gm, example_inputs, config_patches: dict, num_added: int = 0):
    """AOTAutograd + Inductor on a Dynamo graph (takes ownership of `gm`).

    The last `num_added` inputs are tensors a pass added (quantized weights). Dynamo knows no
    source for them, so AOTAutograd would give their sizes fresh symbols that no guard can be
    built for (a failed guard, seen on CUDA where Inductor asks whether 32-bit indexing is safe);
    they are handed over as static-shaped fake tensors of Dynamo's fake mode instead.

    AOTAutograd's on-disk cache is off for these graphs (Inductor's own graph cache stays on): in a
    warm process, SmolLM2's decode graphs loaded from it generated other greedy text than the same
    graphs compiled afresh, and different text from run to run (torch 2.13; the prefill logits were
    equal; the cause is not found). Measured in benchmarks/results/first_token_cpu.md;
    tests/test_weight_cache.py checks it stays off.
    """
    from torch._inductor.compile_fx import compile_fx

    mark_added_inputs_static(gm)
    ctx = torch._guards.TracingContext.try_get()
    if num_added and ctx is not None and ctx.fake_mode is not None:
        head, added = list(example_inputs[:-num_added]), example_inputs[-num_added:]
        example_inputs = head + [ctx.fake_mode.from_tensor(t, static_shapes=True) for t in added]
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=config_patches)


# AOTAutograd finds a Dynamo graph's static inputs (parameters, buffers, a static KV cache: fixed
# addresses that CUDA graphs need not copy) from the GraphModule's `_param_name_to_source` and each
# placeholder's `_dynamo_source` and meta["tensor_dict"]["_dynamo_static_input_type"] (2.11-2.13).
def copy_dynamo_sources(old: torch.fx.GraphModule, new: torch.fx.GraphModule, nodes: dict) -> None:
    """Carry Dynamo's input bookkeeping from `old` to its copy `new` (`nodes`: old node -> new)."""
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source
    for node in old.graph.find_nodes(op="placeholder"):
        if hasattr(node, "_dynamo_source"):
            nodes[node]._dynamo_source = node._dynamo_source


def mark_added_inputs_static(gm: torch.fx.GraphModule) -> None:
    """Placeholders a pass added (quantized weights: Dynamo knows no source for them) are static
    inputs, as Dynamo marks parameters: their addresses never change from call to call."""
    if not hasattr(gm, "_param_name_to_source"):
        return  # not a Dynamo graph (or a release that does not read these): nothing to mark
    for node in gm.graph.find_nodes(op="placeholder"):
        if not hasattr(node, "_dynamo_source"):
            node._dynamo_source = None
            node.meta.setdefault("tensor_dict", {})["_dynamo_static_input_type"] = "unguarded"


def digest_files(files: list[str]) -> str:
    import hashlib
    from pathlib import Path

    return hashlib.sha256(b"".join(Path(f).read_bytes() for f in sorted(files))).hexdigest()


def cache_salt_pass(digest: str):
    """A post-grad pass that changes nothing but whose uuid is `digest`.

    Inductor's on-disk graph cache keys on the graph and its config, not on the decompositions,
    layout constraints and lowerings qcompile registers; without this, a changed qcompile could
    reuse code compiled by an older one.
    """
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class QCompileCacheSalt(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return digest

    return QCompileCacheSalt()


def mode_options(mode: str | None) -> dict:
    """Inductor config for a torch.compile `mode` ("reduce-overhead" -> cudagraphs, ...)."""
    if mode in (None, "default"):
        return {}
    return dict(torch._inductor.list_mode_options(mode))


# --- HF generate() on a torch.compile'd module --------------------------------------------------
# torch.compile(model) returns an OptimizedModule; `compiled.generate(...)` resolves to the original
# module's method, which calls the *uncompiled* module: the compiled forward is never used. For
# modules compiled with a qcompile backend we route those calls through the compiled forward for
# the duration of the call, the way nn.Module.compile() does (`_compiled_call_impl`).
_ROUTED_METHODS = ("generate",)
_routed_calls: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _is_qcompile_backend(obj) -> bool:
    for _ in range(8):
        if obj is None:
            return False
        if getattr(obj, "_qcompile_backend", False):
            return True
        obj = (getattr(obj, "_torchdynamo_orig_backend", None) or getattr(obj, "compiler_fn", None)
               or getattr(obj, "_torchdynamo_orig_callable", None))
    return False


def _route(opt_mod, method):
    @functools.wraps(method)
    def call(*args, **kwargs):
        mod = opt_mod._orig_mod
        compiled = _routed_calls.get(opt_mod)
        if compiled is None:
            compiled = _routed_calls[opt_mod] = opt_mod.dynamo_ctx(mod._call_impl)
        previous = mod._compiled_call_impl
        mod._compiled_call_impl = compiled
        try:
            return method(*args, **kwargs)
        finally:
            mod._compiled_call_impl = previous

    return call


def route_generate_through_compiled_forward() -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    if getattr(OptimizedModule, "_qcompile_routes_generate", False):
        return
    original = OptimizedModule.__getattr__

    def __getattr__(self, name):
        value = original(self, name)
        if name in _ROUTED_METHODS and callable(value) and _is_qcompile_backend(getattr(self.dynamo_ctx, "callback", None)):
            return _route(self, value)
        return value

    OptimizedModule.__getattr__ = __getattr__
    OptimizedModule._qcompile_routes_generate = True
    _keep_qcompiled_forward_in_generate()


# On CUDA (any accelerator) with a static cache, generate() compiles the model's __call__ itself
# with `generation_config.compile_config` (backend "inductor" by default). That compile traces
# through a forward the user compiled with backend=qcompile (HF's recipe `model.forward =
# torch.compile(model.forward, ...)`, or the routed call above), so the float model would run under
# plain Inductor. A model whose forward qcompile compiled keeps it: generate's own compile is skipped.
def _compiled_with_qcompile(fn) -> bool:
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(fn, "__closure__", None) or ():  # torch.compile(fn)'s wrapper closes over its context
        try:
            ctx = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(ctx, _TorchDynamoContext) and _is_qcompile_backend(getattr(ctx, "callback", None)):
            return True
    return False


def _keep_qcompiled_forward_in_generate() -> None:
    try:
        from transformers.generation.utils import GenerationMixin
    except ImportError:
        return
    original = getattr(GenerationMixin, "_valid_auto_compile_criteria", None)
    if original is None or getattr(original, "_qcompile_keeps_forward", False):
        return

    @functools.wraps(original)
    def _valid_auto_compile_criteria(self, *args, **kwargs):
        if _compiled_with_qcompile(self.__dict__.get("forward")) or _compiled_with_qcompile(
                self.__dict__.get("_compiled_call_impl")):
            return False
        return original(self, *args, **kwargs)

    _valid_auto_compile_criteria._qcompile_keeps_forward = True
    GenerationMixin._valid_auto_compile_criteria = _valid_auto_compile_criteria


# --- attention ------------------------------------------------------------------------------------
@functools.cache
def sdpa_has_enable_gqa() -> bool:
    """Whether F.scaled_dot_product_attention takes enable_gqa= (torch >= 2.5; its CPU flash kernel
    then indexes the shared K/V head, its math fallback repeats K/V)."""
    import torch.nn.functional as F

    q = torch.zeros(1, 2, 1, 8)
    kv = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def register_inductor_decomposition(op, fn) -> None:
    """Add `fn` to Inductor's decomposition table for `op` (fn may return NotImplemented to keep the op).
    torch._inductor.decomposition.register_decomposition in 2.11 and 2.13. Where fn keeps the op
    (another device), Inductor calls it as an extern kernel: that fallback is registered here, since
    Inductor refuses to make one on the fly for an op that has a decomposition ("both a fallback
    and a decomp for same op", seen on CUDA)."""
    from torch._inductor.decomposition import register_decomposition
    from torch._inductor.lowering import make_fallback

    register_decomposition(op)(fn)
    make_fallback(op, warn=False, override_decomp=True)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices natively (CUDA with bf16; a CPU with AVX512-BF16 or
    AMX), so that bf16 autocast is faster rather than emulated."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(p() for p in probes if p is not None)
    return False
