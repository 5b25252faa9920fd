"""qcompile::gqa_attention (CPU path vs float64), the attention pass on small HF models, the report,
and MHA -> GQA conversion. Fast: tiny random models only (the real ones: tests/test_attention_models.py)."""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F

import qcompile
from qcompile.ops.attention import alibi_slopes, attention_bias, gqa_attention_reference
from tests.conftest import tiny_gpt2, tiny_llama

NO_QUANT = dict(quantize_linears=False)


def _inputs(b, hq, hkv, L, S, d, dv=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, L, d, generator=g).to(dtype), torch.randn(b, hkv, S, d, generator=g).to(dtype),
            torch.randn(b, hkv, S, dv or d, generator=g).to(dtype))


# --- the op ---------------------------------------------------------------------------------------------
def test_alibi_slopes_follow_the_formula_and_bloom():
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    for n in (1, 2, 3, 5, 6, 8, 12, 16, 24, 30, 32, 40, 64):
        # BLOOM's public builder gives slope * position; position 1 reads the slopes off
        bloom = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n, torch.float32)[:, 0, 1]
        torch.testing.assert_close(alibi_slopes(n), bloom, rtol=1e-6, atol=0)
    assert torch.equal(alibi_slopes(8), torch.tensor([2.0 ** (-i) for i in range(1, 9)]))
    # 12 heads: 8 from 2^(-8i/8), then the odd slopes of 16: 2^(-i/2), i = 1, 3, 5, 7
    assert torch.allclose(alibi_slopes(12)[8:].double(), torch.tensor([2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]).double())
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


CASES = {  # name: (b, hq, hkv, L, S, d, dv), mask kind, alibi, causal
    "decode-gqa": ((2, 6, 2, 1, 19, 16, 16), "bool-pad", False, False),
    "decode-mqa-alibi": ((1, 8, 1, 1, 33, 8, 8), None, True, False),
    "decode-alibi-pad": ((2, 9, 3, 1, 12, 16, 16), "bool-pad", True, False),
    "prefill-causal": ((1, 9, 3, 7, 7, 16, 16), None, False, True),
    "prefill-causal-alibi-float": ((2, 4, 2, 6, 6, 8, 8), "float-perhead", True, True),
    "prefill-broadcast-mask": ((2, 6, 3, 5, 9, 8, 12), "float-row", False, False),
    "mha": ((1, 4, 4, 5, 5, 8, 8), "bool-pad", False, True),
}


def _mask(kind, b, hq, L, S):
    g = torch.Generator().manual_seed(1)
    if kind == "bool-pad":
        m = torch.ones(b, 1, L, S, dtype=torch.bool)
        m[-1, ..., :2] = False
        return m
    if kind == "float-perhead":
        return torch.randn(b, hq, L, S, generator=g)
    if kind == "float-row":
        return torch.randn(1, 1, 1, S, generator=g)
    return None


@pytest.mark.parametrize("path", ["enable_gqa", "grouped-rows"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_op_cpu_path_matches_float64_and_the_reference_matches_sdpa(name, path, monkeypatch):
    if path == "grouped-rows":  # the layout used where SDPA's enable_gqa cannot serve (other devices)
        monkeypatch.setattr(qcompile._compat, "sdpa_has_enable_gqa", lambda: False)
    (b, hq, hkv, L, S, d, dv), kind, alibi, causal = CASES[name]
    q, k, v = _inputs(b, hq, hkv, L, S, d, dv)
    mask, slopes = _mask(kind, b, hq, L, S), alibi_slopes(hq) if alibi else None
    ref = gqa_attention_reference(q, k, v, mask, slopes, None, None, causal)
    out = torch.ops.qcompile.gqa_attention(q, k, v, mask, slopes, None, None, causal)
    assert out.shape == (b, hq, L, dv) and out.dtype == q.dtype and out.is_contiguous()
    assert (out.double() - ref).abs().max() < 2e-6
    # the reference itself against torch's SDPA on explicitly repeated K/V, all in float64
    r = hq // hkv
    bias = attention_bias(q, k, mask, slopes, None, False, torch.float64)
    sdpa = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(r, 1),
                                          v.double().repeat_interleave(r, 1), attn_mask=bias, is_causal=causal)
    assert (sdpa - ref).abs().max() < 1e-12


def test_alibi_positions_shift_per_row_is_the_same_attention():
    q, k, v = _inputs(2, 4, 2, 1, 10, 8)
    pad = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    pad[1, ..., :3] = False
    positions = (torch.arange(10)[None] - torch.tensor([[0], [3]])).clamp(min=0)  # BLOOM's cumsum positions
    slopes = alibi_slopes(4)
    a = torch.ops.qcompile.gqa_attention(q, k, v, pad, slopes, positions)
    b = torch.ops.qcompile.gqa_attention(q, k, v, pad, slopes)
    assert (a - b).abs().max() < 1e-6  # softmax ignores a per-row constant
    holes = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 5, 0, 1, 1, 2, 9, 3, 3]])
    c = torch.ops.qcompile.gqa_attention(q, k, v, pad, slopes, holes)
    ref = gqa_attention_reference(q, k, v, pad, slopes, holes)
    assert (c.double() - ref).abs().max() < 2e-6 and (c - b).abs().max() > 1e-3


def test_fully_masked_rows_give_zeros_like_sdpa():
    q, k, v = _inputs(1, 4, 2, 3, 5, 8)
    keep = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    keep[..., 1, :] = False
    out = torch.ops.qcompile.gqa_attention(q, k, v, keep)
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(gqa_attention_reference(q, k, v, keep)[:, :, 1], torch.zeros(1, 4, 8, dtype=torch.float64))


@pytest.mark.parametrize("L,causal", [(1, False), (6, True), (6, False)])
def test_cpu_path_never_makes_a_repeated_kv_tensor(L, causal):
    from torch.profiler import profile

    b, hq, hkv, S, d = 1, 12, 2, 6 if causal else 64, 16
    q, k, v = _inputs(b, hq, hkv, L, S, d)
    mask = None if causal else torch.ones(b, 1, L, S, dtype=torch.bool)
    with profile(record_shapes=True) as prof:
        torch.ops.qcompile.gqa_attention(q, k, v, mask, alibi_slopes(hq) if not causal else None, None, None, causal)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::repeat_interleave", "aten::_scaled_dot_product_attention_math"}, names
    shapes = [s for e in prof.events() for s in (e.input_shapes or []) if s == [b, hq, S, d]]
    assert not shapes or (L == S and all(s == list(q.shape) for s in shapes))  # q itself when L == S


def test_op_rejects_bad_inputs_with_specific_errors():
    q, k, v = _inputs(1, 6, 4, 1, 5, 8)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4"):
        torch.ops.qcompile.gqa_attention(q, k, v)
    q, k, v = _inputs(1, 4, 2, 1, 5, 8)
    with pytest.raises(ValueError, match="4-D"):
        torch.ops.qcompile.gqa_attention(q[0], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        torch.ops.qcompile.gqa_attention(q.half(), k, v)
    with pytest.raises(ValueError, match="head_dim"):
        torch.ops.qcompile.gqa_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="does not broadcast"):
        torch.ops.qcompile.gqa_attention(q, k, v, torch.ones(1, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool .* or float"):
        torch.ops.qcompile.gqa_attention(q, k, v, torch.ones(1, 1, 1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="alibi_slopes must be"):
        torch.ops.qcompile.gqa_attention(q, k, v, None, torch.ones(2))
    with pytest.raises(ValueError, match="without alibi_slopes"):
        torch.ops.qcompile.gqa_attention(q, k, v, None, None, torch.zeros(1, 5))


def test_opcheck_and_gradients():
    q, k, v = _inputs(2, 4, 2, 3, 5, 8)
    mask = torch.randn(2, 1, 3, 5)
    for op in (torch.ops.qcompile.gqa_attention_kernel.default,):
        torch.library.opcheck(op, (q, k, v, mask, alibi_slopes(4), None, 0.5, False),
                              test_utils=("test_schema", "test_faketensor"))
    qkv = [t.double().requires_grad_() for t in (q, k, v)]
    torch.ops.qcompile.gqa_attention(*qkv, mask.double(), None, None, 0.5, False).square().sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in qkv]
    F.scaled_dot_product_attention(ref[0], ref[1].repeat_interleave(2, 1), ref[2].repeat_interleave(2, 1),
                                   attn_mask=mask.double(), scale=0.5).square().sum().backward()
    for a, b in zip(qkv, ref):
        assert (a.grad - b.grad).abs().max() < 1e-10


# --- the pass on small HF models --------------------------------------------------------------------------
def _compile(model, reports, inductor=False, **options):
    return torch.compile(model, backend=qcompile.Backend(reports=reports, inductor=inductor, **NO_QUANT, **options))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_llama_repeat_kv_is_rewritten_and_matches_float(impl):
    model = tiny_llama()
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # padding: HF repeats K/V (no enable_gqa with a mask)
    reports = []
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        out = _compile(model, reports)(ids, attention_mask=mask).logits
    assert (out - ref).abs().max() < 1e-5
    sites = reports[0].attention
    assert len(sites) == 2 and all(a.op == "qcompile::gqa_attention" and a.kv_repeat == "expand+reshape"
                                   and (a.q_heads, a.kv_heads, a.head_dim) == (4, 2, 32) for a in sites)
    assert all(a.repeated_kv_bytes == 2 * 4 * 9 * 64 * 4 for a in sites)  # B * Hq * S * (Dk + Dv) * fp32
    repeat = "expand(2, 2, 2, 9, 32)"  # repeat_kv: [B, Hkv, r, S, D]
    assert repeat in reports[0].passes[1].before
    assert repeat not in reports[0].passes[1].after and "gqa_attention" in reports[0].passes[1].after


def test_already_gqa_native_sdpa_is_reported_and_rewritten(monkeypatch):
    from transformers.integrations import sdpa_attention

    # transformers decides per release and device whether SDPA gets enable_gqa=True (CPU: only
    # without a mask on newer releases); force it so the GQA-native form is what is compiled.
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", lambda *args, **kwargs: True)
    model = tiny_llama()
    reports = []
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        out = _compile(model, reports)(ids).logits
        ref = model(ids).logits
    assert (out - ref).abs().max() < 1e-5
    a = reports[0].attention[0]
    assert a.pattern == "sdpa(enable_gqa)" and a.kv_repeat == "enable_gqa" and "already GQA-native" in a.reason
    assert "already GQA-native" in reports[0].passes[1].summary or "(2 already GQA-native)" in reports[0].passes[1].summary


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_generate_with_inductor_is_token_identical_and_decode_has_no_repeated_kv(impl):
    from torch._inductor.utils import run_and_get_code
    from transformers import DynamicCache

    model = tiny_llama()
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    reports = []
    compiled = _compile(model, reports, inductor=True)
    with torch.no_grad():
        out = compiled.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)
    assert reports and all(a.op for r in reports for a in r.attention)
    # one decode step on a 7-token cache: no [1, 4 (query heads), 8, 32] buffer in the generated code
    torch._dynamo.reset()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        step = torch.randint(0, 256, (1, 1))
        _, (code, *_) = run_and_get_code(_compile(model, [], inductor=True), step, past_key_values=cache,
                                         attention_mask=torch.ones(1, 8, dtype=torch.long))
    assert "gqa_attention" in code  # decomposed on CPU into the decode kernel on grouped query rows (inductor_attention.py)
    assert code.count("qcompile.decode_attention_kernel.default(") == 2 and "scaled_dot_product" not in code
    assert not re.search(r"empty_strided\w*\(\(1, 4, 8, 32\)", code), "a repeated K/V buffer is allocated"


def test_switches_turn_attention_and_linear_passes_off():
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 6))
    report = qcompile.explain(model, ids, attention=False)
    assert report.attention == [] and report.graphs[0].passes[1].summary == "off"
    assert report.summary()["quantized"] == 15
    report = qcompile.explain(model, ids, quantize_linears=False)
    assert report.summary()["quantized"] == 0 and report.graphs[0].passes[0].summary == "off"
    assert report.summary()["attention_rewritten"] == 2
    assert report.config["attention"] == {"enabled": True, "mha": "keep"} and report.config["quantize_linears"] is False
    with pytest.raises(ValueError, match="mha"):
        qcompile.AttentionConfig(mha="always").validate()


def test_default_backend_quantizes_linears_and_rewrites_attention():
    from tests.test_backend import MINMAX, close_logits, fake_quantized

    model = tiny_llama()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 256, (2, 10))
    reports = []
    with torch.no_grad():
        out = torch.compile(model, backend=qcompile.Backend(MINMAX, reports=reports))(ids).logits
        ref = fake_quantized(model)(ids).logits
    assert close_logits(out, ref)
    r = reports[0]
    assert all(x.op == "qcompile::int4_mm_a8" for x in r.linears if x.path != "lm_head")
    assert [a.op for a in r.attention] == ["qcompile::gqa_attention"] * 2
    assert [p.name for p in r.passes] == ["linear", "attention", "fuse_quantized"]


def test_report_text_and_json():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 256, (1, 6))
    report = qcompile.explain(model, ids, output_attentions=True)  # attention weights are returned
    text = str(report)
    assert "attention: 0/2 sites rewritten" in text
    a = report.attention[0]
    assert a.op is None and "used outside the attention" in a.reason and a.path.endswith("layers.0.self_attn")
    d = json.loads(json.dumps(report.to_dict()))
    assert d["summary"]["attention_sites"] == 2 and d["graphs"][0]["attention"][0]["op"] is None
    report = qcompile.explain(model, ids)
    assert "2/2 sites rewritten" in str(report) and "eager matmul-softmax-matmul" in str(report)


def test_dropout_in_training_keeps_the_site():
    model = tiny_llama(attention_dropout=0.5)
    model.set_attn_implementation("eager")
    model.train()
    report = qcompile.explain(model, torch.randint(0, 256, (1, 6)), quantize_linears=False)
    assert all(a.op is None and "dropout" in a.reason for a in report.attention)


class _RepeatInterleaveAttention(torch.nn.Module):
    """Attention written with repeat_interleave (as some non-HF code does)."""

    def forward(self, q, k, v):
        r = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(r, dim=1), torch.repeat_interleave(v, r, dim=1))


def test_repeat_interleave_pattern():
    q, k, v = _inputs(2, 6, 2, 1, 11, 8)
    reports = []
    out = _compile(_RepeatInterleaveAttention(), reports)(q, k, v)
    assert (out.double() - gqa_attention_reference(q, k, v)).abs().max() < 2e-6
    assert reports[0].attention[0].kv_repeat == "repeat_interleave" and reports[0].attention[0].op


def _small(name):
    from transformers import BertConfig, BertModel, BloomConfig, BloomForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        return tiny_gpt2()
    if name == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                                        num_attention_heads=4, max_position_embeddings=64,
                                        word_embed_proj_dim=64)).eval()
    if name == "bloom":  # 6 heads: ALiBi's non-power-of-two slopes
        return BloomForCausalLM(BloomConfig(vocab_size=256, hidden_size=96, n_layer=2, n_head=6)).eval()
    return BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128)).eval()


@pytest.mark.parametrize("name,impl", [("gpt2", "sdpa"), ("gpt2", "eager"), ("opt", "sdpa"), ("opt", "eager"),
                                       ("bert", "sdpa"), ("bert", "eager"), ("bloom", "eager")])
def test_small_multi_head_models_through_the_pass_match_float(name, impl):
    model = _small(name)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for mha in ("keep", "rewrite"):
        torch._dynamo.reset()
        reports = []
        with torch.no_grad():
            ref = model(ids, attention_mask=mask)[0]
            out = _compile(model, reports, attention=qcompile.AttentionConfig(mha=mha))(ids, attention_mask=mask)[0]
        assert (out - ref).abs().max() < 1e-5
        sites = reports[0].attention
        assert len(sites) == 2 and all(a.q_heads == a.kv_heads for a in sites)
        if name == "bloom":  # ALiBi: rewritten either way, slopes read from the graph
            assert all(a.op and a.pattern == "bloom baddbmm-softmax-bmm" and "ALiBi" in a.reason for a in sites)
        elif mha == "keep":
            assert all(a.op is None and "multi-head" in a.reason for a in sites)
        else:
            assert all(a.op == "qcompile::gqa_attention" for a in sites)


def test_bloom_alibi_generate_is_token_identical():
    model = _small("bloom")
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    reports = []
    with torch.no_grad():
        out = _compile(model, reports).generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    assert len(reports) >= 2 and all(a.op for r in reports for a in r.attention)


# --- MHA -> GQA conversion --------------------------------------------------------------------------------
def _llama_with_duplicate_heads():
    """4 K/V heads where heads 0 = 2 and 1 = 3: merging {0, 2}, {1, 3} loses nothing."""
    model = tiny_llama(num_key_value_heads=4)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                w = lin.weight.view(4, 32, -1)
                w[2], w[3] = w[0].clone(), w[1].clone()
    return model


def test_similarity_grouping_finds_duplicate_heads_and_contiguous_does_not():
    model = _llama_with_duplicate_heads()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    errors = {}
    for grouping in ("contiguous", "similarity"):
        converted = copy.deepcopy(model)
        report = qcompile.convert_to_gqa(converted, qcompile.GQAConfig(2, grouping), calibration=[ids])
        with torch.no_grad():
            out = converted(ids).logits
            reports = []
            compiled = _compile(converted, reports)(ids).logits
        errors[grouping] = (out - ref).abs().max().item()
        assert (compiled - out).abs().max() < 1e-5
        assert reports[0].attention[0].kv_heads == 2 and reports[0].attention[0].op
        assert report.kv_bytes_per_token_before == 2 * report.kv_bytes_per_token_after == 2 * 2 * 4 * 32 * 4
        assert converted.model.layers[0].self_attn.k_proj.weight.shape == (64, 128)
        if grouping == "similarity":
            assert all(x.groups == [[0, 2], [1, 3]] and x.cost < 1e-9 < x.contiguous_cost for x in report.layers)
    assert errors["similarity"] < 1e-5 < 1e-2 < errors["contiguous"]


def test_similarity_grouping_never_costs_more_than_contiguous():
    from qcompile.methods.gqa import contiguous_groups, grouping_cost, similarity_groups

    g = torch.Generator().manual_seed(0)
    for n, groups in ((12, 6), (12, 4), (12, 3), (12, 2), (8, 2), (6, 3)):
        x = torch.randn(n, 5, generator=g)
        cost = torch.cdist(x, x).square()
        best = similarity_groups(cost, groups)
        assert sorted(h for grp in best for h in grp) == list(range(n))
        assert all(len(grp) == n // groups for grp in best)
        assert grouping_cost(cost, best) <= grouping_cost(cost, contiguous_groups(n, groups)) + 1e-9


def test_conversion_of_mha_bert_and_errors():
    from qcompile.methods.gqa import GQAConversionError

    bert = _small("bert")
    ids = torch.randint(0, 256, (2, 9))
    report = qcompile.convert_to_gqa(bert, qcompile.GQAConfig(2, "similarity"), calibration=[ids])
    assert [len(x.groups) for x in report.layers] == [2, 2]
    assert bert.encoder.layer[0].attention.self.num_key_value_groups == 2
    eager = _small("bert")
    eager.set_attn_implementation("eager")
    with pytest.raises(GQAConversionError, match="attn_implementation='sdpa'"):
        qcompile.convert_to_gqa(eager, qcompile.GQAConfig(2))
    with pytest.raises(GQAConversionError, match="cannot be split into 3"):
        qcompile.convert_to_gqa(tiny_llama(), qcompile.GQAConfig(3))
    with pytest.raises(GQAConversionError, match="needs calibration"):
        qcompile.convert_to_gqa(tiny_llama(), qcompile.GQAConfig(1, "similarity"))
    with pytest.raises(GQAConversionError, match="fused qkv"):
        qcompile.convert_to_gqa(tiny_gpt2(), qcompile.GQAConfig(2))
    with pytest.raises(ValueError, match="grouping"):
        qcompile.convert_to_gqa(tiny_llama(), qcompile.GQAConfig(1, "random"))


def test_pca_merge_is_lossless_when_a_group_spans_one_head_and_mean_is_not():
    """BERT heads 1 and 3 are orthogonal transforms of heads 0 and 2 (K and V): each contiguous pair
    spans head_dim dimensions, so merge="pca" keeps them exactly (the maps fold into q and the output
    projection); mean pooling does not. Llama (rotary): K is fitted per rotary frequency."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128)).eval()
    with torch.no_grad():
        for layer in bert.encoder.layer:
            for lin in (layer.attention.self.key, layer.attention.self.value):
                w, b = lin.weight.view(4, 16, 64), lin.bias.view(4, 16)
                for src, dst in ((0, 1), (2, 3)):
                    rot = torch.linalg.qr(torch.randn(16, 16))[0]
                    w[dst], b[dst] = rot @ w[src], rot @ b[src]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = bert(ids).last_hidden_state
    errors = {}
    for merge in ("mean", "pca"):
        converted = copy.deepcopy(bert)
        qcompile.convert_to_gqa(converted, qcompile.GQAConfig(2, merge=merge), calibration=[ids])
        with torch.no_grad():
            errors[merge] = (converted(ids).last_hidden_state - ref).abs().max().item()
    assert errors["pca"] < 1e-4 < 1e-2 < errors["mean"], errors
    # Llama (RoPE): K head 1 = K head 0 times a complex number per rotary frequency, V head 1 = R V head 0
    llama = tiny_llama()
    with torch.no_grad():
        for layer in llama.model.layers:
            k = layer.self_attn.k_proj.weight.view(2, 32, 128)
            c = torch.randn(16, dtype=torch.complex64)
            x, y = k[0, :16], k[0, 16:]
            k[1, :16] = c.real[:, None] * x - c.imag[:, None] * y
            k[1, 16:] = c.imag[:, None] * x + c.real[:, None] * y
            v = layer.self_attn.v_proj.weight.view(2, 32, 128)
            v[1] = torch.linalg.qr(torch.randn(32, 32))[0] @ v[0]
    with torch.no_grad():
        ref = llama(ids).logits
    errors = {}
    for merge in ("mean", "pca"):
        converted = copy.deepcopy(llama)
        report = qcompile.convert_to_gqa(converted, qcompile.GQAConfig(1, merge=merge), calibration=[ids])
        with torch.no_grad():
            errors[merge] = (converted(ids).logits - ref).abs().max().item()
    assert report.layers[0].notes == ["K merged per rotary frequency (complex rank-1 fit)"]
    assert errors["pca"] < 1e-4 < 1e-2 < errors["mean"], errors
    with pytest.raises(qcompile.methods.gqa.GQAConversionError, match="needs calibration"):
        qcompile.convert_to_gqa(tiny_llama(), qcompile.GQAConfig(1, merge="pca"))
