"""QUIK (QUIKConfig, qcompile::quik_mm): the activation grid has one definition, the integer GEMM is
exact, the op matches a float64 reference of the same math on every path (eager CPU kernel, compiled),
GPTQ with float columns matches a plain float64 column-by-column recurrence, outlier channels are
the calibration inputs' largest max|x| and shared by layers that read one input, and save/load keeps
them."""
import json

import pytest
import torch

import qcompile
from qcompile import QUIKConfig, lowering
from qcompile.formats import QuikWeight
from qcompile.methods import gptq
from qcompile.modules import QuantLinear
from qcompile.ops.kernels import load_kernels
from qcompile.ops.quik import (block_weight, fake_quantize_activations, int8_gemm_reference, quantize_activations,
                                quik_linear_reference, quik_mm_reference, unblock_weight)
from tests.conftest import tiny_llama


def calibration_ids(n=16, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def random_quik(n=48, k=64, outliers=8, groups=1, bits=4, act_bits=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=g)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    return QuikWeight(torch.randint(lo, hi, (n, k - outliers), generator=g, dtype=torch.int8),
                      torch.rand(n, groups, generator=g) + 0.05, perm[:k - outliers], perm[k - outliers:],
                      torch.randn(n, outliers, generator=g).half(), bits, act_bits)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_grid_is_asymmetric_per_token_with_exact_zero(bits):
    x = torch.randn(5, 40) * torch.tensor([0.1, 1, 10, 100, 1000])[:, None] + 0.3
    x[2] = x[2].abs() + 1  # all positive: the range still holds 0
    x[3, :7] = 0
    q, z, s = quantize_activations(x, bits)
    maxq, half = 2**bits - 1, 2 ** (bits - 1)
    codes = q.double() + half
    assert q.dtype == torch.int8 and codes.min() >= 0 and codes.max() <= maxq
    # float64 recomputation of the definition: range [min(x, 0), max(x, 0)], integer zero-point
    xd = x.double()
    lo, hi = xd.amin(1, keepdim=True).clamp(max=0), xd.amax(1, keepdim=True).clamp(min=0)
    assert torch.allclose(s.double(), (hi - lo) / maxq, rtol=1e-6)
    assert torch.equal(z, torch.round(z)) and (z + half >= 0).all() and (z + half <= maxq).all()
    deq = s.double() * (q.double() - z.double())
    assert ((deq - xd).abs() <= s.double() / 2 * (1 + 1e-5)).all()  # round to nearest, nothing clipped
    assert (deq[3, :7] == 0).all()  # 0 is on the grid
    assert torch.equal(fake_quantize_activations(x, bits), deq.float())


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_int8_gemm_cpu_is_exact(groups, m):
    load_kernels(torch.device("cpu"))  # the C++ kernel, not the reference, must serve the CPU
    assert "CPU: registered at" in torch._C._dispatch_dump("qcompile::int8_gemm")
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-128, 128, (m, 256), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (72, 256), generator=g, dtype=torch.int8)
    got = torch.ops.qcompile.int8_gemm(a, b, groups)
    want = torch.einsum("mgk,ngk->gmn", a.long().reshape(m, groups, -1), b.long().reshape(72, groups, -1))
    assert got.dtype == torch.int32 and torch.equal(got.long(), want)
    # one token broadcast with stride 0 (what Inductor passes): oneDNN must not see lda = 0
    row = a[:1].expand(1, 256).as_strided((1, 256), (0, 1))
    assert torch.equal(torch.ops.qcompile.int8_gemm(row, b, groups), int8_gemm_reference(a[:1], b, groups))


FLAGS = next((ln.split() for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")), [])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k, groups", [(48, 64, 1), (40, 61, 1), (33, 96, 3), (1536, 576, 18)])
def test_blocked_weight_round_trips(bits, n, k, groups):
    w = random_quik(n=n, k=k + 5, outliers=5, groups=groups, bits=bits, act_bits=bits)
    b, s, r, f = block_weight(w.qweight, w.scales, w.rowsum(), w.fp_weight, bits)
    assert b.dtype == (torch.uint8 if bits == 4 else torch.int8) and b.shape[0] == -(-n // 16)
    run = 8 if bits == 4 else 4  # inputs per channel in a block; 4 bits: two codes a byte
    assert b.shape == (-(-n // 16), -(-k // run), 64) and f.shape == (b.shape[0], 5, 16)
    # byte 4·l + j of block t is channel l's code at k = 4t + j (8 bits); nibbles at 8t + j / 8t + 4 + j (4 bits)
    c, t, j = 5, 1, 2
    if bits == 8:
        assert b[0, t, 4 * c + j] == w.qweight[c, 4 * t + j]
    else:
        byte = int(b[0, t, 4 * c + j])
        assert (byte & 15) - 8 == w.qweight[c, 8 * t + j] and (byte >> 4) - 8 == w.qweight[c, 8 * t + 4 + j]
    q, s2, r2, f2 = unblock_weight(b, s, r, f, n, k)
    assert torch.equal(q, w.qweight) and torch.equal(r2, w.rowsum()) and torch.equal(s2, w.scales.float())
    assert torch.equal(f2, w.fp_weight.float())


@pytest.mark.parametrize("isa", ["native", pytest.param("avx2", marks=pytest.mark.skipif(
    "avx2" not in FLAGS, reason="no AVX2 on this CPU")), "scalar"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k, groups, f", [(48, 64, 1, 0), (40, 61, 1, 3), (33, 96, 3, 8), (1536, 576, 18, 64),
                                              (576, 1536, 1, 20)])
@pytest.mark.parametrize("m", [1, 3, 6, 13])
def test_quik_linear_cpu_matches_the_activation_grid_exactly(isa, bits, n, k, groups, f, m):
    """The blocked kernel (each ISA variant) quantizes x itself: its result equals float64 math on
    `quantize_activations`' codes to float32 rounding of the sums, far below what one code off by
    one would change (so the C++ grid is the Python one, code for code, ties included)."""
    from qcompile.lowering import cpu_kernels
    assert cpu_kernels.load(isa), f"the {isa} CPU kernels did not build"
    ops = torch.ops.qcompile if isa == "native" else getattr(torch.ops, f"qcompile_{isa}")
    w = random_quik(n=n, k=k + f, outliers=f, groups=groups, bits=bits, act_bits=bits, seed=m)
    x = torch.randn(m, k + f, generator=torch.Generator().manual_seed(m)) * 3
    x[0, : k // 3] = 0  # a stretch of exact zeros
    if m > 2:
        x[1] = x[1].abs() + 0.5  # all positive: the range still holds 0
        x[2, w.int_idx[:6].long()] = torch.tensor([7.5, 0.5, -0.5, 1.5, 2.5, -7.5])  # ties: s = 1 when the range is
        x[2, w.int_idx[6:].long()] = x[2, w.int_idx[6:].long()].clamp(-7.5, 7.5)  # [-7.5, 7.5] for 4 bits
    b, s, r, wf = block_weight(w.qweight, w.scales, w.rowsum(), w.fp_weight, bits)
    got = ops.quik_linear(x, w.int_idx, w.fp_idx, b, s, r, wf, bits, n)
    q, z, sx = quantize_activations(x[:, w.int_idx.long()], bits)
    g = k // groups
    wd = w.scales.double().repeat_interleave(g, 1) * w.qweight.double()
    ref = sx.double() * ((q.double() - z.double()) @ wd.t()) + x[:, w.fp_idx.long()].double() @ w.fp_weight.double().t()
    torch.testing.assert_close(quik_linear_reference(x, w.int_idx, w.fp_idx, b, s, r, wf, bits, n).double(), ref,
                               rtol=1e-6, atol=1e-5)
    terms = sx.double() * ((q.double() - z.double()).abs() @ wd.abs().t()) + \
        x[:, w.fp_idx.long()].double().abs() @ w.fp_weight.double().abs().t()
    tol = 1e-6 * terms.amax()
    # one activation code off by one (every row, its most-used column) moves some output well past tol
    assert (sx.double()[:, 0] * wd.abs().amax()).min() > 10 * tol
    assert got.shape == (m, n) and torch.all((got.double() - ref).abs() <= tol)
    with pytest.raises(ValueError, match="do not describe one blocked"):
        ops.quik_linear(x, w.int_idx, w.fp_idx, b, s, r, wf, bits, n + 16)


@pytest.mark.parametrize("act_bits", [4, 8])
@pytest.mark.parametrize("groups", [1, 4])
def test_quik_mm_matches_float64_reference_eager_and_compiled(act_bits, groups):
    w = random_quik(groups=groups, act_bits=act_bits, bits=act_bits)
    packed = lowering.pack(w, "cpu")
    x = torch.randn(2, 7, 64) * 3
    x[..., w.fp_idx.long()] *= 50  # the outlier channels
    ref = quik_mm_reference(x.double(), *packed.tensors.values(), *packed.consts)
    eager = packed(x)
    assert eager.shape == (2, 7, 48)
    # float32 sums of terms up to ~|x|·|W| (thousands here) round at ~1e-7 of that, and an output near 0
    # is a cancellation of such terms: tolerate a few units of that rounding, far below one code step
    w_abs = torch.zeros(48, 64, dtype=torch.float64)
    w_abs[:, w.int_idx.long()] = w.dequantize(torch.float64)[:, w.int_idx.long()].abs()
    w_abs[:, w.fp_idx.long()] = w.fp_weight.double().abs()
    atol = 1e-6 * (x.double().abs() @ w_abs.t()).amax().item()
    torch.testing.assert_close(eager.double(), ref, rtol=1e-5, atol=atol)
    compiled = torch.compile(lambda x: packed(x), backend="inductor", fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=atol)
    one = torch.compile(lambda x: packed(x), backend="inductor", fullgraph=True)(x[:1, :1])  # decode shape
    torch.testing.assert_close(one, eager[:1, :1], rtol=1e-5, atol=atol)
    # the dequantized weight and the simulation (fake-quantized activations) give the same product
    sim = fake_quantize_activations(x[..., w.int_idx.long()], act_bits).double() @ \
        w.dequantize(torch.float64)[:, w.int_idx.long()].t() + x[..., w.fp_idx.long()].double() @ \
        w.fp_weight.double().t()
    torch.testing.assert_close(eager.double(), sim, rtol=1e-5, atol=atol)


def test_quik_mm_rejects_bad_inputs():
    packed = lowering.pack(random_quik(), "cpu")
    with pytest.raises(ValueError, match="64.*56 integer \\+ 8 float"):
        packed(torch.randn(3, 60))
    with pytest.raises(TypeError, match="floating-point"):
        packed(torch.ones(3, 64, dtype=torch.long))
    w = random_quik()
    with pytest.raises(ValueError, match="each of the 64 input channels once"):
        QuikWeight(w.qweight, w.scales, w.int_idx, w.int_idx[:8], w.fp_weight)


def naive_gptq_float_tail(w, h, k_int, bits, damp):
    """Plain float64 GPTQ, one column at a time, per-channel symmetric min/max grid on the first k_int
    columns; the rest stay float and take the error feedback."""
    w = w.double().clone()
    h = h.double() + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    maxq, half = 2**bits - 1, 2 ** (bits - 1)
    s = 2 * w[:, :k_int].abs().amax(1) / maxq  # symmetric: [-max|w|, max|w|] over maxq steps
    s = s.to(torch.bfloat16).double()
    codes = torch.empty(w.shape[0], k_int, dtype=torch.float64)
    for j in range(k_int):
        q = torch.clamp(torch.round(w[:, j] / s) + half, 0, maxq)
        codes[:, j] = q
        e = (w[:, j] - s * (q - half)) / hinv[j, j]
        w[:, j:] -= e[:, None] * hinv[j, j:][None, :]
    return codes, s, w[:, k_int:]


def test_gptq_float_columns_match_plain_recurrence():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 40, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 40, dtype=torch.float64)
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(24, 40, generator=g, dtype=torch.float64)
    inv = gptq.invert(h, act_order=False, damp_percent=0.01)
    result = gptq.gptq_quantize(w, inv, bits=4, group_size=None, sym=True, block_size=8, float_columns=8,
                                scale_dtype=torch.bfloat16)
    codes, s, tail = naive_gptq_float_tail(w, h, 32, 4, 0.01)
    assert result.codes.shape == (24, 32)
    assert (result.codes.double() != codes).float().mean() < 0.01  # rounding ties in float may differ
    torch.testing.assert_close(result.scales[:, 0].double(), s)
    torch.testing.assert_close(result.float_tail.double(), tail, rtol=1e-6, atol=1e-6)
    assert not torch.equal(result.float_tail, w[:, 32:])  # the float columns took error feedback


def test_quantize_tiny_llama_with_quik():
    model, ref = tiny_llama(), tiny_llama()
    ids = calibration_ids()
    # max|x| of the first block's q_proj input on the float model: the outlier ranking
    seen = []
    hook = ref.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).abs().amax(0)))
    with torch.no_grad():
        for row in ids.split(8):
            ref(row)
    hook.remove()
    absmax = torch.stack(seen).amax(0)
    qcompile.quantize(model, QUIKConfig(outliers=12, group_size=None), calibration=ids, progress=False)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.down_proj):
        assert isinstance(m, QuantLinear) and m.layout == "quik"
    assert attn.q_proj.fp_idx.numel() == 12 and mlp.down_proj.fp_idx.numel() == 24  # w8a8: twice
    assert attn.k_proj.fp_idx is attn.q_proj.fp_idx and mlp.up_proj.int_idx is mlp.gate_proj.int_idx
    assert set(attn.q_proj.fp_idx.tolist()) == set(absmax.topk(12).indices.tolist())
    assert attn.q_proj.activations == "int4" and mlp.down_proj.activations == "int8"
    # on CPU the codes are blocked for qcompile::quik_gemm, 4-bit ones two a byte
    assert attn.q_proj.qweight.dtype == torch.uint8 and attn.q_proj.qweight.dim() == 3
    assert mlp.down_proj.qweight.dtype == torch.int8 and mlp.down_proj.qweight.dim() == 3
    lines = str(model.qcompile_report).splitlines()
    assert any("q_proj" in ln and "quik_mm" in ln and "int4" in ln and "12 float outlier columns" in ln for ln in lines)
    assert any("down_proj" in ln and "W8A8" in ln and "int8" in ln for ln in lines)
    x = calibration_ids(2, 24, seed=1)
    with torch.no_grad():
        a, b = ref(x).logits, model(x).logits
        compiled = torch.compile(model, backend=qcompile, fullgraph=True)
        c = compiled(x).logits
    assert (a - b).abs().max() < 0.5 * a.abs().max()  # close to float, not equal
    torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-4)
    # q/k/v and gate/up run as one op each (one quantization of their shared input), views of one buffer
    report = str(qcompile.explain(compiled, x))
    assert report.count("one op for q_proj+k_proj+v_proj]") == 3 * 2 and "fused into 4" in report
    assert "quantized ahead of time: W4A4 per channel sym" in report  # the QUIK layers as quantize() made them
    assert attn.k_proj.qweight.untyped_storage().data_ptr() == attn.q_proj.qweight.untyped_storage().data_ptr()


def test_quik_save_load_keeps_outlier_channels(tmp_path):
    model = qcompile.quantize(tiny_llama(), QUIKConfig(group_size=32), calibration=calibration_ids(), progress=False)
    qcompile.save(model, tmp_path)
    meta = json.loads((tmp_path / "qcompile.json").read_text())
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["format"] == "quik" and layer["act_bits"] == 4 and layer["group_size"] == 32
    loaded = qcompile.load(tiny_llama(seed=5), tmp_path)  # other float weights: nothing recomputed
    x = calibration_ids(2, 24, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    q0, l0 = model.model.layers[0].self_attn.q_proj, loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(q0.fp_idx, l0.fp_idx) and torch.equal(q0.qweight, l0.qweight)
    assert loaded.model.layers[0].self_attn.v_proj.fp_idx is l0.fp_idx  # shared again after loading


def test_quik_config_checks():
    for bad in (-1, 1.5, True, "5%"):
        with pytest.raises(ValueError, match="outliers"):
            QUIKConfig(outliers=bad).validate()
    with pytest.raises(ValueError, match="act_bits=3"):
        QUIKConfig(act_bits=3).validate()
    with pytest.raises(ValueError, match="lm_head_bits=4"):
        QUIKConfig(lm_head_bits=4).validate()
    cfg = QUIKConfig(outliers=32, group_size=-1, w8a8=())
    assert cfg.group_size is None and cfg.outlier_count("model.layers.0.mlp.down_proj", 1536) == 32
    assert QUIKConfig().outlier_count("model.layers.0.mlp.down_proj", 1536) == 2 * round(0.1 * 1536)
    assert qcompile.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_quik_without_outlier_columns_is_plain_w4a4():
    model = qcompile.quantize(tiny_llama(), QUIKConfig(outliers=0), calibration=calibration_ids(), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.layout == "quik" and q.fp_idx.numel() == 0 and q.fp_weight.numel() == 0
    x = calibration_ids(1, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend=qcompile)(x).logits, model(x).logits,
                                   rtol=1e-4, atol=1e-4)
