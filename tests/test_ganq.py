"""GANQ (per-row lookup tables): each step against an independent float64 reference."""
import itertools

import pytest
import torch

from qcompile.formats import LutWeight, pack_nibbles
from qcompile.formats.lut import pack_codes, unpack_codes
from qcompile.methods import ganq


def _hessian(n, tokens=64, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen, dtype=dtype) @ (torch.eye(n, dtype=dtype)
                                                             + 0.5 * torch.randn(n, n, generator=gen, dtype=dtype))
    return x.t() @ x


def _objective(w, w_hat, h):
    r = w - w_hat
    return ((r @ h) * r).sum().item()


def test_code_assignment_is_the_back_substitution_of_the_objective():
    """Each column's code minimises its own term (sum_{u>=j} L[u,j] r_u)^2 given the later columns:
    checked by trying every table entry, with the full L, column by column from the last."""
    gen = torch.Generator().manual_seed(1)
    m, n, levels = 3, 7, 4
    h = _hessian(n, seed=1)
    lower = torch.linalg.cholesky(h)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    tables = torch.randn(m, levels, generator=gen, dtype=torch.float64).sort(1).values
    codes = ganq.assign_codes(w, tables, lower, block=3)  # 3: lazy blocks that do not divide n
    for i in range(m):
        r = torch.zeros(n, dtype=torch.float64)
        for j in reversed(range(n)):
            terms = []
            for c in range(levels):
                r[j] = w[i, j] - tables[i, c]
                terms.append((lower[j:, j] @ r[j:]).abs().item())
            best = min(range(levels), key=terms.__getitem__)
            assert codes[i, j].item() == best
            r[j] = w[i, j] - tables[i, best]


def test_code_assignment_is_optimal_when_inputs_are_uncorrelated():
    """With a diagonal H the objective separates by column, so back-substitution must find the
    global optimum: checked against all levels^n assignments."""
    gen = torch.Generator().manual_seed(2)
    n, levels = 5, 4
    h = torch.diag(torch.rand(n, generator=gen, dtype=torch.float64) + 0.1)
    w = torch.randn(1, n, generator=gen, dtype=torch.float64)
    tables = torch.randn(1, levels, generator=gen, dtype=torch.float64).sort(1).values
    codes = ganq.assign_codes(w, tables, torch.linalg.cholesky(h), block=2)
    best = min(itertools.product(range(levels), repeat=n),
               key=lambda c: _objective(w, tables[0, list(c)][None], h))
    assert codes[0].tolist() == list(best)


def test_table_update_is_the_least_squares_solution():
    """T-step vs an independent solve: min_t ||(w - t S) L|| by lstsq, row by row."""
    gen = torch.Generator().manual_seed(3)
    m, n, levels = 4, 12, 4
    h = _hessian(n, seed=3)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, levels, (m, n), generator=gen)
    codes[:, :levels] = torch.arange(levels)  # every entry used
    tables = torch.zeros(m, levels, dtype=torch.float64)
    got = ganq.update_tables(w, h, codes, tables, w @ h)
    chol = torch.linalg.cholesky(h)
    for i in range(m):
        s = torch.nn.functional.one_hot(codes[i], levels).double()  # [n, levels]
        want = torch.linalg.lstsq(chol.t() @ s, chol.t() @ w[i]).solution
        assert torch.allclose(got[i], want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("bits", [3, 4])
def test_ganq_beats_round_to_nearest_and_its_own_start(bits):
    gen = torch.Generator().manual_seed(4)
    m, n = 32, 128
    h = _hessian(n, tokens=512, seed=4, dtype=torch.float32)
    w = torch.randn(m, n, generator=gen) * 0.05
    result = ganq.ganq_quantize(w, h, bits=bits, iters=6, damp=0.0)
    deq = result.weight.dequantize(torch.float64)
    levels = 2**bits - 1  # per-row min/max round-to-nearest on the same number of levels
    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    scale = (hi - lo) / levels
    rtn = ((w - lo) / scale).round().clamp(0, levels) * scale + lo
    h64 = h.double()
    err, rtn_err = _objective(w.double(), deq, h64), _objective(w.double(), rtn.double(), h64)
    assert err < 0.7 * rtn_err, (err, rtn_err)
    assert min(result.errors[1:]) < result.errors[0]  # the alternation improved on the k-means start
    assert result.weight.tables.shape == (m, 2**bits) and result.weight.bits == bits


def test_dead_inputs_and_bad_arguments():
    h = _hessian(16, dtype=torch.float32)
    h[3, :] = 0
    h[:, 3] = 0
    w = torch.randn(8, 16)
    result = ganq.ganq_quantize(w, h, bits=4, iters=2)
    assert torch.isfinite(result.weight.dequantize()).all()
    with pytest.raises(ValueError, match="bits=5"):
        ganq.ganq_quantize(w, h, bits=5)
    with pytest.raises(ValueError, match="do not match"):
        ganq.ganq_quantize(w, h[:8, :8])


def test_three_bit_codes_pack_densely_and_round_trip(tmp_path):
    import qcompile
    from qcompile import lowering
    from qcompile.modules import QuantLinear

    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 8, (6, 64), generator=gen)
    packed = pack_codes(codes, 3)
    assert packed.shape == (6, 24)  # 3 bits per code
    # byte layout: code i of a group of eight sits at bits 3i..3i+2 of a little-endian 24-bit word
    word = sum(int(packed[0, b]) << (8 * b) for b in range(3))
    assert [(word >> (3 * i)) & 7 for i in range(8)] == codes[0, :8].tolist()
    assert torch.equal(unpack_codes(packed, 3, 64), codes.to(torch.uint8))

    w = LutWeight(pack_nibbles(codes), torch.randn(6, 8, generator=gen).half(), bits=3)
    model = torch.nn.Sequential(QuantLinear(lowering.pack(w, "cpu")))
    x = torch.randn(2, 64, generator=gen)
    ref = x.double() @ w.dequantize(torch.float64).t()
    assert torch.allclose(model(x).double(), ref, rtol=1e-5, atol=1e-5)
    qcompile.save(model, tmp_path / "ck")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 6, bias=False))
    qcompile.load(fresh, tmp_path / "ck")
    assert torch.equal(fresh[0](x), model(x))
    from safetensors.torch import load_file
    assert load_file(tmp_path / "ck" / "model.safetensors")["0.codes"].shape == (6, 24)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("m", [1, 2, 3, 9])  # GEMV with one and two rows at a time, and the GEMM path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpu_lut_kernel_matches_float64(bits, m, dtype):
    """The CPU kernel (float32 math) vs x @ T[q].T in float64; bound: K unit roundoffs of float32
    on |x| @ |W|.T, plus one rounding of the output in x's dtype."""
    gen = torch.Generator().manual_seed(m + 10 * bits)
    n, k = 96, 160  # k: a 16-byte SIMD body plus a scalar tail
    w = LutWeight(pack_nibbles(torch.randint(0, 2**bits, (n, k), generator=gen)),
                  torch.randn(n, 2**bits, generator=gen).to(torch.bfloat16), bits)
    x = torch.randn(2, m, k, generator=gen).to(dtype)
    y = torch.ops.qcompile.lut_mm(x, w.codes, w.tables)
    w64 = w.dequantize(torch.float64)
    ref = x.double() @ w64.t()
    u = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-52}[dtype]
    tol = (k * 2.0**-24) * (x.double().abs() @ w64.abs().t()) + u * ref.abs() + 1e-300
    assert y.dtype == dtype and y.shape == (2, m, n)
    assert ((y.double() - ref).abs() <= tol).all()


def test_incremental_code_sums_equal_the_full_product():
    g = torch.Generator().manual_seed(3)
    m, n, levels = 7, 40, 8
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    h = x @ x.t()
    old = torch.randint(0, levels, (m, n), generator=g)
    new = torch.where(torch.rand(m, n, generator=g) < 0.2, torch.randint(0, levels, (m, n), generator=g), old)
    onehot = torch.nn.functional.one_hot(new, levels).permute(0, 2, 1).double()   # [m, L, n]
    expect = onehot @ h
    assert torch.allclose(ganq.code_sums(h, new, levels), expect, rtol=0, atol=1e-10)
    got = ganq.code_sums(h, new, levels, (ganq.code_sums(h, old, levels), old), chunk=5)
    assert torch.allclose(got, expect, rtol=0, atol=1e-10)


# --- through qcompile.quantize -----------------------------------------------------------------------
def test_quantize_with_ganq_config_compiles_saves_and_reports_tables(tmp_path):
    import copy

    import qcompile
    from qcompile import GANQConfig
    from qcompile.methods.calibration import collect_hessians, capture_block_inputs, _batches
    from tests.conftest import tiny_llama
    from tests.test_gptq import calibration_ids, compiles_like_dequantized_and_round_trips

    model = tiny_llama()
    float_model = copy.deepcopy(model)
    ids = calibration_ids()
    # the first block's q/k/v Hessian on the float model: what GANQ fits q/k/v to
    inputs = capture_block_inputs(float_model, float_model.model.layers[0], _batches(list(ids), 8))
    attn = float_model.model.layers[0].self_attn
    h = collect_hessians(float_model.model.layers[0], {"q": attn.q_proj}, inputs)["q"].h.double()

    qcompile.quantize(model, GANQConfig(bits=4, iters=4), calibration=ids, progress=False)
    lins = {x.path: x for x in model.qcompile_report.linears}
    q = "model.layers.0.self_attn.q_proj"
    assert all(x.op == "qcompile::lut_mm" for p, x in lins.items() if p.startswith("model.layers."))
    assert lins[q].reason == "4-bit lookup table per row (16 float16 entries), ganq, damp 0.01"
    rows = attn.q_proj.weight.shape[0]
    assert f"table {rows * 16 * 2} bytes (16 entries x {rows} rows)" in lins[q].notes
    assert lins["lm_head"].op == "qcompile::int8_mm_a8"
    # q/k/v were fitted together on their shared input: GANQ's fit beats each row's k-means table
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).double()
    got = torch.cat([qcompile.lowering.unpack(m.packed_weight()).dequantize(torch.float64)
                     for m in (model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.k_proj,
                               model.model.layers[0].self_attn.v_proj)])
    kmeans = ganq.nearest_table_quantize(w.float(), 4).dequantize(torch.float64)
    assert ganq.output_error(w, got, h).sum() < 0.8 * ganq.output_error(w, kmeans, h).sum()

    x = torch.randint(0, 256, (2, 24))
    compiles_like_dequantized_and_round_trips(model, float_model, x, tmp_path)
    text = str(qcompile.explain(model, x))
    assert "lookup table per row" in text and f"table {rows * 32} bytes" in text


def test_ganq_config_rejects_bad_values_and_the_unimplemented_outlier_variant():
    import qcompile
    from qcompile import GANQConfig
    from tests.conftest import tiny_llama

    for kwargs, match in (({"bits": 2}, "bits=2"), ({"iters": -1}, "iters"), ({"damp_percent": 0}, "damp"),
                          ({"table_dtype": torch.float32}, "table_dtype")):
        with pytest.raises(ValueError, match=match):
            qcompile.quantize(tiny_llama(), GANQConfig(**kwargs), calibration=torch.randint(0, 256, (2, 8)))
    with pytest.raises(NotImplementedError, match="GANQ\\*"):
        qcompile.quantize(tiny_llama(), GANQConfig(outlier_fraction=0.005), calibration=torch.randint(0, 256, (2, 8)))
    cfg = GANQConfig(bits=3, iters=5, table_dtype=torch.bfloat16)
    assert qcompile.QuantConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="calibration"):
        qcompile.backend(GANQConfig())  # the backend sees no data: quantize first
