"""DL-QAT (`qcompile.qat`): exactness of prepare and convert against independent references, training
that lowers the distillation loss, Ctrl-C, seeds, bits 2-4, save / load / GPTQ export, the report."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import qcompile
from qcompile.qat import QATLinear, trainable_parameters
from qcompile.qat import distill as qat_train
from qcompile.qat.fake_quant import PHI_FRACTION, compiled_fake_quant, fake_quant_weight, group_scales
from qcompile.modules import QuantLinear
from qcompile.tools.evaluate import window_nll

from conftest import tiny_llama, tiny_tokenizer

TEXT = ("The river town keeps its ferry running from spring to late autumn. " * 40
        + "Bread is baked before dawn; the market opens at seven and closes by noon. " * 40)


def _config(**kw):
    base = dict(bits=3, group_size=32, rank=4, init="rtn", steps=6, seqlen=64, batch_size=4, eval_every=2,
                lr=2e-2, magnitude_lr=1e-2, compile=False)
    base.update(kw)
    return qcompile.DLQATConfig(**base)


def _prepared(model_seed=0, **kw):
    cfg = _config(**kw)
    model, tok = tiny_llama(model_seed), tiny_tokenizer()
    teacher = copy.deepcopy(model)
    ptq = copy.deepcopy(model)
    calib = TEXT if cfg.init == "gptq" else None
    qcompile.quantize(ptq, cfg.gptq_config(), calibration=calib, tokenizer=tok if calib else None, progress=False) \
        if cfg.init == "gptq" else qcompile.qat._rtn_init(ptq, cfg.gptq_config(), progress=False)
    qcompile.qat.prepare(model, cfg, calibration=calib, tokenizer=tok, progress=False)
    return model, teacher, ptq, tok, cfg


def _ids(n=2, t=64, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("init", ["rtn", "gptq"])
def test_prepared_model_computes_the_post_training_model_before_any_step(init):
    model, _, ptq, _, _ = _prepared(init=init)
    ptq_layers = {p: m for p, m in ptq.named_modules() if isinstance(m, QuantLinear)}
    qat_layers = {p: m for p, m in model.named_modules() if isinstance(m, QATLinear)}
    assert set(qat_layers) == {p for p, m in ptq_layers.items() if m.format_meta["format"] == "int4"}
    for path, layer in qat_layers.items():
        w = qcompile.lowering.unpack(ptq_layers[path].packed_weight())
        stored = w.dequantize(torch.float32)
        if w.perm is not None:
            stored = stored[:, w.perm.long()]
        assert torch.equal(layer.fake_weight(), stored), path  # bit for bit, in storage order
        assert (layer.perm is None) == (init == "rtn")
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, ptq(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_only_magnitudes_and_lora_train_and_phi_is_not_a_float_copy():
    model, *_ = _prepared(rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("magnitude", "lora_a", "lora_b")) for n in trainable)
    assert {id(p) for p in trainable_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    for m in model.modules():
        if isinstance(m, QATLinear):
            assert m.phi.dtype == torch.int16  # 2 bytes a weight, frozen
            assert all(b.numel() < m.phi.numel() for n, b in m.named_buffers() if n != "phi" and b.is_floating_point())
            assert m.magnitude.shape == (m.out_features, m.in_features // m.group_size)
            assert m.lora_a.shape == (4, m.in_features) and m.lora_b.shape == (m.out_features, 4)
    trained, total = qcompile.qat.trainable_fraction(model)
    want = sum(m.magnitude.numel() + 4 * (m.in_features + m.out_features) for m in model.modules()
               if isinstance(m, QATLinear))
    assert trained == want and 0 < trained / total < 0.2


def _perturb(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QATLinear):
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=g) * 2.0)
                m.magnitude.mul_(1 + 0.05 * torch.randn(m.magnitude.shape, generator=g))


def test_converted_codes_equal_an_independent_float64_recomputation():
    model, *_ = _prepared(bits=3)
    _perturb(model)
    layers = {p: copy.deepcopy(m) for p, m in model.named_modules() if isinstance(m, QATLinear)}
    qcompile.qat.convert(model)
    flips = 0
    for path, layer in layers.items():
        deployed = qcompile.lowering.unpack(model.get_submodule(path).packed_weight())
        phi = layer.phi.numpy().astype(np.float64) / PHI_FRACTION
        t = phi + layer.scaling * (layer.lora_b.detach().numpy().astype(np.float64)
                                   @ layer.lora_a.detach().numpy().astype(np.float64))
        want = np.clip(np.rint(t), 0, 2**layer.bits - 1)
        got = deployed.codes().numpy().astype(np.float64)
        near_tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-5
        assert np.all((got == want) | near_tie), path
        flips += int(np.sum(got != np.clip(np.rint(phi), 0, 2**layer.bits - 1)))
        scales = (layer.magnitude.detach().double() * layer.scales0.double()).to(torch.float16)
        assert torch.equal(deployed.scales, scales), path
        assert torch.equal(deployed.zeros, layer.zeros_stored), path
        assert deployed.bits == layer.bits and deployed.codes().max() <= 2**layer.bits - 1
    assert flips > 100  # the LoRA term moved codes: the check above compared real changes


def test_deployed_kernels_match_the_fake_quantized_forward():
    model, *_ = _prepared(bits=3, init="gptq")
    _perturb(model)
    ids = _ids()
    layers = {p: copy.deepcopy(m) for p, m in model.named_modules() if isinstance(m, QATLinear)}
    with torch.no_grad():
        fake = model(ids).logits
    qcompile.qat.convert(model)
    x = torch.randn(3, 17, 256)
    for path, layer in layers.items():
        deployed = model.get_submodule(path)
        xi = x[..., :layer.in_features]
        with torch.no_grad():
            torch.testing.assert_close(deployed(xi), layer(xi), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fake, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(model, backend=qcompile)(ids).logits
    torch.testing.assert_close(compiled, fake, rtol=1e-3, atol=1e-3)


def test_training_lowers_heldout_kl_and_converted_perplexity_matches_the_trained_model():
    model, teacher, _, tok, cfg = _prepared(bits=2, steps=12)
    result = qcompile.qat.train(model, teacher, calibration=TEXT, tokenizer=tok, progress=False)
    assert result.steps == 12 and result.tokens == 12 * 4 * 64 and not result.interrupted
    assert result.best_heldout_kl < 0.9 * result.initial_heldout_kl
    windows = qat_train.training_windows(TEXT, model=model, tokenizer=tok, seqlen=64)
    held = windows[qat_train.heldout_mask(len(windows), cfg.heldout)]
    fake_ppl = math.exp(window_nll(model, held, progress=False).mean().item())
    qcompile.qat.convert(model)
    deployed_ppl = math.exp(window_nll(model, held, progress=False).mean().item())
    assert abs(deployed_ppl / fake_ppl - 1) < 0.005
    report = model.qcompile_report.graphs[0].linears
    trained = [e for e in report if "dl-qat" in e.reason]
    assert len(trained) == 14 and all("trained: 12 steps" in " ".join(e.notes) for e in trained)


def test_the_best_state_is_kept_when_training_stops_or_gets_worse(monkeypatch):
    model, teacher, _, tok, cfg = _prepared(steps=10, eval_every=1)
    calls = {"n": 0}
    real = qat_train.distill_kl

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6 + 1:  # the first call is the initial held-out check
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(qat_train, "distill_kl", interrupting)
    result = qcompile.qat.train(model, teacher, calibration=TEXT, tokenizer=tok, progress=False)
    monkeypatch.setattr(qat_train, "distill_kl", real)
    assert result.interrupted and result.steps < 10
    windows = qat_train.training_windows(TEXT, model=model, tokenizer=tok, seqlen=64)
    mask = qat_train.heldout_mask(len(windows), cfg.heldout)
    targets = qat_train.teacher_targets(teacher, windows, cfg.distill_topk, 4, False)
    held_t = qat_train.TeacherTargets(targets.logp[mask], targets.index[mask])
    kl = qat_train.heldout_kl(model, windows[mask], held_t, 4)
    assert kl == pytest.approx(result.best_heldout_kl, rel=1e-6)
    assert result.best_heldout_kl == min([result.initial_heldout_kl] + [k for _, k in result.heldout])


def test_a_seed_reproduces_training():
    def run(seed):
        model, teacher, _, tok, _ = _prepared(steps=3, seed=seed)
        qcompile.qat.train(model, teacher, calibration=TEXT, tokenizer=tok, progress=False)
        return [p.detach().clone() for p in trainable_parameters(model)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("precision,dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_train_precision_sets_the_training_matmuls_and_both_learn(precision, dtype):
    model, teacher, _, tok, _ = _prepared(steps=6, train_precision=precision)
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append((m.training, o.dtype)))
    result = qcompile.qat.train(model, teacher, calibration=TEXT, tokenizer=tok, progress=False)
    hook.remove()
    assert {d for _, d in seen} == {torch.float32, dtype}  # held-out checks stay float32
    assert result.best_heldout_kl < result.initial_heldout_kl


@pytest.mark.parametrize("bits,group_size", [(2, 32), (4, 64), (3, None)])
def test_bits_and_groups_convert_to_the_int4_format(bits, group_size):
    model, *_ = _prepared(bits=bits, group_size=group_size)
    _perturb(model)
    qcompile.qat.convert(model)
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear) and m.format_meta["format"] == "int4":
            w = qcompile.lowering.unpack(m.packed_weight())
            assert w.bits == bits and w.codes().max() <= 2**bits - 1
            assert w.group_size == (group_size or w.in_features)
            assert torch.equal(w.zeros, w.zeros.round())  # integer zero-points: 0 stays on the grid


def test_saved_and_gptq_exported_models_load_back(tmp_path):
    model, *_ = _prepared(bits=3, init="gptq")
    _perturb(model)
    qcompile.qat.convert(model)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
    qcompile.save(model, tmp_path / "q")
    qcompile.save(model, tmp_path / "g", format="gptq")
    for folder in ("q", "g"):
        loaded = qcompile.load(tiny_llama(5), tmp_path / folder)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)
    meta = json.loads((tmp_path / "q" / "qcompile.json").read_text())
    assert meta["config"]["method"] == "dlqat" and meta["config"]["rank"] == 4


def test_compiled_fake_quant_matches_eager():
    model, *_ = _prepared(bits=3)
    _perturb(model)
    layer = next(m for m in model.modules() if isinstance(m, QATLinear))
    args = (layer.phi, layer.lora_b, layer.lora_a, layer.scaling, layer.qmax,
            group_scales(layer.magnitude, layer.scales0, layer.scale_dtype), layer.zeros)
    eager, compiled = fake_quant_weight(*args), compiled_fake_quant()(*args)
    differ = (eager != compiled).float().mean().item()
    assert differ < 1e-4  # fp contraction may flip an exact tie; nothing else
    g_e = torch.autograd.grad(eager.square().sum(), layer.lora_b)[0]
    g_c = torch.autograd.grad(compiled.square().sum(), layer.lora_b)[0]
    torch.testing.assert_close(g_c, g_e, rtol=1e-3, atol=1e-3)


def test_quantize_runs_prepare_train_convert_and_explain_says_how():
    model, tok = tiny_llama(), tiny_tokenizer()
    qcompile.quantize(model, _config(steps=2), calibration=TEXT, tokenizer=tok, progress=False)
    assert not any(isinstance(m, QATLinear) for m in model.modules())
    text = str(qcompile.explain(model, _ids()))
    assert "dl-qat (rank 4, magnitude per group; from rtn init)" in text


@pytest.mark.parametrize("field,value,match", [
    ("bits", 5, "use 2, 3 or 4"), ("init", "awq", "'gptq' or 'rtn'"), ("rank", -1, "non-negative"),
    ("heldout", 0.0, "fraction"), ("steps", 0, "positive integer"), ("group_size", 48, "not supported"),
    ("train_precision", "fp8", "'auto', 'float32' or 'bfloat16'")])
def test_bad_configs_say_what_to_do(field, value, match):
    with pytest.raises(ValueError, match=match):
        qcompile.DLQATConfig(**{field: value}).validate()


def test_train_and_convert_refuse_a_model_that_was_not_prepared():
    model = tiny_llama()
    quantized = qcompile.quantize(tiny_llama(), progress=False)
    with pytest.raises(ValueError, match="needs the float model"):
        qcompile.qat.prepare(quantized, _config())
    with pytest.raises(ValueError, match="prepare"):
        qcompile.qat.convert(model)
    with pytest.raises(ValueError, match="prepare"):
        qcompile.qat.train(model, copy.deepcopy(model))


def test_teacher_targets_are_the_top_k_log_probabilities_of_every_window():
    teacher = tiny_llama().eval()
    windows = _ids(n=7, t=32)  # 7 windows in batches of 3: the last batch is partial
    targets = qat_train.teacher_targets(teacher, windows, 8, 3, False)
    with torch.no_grad():
        ref = torch.log_softmax(teacher(windows, use_cache=False).logits.double(), dim=-1)
    assert targets.logp.shape == targets.index.shape == (7, 32, 8) and targets.index.dtype == torch.int32
    torch.testing.assert_close(targets.logp.double(), ref.topk(8, dim=-1).values, rtol=0, atol=1e-5)
    picked = ref.gather(-1, targets.index.long())  # the ids point at those log-probabilities
    torch.testing.assert_close(picked, targets.logp.double(), rtol=0, atol=1e-5)
