"""The Triton LUT-mpGEMM kernel and its Inductor template, checked on CPU through Triton's interpreter.

As in tests/test_triton_int4.py, the checks run in child processes (this file run as a script with
TRITON_INTERPRET=1 in its environment, which must be set before triton is first imported) that
report a JSON line per case; each pytest test below asserts on its cases.

Tolerance (`_expected`): the kernel rounds each looked-up table entry to the activation dtype
(exact when the table has that dtype; unit roundoff u: 2^-8 bf16, 2^-11 fp16, 2^-24 fp32),
accumulates K products in fp32 (split-K sums fp32 partials: the same K additions, in another
order) and rounds the output once to the activation dtype. So
|y - y64| <= (2u + K u_fp32) * (|x| @ |W|^T); we allow twice that, as for int4. Inputs (x in its
dtype, codes, tables) are exact in float64, so the float64 reference is the exact answer.
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
def _weight(n, k, bits, table_dtype=torch.float16, seed=0):
    from qcompile.formats.int4 import pack_nibbles

    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    tables = (torch.randn(n, 2**bits, generator=gen) * 0.05).to(table_dtype)
    return pack_nibbles(codes), tables


def _expected(x, codes, tables):
    """The float64 result x @ W.T (x as [M, K]) and the tolerance of each entry (module docstring)."""
    from qcompile.ops import dequantize_lut

    w = dequantize_lut(codes, tables, torch.float64)
    bound = x.double().abs() @ w.abs().t()
    u = UNIT_ROUNDOFF[x.dtype]
    return x.double() @ w.t(), 2 * (2 * u + x.shape[-1] * UNIT_ROUNDOFF[torch.float32]) * bound + 1e-12


def _compare(y, dtype, ref, tol):
    err = (y.double() - ref).abs()
    ratio = (err / tol).max().item() if err.numel() else 0.0  # <= 1 passes
    return {"ok": bool(y.dtype == dtype and ratio <= 1), "err_over_tol": ratio,
            "max_err": err.max().item() if err.numel() else 0.0}


def _kernel_cases(bits):
    """Every autotune config on its M bucket x activation dtypes, with and without split-K."""
    from qcompile.lowering import triton_lut as tl_

    n, k = 72, 512  # 72: not a multiple of any BLOCK_N
    w = _weight(n, k, bits)
    # split 2: one split a BLOCK_K = 256 step; split 3 over 4 steps of 128: two splits of two steps
    # and an empty one (its zero partial still takes a ticket)
    buckets = [(1, tl_.DECODE_CONFIGS, 1), (3, tl_.DECODE_CONFIGS, 2), (17, tl_.SMALL_BATCH_CONFIGS, 3),
               (70, tl_.PREFILL_CONFIGS, 1)]
    for m, configs, split in buckets:
        for name, dtype in DTYPES.items():
            x = torch.randn(m, k).to(dtype)
            expected = _expected(x, *w)
            for c in configs:
                c = c._replace(split_k=split)
                y = tl_.lut_mm_triton(x, *w, config=c)
                yield f"b{bits}-m{m}-{name}-{tuple(c)}", _compare(y, dtype, *expected)


def _odd_cases():
    """K that is no multiple of BLOCK_K, leading dims, table dtypes, tables the OR trick cannot use."""
    from qcompile.lowering import triton_lut as tl_

    # K = 200: every BLOCK_K masks its last step (EVEN_K False), split or not; leading batch
    # dimensions are flattened by the launcher
    for bits, (m, c) in zip((3, 4, 4), ((1, tl_.DECODE_CONFIGS[0]._replace(split_k=3)),
                                        (5, tl_.DECODE_CONFIGS[3]._replace(split_k=2)), (40, tl_.PREFILL_CONFIGS[2]))):
        w = _weight(40, 200, bits)
        x = torch.randn(2, m, 200)
        y = tl_.lut_mm_triton(x, *w, config=c)
        result = _compare(y.reshape(-1, 40), x.dtype, *_expected(x.reshape(-1, 200), *w))
        result["ok"] &= y.shape == (2, m, 40)
        yield f"oddk-b{bits}-m{m}-{tuple(c)}", result
    n, k = 72, 256
    c = tl_.DECODE_CONFIGS[3]._replace(split_k=2)
    for tname, tdtype in DTYPES.items():
        w = _weight(n, k, 4, table_dtype=tdtype)
        for name, dtype in DTYPES.items():
            x = torch.randn(5, k).to(dtype)
            yield f"tables-{tname}-x-{name}", _compare(tl_.lut_mm_triton(x, *w, config=c), dtype, *_expected(x, *w))
    # Tables not aligned to their 32-byte rows (a view one element in; rows 24 elements apart):
    # the kernel's second loop adds the offset instead of OR-ing it.
    codes, tables = _weight(n, k, 4)
    x = torch.randn(3, k).half()
    flat = torch.empty(n * 16 + 1, dtype=torch.float16)
    shifted = flat[1:].view(n, 16)
    shifted.copy_(tables)
    wide = torch.zeros(n, 24, dtype=torch.float16)
    wide[:, :16] = tables
    for name, t in (("unaligned", shifted), ("row-stride-24", wide[:, :16])):
        y = tl_.lut_mm_triton(x, codes, t, config=c)
        yield f"tables-{name}", _compare(y, x.dtype, *_expected(x, codes, tables))
    # 2-bit codes: four entries a row (16-byte rows: the OR path on its own alignment)
    w = _weight(n, k, 2)
    yield "tables-2bit", _compare(tl_.lut_mm_triton(x, *w, config=c), x.dtype, *_expected(x, *w))
    # no rows: an empty result, no launch
    y = tl_.lut_mm_triton(torch.randn(0, k), codes, tables)
    yield "empty-m", {"ok": y.shape == (0, n)}
    # every split that ran has handed its tickets back
    yield "tickets-reset", {"ok": all(int(t.abs().sum()) == 0 for t in tl_._tickets.values())}


def _template_cases():
    """The Inductor template source, rendered with plain hooks into a @triton.jit kernel."""
    import importlib.util

    import jinja2

    from qcompile.lowering import inductor_lut, triton_lut as tl_

    n = 72
    cases = ((3, 512, 3, torch.float32, tl_.DECODE_CONFIGS[0]),
             (17, 512, 4, torch.bfloat16, tl_.SMALL_BATCH_CONFIGS[0]),
             (70, 200, 4, torch.float16, tl_.PREFILL_CONFIGS[2]),  # K = 200: EVEN_K False
             (1, 256, 3, torch.float16, tl_.DECODE_CONFIGS[3]))
    for m, k, bits, dtype, c in cases:
        x = torch.randn(m, k).to(dtype)
        w = _weight(n, k, bits, table_dtype=torch.bfloat16 if dtype == torch.float32 else torch.float16)
        tensors = {"X": x, "CODES": w[0], "TABLES": w[1]}
        meta = {**inductor_lut.template_meta(c, k, bits), "ALLOW_TF32": False}
        defines = "".join(f"    {key}: tl.constexpr = {val}\n" for key, val in meta.items())
        hooks = {
            "def_kernel": lambda *names: ("import triton\nimport triton.language as tl\n\n@triton.jit\n"
                                          f"def lut_mm_template({', '.join(names)}, OUT):\n{defines}"),
            "size": lambda name, i: str(tensors[name].shape[i]),
            "stride": lambda name, i: str(tensors[name].stride(i)),
            "store_output": lambda idx, val, mask, **_: (
                f"tl.store(OUT + {idx[0]} * {n} + {idx[1]}, {val}.to(OUT.dtype.element_ty), {mask})"),
        }
        src = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            inductor_lut.template_source()).render(**hooks, **meta)
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:  # triton.jit reads source files
            f.write(src)
        spec = importlib.util.spec_from_file_location("lut_mm_template", f.name)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = torch.empty(m, n, dtype=dtype)
        grid = (-(-m // c.block_m) * -(-n // c.block_n),)
        mod.lut_mm_template[grid](x, *w, out, num_warps=c.num_warps, num_stages=c.num_stages)
        os.unlink(f.name)
        yield f"template-m{m}-k{k}-b{bits}-{dtype}-{tuple(c)}", _compare(out, dtype, *_expected(x, *w))


def _inductor_cases():
    """torch.compile with the lowering registered: CPU tensors keep the fallback kernel; then, with
    Inductor's Triton backend pointed at the CPU and the interpreter standing in for a GPU, the
    template path itself (codegen, epilogue fusion, numerics) and the split-K extern choice."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    from qcompile.lowering import inductor_lut

    config.fx_graph_cache = False
    inductor_lut.register()
    n, k = 48, 256
    w = _weight(n, k, 4)
    bias = torch.randn(n)
    x = torch.randn(2, 3, k)

    def f(x):
        return torch.relu(torch.ops.qcompile.lut_mm(x, *w) + bias)

    y, (code,) = run_and_get_code(torch.compile(f), x)
    ref, tol = _expected(x.reshape(-1, k), *w)
    result = _compare(y.reshape(-1, n), x.dtype, torch.relu(ref + bias.double()), tol)
    result["ok"] &= "torch.ops.qcompile.lut_mm_kernel.default(" in code and inductor_lut.TEMPLATE_MARKER not in code
    yield "cpu-fallback", result

    if torch.cuda.is_available():
        return  # the real path is tested by tests/test_gpu_lut.py
    import torch.utils._triton as torch_triton

    # No Triton driver on a CPU machine: Inductor only asks the backend for a cache-key string.
    torch_triton.triton_backend = lambda: "interpreter"
    torch_triton.triton_hash_with_backend = lambda: "interpreter"
    config.cpu_backend = "triton"
    inductor_lut.DEVICE_TYPES = ("cuda", "cpu")
    for shape, dtype, bits in (((2, 3), torch.float32, 4), ((17,), torch.bfloat16, 3), ((70,), torch.float16, 4)):
        w = _weight(n, k, bits)
        bias, res = torch.randn(n).to(dtype), torch.randn(*shape, n).to(dtype)
        x = torch.randn(*shape, k).to(dtype)

        def f(x):  # relu, not silu: the interpreter lacks libdevice.exp
            return torch.relu(torch.ops.qcompile.lut_mm(x, *w) + bias) + res

        torch._dynamo.reset()
        y, (code,) = run_and_get_code(torch.compile(f), x)
        ref, tol = _expected(x.reshape(-1, k), *w)
        ref = torch.relu(ref + bias.double()) + res.double().reshape(-1, n)
        # The product is rounded to `dtype` before the epilogue (as eager does), and the epilogue's
        # result once more when stored: allow that last rounding too.
        result = _compare(y.reshape(-1, n), dtype, ref, tol + 2 * UNIT_ROUNDOFF[dtype] * ref.abs())
        kernels = [line for line in code.splitlines() if line.startswith("def triton")]
        result["kernels"] = kernels
        result["ok"] &= (len(kernels) == 1 and inductor_lut.TEMPLATE_MARKER in code
                         and "lut_mm" in kernels[0] and "relu" in kernels[0])
        yield f"interpreted-template-{shape}-{dtype}-b{bits}", result

    # dynamic=True: one kernel for every M (a symbolic size), K and N specialized with a guard
    torch._dynamo.reset()
    w = _weight(n, k, 4)
    fn = torch.compile(lambda x, r: torch.ops.qcompile.lut_mm(x, *w) + r, dynamic=True)
    for i, seq in enumerate((5, 37)):
        x, r = torch.randn(2, seq, k), torch.randn(2, seq, n)
        y, codes = run_and_get_code(fn, x, r) if i == 0 else (fn(x, r), None)  # (run_and_get_code resets)
        ref, tol = _expected(x.reshape(-1, k), *w)
        ref = ref + r.double().reshape(-1, n)
        result = _compare(y.reshape(-1, n), x.dtype, ref, tol + 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs())
        result["ok"] &= i > 0 or inductor_lut.TEMPLATE_MARKER in "\n".join(codes)
        yield f"interpreted-dynamic-m{2 * seq}", result

    # Decode with few output tiles: the heuristic splits K, which a template program cannot, so the
    # extern choice runs: Inductor calls the eager launcher with out=, then the epilogue.
    # (triton.autotune cannot time configs without a driver: let it keep the first one.)
    k_long = 2048
    w = _weight(n, k_long, 4)
    x, r = torch.randn(1, k_long).half(), torch.randn(1, n).half()
    assert inductor_lut.triton_lut.lut_mm_configs(1, n, k_long)[0].split_k > 1
    tuner = inductor_lut.triton_lut.lut_mm_autotuned
    prune, tuner.early_config_prune = tuner.early_config_prune, lambda *a, **kw: prune(*a, **kw)[:1]
    try:
        torch._dynamo.reset()
        y, (code,) = run_and_get_code(torch.compile(lambda x: torch.ops.qcompile.lut_mm(x, *w) * r), x)
    finally:
        tuner.early_config_prune = prune
    ref, tol = _expected(x, *w)
    ref = ref * r.double()
    result = _compare(y, x.dtype, ref, tol * r.double().abs() + 2 * UNIT_ROUNDOFF[x.dtype] * ref.abs())
    result["ok"] &= f"extern_kernels.{inductor_lut.TEMPLATE_NAME}(" in code and inductor_lut.TEMPLATE_MARKER not in code
    yield "interpreted-extern-split-k", result


# Two children share the work (2 CPU cores): 3-bit kernels + odd cases | 4-bit kernels + the rest.
CHILD_PARTS = (("kernel:3", "odd", "template"), ("kernel:4", "inductor"))


def _child_main(parts) -> None:
    from tests.test_triton_int4 import _fix_interpreter_bf16_dot

    _fix_interpreter_bf16_dot()
    for part in parts:
        name, _, bits = part.partition(":")
        section = {"kernel": lambda: _kernel_cases(int(bits)), "odd": _odd_cases, "template": _template_cases,
                   "inductor": _inductor_cases}[name]
        for case, result in section():
            print(json.dumps({"case": case, **result}), flush=True)


# --- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    pytest.importorskip("jinja2")
    return run_children(__file__, CHILD_PARTS)


@pytest.mark.parametrize("bits", [3, 4])
def test_kernel_every_config_matches_float64(results, bits):
    from qcompile.lowering import triton_lut as tl_

    per_dtype = 2 * len(tl_.DECODE_CONFIGS) + len(tl_.SMALL_BATCH_CONFIGS) + len(tl_.PREFILL_CONFIGS)
    check(results, f"b{bits}-", 3 * per_dtype)


def test_kernel_odd_k_and_leading_dims(results):
    check(results, "oddk-", 3)


def test_kernel_table_dtypes_and_layouts(results):
    check(results, "tables-", 12)


def test_kernel_empty_input_and_tickets_reset(results):
    check(results, "empty-m", 1)
    check(results, "tickets-reset", 1)


def test_inductor_template_source_matches_float64(results):
    check(results, "template-", 4)


def test_cpu_compile_keeps_fallback(results):
    check(results, "cpu-fallback", 1)


def test_inductor_template_codegen_fuses_epilogue(results):
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/test_gpu_lut.py")
    check(results, "interpreted-template-", 3)
    check(results, "interpreted-dynamic-", 2)


def test_inductor_decode_takes_split_k_extern(results):
    if torch.cuda.is_available():
        pytest.skip("covered on the GPU by tests/test_gpu_lut.py")
    check(results, "interpreted-extern-split-k", 1)


def test_configs_and_split_k():
    tl_ = pytest.importorskip("qcompile.lowering.triton_lut")
    assert {c.block_m for c in tl_.lut_mm_configs(1)} == {16}
    assert all(c.block_k % 8 == 0 and c.block_k >= 16 for c in tl_.ALL_CONFIGS)
    # decode on a 4096-row weight: split K until there are ~4 programs an SM, no split left empty
    for n, k in ((4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (576, 576)):
        for c in tl_.lut_mm_configs(1, n, k, num_sms=132):
            steps = -(-k // c.block_k)
            per_split = -(-steps // c.split_k)
            assert 1 <= c.split_k <= tl_.triton_tiles.MAX_SPLIT_K and (c.split_k - 1) * per_split < steps
            assert c.split_k == 1 or (c.tiles(1, n) * c.split_k <= 8 * 132 and per_split >= 2)
    assert tl_.lut_mm_configs(1, 4096, 11008, num_sms=132)[0].split_k > 1
    assert all(c.split_k == 1 for c in tl_.lut_mm_configs(512, 4096, 4096))
    assert all(c.split_k == 1 for c in tl_.lut_mm_configs(1, 4096, 4096, split_k=False))
    # shared memory: fp32 activations drop the tiles whose stages would not fit (an H100's 227 KB)
    assert tl_.PREFILL_CONFIGS[0] in tl_.lut_mm_configs(512)
    for itemsize in (2, 4):
        for m in (1, 32, 512):
            configs = tl_.lut_mm_configs(m, x_itemsize=itemsize)
            assert configs and all(c.shared_memory(itemsize) <= tl_.DEFAULT_SHARED_MEMORY for c in configs)
    assert tl_.PREFILL_CONFIGS[0] not in tl_.lut_mm_configs(512, x_itemsize=4)
    with pytest.raises(NotImplementedError, match="multiple of 8"):
        tl_._check(torch.randn(1, 12), torch.zeros(4, 6, dtype=torch.uint8), torch.zeros(4, 16))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
