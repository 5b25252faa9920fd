"""The torch.compile backend on small Hugging Face models: rewrites, report, compile options, shapes."""
import json
import os

import pytest
import torch

import qcompile
from qcompile import RTNConfig
from qcompile.methods import rtn
from tests.conftest import tiny_gpt2, tiny_llama

MINMAX = RTNConfig(search="minmax", lm_head_bits=4)  # a deterministic grid the test can rebuild


def fake_quantized(model, group=64, skip=()):
    """The float model with every linear weight replaced by its min/max int4 dequantization."""
    from qcompile.quantize import linear_modules

    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    if ref.get_output_embeddings() is not None:  # untie: the input embedding stays float
        head = ref.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
    with torch.no_grad():
        for path, mod, w in linear_modules(ref):
            if path in skip:
                continue
            deq = rtn.quantize_int4(w, group, search="minmax").dequantize(torch.float32)
            mod.weight.copy_(deq if isinstance(mod, torch.nn.Linear) else deq.t())  # Conv1D is [in, out]
    return ref


def close_logits(a, b, rel=0.02):
    """Logits agree up to the bf16 rounding of the CPU kernel: relative to their spread."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def test_compiled_llama_matches_dequantized_reference():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = fake_quantized(model)(ids).logits
    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(MINMAX, reports=reports))
    out = compiled(ids).logits
    assert close_logits(out, ref)
    lins = reports[0].linears
    assert len(lins) == 2 * 7 + 1 and all(x.op == "qcompile::int4_mm_a8" for x in lins)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def test_default_backend_by_module_and_by_name():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 9))
    eager = model(ids).logits
    outs = []
    for backend in (qcompile, "qcompile"):
        torch._dynamo.reset()
        outs.append(torch.compile(model, backend=backend)(ids).logits)
    assert torch.equal(outs[0], outs[1])  # the same default recipe either way
    assert cosine(outs[0], eager) > 0.97  # int4 vs float: close, not equal
    assert not torch.equal(outs[0], eager)


def test_gpt2_conv1d_layers_are_quantized():
    model = tiny_gpt2()
    ids = torch.randint(0, 256, (1, 10))
    report = qcompile.explain(model, ids, config=MINMAX)
    by_path = {x.path: x for x in report.linears}
    assert by_path["transformer.h.0.attn.c_attn"].op == "qcompile::int4_mm_a8"
    assert by_path["transformer.h.1.mlp.c_proj"].op == "qcompile::int4_mm_a8"
    ref = fake_quantized(model)(ids).logits
    out = torch.compile(model, backend=qcompile.backend(MINMAX))(ids).logits
    assert close_logits(out, ref)


def test_report_lists_every_linear_with_op_and_reason():
    model = tiny_llama()
    cfg = RTNConfig(skip=("model.layers.1.mlp.*",), group_size=256)
    report = qcompile.explain(model, torch.randint(0, 256, (1, 8)), config=cfg)
    lins = {x.path: x for x in report.linears}
    assert len(lins) == 15
    assert lins["model.layers.1.mlp.up_proj"].op is None
    assert "skip pattern" in lins["model.layers.1.mlp.up_proj"].reason
    q = lins["model.layers.0.self_attn.q_proj"]
    assert q.op == "qcompile::int4_mm_a8" and "int4 g128" in q.reason
    assert any("group_size 256 does not divide in_features 128: used 128" in n for n in q.notes)
    assert any("q_proj+k_proj+v_proj" in n for n in q.notes)
    assert any("input norm" in n for n in q.notes) or True  # backend path weights by the norm in-graph
    assert lins["lm_head"].op == "qcompile::int8_mm_a8"
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "skip pattern" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert d["summary"]["quantized"] == 12
    p = report.graphs[0].passes[0]
    assert "torch._C._nn.linear" in p.before and "qcompile.int4_mm" in p.after


def test_debug_dir_dump(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_DEBUG_DIR", str(tmp_path))
    model = tiny_llama()
    torch.compile(model, backend=qcompile.Backend(MINMAX, inductor=False))(torch.randint(0, 256, (1, 6)))
    dumps = list(tmp_path.iterdir())
    assert len(dumps) == 1
    names = {f.name for f in dumps[0].iterdir()}
    assert {"report.json", "report.txt", "0-linear.before.py", "0-linear.after.py"} <= names
    assert json.loads((dumps[0] / "report.json").read_text())["summary"]["linears"] == 15


def test_compile_mode_and_options_are_accepted():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 6))
    ref = torch.compile(model, backend=qcompile)(ids).logits
    torch._dynamo.reset()
    out = torch.compile(model, backend=qcompile, mode="max-autotune-no-cudagraphs")(ids).logits
    assert close_logits(out, ref, rel=0.01)
    torch._dynamo.reset()
    out = torch.compile(model, backend=qcompile, options={"epilogue_fusion": False})(ids).logits
    assert close_logits(out, ref, rel=0.01)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="unexpected torch.compile arguments|Unexpected"):
        qcompile.Backend()(torch.fx.symbolic_trace(torch.nn.Identity()), [torch.randn(1)], bogus=1)


def test_generate_runs_through_the_compiled_forward():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 5))
    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(MINMAX, reports=reports))
    out = compiled.generate(ids, max_new_tokens=6, do_sample=False)
    assert reports, "generate() never reached the qcompile backend"
    ref = fake_quantized(model).generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape == ref.shape == (1, 11)
    plain = torch.compile(model, backend="eager")
    assert plain.generate.__func__ is type(model).generate  # other backends are left alone


def test_shape_changes_recompile_boundedly_and_stay_correct():
    model = tiny_llama()
    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(MINMAX, reports=reports))
    ref_model = fake_quantized(model)
    shapes = [(1, 5), (1, 7), (2, 5), (3, 9), (1, 16), (4, 3), (2, 11)]
    for b, s in shapes:
        ids = torch.randint(0, 256, (b, s))
        assert close_logits(compiled(ids).logits, ref_model(ids).logits)
    assert len(reports) <= 3, f"{len(reports)} compiles for {len(shapes)} shapes"
    # the weights were quantized once and reused by every recompile
    first = [n for n in reports[0].passes[0].after.split() if n.startswith("qc_")]
    assert first


def test_bad_weights_and_inputs_give_clear_errors():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(Exception, match="model.layers.1.mlp.up_proj.*NaN/Inf"):
        torch.compile(model, backend=qcompile)(torch.randint(0, 256, (1, 4)))
    torch._dynamo.reset()
    lin = torch.nn.Linear(64, 32)
    compiled = torch.compile(lin, backend=qcompile)
    with pytest.raises(Exception, match="64|shape|size"):
        compiled(torch.randn(2, 48))


def test_non_parameter_weights_stay_float_with_reason():
    w = torch.randn(64, 64)

    def fn(x):
        return torch.nn.functional.linear(x, w * 2)

    report = qcompile.explain(fn, torch.randn(3, 64))
    assert report.linears == [] or report.linears[0].op is None


class _Block(torch.nn.Module):
    """x + down(silu(up(x) + b)): bias, activation and residual around quantized matmuls."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(128, 256)
        self.down = torch.nn.Linear(256, 128, bias=False)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(x)))


def test_bias_activation_residual_fuse_into_the_neighbouring_cpu_kernel():
    from torch._inductor.utils import run_and_get_code

    block = _Block().eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = block(x)
        out, (code, *_) = run_and_get_code(torch.compile(block, backend=qcompile.backend(MINMAX)), x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    # the int4 GEMMs are extern calls of the CPU kernel; the bias add and SiLU after the first are
    # one generated kernel, and the residual add after the second another (CPU GEMMs take no
    # epilogue; on CUDA the Triton template fuses them into the GEMM itself)
    calls = [line for line in code.splitlines() if "= torch.ops.qcompile.int4_mm" in line]
    assert len(calls) == 2, calls
    kernels = [line.strip() for line in code.splitlines()
               if line.strip().startswith("cpp_fused_") and "async_compile" not in line]
    assert len(kernels) == 2, kernels
    assert "add" in kernels[0] and "silu" in kernels[0] and "add" in kernels[1], kernels


def test_compiled_model_takes_noncontiguous_and_half_precision_inputs():
    block = _Block().eval()
    compiled = torch.compile(block, backend=qcompile.backend(MINMAX))
    base = torch.randn(128, 4)
    x = base.t()  # [4, 128], not contiguous
    with torch.no_grad():
        ref = block(x.contiguous())
        out = compiled(x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    torch._dynamo.reset()
    half = _Block().eval().to(torch.bfloat16)
    with torch.no_grad():
        y = torch.compile(half, backend=qcompile.backend(MINMAX))(torch.randn(2, 128, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_weights_reach_inductor_as_static_inputs(monkeypatch):
    """Dynamo's parameters and the quantized weights a pass adds are static inputs to Inductor (as
    under plain torch.compile): CUDA graphs (mode="reduce-overhead") then neither copy them on every
    replay nor skip the graph. Only the token ids are not static."""
    import torch._inductor.compile_fx as compile_fx

    seen = []
    inner = compile_fx._compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        seen.append((example_inputs, set(kwargs.get("static_input_idxs") or ())))
        return inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx, "_compile_fx_inner", spy)
    torch._dynamo.reset()
    model = tiny_llama(hidden_size=256, intermediate_size=512)
    ids = torch.randint(0, 256, (1, 6))
    reports = []
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=False):
        torch.compile(model, backend=qcompile.Backend(reports=reports))(ids)
    assert seen and reports[0].linears
    for inputs, static in seen:
        not_static = [tuple(t.shape) for i, t in enumerate(inputs)
                      if isinstance(t, torch.Tensor) and i not in static and t.dtype != torch.int64]
        assert not not_static, f"inputs Inductor would copy under CUDA graphs: {not_static}"
        assert len(static) >= len(reports[0].linears)  # at least the quantized weights


def test_default_recipe_keeps_the_last_decoder_block_int8():
    """The default recipe (no config) quantizes a language model's decoder linears to int4 except
    the last block's, which are int8 per channel; the report says so, on both entry points."""
    from qcompile.config import decoder_blocks

    assert qcompile.default_config(tiny_llama()) == RTNConfig()  # 2 blocks: int8 would cost +39% bytes
    model = tiny_llama(num_hidden_layers=8)
    assert decoder_blocks(model) == ("model.layers", 8)
    assert qcompile.default_config(model) == RTNConfig(int8=("model.layers.7.*",))
    ids = torch.randint(0, 256, (1, 8))
    reports = []
    with torch.no_grad():
        torch.compile(model, backend=qcompile.Backend(reports=reports))(ids)
    ops = {x.path: x.op for x in reports[0].linears}
    assert ops["model.layers.7.mlp.down_proj"] == "qcompile::int8_mm"
    assert ops["model.layers.6.mlp.down_proj"] == "qcompile::int4_mm_a8"
    assert any("last decoder block" in n for n in reports[0].notes)
    # the same recipe however the compiled code is reached: generate() on the compiled module, and
    # HF's `model.forward = torch.compile(model.forward)` (both once compiled the last block int4)
    for compile_it in ("generate", "forward"):
        fresh, reports = tiny_llama(num_hidden_layers=8), []
        with torch.no_grad():
            if compile_it == "generate":
                torch.compile(fresh, backend=qcompile.Backend(reports=reports)).generate(
                    ids, max_new_tokens=2, do_sample=False)
            else:
                fresh.forward = torch.compile(fresh.forward, backend=qcompile.Backend(reports=reports))
                fresh(ids)
        ops = {x.path: x.op for r in reports for x in r.linears}
        assert ops["model.layers.7.mlp.down_proj"] == "qcompile::int8_mm", compile_it
        assert ops["model.layers.6.mlp.down_proj"] == "qcompile::int4_mm_a8", compile_it
    qcompile.quantize(model, progress=False)
    ops = {x.path: (x.op, x.reason) for x in model.qcompile_report.linears}
    assert ops["model.layers.7.self_attn.q_proj"][0] == "qcompile::int8_mm"
    assert "int8 pattern 'model.layers.7.*'" in ops["model.layers.7.self_attn.q_proj"][1]
    assert ops["model.layers.6.self_attn.q_proj"][0] == "qcompile::int4_mm_a8"
    # an explicit config is taken as given
    assert RTNConfig().int8 == ()


def test_a_decode_step_compiled_for_training_warns_that_it_copies_the_cache():
    """A static-cache decode loop written without torch.no_grad() compiles a training graph, which copies
    the cache it mutates on every call: the backend says so (warning and report); under no_grad it is quiet."""
    import warnings

    from qcompile.backend import Backend
    from transformers import StaticCache

    torch.manual_seed(0)
    model = tiny_llama(num_key_value_heads=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    notes = {}
    for grad in (True, False):
        torch._dynamo.reset()
        reports = []
        compiled = torch.compile(model, backend=Backend(quantize_linears=False, inductor=False, reports=reports))
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
        with warnings.catch_warnings(record=True) as caught, torch.set_grad_enabled(grad):
            warnings.simplefilter("always")
            compiled(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True, cache_position=torch.tensor([6]))
        notes[grad] = ([str(w.message) for w in caught if str(w.message).startswith("qcompile: this graph mutates")],
                       [n for r in reports for n in r.notes if "compiled for training" in n])
    warned, in_report = notes[True]
    layers = model.config.num_hidden_layers
    assert len(warned) == 1 and len(in_report) == 1 and "torch.no_grad()" in warned[0]
    mutated = int(in_report[0].split("mutates ")[1].split()[0])  # keys and values per layer (newer HF: + a length)
    assert mutated >= 2 * layers and "past_key_values_layers_0_keys" in in_report[0]
    assert notes[False] == ([], [])
