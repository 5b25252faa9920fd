"""Quantized ops and CPU kernels against float64 math on the canonical formats."""
import pytest
import torch

from qcompile import lowering
from qcompile.formats import Int4Weight, Int8Weight, pack_nibbles
from qcompile.lowering import cpu_kernels
from qcompile.methods import rtn
from qcompile.modules import QuantLinear


def random_int4(n, k, group, seed=0, scale_dtype=torch.bfloat16, zero_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales = ((torch.rand(n, k // group, generator=g) + 0.5) * 0.01).to(scale_dtype)
    zeros = (torch.rand(n, k // group, generator=g) * 15).to(zero_dtype)
    return Int4Weight(pack_nibbles(codes), scales, zeros, group)


def fp32_bound(x, w64, out_dtype=torch.float32):
    """Error bound of a float32 kernel: each product and partial sum rounds at 2^-24 relative, over
    K terms (a generous K * 2^-24 * sum |x||w|, with the zero-point term as large again), plus the
    final rounding to the output dtype."""
    x = x.double()
    k = x.shape[-1]
    mags = x.abs() @ w64.abs().t()
    out_unit = {torch.float32: 2.0**-24, torch.float64: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[out_dtype]
    return 2 * k * 2.0**-24 * mags * 2 + out_unit * (x @ w64.t()).abs() + 1e-30


def assert_matches(y, x, w64):
    ref = x.double() @ w64.t()
    assert y.shape == ref.shape
    assert torch.all((y.double() - ref).abs() <= fp32_bound(x, w64, y.dtype)), (y.double() - ref).abs().max()


@pytest.mark.parametrize("n,k,group", [(192, 576, 64), (64, 96, 32), (40, 256, 128), (33, 512, 256), (16, 576, 576), (8, 48, 16)])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 17])
def test_cpu_int4_kernel_matches_float64(n, k, group, m):
    assert cpu_kernels.load(), "the CPU kernels did not build"
    w = random_int4(n, k, group, seed=n + m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = lowering.pack(w, "cpu")(x)
    assert y.dtype == x.dtype
    assert_matches(y, x, w.dequantize(torch.float64))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("zero_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cpu_int4_kernel_reads_every_scale_dtype(scale_dtype, zero_dtype):
    w = random_int4(48, 128, 64, scale_dtype=scale_dtype, zero_dtype=zero_dtype)
    for m in (1, 2, 9):
        x = torch.randn(m, 128)
        assert_matches(lowering.pack(w, "cpu")(x), x, w.dequantize(torch.float64))


def test_canonical_reference_op_matches_float64():
    w = random_int4(40, 128, 32, scale_dtype=torch.float32)
    x = torch.randn(3, 128, dtype=torch.float64)
    y = torch.ops.qcompile.int4_mm(x, w.qweight, w.scales, w.zeros, 32)  # fp64 input
    torch.testing.assert_close(y, x @ w.dequantize(torch.float64).t(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_leading_dims_noncontiguous_and_dtypes(dtype):
    w = random_int4(64, 128, 64)
    packed = lowering.pack(w, "cpu")
    x = torch.randn(128, 2, 3).to(dtype).permute(1, 2, 0)  # [2, 3, 128], not contiguous
    assert not x.is_contiguous()
    y = packed(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    assert_matches(y.reshape(6, 64), x.reshape(6, 128), w.dequantize(torch.float64))


def test_ops_give_clear_errors():
    packed = lowering.pack(random_int4(64, 128, 64), "cpu")
    with pytest.raises(ValueError, match="expects 128"):
        packed(torch.randn(2, 96))
    with pytest.raises(TypeError, match="floating-point"):
        packed(torch.ones(2, 128, dtype=torch.int32))


@pytest.mark.parametrize("m", [1, 3, 12])
def test_int8_kernel_and_embedding_match_float64(m):
    w = rtn.quantize_int8(torch.randn(96, 72), scale_dtype=torch.bfloat16)
    x = torch.randn(m, 72)
    w64 = w.dequantize(torch.float64)
    assert_matches(lowering.pack(w, "cpu")(x), x, w64)
    ids = torch.tensor([[0, 5, 95]])
    emb = torch.ops.qcompile.int8_embedding(ids, w.qweight, w.scales, torch.float32)
    torch.testing.assert_close(emb.double(), w64[ids], rtol=0, atol=1e-6)


def test_custom_op_registration_is_consistent():
    w = random_int4(32, 64, 32, scale_dtype=torch.float32)
    torch.library.opcheck(torch.ops.qcompile.int4_mm_kernel.default, (torch.randn(3, 64), w.qweight, w.scales, w.zeros, 32))
    w8 = rtn.quantize_int8(torch.randn(32, 64))
    torch.library.opcheck(torch.ops.qcompile.int8_mm_kernel.default, (torch.randn(3, 64), w8.qweight, w8.scales))


def test_input_gradient_flows_through_quantized_ops():
    w = random_int4(32, 64, 32, scale_dtype=torch.float32)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    torch.ops.qcompile.int4_mm(x, w.qweight, w.scales, w.zeros, 32).sum().backward()
    torch.testing.assert_close(x.grad, w.dequantize(torch.float64).sum(0).expand(3, 64), rtol=1e-9, atol=1e-9)


def test_quantlinear_keeps_packed_dtypes_and_moves_as_module():
    w = random_int4(64, 128, 64)
    layer = QuantLinear(lowering.pack(w, "cpu"), torch.randn(64))
    before = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.float16)  # a model-wide dtype cast must not touch the quantized weight
    for k, v in before.items():
        assert torch.equal(getattr(layer, k), v)
    assert layer.bias.dtype == torch.float16
    assert set(layer.state_dict()) == {"qweight", "scales", "zeros", "bias"}


# --- int8 with groups, zero-points and act_order (GPTQ 8-bit) -----------------------------------
def random_int8(n, k, group, zeros=True, seed=0, scale_dtype=torch.float16, perm=False):
    """GPTQ-style unsigned 8-bit codes 0..255 stored as codes - 128, zeros shifted alike."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=g)
    shape = (n,) if group is None else (n, k // group)
    scales = ((torch.rand(shape, generator=g) + 0.5) * 0.01).to(scale_dtype)
    z = (torch.randint(0, 256, shape, generator=g) - 128).to(torch.float16) if zeros else None
    p = torch.randperm(k, generator=g) if perm else None
    return Int8Weight((codes - 128).to(torch.int8), scales, z, group, p)


def int8_float64(w):
    """w[n, k] = s[n, g] * (q[n, k] - z[n, g]) written out column by column, then un-permuted."""
    n, k = w.qweight.shape
    q = w.qweight.double()
    s = w.scales.double().reshape(n, -1)
    z = torch.zeros_like(s) if w.zeros is None else w.zeros.double().reshape(n, -1)
    group = k // s.shape[1]
    stored = torch.stack([s[:, c // group] * (q[:, c] - z[:, c // group]) for c in range(k)], dim=1)
    if w.perm is None:
        return stored
    out = torch.empty_like(stored)
    for j, c in enumerate(w.perm.tolist()):
        out[:, c] = stored[:, j]
    return out


@pytest.mark.parametrize("n,k,group,zeros", [(96, 128, 32, True), (40, 576, 64, True), (33, 192, 64, False),
                                             (24, 72, 24, True), (64, 576, None, True), (17, 80, 80, True)])
@pytest.mark.parametrize("m", [1, 2, 9, 17])
def test_cpu_int8_grouped_kernel_matches_float64(n, k, group, zeros, m):
    assert cpu_kernels.load(), "the CPU kernels did not build"
    w = random_int8(n, k, group, zeros, seed=n + m)
    w64 = int8_float64(w)
    torch.testing.assert_close(w.dequantize(torch.float64), w64, rtol=0, atol=0)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = lowering.pack(w, "cpu")(x)
    assert y.dtype == x.dtype
    assert_matches(y, x, w64)
    x64 = x.double()
    torch.testing.assert_close(lowering.pack(w, "cpu")(x64), x64 @ w64.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_cpu_int8_grouped_kernel_dtypes_and_leading_dims(dtype, scale_dtype):
    w = random_int8(64, 128, 32, scale_dtype=scale_dtype)
    x = torch.randn(128, 2, 3).to(dtype).permute(1, 2, 0)
    y = lowering.pack(w, "cpu")(x)
    assert y.shape == (2, 3, 64) and y.dtype == dtype
    assert_matches(y.reshape(6, 64), x.reshape(6, 128), int8_float64(w))


def test_int8_act_order_layer_gathers_its_input():
    w = random_int8(48, 128, 32, perm=True)
    w64 = int8_float64(w)
    torch.testing.assert_close(w.dequantize(torch.float64), w64, rtol=0, atol=0)
    layer = QuantLinear(lowering.pack(w, "cpu"))
    for m in (1, 5, 12):
        x = torch.randn(m, 128)
        assert_matches(layer(x), x, w64)
    back = lowering.unpack(layer.packed_weight())
    assert torch.equal(back.perm, w.perm) and torch.equal(back.zeros, w.zeros) and back.group_size == 32


@pytest.mark.parametrize("group,zeros,perm", [(None, False, False), (32, True, False), (None, True, True), (16, True, True)])
def test_int8_embedding_reads_every_int8_table(group, zeros, perm):
    from qcompile.modules import QuantEmbedding

    w = random_int8(50, 64, group, zeros, perm=perm)
    head = QuantLinear(lowering.pack(w, "cpu"))
    emb = QuantEmbedding(head, torch.float32)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    torch.testing.assert_close(emb(ids).double(), int8_float64(w)[ids], rtol=1e-6, atol=1e-6)


def test_int8_op_registration_gradient_and_errors():
    w = random_int8(32, 64, 16, scale_dtype=torch.float32)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.qcompile.int8_mm_kernel.default, (x, w.qweight, w.scales, w.zeros))
    torch.library.opcheck(torch.ops.qcompile.int8_mm_kernel.default, (x, w.qweight, w.scales))
    x64 = x.double().requires_grad_()
    torch.ops.qcompile.int8_mm(x64, w.qweight, w.scales, w.zeros).sum().backward()
    torch.testing.assert_close(x64.grad, int8_float64(w).sum(0).expand(3, 64), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.qcompile.int8_mm(x, w.qweight, w.scales[:, :3], None)
    with pytest.raises(ValueError, match="shape of scales"):
        torch.ops.qcompile.int8_mm(x, w.qweight, w.scales, w.zeros[:, :2])
    with pytest.raises(ValueError, match="group_size 24 does not divide"):
        Int8Weight(w.qweight, w.scales, None, 24)
    with pytest.raises(ValueError, match="zeros has shape"):
        Int8Weight(w.qweight, w.scales, w.zeros[:, :2], 16)


def test_default_int8_head_stays_symmetric_per_channel():
    w = rtn.quantize_int8(torch.randn(96, 72))
    assert w.zeros is None and w.group_size is None and w.scales.shape == (96,)
    packed = lowering.pack(w, "cpu")
    assert list(packed.tensors) == ["qweight", "scales"] and packed.consts == ()
