"""qcompile::int4_mm on a CUDA GPU: the eager Triton kernel at model sizes, and Inductor's template.

On the GPU machine, from the source tree: `bash benchmarks/run_gpu_checks.sh all OUT_DIR` (or
`PYTHONPATH=. python -m pytest tests/test_gpu_int4.py -m gpu`). Tolerances as in
tests/test_triton_int4.py: |y - y64| <= 2 (2u + K u_fp32) (|x| @ |W|^T), u the unit roundoff of
the activation dtype (one rounding of each dequantized weight, fp32 accumulation, one rounding of
the output), plus 2u|y| where a fused epilogue rounds its own result.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# (K, N) of a 7B Llama's projections: attention (square), MLP up (4096 -> 11008), MLP down.
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
BATCHES = [1, 4, 16, 64, 512]


def _weight(n, k, g, scale_dtype=torch.float16, seed=0):
    from qcompile.formats.int4 import pack_nibbles

    gen = torch.Generator("cuda").manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda")
    scales = (torch.rand(n, k // g, generator=gen, device="cuda") * 0.02 + 0.002).to(scale_dtype)
    zeros = (torch.rand(n, k // g, generator=gen, device="cuda") * 15).to(scale_dtype)
    return pack_nibbles(codes), scales, zeros


def _assert_close(y, x, w, g, epilogue=None):
    """y ~ epilogue(x @ W.T) (x as [M, K]); the reference is float64 on the GPU."""
    from qcompile.ops import dequantize_int4

    w64 = dequantize_int4(*w, g, torch.float64)
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


# --- the eager kernel ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", BATCHES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_launcher_matches_float64(k, n, m, dtype):
    from qcompile.lowering.triton_int4 import int4_mm_triton

    w = _weight(n, k, 128)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    _assert_close(int4_mm_triton(x, *w, 128), x, w, 128)


@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("k,n", [(2048, 128256), (4096, 4096)])
def test_int8_launcher_matches_float64(k, n, m):
    """qcompile::int8_mm on CUDA runs the same kernel (BITS = 8): an int8 per-channel lm_head of
    Llama-3's vocabulary, and a square layer."""
    from qcompile.ops.linear import dequantize_int8

    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    scales = (torch.rand(n, generator=gen, device="cuda") * 0.002 + 1e-4).bfloat16()
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = torch.ops.qcompile.int8_mm(x, q, scales)
    w64 = dequantize_int8(q, scales, None, torch.float64)
    ref = x.double() @ w64.t()
    tol = 2 * (2 * UNIT_ROUNDOFF[x.dtype] + k * UNIT_ROUNDOFF[torch.float32]) * (x.double().abs() @ w64.abs().t())
    assert y.dtype == x.dtype
    assert ((y.double() - ref).abs() / (tol + 1e-12)).max().item() <= 1


@pytest.mark.parametrize("g", [32, 64, 128, 4096])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_group_sizes_and_scale_dtypes(g, scale_dtype):
    w = _weight(4096, 4096, g, scale_dtype)
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    _assert_close(torch.ops.qcompile.int4_mm(x, *w, g), x, w, g)  # the op's registered CUDA kernel


def test_every_config_and_fp32_activations():
    from qcompile.lowering import triton_int4 as ti

    w = _weight(1000, 1024, 64)  # N = 1000: edge tiles in N
    for m in (1, 3, 17, 100):
        x = torch.randn(m, 1024, device="cuda", dtype=torch.float16)
        for c in ti.int4_mm_configs(m, 1024, 64):
            _assert_close(ti.int4_mm_triton(x, *w, 64, config=c), x, w, 64)
        # fp32 (TF32 off, torch's default): through the autotuner, which skips tiles that would not
        # fit in shared memory at 4 bytes per element
        x32 = x.float()
        _assert_close(ti.int4_mm_triton(x32, *w, 64), x32, w, 64)


def test_opcheck():
    w = _weight(256, 512, 128)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.qcompile.int4_mm_kernel.default, (x, *w, 128))


# --- Inductor -----------------------------------------------------------------------------------
def _compile(fn, *args, **compile_kwargs):
    from torch._inductor.utils import run_and_get_code

    y, codes = run_and_get_code(torch.compile(fn, **compile_kwargs), *args)
    code = _without_comments(codes)
    return y, code, [line for line in code.splitlines() if line.startswith("def triton")], "\n".join(codes)


def _without_comments(codes) -> str:
    """Inductor's output code minus comments (they name the source ops, e.g. int4_mm_kernel)."""
    return "\n".join(line for c in codes for line in c.splitlines() if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [17, 512])
def test_compile_fuses_bias_silu_into_template(m, dtype):
    from qcompile.lowering import inductor_int4

    n, k, g = 4096, 4096, 128
    w = _weight(n, k, g)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y, code, kernels, raw = _compile(lambda x: F.silu(torch.ops.qcompile.int4_mm(x, *w, g) + bias), x)
    _assert_close(y, x, w, g, epilogue=lambda r: F.silu(r + bias.double()))
    assert inductor_int4.TEMPLATE_MARKER in raw, "the int4 template was not used"
    # bias add and SiLU live in the template kernel: it is the only Triton kernel of the graph
    assert len(kernels) == 1 and "int4_mm" in kernels[0], kernels
    assert "extern_kernels." + inductor_int4.TEMPLATE_NAME not in code
    assert "torch.ops.qcompile.int4_mm" not in code  # no fallback kernel either


@pytest.mark.parametrize("m", [1, 16])
def test_compile_decode_takes_split_k_launcher(m):
    """At decode sizes the heuristic splits K, which a template program cannot: the extern choice
    (the eager launcher) runs, then the epilogue; the split-K tickets are back at zero."""
    from qcompile.lowering import inductor_int4, triton_tiles

    n, k, g = 4096, 11008, 128
    w = _weight(n, k, g)
    r = torch.randn(m, n, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    y, code, _, raw = _compile(lambda x: torch.ops.qcompile.int4_mm(x, *w, g) + r, x)
    _assert_close(y, x, w, g, epilogue=lambda y: y + r.double())
    assert "extern_kernels." + inductor_int4.TEMPLATE_NAME in code
    assert "torch.ops.qcompile.int4_mm" not in code
    torch.cuda.synchronize()
    assert all(int(t.abs().sum()) == 0 for t in triton_tiles.tickets.values())


def test_split_k_is_deterministic_and_graph_safe():
    """Split-K sums its partials in a fixed order: repeated calls and a CUDA-graph replay give the
    same bits."""
    from qcompile.lowering import triton_int4

    n, k, g = 4096, 4096, 128
    w = _weight(n, k, g)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    config = triton_int4.int4_mm_configs(1, k, g, n)[0]
    assert config.split_k > 1
    first = triton_int4.int4_mm_triton(x, *w, g, config=config)
    assert all(torch.equal(first, triton_int4.int4_mm_triton(x, *w, g, config=config)) for _ in range(5))
    out = torch.empty_like(first)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_int4.int4_mm_triton(x, *w, g, out=out, config=config)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)


def test_compile_3d_input_with_residual_and_dynamic_batch():
    from torch._inductor.utils import run_and_get_code

    from qcompile.lowering import inductor_int4

    n, k, g = 4096, 11008, 128
    w = _weight(n, k, g)
    fn = torch.compile(lambda x, r: torch.ops.qcompile.int4_mm(x, *w, g) + r, dynamic=True)
    for i, seq in enumerate((5, 37, 300)):  # one compile with a symbolic M serves all three
        x = torch.randn(2, seq, k, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(2, seq, n, device="cuda", dtype=torch.bfloat16)
        if i == 0:
            y, codes = run_and_get_code(fn, x, r)
            assert inductor_int4.TEMPLATE_MARKER in "\n".join(codes)
        else:
            y = fn(x, r)
        _assert_close(y, x, w, g, epilogue=lambda y: y + r.reshape(-1, n).double())


def test_compile_max_autotune():
    from qcompile.lowering import inductor_int4

    n, k, g = 11008, 4096, 128
    w = _weight(n, k, g)
    x = torch.randn(64, k, device="cuda", dtype=torch.float16)
    y, code, _, raw = _compile(lambda x: torch.ops.qcompile.int4_mm(x, *w, g), x, mode="max-autotune-no-cudagraphs")
    _assert_close(y, x, w, g)
    # either a template config or the extern (eager, autotuned) kernel won; never the fallback op
    assert inductor_int4.TEMPLATE_MARKER in raw or "extern_kernels." + inductor_int4.TEMPLATE_NAME in code
    assert "torch.ops.qcompile.int4_mm" not in code


# --- a whole model ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_through_the_backend_on_cuda(dtype):
    """torch.compile(model, backend=qcompile) on a CUDA model: every linear runs Inductor's int4
    template, logits match the dequantized float model, and generate() works."""
    from torch._inductor.utils import run_and_get_code

    import qcompile
    from qcompile.lowering import inductor_int4
    from tests.conftest import tiny_llama
    from tests.test_backend import MINMAX, fake_quantized

    model = tiny_llama(hidden_size=512, intermediate_size=1024, vocab_size=512).to(dtype)
    deq = fake_quantized(model).float()  # quantized from the same dtype-rounded weights the backend sees
    ref = deq.to("cuda", torch.float64)
    ids = torch.randint(0, 512, (2, 24), device="cuda")
    expect = ref(ids).logits
    # yardstick: the same dequantized model compiled by plain Inductor in `dtype` (its attention,
    # norms and residuals round as the qcompile graph's do); qcompile may not be much worse
    torch._dynamo.reset()
    float_compiled = torch.compile(deq.to("cuda", dtype))(ids).logits.double()
    eager_err = (float_compiled - expect).norm() / expect.norm()
    torch._dynamo.reset()
    model = model.to("cuda", dtype)
    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(MINMAX, reports=reports))
    out, codes = run_and_get_code(lambda: compiled(ids).logits)
    code = _without_comments(codes)
    rel = (out.double() - expect).norm() / expect.norm()
    assert rel < 2 * eager_err + 1e-3, f"relative error {rel:.3g}, float Inductor {dtype} {eager_err:.3g}"
    assert all(x.op == "qcompile::int4_mm" for x in reports[0].linears)
    assert inductor_int4.TEMPLATE_MARKER in "\n".join(codes), "the int4 template was not used"
    assert "torch.ops.qcompile.int4_mm" not in code
    gen = compiled.generate(ids[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 13)


def test_quantized_model_moves_to_cuda_and_runs():
    """qcompile.quantize on CPU, then .to('cuda'): the packed weights follow and the Triton kernel
    gives the CPU kernel's answer."""
    import qcompile
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden_size=256, intermediate_size=512)
    qcompile.quantize(model, progress=False)
    ids = torch.randint(0, 256, (1, 16))
    cpu = model(ids).logits
    model.to("cuda")
    gpu = model(ids.cuda()).logits.cpu()
    compiled = torch.compile(model, backend=qcompile)(ids.cuda()).logits.cpu()
    for y in (gpu, compiled):
        rel = (y - cpu).norm() / cpu.norm()
        assert rel < 1e-3, f"relative error {rel:.3g}"
