"""qcompile.quantize (module swap, freed float weights) and save/load round trips."""
import gc
import json
import weakref

import pytest
import torch

import qcompile
from qcompile.modules import QuantEmbedding, QuantLinear
from qcompile.formats.checkpoint import CheckpointError
from tests.conftest import tiny_gpt2, tiny_llama


def test_quantize_swaps_every_linear_and_frees_float_weights():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():  # (an autograd graph would keep the weights alive)
        float_logits = model(ids).logits
    refs = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    qcompile.quantize(model, progress=False)
    gc.collect()
    assert all(r() is None for r in refs), "a float copy of a quantized weight is still referenced"
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.layout == "int8"
    assert isinstance(model.model.embed_tokens, QuantEmbedding)  # tied table shared, not copied
    report = model.qcompile_report
    assert report.summary()["quantized"] == 15
    notes = {x.path: x.notes for x in report.linears}
    assert any("input norm" in n for n in notes["model.layers.0.self_attn.q_proj"])
    assert not any("input norm" in n for n in notes["model.layers.0.self_attn.o_proj"])
    out = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(out.flatten(), float_logits.flatten(), dim=0)
    assert cos > 0.97


def test_quantized_weight_bytes_below_three_tenths_of_bf16():
    model = tiny_llama(hidden_size=256, intermediate_size=512)
    qcompile.quantize(model, progress=False)
    decoder = [m for p, m in model.named_modules() if isinstance(m, QuantLinear) and p != "lm_head"]
    qbytes = sum(sum(t.numel() * t.element_size() for t in m.buffers()) for m in decoder)
    bf16 = sum(2 * m.in_features * m.out_features for m in decoder)
    assert qbytes <= 0.3 * bf16, qbytes / bf16


def test_compiling_a_quantized_model_reports_prequantized_layers():
    model = tiny_llama()
    qcompile.quantize(model, progress=False)
    ids = torch.randint(0, 256, (2, 7))
    eager = model(ids).logits
    report = qcompile.explain(model, ids)
    assert all(x.op and "ahead of time" in x.reason for x in report.linears)
    compiled = torch.compile(model, backend=qcompile)(ids).logits
    assert (compiled - eager).abs().max() <= 0.02 * eager.abs().max()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_save_load_round_trip_is_exact(tmp_path, make):
    model = make()
    qcompile.quantize(model, progress=False)
    ids = torch.randint(0, 256, (1, 10))
    expected = model(ids).logits
    qcompile.save(model, tmp_path)
    meta = json.loads((tmp_path / "qcompile.json").read_text())
    assert meta["config"]["method"] == "rtn"

    fresh = make(seed=123)  # same architecture, different float weights
    qcompile.load(fresh, tmp_path)
    assert torch.equal(fresh(ids).logits, expected)


def test_load_into_meta_device_model(tmp_path):
    model = tiny_llama()
    qcompile.quantize(model, progress=False)
    ids = torch.randint(0, 256, (1, 6))
    expected = model(ids).logits
    qcompile.save(model, tmp_path)
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = type(model)(model.config)
    assert empty.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    qcompile.load(empty, tmp_path)
    assert all(t.device.type == "cpu" for t in list(empty.parameters()) + list(empty.buffers()))
    assert torch.equal(empty(ids).logits, expected)


def test_corrupted_or_mismatched_checkpoints_fail_clearly(tmp_path):
    model = tiny_llama()
    qcompile.quantize(model, progress=False)
    qcompile.save(model, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()

    (tmp_path / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        qcompile.load(tiny_llama(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        qcompile.load(tiny_llama(), tmp_path, verify=False)
    (tmp_path / "model.safetensors").write_bytes(data)

    with pytest.raises(CheckpointError, match="out x in|shape"):
        qcompile.load(tiny_llama(intermediate_size=192), tmp_path)
    with pytest.raises(CheckpointError, match="another architecture"):
        qcompile.load(tiny_gpt2(), tmp_path)
    (tmp_path / "qcompile.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        qcompile.load(tiny_llama(), tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        qcompile.load(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no quantized layers"):
        qcompile.save(tiny_llama(), tmp_path / "float")


def test_quantize_rejects_nan_weights_with_the_layer_name():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj"):
        qcompile.quantize(model, progress=False)


def test_int8_groups_zeros_perm_round_trip_and_older_files_load(tmp_path):
    """8-bit GPTQ-style layers (groups, zero-points, act_order) save and load; files written before
    int8 had zero-points (no "zeros" in the layer's meta) still load as symmetric per channel."""
    from qcompile import lowering
    from qcompile.formats import Int8Weight

    model = tiny_llama()
    qcompile.quantize(model, progress=False)  # int8 lm_head, tied embedding
    gen = torch.Generator().manual_seed(0)
    up = model.model.layers[0].mlp.up_proj
    n, k = up.out_features, up.in_features
    w8 = Int8Weight((torch.randint(0, 256, (n, k), generator=gen) - 128).to(torch.int8),
                    torch.rand(n, k // 32, generator=gen).half() * 0.01 + 0.001,
                    (torch.randint(0, 256, (n, k // 32), generator=gen) - 128).half(), 32,
                    torch.randperm(k, generator=gen))
    model.model.layers[0].mlp.up_proj = QuantLinear(lowering.pack(w8, "cpu"))
    ids = torch.randint(0, 256, (1, 9))
    expected = model(ids).logits
    qcompile.save(model, tmp_path)
    fresh = tiny_llama(seed=5)
    qcompile.load(fresh, tmp_path)
    assert torch.equal(fresh(ids).logits, expected)
    back = lowering.unpack(fresh.model.layers[0].mlp.up_proj.packed_weight())
    assert back.group_size == 32 and torch.equal(back.perm, w8.perm) and torch.equal(back.zeros, w8.zeros)

    meta = json.loads((tmp_path / "qcompile.json").read_text())
    for key in ("zeros", "act_order"):
        del meta["layers"]["lm_head"][key]  # as written before these fields existed
    (tmp_path / "qcompile.json").write_text(json.dumps(meta))
    older = tiny_llama(seed=6)
    qcompile.load(older, tmp_path)
    assert torch.equal(older(ids).logits, expected)
    assert older.lm_head.format_meta.get("zeros") is False and older.lm_head.perm is None
