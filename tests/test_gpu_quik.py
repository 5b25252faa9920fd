"""QUIK on a CUDA device: the Triton int8 GEMM is exact, quik_mm matches its float64 reference eager and
under torch.compile. On the GPU machine: `bash benchmarks/run_gpu_checks.sh quik OUT_DIR`."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("m", [1, 16, 300])
@pytest.mark.parametrize("groups", [1, 4])
def test_int8_gemm_cuda_is_exact(m, groups):
    from qcompile.ops.quik import int8_gemm_reference

    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, 1024), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (512, 1024), generator=g, dtype=torch.int8)
    got = torch.ops.qcompile.int8_gemm(a.cuda(), b.cuda(), groups)
    assert torch.equal(got.cpu(), int8_gemm_reference(a, b, groups))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quik_mm_cuda_matches_reference(dtype):
    from qcompile import lowering
    from qcompile.ops.quik import quik_mm_reference
    from tests.test_quik import random_quik

    packed = lowering.pack(random_quik(n=256, k=512, outliers=32), "cuda")
    x = torch.randn(3, 9, 512, device="cuda").to(dtype)
    ref = quik_mm_reference(x.double(), *packed.tensors.values(), *packed.consts)
    torch.testing.assert_close(packed(x).double(), ref, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(lambda x: packed(x), fullgraph=True)(x)
    torch.testing.assert_close(compiled.double(), ref, rtol=2e-2, atol=2e-2)
