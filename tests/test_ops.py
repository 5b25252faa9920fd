"""Quantized ops and CPU kernels against float64 math on the canonical format."""
import pytest
import torch

import qcompile
from qcompile import lowering
from qcompile.formats import Int4Weight, pack_nibbles
from qcompile.methods import rtn
from qcompile.modules import QuantLinear


def random_int4(n, k, group, seed=0, scale_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = ((torch.rand(n, k // group, generator=g) + 0.5) * 0.01).to(scale_dtype)
    zeros = (torch.rand(n, k // group, generator=g) * 15).to(scale_dtype)
    return Int4Weight(pack_nibbles(codes), scales, zeros, group)


def bf16_bound(x, w64, step=None):
    """Error bound of the bf16 CPU kernel, from its rounding steps (2^-9 relative each):
    x to bf16 (sum |x||w|), the per-group offset (8 - z) * s to bf16 (|offset| <= 8 s, and fp32/
    fp16 scales to bf16 another 8 s), the bf16 output (|y|). fp32 accumulation adds ~K 2^-24."""
    x = x.double()
    mags = x.abs() @ w64.abs().t()
    bound = mags + (x @ w64.t()).abs()
    if step is not None:
        bound = bound + 16 * (x.abs() @ step.double().t())
    return 2.0**-9 * bound + 1e-6 * mags.max()


@pytest.mark.parametrize("n,k,group", [(192, 576, 64), (64, 96, 32), (48, 256, 128), (32, 512, 256), (16, 576, 576)])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_cpu_int4_kernel_matches_float64(n, k, group, m):
    w = random_int4(n, k, group, seed=n + m)
    packed = lowering.pack(w, "cpu")
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = packed(x)
    w64 = w.dequantize(torch.float64)
    ref = x.double() @ w64.t()
    assert y.dtype == x.dtype and y.shape == (m, n)
    step = w.scales.double().repeat_interleave(group, 1)
    assert torch.all((y.double() - ref).abs() <= bf16_bound(x, w64, step))


def test_cpu_int4_layout_round_trips_exactly():
    w = random_int4(64, 256, 64, scale_dtype=torch.bfloat16)
    p = lowering.pack(w, "cpu")
    back = lowering.unpack(p)
    assert torch.equal(back.codes(), w.codes()) and torch.equal(back.scales, w.scales)
    again = lowering.pack(back, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(p.tensors.values(), again.tensors.values()))


def test_canonical_op_matches_float64():
    w = random_int4(40, 128, 32, scale_dtype=torch.float32)
    x = torch.randn(3, 128, dtype=torch.float64)
    y = torch.ops.qcompile.int4_mm(x, w.qweight, w.scales, w.zeros, 32)
    torch.testing.assert_close(y, x @ w.dequantize(torch.float64).t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_leading_dims_noncontiguous_and_dtypes(dtype):
    w = random_int4(64, 128, 64)
    packed = lowering.pack(w, "cpu")
    base = torch.randn(128, 2, 3).to(dtype)
    x = base.permute(1, 2, 0)  # [2, 3, 128], not contiguous
    assert not x.is_contiguous()
    y = packed(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    w64 = w.dequantize(torch.float64)
    ref = x.double() @ w64.t()
    step = w.scales.double().repeat_interleave(64, 1)
    out_rounding = 2.0**-11 * ref.abs() if dtype == torch.float16 else 0  # fp16 output: 11-bit mantissa
    assert torch.all((y.double() - ref).abs() <= bf16_bound(x, w64, step) + out_rounding)


def test_ops_give_clear_errors():
    w = random_int4(64, 128, 64)
    packed = lowering.pack(w, "cpu")
    with pytest.raises(ValueError, match="expects 128"):
        packed(torch.randn(2, 96))
    with pytest.raises(TypeError, match="floating-point"):
        packed(torch.ones(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="divisible by 16"):
        lowering.pack(random_int4(40, 128, 64), "cpu")


def test_int8_ops_match_float64():
    w = rtn.quantize_int8(torch.randn(96, 64), scale_dtype=torch.bfloat16)
    packed = lowering.pack(w, "cpu")
    x = torch.randn(4, 64)
    w64 = w.dequantize(torch.float64)
    ref = x.double() @ w64.t()
    assert torch.all((packed(x).double() - ref).abs() <= bf16_bound(x, w64))
    ids = torch.tensor([[0, 5, 95]])
    emb = torch.ops.qcompile.int8_embedding(ids, w.qweight, w.scales, torch.float32)
    torch.testing.assert_close(emb.double(), w64[ids], rtol=0, atol=1e-6)


def test_custom_op_registration_is_consistent():
    w = random_int4(32, 64, 32, scale_dtype=torch.float32)
    torch.library.opcheck(torch.ops.qcompile.int4_mm.default, (torch.randn(3, 64), w.qweight, w.scales, w.zeros, 32))


def test_quantlinear_keeps_packed_dtypes_and_moves_as_module():
    w = random_int4(64, 128, 64)
    layer = QuantLinear(lowering.pack(w, "cpu"), torch.randn(64))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.float16)  # a model-wide dtype cast must not touch the kernel's layout
    for k, v in before.items():
        assert torch.equal(getattr(layer, k), v)
    assert layer.bias.dtype == torch.float16
    assert set(layer.state_dict()) == {"packed", "scale_zero", "bias"}
