"""act_order at run time: QuantLinear gathers the input by perm, then runs the contiguous-group int4
kernel. The g_idx-indexed alternative (benchmarks/bench_act_order.py) computes the same numbers,
and models compiled with backend=qcompile keep the gather."""
import pytest
import torch

import qcompile
from qcompile import RTNConfig, lowering
from qcompile.formats import Int4Weight, pack_nibbles, unpack_nibbles
from qcompile.modules import QuantLinear
from qcompile.ops import int4_mm_g_idx_reference
from tests.conftest import tiny_llama
from tests.test_ops import assert_matches


def act_order_weight(n, k, group, seed=0, bits=4):
    """A GPTQ-like act_order weight: integer zero-points, fp16 scales, a random input order."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (n, k // group), generator=g).half()
    return Int4Weight(pack_nibbles(codes), scales, zeros, group, bits, torch.randperm(k, generator=g))


def g_idx_layout(w: Int4Weight):
    """The same weight in its layer's input order with a group index per input channel."""
    stored = unpack_nibbles(w.qweight)
    original = torch.empty_like(stored)
    original[:, w.perm.long()] = stored
    g_idx = torch.empty(w.in_features, dtype=torch.int32)
    g_idx[w.perm.long()] = (torch.arange(w.in_features) // w.group_size).int()
    return pack_nibbles(original), g_idx


@pytest.mark.parametrize("n,k,group", [(576, 576, 64), (1536, 576, 64), (576, 1536, 64), (64, 256, 32)])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_perm_gather_and_g_idx_layouts_match_float64(n, k, group, m):
    w = act_order_weight(n, k, group, seed=n + k + m, bits=3 if m == 3 else 4)
    w64 = w.dequantize(torch.float64)
    layer = QuantLinear(lowering.pack(w, "cpu"))
    q_original, g_idx = g_idx_layout(w)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert_matches(layer(x), x, w64)
    assert_matches(int4_mm_g_idx_reference(x, q_original, w.scales, w.zeros, g_idx), x, w64)
    x64 = x.double()  # float64 in: both layouts give float64 math
    expect = x64 @ w64.t()
    torch.testing.assert_close(layer(x64), expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(int4_mm_g_idx_reference(x64, q_original, w.scales, w.zeros, g_idx), expect,
                               rtol=1e-12, atol=1e-12)


def test_backend_compiles_a_model_quantized_with_act_order():
    """Every int4 layer of a tiny Llama gets an input order; torch.compile(model, backend=qcompile)
    reports them as pre-quantized, keeps the gather, and matches eager and the float64 weights."""
    model = tiny_llama()
    qcompile.quantize(model, RTNConfig(search="minmax"), progress=False)
    gen = torch.Generator().manual_seed(0)
    dense = {}
    for path, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod.layout == "int4":
            w = lowering.unpack(mod.packed_weight())
            w = Int4Weight(w.qweight, w.scales, w.zeros, w.group_size, w.bits, torch.randperm(w.in_features, generator=gen))
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, QuantLinear(lowering.pack(w, "cpu", "int8")))
            dense[path] = w.dequantize(torch.float32)
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    eager = model(ids).logits

    reference = tiny_llama()  # the float model with the act_order weights dequantized
    with torch.no_grad():
        reference.lm_head.weight = torch.nn.Parameter(lowering.unpack(model.lm_head.packed_weight()).dequantize())
        reference.model.embed_tokens.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
        for path, w in dense.items():
            reference.get_submodule(path).weight.copy_(w)
    expect = reference(ids).logits
    torch.testing.assert_close(eager, expect, rtol=0, atol=1e-4 * expect.abs().max().item())

    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(reports=reports))
    out = compiled(ids).logits
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    linears = [x for g in reports for x in g.linears]
    assert len(linears) == 15 and all("ahead of time" in x.reason for x in linears)
    assert {x.op for x in linears} == {"qcompile::int4_mm_a8", "qcompile::int8_mm_a8"}
    assert "index_select" in reports[0].passes[-1].after
    report = qcompile.explain(model, ids)
    notes = {x.path: x.notes for x in report.linears}
    assert any("act_order" in n for n in notes["model.layers.0.self_attn.q_proj"])


def test_siblings_with_one_input_order_gather_once_and_run_as_one_op():
    """GPTQ gives q/k/v (and gate/up) one input order (one Hessian): colocate_siblings makes them hold
    one perm tensor, the compiled graph gathers x once and runs each group as one op; layers with
    their own order keep their own gather. Outputs as eager."""
    from qcompile.modules import colocate_siblings

    model = tiny_llama()
    qcompile.quantize(model, RTNConfig(search="minmax"), progress=False)
    gen = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        for parent, shared_by in ((block.self_attn, ("q_proj", "k_proj", "v_proj")), (block.mlp, ("gate_proj", "up_proj"))):
            order = torch.randperm(128, generator=gen)
            for name, mod in list(parent.named_children()):
                if not isinstance(mod, QuantLinear):
                    continue
                w = lowering.unpack(mod.packed_weight())
                perm = order.clone() if name in shared_by else torch.randperm(w.in_features, generator=gen)
                setattr(parent, name, QuantLinear(lowering.pack(
                    Int4Weight(w.qweight.clone(), w.scales, w.zeros, w.group_size, w.bits, perm), "cpu", "int8")))
    ids = torch.randint(0, 256, (2, 5), generator=gen)
    eager = model(ids).logits
    colocate_siblings(model)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.perm is attn.k_proj.perm is attn.v_proj.perm and attn.o_proj.perm is not attn.q_proj.perm
    report = qcompile.explain(model, ids)
    assert report.summary()["collectives"]["runtime_index"] == 2 * 4  # q/k/v, o, gate/up, down per block
    assert "10 quantized ops fused into 4" in report.graphs[0].passes[-1].summary
    out = torch.compile(model, backend=qcompile)(ids).logits
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
