"""Module paths in the report are the model's own `named_modules()` names, whatever the entry point.

Dynamo's records (nn_module_stack keys, placeholder sources) start from the frame it traced, which
moves between releases: transformers 5.25 wraps `forward` in `*args` decorators, so the root
module is `L['args'][0]` there and `L['self']` before. Skip patterns, the lm_head rule and every
report key read these paths; this file pins the exact strings for a Llama-style model so a future
release that changes the records fails here, loudly, instead of silently renaming layers.
"""
import pytest
import torch

import qcompile
from qcompile import RTNConfig
from tests.conftest import tiny_llama

LLAMA_PATHS = sorted(
    [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    + [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    + ["lm_head"])


def _paths(reports):
    return sorted({lin.path for r in reports for lin in r.linears})


def _backend(reports, **kw):
    return qcompile.Backend(RTNConfig(group_size=64), inductor=False, reports=reports, **kw)


def _entry_points():
    """(name, run(model, backend, ids)) for the ways people hand a model to torch.compile."""
    def module(model, backend, ids):
        torch.compile(model, backend=backend)(ids)

    def bound_forward(model, backend, ids):  # Hugging Face's documented recipe
        model.forward = torch.compile(model.forward, backend=backend)
        model(ids)

    def module_compile(model, backend, ids):
        model.compile(backend=backend)
        model(ids)

    def function_of_model(model, backend, ids):
        torch.compile(lambda m, x: m(x).logits, backend=backend)(model, ids)

    def closure(model, backend, ids):
        torch.compile(lambda x: model(x).logits, backend=backend)(ids)

    return [module, bound_forward, module_compile, function_of_model, closure]


@pytest.mark.parametrize("run", _entry_points(), ids=lambda f: f.__name__)
def test_paths_are_named_modules_for_every_entry_point(run):
    torch._dynamo.reset()
    model = tiny_llama()
    reports = []
    run(model, _backend(reports), torch.randint(0, 256, (1, 8)))
    assert _paths(reports) == LLAMA_PATHS
    names = dict(model.named_modules())
    assert all(p in names for p in _paths(reports))


def test_graphs_after_a_graph_break_keep_full_paths():
    # A graph break inside the decoder: the rest is compiled as graphs rooted at inner modules,
    # whose own records read "layers.0.mlp.up_proj".
    torch._dynamo.reset()
    model = tiny_llama()
    model.model.layers[1].register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    reports = []
    torch.compile(model, backend=_backend(reports))(torch.randint(0, 256, (1, 8)))
    assert len(reports) > 1
    assert _paths(reports) == LLAMA_PATHS


def test_compiled_forward_called_from_a_wrapper_keeps_paths_of_the_compiled_model():
    torch._dynamo.reset()
    model = tiny_llama()

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return self.net(x).logits

    reports = []
    model.forward = torch.compile(model.forward, backend=_backend(reports))
    Wrapper()(torch.randint(0, 256, (1, 8)))
    assert _paths(reports) == LLAMA_PATHS


def test_skip_patterns_and_lm_head_rule_read_the_paths(recwarn):
    torch._dynamo.reset()
    model = tiny_llama()
    cfg = RTNConfig(skip=("model.layers.0.*",), lm_head=False)
    report = qcompile.explain(model, torch.randint(0, 256, (1, 8)), config=cfg)
    assert not [w for w in recwarn if "report paths" in str(w.message)]
    by_path = {x.path: x for x in report.linears}
    assert sorted(by_path) == LLAMA_PATHS
    for path, lin in by_path.items():
        if path.startswith("model.layers.0."):
            assert lin.op is None and "skip pattern" in lin.reason, path
        elif path == "lm_head":
            assert lin.op is None and "lm_head=False" in lin.reason
        else:
            assert lin.op == "qcompile::int4_mm_a8", path


def test_explain_on_a_compiled_model_reads_the_paths_of_the_model_it_wraps(recwarn):
    # qcompile.explain(torch.compile(model, ...), ids), as a user inspects what they compiled: the
    # wrapper's named_modules() start with "_orig_mod.", the report's paths do not
    torch._dynamo.reset()
    model = tiny_llama()
    report = qcompile.explain(torch.compile(model, backend=qcompile), torch.randint(0, 256, (1, 8)))
    assert not [w for w in recwarn if "report paths" in str(w.message)]
    assert sorted({x.path for x in report.linears}) == LLAMA_PATHS


@pytest.mark.parametrize("source, path", [
    ("L['self']._modules['model']._modules['layers']._modules['0']._modules['self_attn']._modules['q_proj']",
     "model.layers.0.self_attn.q_proj"),
    ("L['args'][0].model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
    ("L['self'].model.layers[0].mlp.up_proj", "model.layers.0.mlp.up_proj"),
    ("L['args'][0]._modules['lm_head']._parameters['weight']", "lm_head.weight"),
    ("G['model'].lm_head", "lm_head"),
    ("L['fn'].__self__.model.norm", "model.norm"),
])
def test_source_expressions_become_paths_relative_to_the_root_module(source, path):
    from qcompile.passes.analysis import _clean_path

    assert _clean_path(source) == path


@pytest.mark.parametrize("inductor", [False, True])
def test_a_graph_shared_by_layers_uses_each_layers_own_weights(inductor):
    # A graph break inside every MLP: Dynamo compiles the rest of an MLP's forward once and calls
    # that graph for all layers with their own parameters. Each layer must compute with its own
    # quantized weights (once, layers 1 and 2 silently ran with layer 0's) and be in the report.
    from tests.test_backend import MINMAX, close_logits, fake_quantized

    model = tiny_llama(num_hidden_layers=3)
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda m, a: torch._dynamo.graph_break())
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    reports = []
    with torch.no_grad():
        out = torch.compile(model, backend=qcompile.Backend(MINMAX, inductor=inductor, reports=reports))(ids).logits
        ref = fake_quantized(model)(ids).logits
    assert close_logits(out, ref)
    paths = {x.path for r in reports for x in r.linears if x.op}
    assert {f"model.layers.{i}.mlp.{n}" for i in range(3) for n in ("gate_proj", "up_proj", "down_proj")} <= paths
    shared = [x for r in reports for x in r.linears if x.path == "model.layers.2.mlp.down_proj"]
    assert any("same compiled graph as model.layers.0.mlp.down_proj" in n for n in shared[0].notes)
