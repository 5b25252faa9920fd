"""QuantConfig.cpu_activations: CPU decode runs the int8-activation ops (W4A8 / W8A8) on both entry
points, "float" restores W4A16, and the outputs are those of the ops' float64 references."""
import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qcompile
from qcompile import lowering
from qcompile.formats import Int8Weight
from qcompile.methods import rtn
from qcompile.modules import QuantLinear
from qcompile.ops import linear as ops
from tests.conftest import tiny_llama

A8_KERNELS = {"qcompile.int4_mm_a8_kernel.default", "qcompile.int8_mm_a8_kernel.default"}
A16_KERNELS = {"qcompile.int4_mm_kernel.default", "qcompile.int8_mm_kernel.default"}


class OpsCalled(TorchDispatchMode):
    """Names of the ops that reach the dispatcher's kernels."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def quantized(activations=None, seed=0):
    model = tiny_llama(seed)
    config = qcompile.default_config(model)
    if activations is not None:
        config = dataclasses.replace(config, cpu_activations=activations)
    return qcompile.quantize(model, config, progress=False)


def kernels_called(model, ids):
    with torch.no_grad(), OpsCalled() as seen:
        model(ids)
    return seen.names & (A8_KERNELS | A16_KERNELS)


def test_config_checks_and_keeps_cpu_activations():
    assert qcompile.RTNConfig().cpu_activations == "int8"
    with pytest.raises(ValueError, match="cpu_activations='fp8'.*'int8'.*'float'"):
        qcompile.RTNConfig(cpu_activations="fp8").validate()
    with pytest.raises(ValueError, match="cpu_activations"):
        qcompile.quantize(tiny_llama(), qcompile.RTNConfig(cpu_activations=True), progress=False)
    cfg = qcompile.RTNConfig(cpu_activations="float")
    assert qcompile.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "cpu_activations"}  # a config saved before the setting
    assert qcompile.QuantConfig.from_dict(old).cpu_activations == "int8"


def test_quantize_path_runs_int8_activation_kernels_and_float_opts_out():
    ids = torch.randint(0, 256, (1, 5))
    a8, a16 = quantized(), quantized("float")
    assert kernels_called(a8, ids) == A8_KERNELS
    assert kernels_called(a16, ids) == A16_KERNELS
    assert {x.activations for x in a8.qcompile_report.linears} == {"int8"}
    assert {x.op for x in a8.qcompile_report.linears} == {"qcompile::int4_mm_a8", "qcompile::int8_mm_a8"}
    assert {x.activations for x in a16.qcompile_report.linears} == {"float"}
    assert " int8 " in str(a8.qcompile_report).splitlines()[3]
    a8.lm_head.set_cpu_activations("float")  # per layer, without re-quantizing
    assert a8.lm_head.activations == "float" and "activations=float" in repr(a8.lm_head)


def test_a8_layers_pickle_and_pass_the_input_gradient_straight_through(tmp_path):
    model = quantized()
    torch.save(model, tmp_path / "m.pt")  # whole-module pickling (no op objects in the modules' state)
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    assert back.lm_head.layout_op == torch.ops.qcompile.int8_mm_a8.default
    for layer in (model.model.layers[0].mlp.down_proj, model.lm_head):
        x = torch.randn(3, layer.in_features, requires_grad=True)
        layer(x).square().sum().backward()
        w = lowering.unpack(layer.packed_weight()).dequantize(torch.float32)
        with torch.no_grad():
            expect = 2 * layer(x) @ w  # d/dx sum(y^2) with dy/dx = W: the rounding of x passes through
        torch.testing.assert_close(x.grad, expect, rtol=1e-4, atol=1e-4)


def test_int8_decoder_layers_keep_float_activations():
    model = tiny_llama()
    qcompile.quantize(model, qcompile.RTNConfig(int8=("model.layers.1.*",)), progress=False)
    acts = {x.path: x.activations for x in model.qcompile_report.linears}
    assert acts["model.layers.1.mlp.down_proj"] == "float" and acts["model.layers.0.mlp.down_proj"] == "int8"
    assert acts["lm_head"] == "int8"
    notes = {x.path: x.notes for x in model.qcompile_report.linears}
    assert any("float activations" in n for n in notes["model.layers.1.mlp.down_proj"])


def test_backend_graph_calls_the_a8_kernel_and_the_report_says_so():
    from torch._inductor.utils import run_and_get_code

    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 3))
    compiled = torch.compile(model, backend=qcompile)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, ids)
    code = "\n".join(code)
    assert "qcompile.int4_mm_a8_kernel" in code and "qcompile.int8_mm_a8_kernel" in code
    assert "int4_mm_kernel" not in code and "int8_mm_kernel" not in code
    report = qcompile.explain(model, ids)
    assert {x.activations for x in report.linears} == {"int8"}
    off = qcompile.explain(model, ids, config=qcompile.RTNConfig(cpu_activations="float"))
    assert {(x.op, x.activations) for x in off.linears} == {("qcompile::int4_mm", "float"),
                                                            ("qcompile::int8_mm", "float")}
    graph = off.graphs[0].passes[0].after
    assert "int4_mm.default" in graph and "a8" not in graph


def test_prequantized_layers_report_their_activations():
    ids = torch.randint(0, 256, (1, 4))
    for activations in ("int8", "float"):
        report = qcompile.explain(quantized(activations), ids)
        assert {x.activations for x in report.linears} == {activations}


def reference_a8(model):
    """`model` with every QuantLinear computed by the a8 ops' float64 references (the W4A16
    reference above A8_MAX_ROWS rows, as the kernels do)."""
    def forward(self, x):
        t = {n: getattr(self, n) for n in self._tensor_names}
        if self.layout == "int4":
            y = ops.int4_mm_a8_reference(x, t["qweight"], t["scales"], t["zeros"], self.consts[0])
        else:
            y = ops.int8_mm_a8_reference(x, t["qweight"], t["scales"], self._op_consts[0])
        return y if self.bias is None else y + self.bias

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.forward = forward.__get__(m)
    return model


def test_w4a8_outputs_match_the_a8_references_and_stay_close_to_w4a16():
    ids = torch.randint(0, 256, (2, 4))  # 8 rows: the largest decode-size call
    a8, a16 = quantized(), quantized("float")
    with torch.no_grad():
        got, w4a16 = a8(ids).logits, a16(ids).logits
        ref = reference_a8(a8)(ids).logits
    scale = ref.abs().max()
    err_ref, err_a16 = (got - ref).abs().max() / scale, (got - w4a16).abs().max() / scale
    assert err_ref < 2e-4, err_ref  # float32 combination and a rare activation rounding flip
    assert err_a16 < 0.05, err_a16  # int8 activations: close to float ones ...
    assert err_a16 > 20 * err_ref, (err_a16, err_ref)  # ... and measurably not them: the a8 ops did run
    cos = torch.nn.functional.cosine_similarity(got.flatten(), w4a16.flatten(), dim=0)
    assert cos > 0.999, cos


def test_prefill_size_calls_run_float_activations():
    ids = torch.randint(0, 256, (1, 9))  # 9 rows: the a8 ops send them to the W4A16 kernels
    a8, a16 = quantized(), quantized("float")
    with torch.no_grad():
        torch.testing.assert_close(a8(ids).logits, a16(ids).logits, rtol=0, atol=0)


def test_only_cpu_and_layouts_with_an_a8_kernel_get_int8_activations():
    w = torch.randn(64, 128)
    int4 = rtn.quantize_int4(w, 64)
    assert lowering.pack(int4, "cpu", "int8").activations == "int8"
    assert lowering.pack(int4, "cpu").activations == "float"  # the low-level default: exact W4A16
    assert lowering.pack(int4, "meta", "int8").activations == "float"  # other devices: unchanged
    per_channel = rtn.quantize_int8(w)
    assert lowering.pack(per_channel, "cpu", "int8").op == torch.ops.qcompile.int8_mm_a8.default
    grouped = Int8Weight(per_channel.qweight, per_channel.scales[:, None].expand(64, 2).contiguous(),
                         torch.zeros(64, 2, dtype=torch.float16), 64)
    assert lowering.pack(grouped, "cpu", "int8").activations == "float"  # no a8 kernel for groups/zeros
    layer = QuantLinear(lowering.pack(int4, "cpu", "int8"))
    layer.to("meta")
    assert layer.activations == "float" and layer.cpu_activations == "int8"


def test_checkpoints_keep_cpu_activations(tmp_path):
    model = quantized("float")
    qcompile.save(model, tmp_path)
    loaded = qcompile.load(tiny_llama(), tmp_path)
    assert {m.activations for m in loaded.modules() if isinstance(m, QuantLinear)} == {"float"}
    forced = qcompile.load(tiny_llama(), tmp_path, cpu_activations="int8")
    assert {m.activations for m in forced.modules() if isinstance(m, QuantLinear)} == {"int8"}
    meta = json.loads((tmp_path / "qcompile.json").read_text())
    del meta["config"]["cpu_activations"]  # a file written before the setting
    for layer in meta["layers"].values():
        del layer["cpu_activations"]
    (tmp_path / "qcompile.json").write_text(json.dumps(meta))
    older = qcompile.load(tiny_llama(), tmp_path)
    assert {m.activations for m in older.modules() if isinstance(m, QuantLinear)} == {"int8"}
    with pytest.raises(ValueError, match="cpu_activations"):
        qcompile.load(tiny_llama(), tmp_path, cpu_activations="int4")
    # a model without a report (layers packed by hand) keeps each layer's setting
    mixed = quantized()
    mixed.model.layers[0].mlp.up_proj.set_cpu_activations("float")
    del mixed.qcompile_report
    qcompile.save(mixed, tmp_path / "mixed")
    back = qcompile.load(tiny_llama(), tmp_path / "mixed")
    assert back.model.layers[0].mlp.up_proj.activations == "float"
    assert back.model.layers[0].mlp.down_proj.activations == "int8"


@pytest.mark.slow
def test_smollm2_greedy_decode_w4a8_matches_w4a16():
    """64 greedy tokens of the W4A16 model; W4A8 decoding the same sequence token by token picks the
    same top-1 at all but a few steps, each a near-tie of W4A16's logits (measured: 1 of 256 steps on
    this prompt, gap 0.14, where the float model differs from W4A16 at 13, gaps up to 2.1); its own
    greedy generation, where it splits, splits at a near-tie too."""
    from qcompile.tools.models import load_model

    model, tok = load_model()
    qcompile.quantize(model, progress=False)
    ids = tok("The history of the Roman Empire is", return_tensors="pt").input_ids

    def use(activations):
        for path, m in model.named_modules():
            if isinstance(m, QuantLinear):
                m.set_cpu_activations(qcompile.config.cpu_activations_for(activations, path, m.layout))

    def generate():
        out = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        return out.sequences[0, ids.shape[1]:], torch.cat(out.logits)

    with torch.no_grad():
        use("float")
        a16, logits16 = generate()
        use("int8")
        assert model.lm_head.activations == "int8" and model.model.layers[29].mlp.down_proj.activations == "float"
        a8, _ = generate()
        out = model(ids, use_cache=True)  # teacher-forced: one token at a time through the a8 ops
        forced = [out.logits[0, -1].argmax()]
        for t in a16[:-1]:
            out = model(t.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
            forced.append(out.logits[0, -1].argmax())
    forced = torch.stack(forced)
    differ = (forced != a16).nonzero().flatten()
    gaps = logits16[differ, a16[differ]] - logits16[differ, forced[differ]]
    assert differ.numel() <= 4 and bool((gaps < 0.5).all()), (differ.tolist(), gaps.tolist())
    split = (a16 != a8).nonzero().flatten()
    if split.numel():
        step = int(split[0])
        assert logits16[step, a16[step]] - logits16[step, a8[step]] < 0.5, step
