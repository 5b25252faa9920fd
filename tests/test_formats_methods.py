"""Formats and data-free methods against independent float64 references."""
import numpy as np
import pytest
import torch

from qcompile.config import RTNConfig, choose_group_size
from qcompile.formats import Int4Weight, Int8Weight, pack_nibbles, unpack_nibbles
from qcompile.methods import plan_linear
from qcompile.methods import rtn


def test_nibble_packing_matches_published_order():
    codes = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]])
    packed = pack_nibbles(codes)
    # byte j = code[2j] | code[2j+1] << 4
    assert packed.tolist() == [[1 | 2 << 4, 15 | 0 << 4], [7 | 8 << 4, 9 | 10 << 4]]
    assert torch.equal(unpack_nibbles(packed), codes.to(torch.uint8))


def test_int4_dequantize_is_the_documented_formula():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), generator=g)
    scales = torch.rand(6, 2, generator=g) + 0.1
    zeros = torch.rand(6, 2, generator=g) * 15
    w = Int4Weight(pack_nibbles(codes), scales, zeros, 32)
    c, s, z = codes.numpy().astype(np.float64), scales.double().numpy(), zeros.double().numpy()
    expect = np.stack([s[:, k // 32] * (c[:, k] - z[:, k // 32]) for k in range(64)], axis=1)
    np.testing.assert_allclose(w.dequantize(torch.float64).numpy(), expect, rtol=0, atol=1e-12)


def test_formats_reject_inconsistent_tensors():
    with pytest.raises(ValueError, match="uint8"):
        Int4Weight(torch.zeros(4, 16, dtype=torch.int32), torch.ones(4, 1), torch.zeros(4, 1), 32)
    with pytest.raises(ValueError, match="scales has shape"):
        Int4Weight(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 1), 32)
    with pytest.raises(ValueError, match="does not divide"):
        Int4Weight(torch.zeros(4, 24, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1), 32)
    with pytest.raises(ValueError, match="int8"):
        Int8Weight(torch.zeros(4, 4), torch.ones(4))


def _gptq_grid_reference(w: np.ndarray, group: int):
    """GPTQ's asymmetric min/max grid with integer zero-point, written independently in float64."""
    n, k = w.shape
    out = np.empty_like(w)
    for i in range(n):
        for j in range(0, k, group):
            x = w[i, j:j + group]
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            s = (hi - lo) / 15 or 1.0
            z = np.round(-lo / s)
            out[i, j:j + group] = s * (np.clip(np.round(x / s) + z, 0, 15) - z)
    return out


def test_minmax_matches_gptq_grid_with_float32_storage():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    q = rtn.quantize_int4(w, 64, search="minmax", scale_dtype=torch.float32)
    ref = _gptq_grid_reference(w.double().numpy(), 64)
    np.testing.assert_allclose(q.dequantize(torch.float64).numpy(), ref, atol=1e-6)


@pytest.mark.parametrize("search", ["minmax", "hqq"])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_are_nearest_on_the_stored_grid(search, sym):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    q = rtn.quantize_int4(w, 64, search=search, sym=sym)
    s = q.scales.float().repeat_interleave(64, 1)
    z = q.zeros.float().repeat_interleave(64, 1)
    expect = torch.clamp(torch.round(w / s + z), 0, 15)
    assert torch.equal(q.codes().float(), expect)
    if sym:
        assert torch.all(q.zeros.float() == 8)


def test_minmax_error_bounded_by_half_a_step():
    w = torch.randn(32, 192, generator=torch.Generator().manual_seed(3))
    q = rtn.quantize_int4(w, 64, search="minmax", scale_dtype=torch.float32)
    step = q.scales.repeat_interleave(64, 1)
    assert torch.all((w - q.dequantize()).abs() <= step / 2 + 1e-6)


def test_hqq_never_worse_than_minmax_on_its_objective():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.03
    groups = w.reshape(-1, 64)
    s0, z0 = rtn.minmax_grid(groups, 15, False)
    s1, z1 = rtn.hqq_refine(groups, s0, z0, 15, False, None)
    e0, e1 = rtn.lp_error(groups, s0, z0, 15, None), rtn.lp_error(groups, s1, z1, 15, None)
    assert torch.all(e1 <= e0)
    assert e1.sum() < 0.95 * e0.sum()  # and it does improve on the whole


def test_importance_lowers_the_error_where_it_is_high():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=g) * 0.03
    imp = torch.ones(64)
    imp[:8] = 100.0
    plain = rtn.quantize_int4(w, 64).dequantize()
    weighted = rtn.quantize_int4(w, 64, importance=imp).dequantize()
    err = lambda d: (w - d)[:, :8].abs().pow(0.7).sum()
    assert err(weighted) < err(plain)


def test_int8_error_bounded_by_half_a_step():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6))
    q = rtn.quantize_int8(w, scale_dtype=torch.float32)
    assert torch.all((w - q.dequantize()).abs() <= q.scales[:, None] / 2 + 1e-6)


def test_group_size_falls_back_to_largest_divisor():
    assert choose_group_size(128, 576) == (64, "group_size 128 does not divide in_features 576: used 64")
    assert choose_group_size(64, 576) == (64, None)
    assert choose_group_size(None, 576) == (576, None)
    assert choose_group_size(32, 100) == (None, None)


def test_plan_explains_float_layers_and_rejects_nan():
    cfg = RTNConfig(skip=("*.v_proj",))
    cpu = torch.device("cpu")
    assert "skip pattern" in plan_linear(cfg, "layers.0.v_proj", torch.randn(64, 64), cpu).reason
    assert "min_features" in plan_linear(cfg, "x", torch.randn(8, 64), cpu).reason
    assert "not a float" in plan_linear(cfg, "x", torch.ones(64, 64, dtype=torch.int8), cpu).reason
    assert plan_linear(cfg, "x", torch.randn(40, 64), cpu).format == "int4"  # any out_features
    assert "no supported group size" in plan_linear(cfg, "x", torch.randn(64, 100), cpu).reason
    p = plan_linear(cfg, "x", torch.randn(64, 576), cpu)
    assert p.format == "int4" and p.group_size == 64
    assert plan_linear(cfg, "lm_head", torch.randn(64, 64), cpu).format == "int8"
    assert plan_linear(RTNConfig(lm_head=False), "lm_head", torch.randn(64, 64), cpu).format is None
    w = torch.randn(64, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="layers.7.up_proj.*NaN"):
        plan_linear(cfg, "layers.7.up_proj", w, cpu)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3), "bits=3"), (dict(group_size=48), "group_size=48"),
    (dict(search="kmeans"), "search"), (dict(lm_head_bits=6), "lm_head_bits"),
    (dict(scale_dtype=torch.int8), "scale_dtype"),
])
def test_config_rejects_unsupported_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RTNConfig(**kwargs).validate()


def test_config_round_trips_through_dict():
    cfg = RTNConfig(group_size=128, sym=True, skip=("a.*",), scale_dtype=torch.float16)
    assert RTNConfig.from_dict(cfg.to_dict()) == cfg


def test_act_order_perm_gathers_the_input_and_round_trips(tmp_path):
    """A weight stored in a permuted input order (act_order) computes x @ W.T in the layer's order."""
    import qcompile
    from qcompile import lowering
    from qcompile.formats import Int4Weight, pack_nibbles
    from qcompile.modules import QuantLinear

    gen = torch.Generator().manual_seed(0)
    n, k, g = 48, 128, 32
    w = Int4Weight(pack_nibbles(torch.randint(0, 8, (n, k), generator=gen)),
                   torch.rand(n, k // g, generator=gen, dtype=torch.float64).half() + 0.01,
                   torch.full((n, k // g), 4.0, dtype=torch.float16), g, bits=3,
                   perm=torch.randperm(k, generator=gen))
    stored = Int4Weight(w.qweight, w.scales, w.zeros, g, bits=3).dequantize(torch.float64)
    w64 = w.dequantize(torch.float64)
    assert torch.equal(w64[:, w.perm.long()], stored)  # stored[:, j] = W[:, perm[j]]
    lin = QuantLinear(lowering.pack(w, "cpu"))
    x = torch.randn(3, k, generator=gen)
    ref = x.double() @ w64.t()
    assert torch.allclose(lin(x).double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    model = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    model[0] = lin
    qcompile.save(model, tmp_path / "ck")
    fresh = torch.nn.Sequential(torch.nn.Linear(k, n, bias=False))
    qcompile.load(fresh, tmp_path / "ck")
    assert fresh[0].format_meta["bits"] == 3 and torch.equal(fresh[0].perm, w.perm)
    assert torch.equal(fresh[0](x), lin(x))
    with pytest.raises(ValueError, match="perm"):
        Int4Weight(w.qweight, w.scales, w.zeros, g, perm=torch.arange(k - 1))
