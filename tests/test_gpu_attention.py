"""qcompile::gqa_attention on a CUDA GPU: the Triton kernel at model sizes, the op, and the pass end to end.

On the GPU machine, from the source tree: `PYTHONPATH=. python -m pytest tests/test_gpu_attention.py -m gpu`
(also run by benchmarks/run_gpu_checks.sh). Tolerances as in tests/test_triton_attention.py.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_triton_attention import _compare, _tolerance

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (batch, q heads, kv heads, q len, kv len, head_dim): Llama-3-8B decode / prefill, SmolLM2, MQA, MHA
DECODE_SHAPES = [(1, 32, 8, 1, 4096, 128), (4, 9, 3, 1, 1000, 64), (2, 16, 1, 1, 2048, 128), (1, 12, 12, 1, 513, 64)]
PREFILL_SHAPES = [(1, 32, 8, 1024, 1024, 128), (2, 9, 3, 300, 300, 64)]


def _inputs(b, hq, hkv, L, S, d, dtype, seed=0):
    gen = torch.Generator("cuda").manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, device="cuda").to(dtype)
            for h, n in ((hq, L), (hkv, S), (hkv, S))]


def _check(y, q, k, v, mask=None, slopes=None, positions=None, scale=None, causal=False):
    result = _compare(y, q, *_tolerance(q, k, v, mask, slopes, positions, scale, causal))
    assert result["ok"], result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", DECODE_SHAPES)
def test_decode_kernel_matches_float64(shape, dtype):
    from qcompile.lowering.triton_attention import gqa_attention_triton

    q, k, v = _inputs(*shape, dtype)
    _check(gqa_attention_triton(q, k, v), q, k, v)  # split-KV chosen by the heuristic


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", PREFILL_SHAPES)
def test_prefill_causal_kernel_matches_float64(shape, dtype):
    from qcompile.lowering.triton_attention import gqa_attention_triton

    q, k, v = _inputs(*shape, dtype)
    _check(gqa_attention_triton(q, k, v, is_causal=True), q, k, v, causal=True)


def test_masks_and_alibi_on_gpu():
    from qcompile.ops.attention import alibi_slopes
    from qcompile.lowering.triton_attention import gqa_attention_triton

    q, k, v = _inputs(2, 12, 4, 1, 777, 64, torch.float16)
    pad = torch.ones(2, 1, 1, 777, dtype=torch.bool, device="cuda")
    pad[1, ..., :100] = False
    slopes = alibi_slopes(12).cuda()
    positions = (torch.arange(777, device="cuda")[None] - torch.tensor([[0], [100]], device="cuda")).clamp(min=0)
    _check(gqa_attention_triton(q, k, v, pad, slopes, positions), q, k, v, pad, slopes, positions)
    q, k, v = _inputs(1, 12, 12, 200, 200, 64, torch.bfloat16)
    bias = torch.randn(1, 12, 200, 200, device="cuda")
    _check(gqa_attention_triton(q, k, v, bias, slopes, None, 0.1, True), q, k, v, bias, slopes, None, 0.1, True)


def test_op_dispatches_to_the_kernel_and_never_repeats_kv():
    q, k, v = _inputs(1, 32, 8, 1, 8192, 128, torch.float16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = torch.ops.qcompile.gqa_attention(q, k, v)
    fallbacks = [str(w.message) for w in caught if "SDPA path" in str(w.message)]
    assert not fallbacks, fallbacks  # the op fell back from the Triton kernel
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    repeated = 2 * 32 * 8192 * 128 * 2  # K and V repeated to 32 heads, fp16
    assert extra < repeated / 8, f"op allocated {extra} bytes; a repeated K/V would be {repeated}"
    _check(y, q, k, v)


def test_compiled_tiny_llama_on_gpu_matches_float_with_the_op():
    import qcompile
    from tests.conftest import tiny_llama

    model = tiny_llama().cuda()
    model.set_attn_implementation("eager")  # repeat_kv in the graph
    ids = torch.randint(0, 256, (2, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    reports = []
    compiled = torch.compile(model, backend=qcompile.backend(quantize_linears=False, reports=reports))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = compiled(ids, attention_mask=mask).logits
        gen = compiled.generate(ids[:1], max_new_tokens=16, do_sample=False)
        gen_ref = model.generate(ids[:1], max_new_tokens=16, do_sample=False)
    assert (out - ref)[mask.bool()].abs().max() < 1e-3
    assert torch.equal(gen, gen_ref)
    assert all(a.op == "qcompile::gqa_attention" for r in reports for a in r.attention)
