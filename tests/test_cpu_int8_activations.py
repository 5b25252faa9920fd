"""W4A8 / W8A8 decode ops (int8 activations): the CPU kernels, in each ISA variant, against their float64
reference (tight: the integer sums are exact, only float32 combination rounds), against the float-activation
ops (loose: within the activation rounding bound), and their errors."""
import pytest
import torch

from qcompile.formats import pack_nibbles, unpack_nibbles
from qcompile.ops import linear
from tests.conftest import CPU_ISAS as ISAS, cpu_kernel_ops as ops

RTOL = 1e-5  # of the output's scale (its largest magnitude in the row of y)


def random_int4(n, k, group, seed, scale_dtype=torch.bfloat16, zero_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    qweight = pack_nibbles(torch.randint(0, 16, (n, k), generator=g))
    scales = ((torch.rand(n, k // group, generator=g) + 0.5) * 0.01).to(scale_dtype)
    zeros = (torch.rand(n, k // group, generator=g) * 15).to(zero_dtype)  # fractional, as HQQ's
    return qweight, scales, zeros


def random_int8(n, k, seed, scale_dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    q[:, 0] = -128  # |q| = 128 is the sign trick's edge
    return q, ((torch.rand(n, generator=g) + 0.5) * 0.01).to(scale_dtype)


def activations(m, k, seed):
    """Gaussian rows with outlier features (x50), an all-zero stretch (scale 0) and ties (x / sx = j + 0.5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[slice(None, -1) if m > 1 else slice(None), torch.randint(0, k, (max(1, k // 100),), generator=g)] *= 50
    x[0, : k // 2] = 0
    x[-1, :8] = torch.tensor([127.0, 2.5, -3.5, 0.5, -0.5, 126.5, 1.5, -127.0])  # sx = 1 in groups < K/2
    return x


def assert_tight(y, ref):
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = ref.abs().amax(-1, keepdim=True)
    err = (y.double() - ref).abs()
    assert torch.all(err <= RTOL * scale + 1e-30), (err / scale).max()


INT4_SHAPES = [(37, 576, 64), (100, 2304, 128), (19, 96, 32), (33, 48, 16), (50, 1536, 32), (65, 320, 160),
               (7, 2304, 2304), (21, 512, 8), (13, 1024, 256), (11, 96, 24)]
# odd N; 256-bit loop: groups of 64/128 codes, 32 (16 bytes), 160 (32 + 16 bytes), 16 (scalar tail); 512-bit loop
# (AVX-512 VNNI): 64-byte steps with 2 (group 64), 4 (32), 16 (8) groups or part of one (128, 256, 2304), a
# masked last step (576: 32 bytes, 96: 48); groups of 160 and 24 take the 256-bit loop there too


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,group", INT4_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int4_a8_matches_float64_reference(isa, n, k, group, m):
    qweight, scales, zeros = random_int4(n, k, group, seed=n + m)
    x = activations(m, k, seed=k + m)
    y = ops(isa).int4_mm_a8_kernel(x, qweight, scales, zeros, group)
    assert_tight(y, linear.int4_mm_a8_reference(x.double(), qweight, scales, zeros, group))


INT8_SHAPES = [(37, 576, 576), (37, 576, 64), (100, 2304, 2304), (100, 2304, 128), (19, 96, 32), (33, 48, 48),
               (33, 48, 16), (130, 1536, 1536)]  # per token (act group K) and per group; 48 and 16: scalar tails


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,act_group", INT8_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_int8_a8_matches_float64_reference(isa, n, k, act_group, m):
    q, scales = random_int8(n, k, seed=n + m)
    x = activations(m, k, seed=k + m)
    y = ops(isa).int8_mm_a8_kernel(x, q, scales, act_group)
    assert_tight(y, linear.int8_mm_a8_reference(x.double(), q, scales, act_group))


@pytest.mark.parametrize("m", range(1, 9))
def test_every_decode_row_count(m):
    qweight, scales, zeros = random_int4(61, 576, 64, seed=m)
    q, s8 = random_int8(61, 576, seed=m)
    x = activations(m, 576, seed=m)
    kernels = ops("native")
    assert_tight(kernels.int4_mm_a8_kernel(x, qweight, scales, zeros, 64),
                 linear.int4_mm_a8_reference(x.double(), qweight, scales, zeros, 64))
    assert_tight(kernels.int8_mm_a8_kernel(x, q, s8, 576), linear.int8_mm_a8_reference(x.double(), q, s8, 576))


def test_quantize_activations_follows_its_definition():
    x = activations(3, 256, seed=0)
    a, sx = linear.quantize_activations(x, 64)
    xg = x.double().reshape(3, 4, 64)
    assert torch.equal(sx, (x.abs().reshape(3, 4, 64).amax(-1) / 127).double())
    assert a.abs().max() == 127 and torch.equal(a, a.round())
    assert torch.all((xg - a * sx[..., None]).abs() <= sx[..., None] / 2 * (1 + 1e-6))
    half_to_even = torch.tensor([127.0, 2, -4, 0, 0, 126, 2, -127], dtype=torch.float64)
    assert torch.equal(a[2, 0, :8], half_to_even)
    assert torch.all(a[0, :2] == 0) and torch.all(sx[0, :2] == 0)


def rounding_bound(x, w, group):
    """Each activation rounds by at most sx / 2, independently: by Hoeffding, |y_a8 - x @ W.T| exceeds
    4 sqrt(sum_k (W[n,k] sx[m, k // group])^2) with probability below 2 exp(-32) per output."""
    _, sx = linear.quantize_activations(x, group)
    return 4 * ((sx.repeat_interleave(group, dim=-1) ** 2) @ (w.double() ** 2).t()).sqrt()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n,k,group", [(37, 576, 64), (50, 1536, 32), (61, 576, 576)])
def test_a8_ops_stay_within_activation_rounding_of_float_activation_ops(isa, n, k, group):
    """Against the W4A16 / W8A16 ops, which see x unrounded: a wrong activation or weight scale shows."""
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(n))
    qweight, scales, zeros = random_int4(n, k, group, seed=n)
    q, s8 = random_int8(n, k, seed=n)
    w4 = linear.dequantize_int4(qweight, scales, zeros, group, torch.float64)
    w8 = linear.dequantize_int8(q, s8, None, torch.float64)
    kernels = ops(isa)
    for y, ref, w in [(kernels.int4_mm_a8_kernel(x, qweight, scales, zeros, group),
                       kernels.int4_mm_kernel(x, qweight, scales, zeros, group), w4),
                      (kernels.int8_mm_a8_kernel(x, q, s8, group), kernels.int8_mm_kernel(x, q, s8), w8)]:
        bound = rounding_bound(x, w, group)
        assert bound.mean() < 0.25 * ref.abs().mean()  # tight enough that a wrong scale shows
        assert torch.all((y - ref).abs() <= bound + RTOL * ref.abs().amax(-1, keepdim=True))


def test_prefill_rows_take_the_float_activation_kernels():
    qweight, scales, zeros = random_int4(40, 128, 32, seed=1)
    q, s8 = random_int8(40, 128, seed=1)
    x = activations(linear.A8_MAX_ROWS + 1, 128, seed=1)
    kernels = ops("native")
    assert torch.equal(kernels.int4_mm_a8_kernel(x, qweight, scales, zeros, 32),
                       kernels.int4_mm_kernel(x, qweight, scales, zeros, 32))
    assert torch.equal(kernels.int8_mm_a8_kernel(x, q, s8, 128), kernels.int8_mm_kernel(x, q, s8))
    torch.testing.assert_close(linear.int4_mm_a8_reference(x, qweight, scales, zeros, 32),
                               linear.int4_mm_reference(x, qweight, scales, zeros, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_leading_dims(dtype, param_dtype):
    qweight, scales, zeros = random_int4(24, 128, 64, seed=2, scale_dtype=param_dtype, zero_dtype=param_dtype)
    q, s8 = random_int8(24, 128, seed=2, scale_dtype=param_dtype)
    x = activations(6, 128, seed=2).to(dtype).reshape(3, 2, 128).transpose(0, 1)  # [2, 3, 128], not contiguous
    unit = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    kernels = ops("native")
    for y, ref in [(kernels.int4_mm_a8_kernel(x, qweight, scales, zeros, 64),
                    linear.int4_mm_a8_reference(x.double(), qweight, scales, zeros, 64)),
                   (kernels.int8_mm_a8_kernel(x, q, s8, 32), linear.int8_mm_a8_reference(x.double(), q, s8, 32))]:
        assert y.shape == (2, 3, 24) and y.dtype == dtype
        scale = ref.abs().amax(-1, keepdim=True)
        assert torch.all((y.double() - ref).abs() <= (RTOL + unit) * scale + unit * ref.abs())


def test_custom_op_registration_is_consistent():
    ops("native")
    qweight, scales, zeros = random_int4(32, 128, 64, seed=3, scale_dtype=torch.float32, zero_dtype=torch.float32)
    q, s8 = random_int8(32, 128, seed=3, scale_dtype=torch.float32)
    x = torch.randn(2, 128)
    torch.library.opcheck(torch.ops.qcompile.int4_mm_a8_kernel.default, (x, qweight, scales, zeros, 64))
    torch.library.opcheck(torch.ops.qcompile.int8_mm_a8_kernel.default, (x, q, s8, 128))


def test_bad_input_gets_clear_errors():
    qweight, scales, zeros = random_int4(16, 128, 64, seed=4)
    q, s8 = random_int8(16, 128, seed=4)
    x = torch.randn(1, 128)
    cases = [
        (TypeError, "floating-point", "int4", (x.int(), qweight, scales, zeros, 64)),
        (TypeError, "uint8", "int4", (x, qweight.view(torch.int8), scales, zeros, 64)),
        (TypeError, "floating-point", "int4", (x, qweight, scales.int(), zeros, 64)),
        (ValueError, "expects 128", "int4", (torch.randn(1, 96), qweight, scales, zeros, 64)),
        (ValueError, "does not divide 128", "int4", (x, qweight, scales, zeros, 48)),
        (ValueError, "even size", "int4", (torch.randn(1, 126), qweight[:, :63], scales, zeros, 63)),
        (ValueError, "must be", "int4", (x, qweight, scales[:, :1], zeros[:, :1], 64)),
        (TypeError, "int8", "int8", (x, q.view(torch.uint8), s8, 128)),
        (TypeError, "floating-point", "int8", (x.long(), q, s8, 128)),
        (ValueError, "does not divide 128", "int8", (x, q, s8, 96)),
        (ValueError, "does not divide 128", "int8", (x, q, s8, 0)),
        (ValueError, "per channel", "int8", (x, q, s8[:, None].expand(16, 2), 128)),
    ]
    for exc, match, kind, args in cases:
        ref = linear.int4_mm_a8_reference if kind == "int4" else linear.int8_mm_a8_reference
        kernel = ops("native").int4_mm_a8_kernel if kind == "int4" else ops("native").int8_mm_a8_kernel
        for fn in (kernel, ref):  # the C++ kernel and the reference (other devices) say the same
            with pytest.raises(exc, match=match):
                fn(*args)


def test_reference_is_the_documented_formula():
    """The reference against a direct per-element loop of the formula in the schema comment."""
    qweight, scales, zeros = random_int4(3, 64, 32, seed=5, scale_dtype=torch.float32, zero_dtype=torch.float32)
    q, s8 = random_int8(3, 64, seed=5, scale_dtype=torch.float32)
    x = activations(2, 64, seed=5)
    a, sx = linear.quantize_activations(x, 32)
    a, codes = a.reshape(2, 64), unpack_nibbles(qweight).double()
    y4, y8 = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64)
    for m in range(2):
        for n in range(3):
            for g in range(2):
                ks = slice(32 * g, 32 * (g + 1))
                y4[m, n] += scales[n, g] * sx[m, g] * ((codes[n, ks] * a[m, ks]).sum() - zeros[n, g] * a[m, ks].sum())
                y8[m, n] += s8[n] * sx[m, g] * (q[n, ks].double() * a[m, ks]).sum()
    torch.testing.assert_close(linear.int4_mm_a8_reference(x.double(), qweight, scales, zeros, 32), y4,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(linear.int8_mm_a8_reference(x.double(), q, s8, 32), y8, rtol=1e-12, atol=0)
