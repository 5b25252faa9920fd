"""Layers quantized ahead of time (`qcompile.quantize`, `qcompile.load`) run like the ones the backend
quantizes itself: siblings reading one input (q/k/v, gate/up) as one op over weights laid end to end."""
import torch

import qcompile
from qcompile.modules import QuantLinear, colocate_siblings
from qcompile.ops.linear import rows_end_to_end, rows_view
from passes.fuse_quantized import _combined
from tests.conftest import tiny_llama

LAYERS = 2  # tiny_llama's decoder blocks


def quantized(**config):
    model = tiny_llama()
    cfg = qcompile.default_config(model)
    return qcompile.quantize(model, cfg if not config else qcompile.RTNConfig(**config), progress=False)


def apart(model):
    """`model` with every packed tensor in a storage of its own (what quantize made before colocation)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            for name in m._tensor_names:
                setattr(m, name, getattr(m, name).clone())
    return model


def quantized_ops(report) -> int:
    """Quantized linear ops in the graphs Inductor gets."""
    return sum(g.passes[-1].after.count("torch.ops.qcompile.int") - g.passes[-1].after.count("int8_embedding")
               for g in report.graphs)


def test_quantize_lays_siblings_end_to_end_without_changing_any_layer():
    model = quantized()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for group in ([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj], [mlp.gate_proj, mlp.up_proj]):
        for name in group[0]._tensor_names:
            assert rows_end_to_end([getattr(m, name) for m in group]), name
    assert not rows_end_to_end([mlp.up_proj.qweight, mlp.down_proj.qweight[:, :1]])  # other width: apart
    ids = torch.randint(0, 256, (1, 5))
    reference = apart(quantized())
    assert colocate_siblings(reference) > 0 and colocate_siblings(reference) == 0  # idempotent
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, apart(quantized())(ids).logits, rtol=0, atol=0)


def test_backend_runs_siblings_of_a_quantized_model_as_one_op():
    ids = torch.randint(0, 256, (1, 5))
    model = quantized()
    report = qcompile.explain(model, ids)
    # per block: q+k+v, o, gate+up, down; then the lm_head (the input embedding reads its int8 table)
    assert quantized_ops(report) == 4 * LAYERS + 1, report.graphs[0].passes[-1].after
    notes = {x.path: x.notes for x in report.linears}
    assert "one op for q_proj+k_proj+v_proj" in notes["model.layers.1.self_attn.v_proj"]
    assert "one op for gate_proj+up_proj" in notes["model.layers.0.mlp.gate_proj"]
    assert not any("one op" in n for n in notes["model.layers.0.self_attn.o_proj"])
    # the same rows computed by the same kernels, one call instead of three
    unfused = apart(quantized())
    assert quantized_ops(qcompile.explain(unfused, ids)) == 7 * LAYERS + 1
    compiled = torch.compile(model, backend=qcompile)
    with torch.no_grad():
        for n in (5, 1):  # prefill (float activations), decode-size (int8 activations)
            x = ids[:, :n]
            torch.testing.assert_close(compiled(x).logits, unfused(x).logits, rtol=1e-5, atol=1e-5)
    off = qcompile.explain(model, ids, fuse_projections=False)
    assert quantized_ops(off) == 7 * LAYERS + 1


def test_checkpoints_of_colocated_layers_save_and_load_colocated(tmp_path):
    model = quantized()
    ids = torch.randint(0, 256, (1, 4))
    qcompile.save(model, tmp_path / "q")  # safetensors refuses shared storages: each tensor on its own
    loaded = qcompile.load(tiny_llama(), tmp_path / "q")
    attn = loaded.model.layers[1].self_attn
    assert rows_end_to_end([attn.q_proj.scales, attn.k_proj.scales, attn.v_proj.scales])
    plain = qcompile.quantize(tiny_llama(), qcompile.RTNConfig(lm_head=False, search="minmax"), progress=False)
    qcompile.save(plain, tmp_path / "gptq", format="gptq")
    gptq = qcompile.load(tiny_llama(), tmp_path / "gptq")
    mlp = gptq.model.layers[0].mlp
    assert rows_end_to_end([mlp.gate_proj.qweight, mlp.up_proj.qweight])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(gptq(ids).logits, plain(ids).logits, rtol=0, atol=0)


def test_combined_weights_are_views_when_end_to_end_else_copies():
    whole = torch.arange(24, dtype=torch.int32).reshape(6, 4)
    a, b = whole[:2], whole[2:6]
    view, = _combined([[a], [b]])
    assert view.data_ptr() == whole.data_ptr() and torch.equal(view, whole)
    assert torch.equal(rows_view([a, b]), whole)
    swapped, = _combined([[b], [a]])  # another layer's tensors, not in storage order: concatenated
    assert swapped.data_ptr() != whole.data_ptr() and torch.equal(swapped, torch.cat([b, a]))
    assert not rows_end_to_end([whole[:2], whole[3:]])  # a gap
    assert not rows_end_to_end([whole[:, :2], whole[:, 2:]])  # not contiguous
