"""The Triton int4 kernel and its Inductor template, checked on CPU through Triton's interpreter.

TRITON_INTERPRET=1 only works if it is set before triton is first imported in the process, which
other test modules may already have done. So the checks run in one child process (this file run as
a script, with TRITON_INTERPRET=1 in its environment) and report a JSON line per case; each pytest
test below asserts on its cases.

Tolerance (`_tolerance`): the kernel rounds each dequantized weight to the activation dtype (unit
roundoff u: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32), accumulates K products in fp32 and rounds the
output once to the activation dtype. So |y - y64| <= (2u + K u_fp32) * (|x| @ |W|^T); we allow
twice that. Inputs (x in its dtype, codes, scales, zeros) are exact in float64, so the float64
reference is the exact answer.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import pytest
import torch

from tests.interpreter import check, run_children

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# --- the child process: runs the kernels, prints one JSON line per case -------------------------
def _weight(n, k, g, scale_dtype=torch.float32, seed=0):
    from qcompile.formats.int4 import pack_nibbles

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    zeros = (torch.rand(n, k // g, generator=gen) * 15).to(scale_dtype)  # fractional zero-points
    return pack_nibbles(codes), scales, zeros


def _expected(x, qweight, scales, zeros, g):
    """The float64 result x @ W.T (x as [M, K]) and the tolerance of each entry (module docstring)."""
    from qcompile.ops import dequantize_int4

    w = dequantize_int4(qweight, scales, zeros, g, torch.float64)
    bound = x.double().abs() @ w.abs().t()
    u = UNIT_ROUNDOFF[x.dtype]
    return x.double() @ w.t(), 2 * (2 * u + x.shape[-1] * UNIT_ROUNDOFF[torch.float32]) * bound + 1e-12


def _compare(y, dtype, ref, tol):
    err = (y.double() - ref).abs()
    ratio = (err / tol).max().item()  # <= 1 passes
    return {"ok": bool(y.dtype == dtype and ratio <= 1), "err_over_tol": ratio, "max_err": err.max().item()}


def _fix_interpreter_bf16_dot():
    # The interpreter stores bf16 as uint16 and its tl.dot multiplies those bit patterns
    # (triton-lang/triton#11584, "not supported yet"). GPUs do not; widen bf16 operands (exactly).
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, *args):
        return original(self, widen(a), widen(b), *args)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _kernel_cases(groups):
    """Every autotune config on its M bucket x group sizes x activation dtypes."""
    from qcompile.lowering import triton_int4 as ti

    n, k = 72, 256  # 72: not a multiple of any BLOCK_N
    buckets = [(1, ti.GEMV_CONFIGS + ti.DECODE_CONFIGS), (3, ti.DECODE_CONFIGS), (17, ti.SMALL_BATCH_CONFIGS),
               (70, ti.PREFILL_CONFIGS)]
    for g in groups:
        w = _weight(n, k, g)
        for m, configs in buckets:
            for name, dtype in DTYPES.items():
                if m == 70 and g in (64, 128):
                    continue  # prefill tiles: groups 32 and per-channel cover both scale paths
                x = torch.randn(m, k).to(dtype)
                expected = _expected(x, *w, g)
                for c in (c for c in configs if c.fits(k, g)):  # (BLOCK_K = 512 GEMV tiles: longer K)
                    y = ti.int4_mm_triton(x, *w, g, config=c)
                    yield f"g{g}-m{m}-{name}-{tuple(c)}", _compare(y, dtype, *expected)


def _split_k_cases():
    """Decode tiles with K split over 2 and 3 programs (split 3 over K = 512: uneven splits; over
    BLOCK_K = 256: an empty last split), groups inside and across splits; the tickets return to 0."""
    from qcompile.lowering import triton_int4 as ti, triton_tiles

    n, k = 72, 512
    for g in (64, 512):
        w = _weight(n, k, g)
        for m in (1, 5):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                x = torch.randn(m, k).to(dtype)
                expected = _expected(x, *w, g)
                for c in (ti.GEMV_CONFIGS[:2] if m == 1 else ()) + ti.DECODE_CONFIGS[:3]:
                    for split in (2, 3):
                        y = ti.int4_mm_triton(x, *w, g, config=c._replace(split_k=split))
                        yield f"split-g{g}-m{m}-{name}-{tuple(c)}-s{split}", _compare(y, dtype, *expected)
    yield "split-tickets-reset", {"ok": all(int(t.abs().sum()) == 0 for t in triton_tiles.tickets.values())}


def _int8_cases():
    """The int8 layout through the same kernel (BITS = 8): per channel without zeros (the int8
    lm_head) and in groups with zeros, GEMV, split-K and tensor-core tiles."""
    from qcompile.lowering import triton_int4 as ti
    from qcompile.ops.linear import dequantize_int8

    n, k = 72, 512
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    for name, scales, zeros in (("per-channel", torch.rand(n, generator=gen) * 0.01 + 0.001, None),
                                ("g128-zeros", (torch.rand(n, 4, generator=gen) * 0.01 + 0.001).bfloat16(),
                                 torch.randint(-8, 8, (n, 4), generator=gen).bfloat16())):
        w64 = dequantize_int8(q, scales, zeros, torch.float64)
        for m, configs in ((1, ti.GEMV_CONFIGS[:1]), (5, ti.DECODE_CONFIGS[:1]), (40, ti.SMALL_BATCH_CONFIGS[:1])):
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(m, k).to(dtype)
                ref = x.double() @ w64.t()
                u = UNIT_ROUNDOFF[dtype]
                tol = 2 * (2 * u + k * UNIT_ROUNDOFF[torch.float32]) * (x.double().abs() @ w64.abs().t()) + 1e-12
                for c in configs:
                    for split in (1, 2) if m <= 16 else (1,):
                        y = ti.int8_mm_triton(x, q, scales, zeros, config=c._replace(split_k=split))
                        yield f"int8-{name}-m{m}-{dtype}-{tuple(c)}-s{split}", _compare(y, dtype, ref, tol)


def _odd_cases():
    """K that is not a multiple of 64, the BLOCK_K=16 fallback, leading dims, scale/zero dtypes."""
    from qcompile.lowering import triton_int4 as ti

    # K that is not a multiple of 64 (only BLOCK_K=32 fits), and K=48 with one 48-wide group (the
    # BLOCK_K=16 fallback); leading batch dimensions are flattened by the launcher.
    for m, k2, g in ((3, 96, 32), (17, 96, 32), (2, 48, 48)):
        w = _weight(40, k2, g)
        x = torch.randn(2, m, k2)
        expected = _expected(x.reshape(-1, k2), *w, g)
        for c in ti.int4_mm_configs(m * 2, k2, g):
            y = ti.int4_mm_triton(x, *w, g, config=c)
            yield f"oddk-k{k2}-g{g}-m{m}-{tuple(c)}", _compare(y.reshape(-1, 40), x.dtype, *expected)
    n, k = 72, 256
    for sname, sdtype in DTYPES.items():
        w = _weight(n, k, 64, scale_dtype=sdtype)
        for name, dtype in DTYPES.items():
            x = torch.randn(5, k).to(dtype)
            c = ti.int4_mm_configs(5, k, 64)[0]
            y = ti.int4_mm_triton(x, *w, 64, config=c)
            yield f"scales-{sname}-x-{name}", _compare(y, dtype, *_expected(x, *w, 64))


def _template_cases():
    """The Inductor template source, rendered with plain hooks into a @triton.jit kernel."""
    import importlib.util

    import jinja2

    from qcompile.lowering import inductor_int4, triton_int4 as ti

    m, n, k = 17, 72, 256
    for g, dtype, c in ((32, torch.float32, ti.DECODE_CONFIGS[0]), (128, torch.bfloat16, ti.SMALL_BATCH_CONFIGS[0]),
                        (256, torch.float16, ti.PREFILL_CONFIGS[0]), (64, torch.float32, ti.SMALL_BATCH_CONFIGS[3])):
        x = torch.randn(m, k).to(dtype)
        w = _weight(n, k, g, scale_dtype=torch.bfloat16)
        tensors = {"X": x, "QW": w[0], "S": w[1], "Z": w[2]}
        meta = {**c.meta(), "GROUP_SIZE": g, "ALLOW_TF32": False}
        defines = "".join(f"    {key}: tl.constexpr = {val}\n" for key, val in meta.items())
        hooks = {
            "def_kernel": lambda *names: ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
                                          f"def int4_mm_template({', '.join(names)}, OUT):\n{defines}"),
            "size": lambda name, i: str(tensors[name].shape[i]),
            "stride": lambda name, i: str(tensors[name].stride(i)),
            "store_output": lambda idx, val, mask, **_: (
                f"tl.store(OUT + {idx[0]} * {n} + {idx[1]}, {val}.to(OUT.dtype.element_ty), {mask})"),
        }
        src = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            inductor_int4.template_source()).render(**hooks, **meta)
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # triton.jit reads source files
            f.write(src)
        spec = importlib.util.spec_from_file_location("int4_mm_template", f.name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = torch.empty(m, n, dtype=dtype)
        grid = (-(-m // c.block_m) * -(-n // c.block_n),)
        mod.int4_mm_template[grid](x, *w, out, num_warps=c.num_warps, num_stages=c.num_stages)
        os.unlink(f.name)
        yield f"template-g{g}-{dtype}-{tuple(c)}", _compare(out, dtype, *_expected(x, *w, g))


def _inductor_cases():
    """torch.compile with the lowering registered: CPU tensors keep the fallback kernel; then, with
    Inductor's Triton backend pointed at the CPU and the interpreter standing in for a GPU, the
    template path itself (codegen, epilogue fusion, numerics)."""
    import torch.nn.functional as F
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from qcompile.lowering import inductor_int4

    config.fx_graph_cache = False
    inductor_int4.register()
    n, k, g = 48, 256, 64
    w = _weight(n, k, g, scale_dtype=torch.bfloat16)
    bias = torch.randn(n)
    x = torch.randn(2, 3, k)

    def f(x):
        return F.silu(torch.ops.qcompile.int4_mm(x, *w, g) + bias)

    y, (code,) = run_and_get_code(torch.compile(f), x)
    ref, tol = _expected(x.reshape(-1, k), *w, g)
    result = _compare(y.reshape(-1, n), x.dtype, F.silu(ref + bias.double()), tol)  # |silu'| <= 1.1
    result["ok"] &= "torch.ops.qcompile.int4_mm_kernel.default(" in code and inductor_int4.TEMPLATE_MARKER not in code
    yield "cpu-fallback", result

    if torch.cuda.is_available():
        return  # the real path is tested by tests/test_gpu_int4.py
    import torch.utils._triton as torch_triton

    # No Triton driver on a CPU machine: Inductor only asks the backend for a cache-key string.
    torch_triton.triton_backend = lambda: "interpreter"
    torch_triton.triton_hash_with_backend = lambda: "interpreter"
    config.cpu_backend = "triton"
    inductor_int4.DEVICE_TYPES = ("cuda", "cpu")
    for shape, dtype, g in (((2, 3), torch.float32, 64), ((17,), torch.bfloat16, 128), ((1,), torch.float16, 256)):
        w = _weight(n, k, g, scale_dtype=torch.bfloat16)
        bias, res = torch.randn(n).to(dtype), torch.randn(*shape, n).to(dtype)
        x = torch.randn(*shape, k).to(dtype)

        def f(x):  # relu, not silu: the interpreter lacks libdevice.exp
            return torch.relu(torch.ops.qcompile.int4_mm(x, *w, g) + bias) + res

        torch._dynamo.reset()
        y, (code,) = run_and_get_code(torch.compile(f), x)
        ref, tol = _expected(x.reshape(-1, k), *w, g)
        ref = torch.relu(ref + bias.double()) + res.double().reshape(-1, n)
        # The product is rounded to `dtype` before the epilogue (as eager does), and the epilogue's
        # result once more when stored: allow that last rounding too.
        result = _compare(y.reshape(-1, n), dtype, ref, tol + 2 * UNIT_ROUNDOFF[dtype] * ref.abs())
        kernels = [line for line in code.splitlines() if line.startswith("def triton")]
        result["kernels"] = kernels
        result["ok"] &= (len(kernels) == 1 and inductor_int4.TEMPLATE_MARKER in code
                         and "int4_mm" in kernels[0] and "relu" in kernels[0])
        yield f"interpreted-template-{shape}-{dtype}-g{g}", result

    # dynamic=True: one kernel for every M (a symbolic size), K and N specialized with a guard
    torch._dynamo.reset()
    fn = torch.compile(lambda x, r: torch.ops.qcompile.int4_mm(x, *w, g) + r, dynamic=True)
    for i, seq in enumerate((5, 37)):
        x, r = torch.randn(2, seq, k), torch.randn(2, seq, n)
        y, codes = run_and_get_code(fn, x, r) if i == 0 else (fn(x, r), None)  # (run_and_get_code resets)
        ref, tol = _expected(x.reshape(-1, k), *w, g)
        ref = ref + r.double().reshape(-1, n)
        result = _compare(y.reshape(-1, n), x.dtype, ref, tol + 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs())
        result["ok"] &= i > 0 or inductor_int4.TEMPLATE_MARKER in "\n".join(codes)
        yield f"interpreted-dynamic-m{2 * seq}", result

    # Without the template (as on a torch whose template API moved) the lowering's only choice is the
    # extern kernel: Inductor calls the eager launcher with out=, and still runs the epilogue.
    # (triton.autotune cannot time configs without a driver: let it keep the first one.)
    tuner = inductor_int4.triton_int4.int4_mm_autotuned
    prune, tuner.early_config_prune = tuner.early_config_prune, lambda *a, **kw: prune(*a, **kw)[:1]
    template, inductor_int4._template = inductor_int4._template, None
    x, r = torch.randn(4, k).half(), torch.randn(4, n).half()
    try:
        torch._dynamo.reset()
        y, (code,) = run_and_get_code(torch.compile(lambda x: torch.ops.qcompile.int4_mm(x, *w, g) * r), x)
    finally:
        inductor_int4._template, tuner.early_config_prune = template, prune
    ref, tol = _expected(x, *w, g)
    ref = ref * r.double()
    result = _compare(y, x.dtype, ref, tol * r.double().abs() + 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs())
    result["ok"] &= f"extern_kernels.{inductor_int4.TEMPLATE_NAME}(" in code
    yield "interpreted-extern-choice", result

    # Decode with few output tiles: the heuristic splits K, which a template program cannot, so the
    # extern choice runs even with the template available (Inductor calls the launcher with out=).
    k_long = 2048
    w = _weight(n, k_long, 128, scale_dtype=torch.bfloat16)
    x, r = torch.randn(1, k_long).half(), torch.randn(1, n).half()
    assert inductor_int4.triton_int4.int4_mm_configs(1, k_long, 128, n)[0].split_k > 1
    prune, tuner.early_config_prune = tuner.early_config_prune, lambda *a, **kw: prune(*a, **kw)[:1]
    try:
        torch._dynamo.reset()
        y, (code,) = run_and_get_code(torch.compile(lambda x: torch.ops.qcompile.int4_mm(x, *w, 128) * r), x)
    finally:
        tuner.early_config_prune = prune
    ref, tol = _expected(x, *w, 128)
    ref = ref * r.double()
    result = _compare(y, x.dtype, ref, tol * r.double().abs() + 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs())
    result["ok"] &= (f"extern_kernels.{inductor_int4.TEMPLATE_NAME}(" in code
                     and inductor_int4.TEMPLATE_MARKER not in code)
    yield "interpreted-extern-split-k", result


# Two children share the work (2 CPU cores): group sizes 32/64 | 128/per-channel (256) + the rest.
CHILD_PARTS = (("kernel:32,64", "split", "int8"), ("kernel:128,256", "odd", "template", "inductor"))


def _child_main(parts) -> None:
    _fix_interpreter_bf16_dot()
    for part in parts:
        name, _, groups = part.partition(":")
        section = {"kernel": lambda: _kernel_cases([int(g) for g in groups.split(",")]),
                   "split": _split_k_cases, "int8": _int8_cases, "odd": _odd_cases, "template": _template_cases,
                   "inductor": _inductor_cases}[name]
        for case, result in section():
            print(json.dumps({"case": case, **result}), flush=True)


# --- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    pytest.importorskip("jinja2")
    return run_children(__file__, CHILD_PARTS)


@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_kernel_every_config_matches_float64(results, g):
    from qcompile.lowering import triton_int4 as ti

    fitting = lambda configs: sum(c.fits(256, g) for c in configs)  # noqa: E731
    per_dtype = fitting(ti.GEMV_CONFIGS) + 2 * fitting(ti.DECODE_CONFIGS) + fitting(ti.SMALL_BATCH_CONFIGS)
    per_dtype += fitting(ti.PREFILL_CONFIGS) if g in (32, 256) else 0
    check(results, f"g{g}-", 3 * per_dtype)


def test_kernel_split_k_matches_float64_and_resets_tickets(results):
    check(results, "split-", 2 * 2 * (5 + 3) * 2 + 1)


def test_int8_layout_matches_float64(results):
    check(results, "int8-", 2 * 2 * (2 + 2 + 1))


def test_kernel_odd_k_and_leading_dims(results):
    check(results, "oddk-", 3)


def test_kernel_scale_and_zero_dtypes(results):
    check(results, "scales-", 9)


def test_inductor_template_source_matches_float64(results):
    check(results, "template-", 4)


def test_cpu_compile_keeps_fallback(results):
    check(results, "cpu-fallback", 1)


def test_inductor_template_codegen_fuses_epilogue(results):
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/test_gpu_int4.py")
    check(results, "interpreted-", 7)


def test_configs_fit_or_raise():
    ti = pytest.importorskip("qcompile.lowering.triton_int4")
    for m in (1, 16, 17, 64, 65, 4096):
        for k, g in ((4096, 128), (4096, 4096), (11008, 128), (576, 64), (576, 576), (96, 32), (48, 48)):
            configs = ti.int4_mm_configs(m, k, g)
            assert configs and all(c.fits(k, g) for c in configs)
    assert {c.block_m for c in ti.int4_mm_configs(1, 4096, 128)} == {1, 16}  # GEMV and tensor-core tiles
    assert {c.block_m for c in ti.int4_mm_configs(2, 4096, 128)} == {16}
    # decode: split K until ~4 programs an SM, every split at least 2 steps, none empty; not above M=16
    for n, k in ((4096, 4096), (4096, 11008), (11008, 4096), (576, 576), (49152, 576)):
        for c in ti.int4_mm_configs(1, k, 64, n, num_sms=132):
            steps = -(-k // c.block_k)
            per_split = -(-steps // c.split_k)
            assert 1 <= c.split_k and (c.split_k - 1) * per_split < steps
            assert c.split_k == 1 or (c.tiles(1, n) * c.split_k <= 8 * 132 and per_split >= 2)
    assert ti.int4_mm_configs(1, 4096, 64, 4096, num_sms=132)[0].split_k > 1
    assert all(c.split_k == 1 for c in ti.int4_mm_configs(17, 4096, 64, 4096) + ti.int4_mm_configs(512, 4096, 64, 4096))
    with pytest.raises(NotImplementedError, match="BLOCK_K"):
        ti.int4_mm_configs(1, 40, 40)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
