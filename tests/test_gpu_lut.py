"""qcompile::lut_mm on a CUDA GPU: the eager Triton kernel at model sizes, and Inductor's template.

On the GPU machine, from the source tree: `bash benchmarks/run_gpu_checks.sh all OUT_DIR` (or
`PYTHONPATH=. python -m pytest tests/test_gpu_lut.py -m gpu`). Tolerances as in
tests/test_triton_lut.py: |y - y64| <= 2 (2u + K u_fp32) (|x| @ |W|^T), u the unit roundoff of
the activation dtype (one rounding of each looked-up entry, fp32 accumulation, one rounding of
the output), plus 2u|y| where a fused epilogue rounds its own result.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (K, N): a 7B Llama's attention (square), MLP up (4096 -> 11008) and down, and a 13B-size square
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
BATCHES = [1, 4, 16, 64, 512]


def _weight(n, k, bits=4, table_dtype=torch.float16, seed=0):
    from qcompile.formats.int4 import pack_nibbles

    gen = torch.Generator("cuda").manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen, device="cuda")
    tables = (torch.randn(n, 2**bits, generator=gen, device="cuda") * 0.02).to(table_dtype)
    return pack_nibbles(codes), tables


def _assert_close(y, x, w, epilogue=None):
    """y ~ epilogue(x @ W.T) (x as [M, K]); the reference is float64 on the GPU."""
    from qcompile.ops import dequantize_lut

    w64 = dequantize_lut(*w, torch.float64)
    x64 = x.reshape(-1, x.shape[-1]).double()
    ref = x64 @ w64.t()
    u = UNIT_ROUNDOFF[x.dtype]
    tol = 2 * (2 * u + x.shape[-1] * UNIT_ROUNDOFF[torch.float32]) * (x64.abs() @ w64.abs().t())
    if epilogue is not None:
        ref = epilogue(ref)
        tol = tol * 1.1 + 2 * u * ref.abs()  # 1.1: the steepest slope of silu
    assert y.dtype == x.dtype
    ratio = ((y.reshape(ref.shape).double() - ref).abs() / (tol + 1e-12)).max().item()
    assert ratio <= 1, f"error is {ratio:.3g} x the tolerance"


def _tickets_clear():
    from qcompile.lowering import triton_lut

    torch.cuda.synchronize()
    return all(int(t.abs().sum()) == 0 for t in triton_lut._tickets.values())


# --- the eager kernel ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_launcher_matches_float64(k, n, m):
    from qcompile.lowering.triton_lut import lut_mm_triton

    w = _weight(n, k)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    _assert_close(lut_mm_triton(x, *w), x, w)  # autotuned; decode sizes split K
    assert _tickets_clear()


@pytest.mark.parametrize("m", [1, 16, 512])
def test_bits3_and_bf16(m):
    from qcompile.lowering import triton_lut as tl_

    k, n = 4096, 11008
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    config = tl_.lut_mm_configs(m, n, k)[0]  # the heuristic's pick (autotuning every variant costs minutes)
    for w in (_weight(n, k, bits=3), _weight(n, k, table_dtype=torch.bfloat16)):
        _assert_close(tl_.lut_mm_triton(x, *w, config=config), x, w)


def test_op_runs_the_triton_kernel():
    from qcompile.lowering import triton_lut

    w = _weight(4096, 4096)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)
    before = len(triton_lut.lut_mm_autotuned.cache)
    _assert_close(torch.ops.qcompile.lut_mm(x, *w), x, w)
    assert len(triton_lut.lut_mm_autotuned.cache) == before + 1, "the op did not reach the Triton kernel"


def test_every_config_edges_fp32_and_unaligned_tables():
    from qcompile.lowering import triton_lut as tl_

    w = _weight(1000, 1024)  # N = 1000: edge tiles in N
    for m in (1, 3, 17, 100):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        for c in tl_.lut_mm_configs(m, 1000, 1024):  # each with its split-K, and without
            for split in {c.split_k, 1}:
                _assert_close(tl_.lut_mm_triton(x, *w, config=c._replace(split_k=split)), x, w)
    # fp32 (TF32 off, torch's default: Triton's FMA dot, slow to compile): the first config that
    # fits in shared memory at 4 bytes an element, split and not
    for m in (1, 100):
        x32 = torch.randn(m, 1024, device="cuda")
        _assert_close(tl_.lut_mm_triton(x32, *w, config=tl_.lut_mm_configs(m, 1000, 1024, x_itemsize=4)[0]), x32, w)
    # tables one element off their 32-byte rows: the kernel's adding loop
    flat = torch.empty(1000 * 16 + 1, device="cuda", dtype=torch.float16)
    shifted = flat[1:].view(1000, 16)
    shifted.copy_(w[1])
    x = torch.randn(5, 1024, device="cuda", dtype=torch.float16)
    _assert_close(tl_.lut_mm_triton(x, w[0], shifted), x, w)
    assert _tickets_clear()


def test_opcheck():
    w = _weight(256, 512)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.qcompile.lut_mm_kernel.default, (x, *w))


# --- Inductor -----------------------------------------------------------------------------------
def _compile(fn, *args, **compile_kwargs):
    from torch._inductor.utils import run_and_get_code

    y, codes = run_and_get_code(torch.compile(fn, **compile_kwargs), *args)
    code = _without_comments(codes)
    return y, code, [line for line in code.splitlines() if line.startswith("def triton")], "\n".join(codes)


def _without_comments(codes) -> str:
    """Inductor's output code minus comments (they name the source ops, e.g. lut_mm_kernel)."""
    return "\n".join(line for c in codes for line in c.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("m,dtype", [(128, torch.float16), (512, torch.float16), (128, torch.bfloat16),
                                     (128, torch.float32)])
def test_compile_fuses_bias_silu_into_template(m, dtype):
    from qcompile.lowering import inductor_lut

    n, k = 4096, 4096
    w = _weight(n, k)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y, code, kernels, raw = _compile(lambda x: F.silu(torch.ops.qcompile.lut_mm(x, *w) + bias), x)
    _assert_close(y, x, w, epilogue=lambda r: F.silu(r + bias.double()))
    assert inductor_lut.TEMPLATE_MARKER in raw, "the lut template was not used"
    # bias add and SiLU live in the template kernel: it is the only Triton kernel of the graph
    assert len(kernels) == 1 and "lut_mm" in kernels[0], kernels
    assert "extern_kernels." + inductor_lut.TEMPLATE_NAME not in code
    assert "torch.ops.qcompile.lut_mm" not in code  # no fallback kernel either


@pytest.mark.parametrize("m", [1, 16])
def test_compile_decode_takes_split_k_launcher(m):
    """At decode sizes the heuristic splits K, which a template program cannot: the extern choice
    (the eager launcher) runs, and the epilogue after it."""
    from qcompile.lowering import inductor_lut

    n, k = 4096, 11008
    w = _weight(n, k)
    r = torch.randn(m, n, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y, code, _, raw = _compile(lambda x: torch.ops.qcompile.lut_mm(x, *w) + r, x)
    _assert_close(y, x, w, epilogue=lambda y: y + r.double())
    assert "extern_kernels." + inductor_lut.TEMPLATE_NAME in code
    assert "torch.ops.qcompile.lut_mm" not in code
    assert _tickets_clear()


def test_compile_3d_input_with_residual_and_dynamic_batch():
    from torch._inductor.utils import run_and_get_code

    from qcompile.lowering import inductor_lut

    n, k = 4096, 11008
    w = _weight(n, k)
    fn = torch.compile(lambda x, r: torch.ops.qcompile.lut_mm(x, *w) + r, dynamic=True)
    for i, seq in enumerate((300, 5, 37)):  # one compile with a symbolic M serves all three
        x = torch.randn(2, seq, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(2, seq, n, device="cuda", dtype=torch.bfloat16)
        if i == 0:  # compiled for M ~ 600: the template, with a mask for every M
            y, codes = run_and_get_code(fn, x, r)
            assert inductor_lut.TEMPLATE_MARKER in "\n".join(codes)
        else:
            y = fn(x, r)
        _assert_close(y, x, w, epilogue=lambda y: y + r.reshape(-1, n).double())


def test_compile_max_autotune():
    from qcompile.lowering import inductor_lut

    n, k = 11008, 4096
    w = _weight(n, k)
    x = torch.randn(64, k, device="cuda", dtype=torch.float16)
    y, code, _, raw = _compile(lambda x: torch.ops.qcompile.lut_mm(x, *w), x, mode="max-autotune-no-cudagraphs")
    _assert_close(y, x, w)
    # either a template config or the extern (eager, autotuned, split-K) kernel won; never the fallback op
    assert inductor_lut.TEMPLATE_MARKER in raw or "extern_kernels." + inductor_lut.TEMPLATE_NAME in code
    assert "torch.ops.qcompile.lut_mm" not in code
