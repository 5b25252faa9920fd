"""The ways people already run Hugging Face models, with backend=qcompile (tiny models; fast).

The real-model versions are in test_smollm2_recipes.py.
"""
import torch

import qcompile
from tests.conftest import tiny_llama


def _generate(model, ids, **kw):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def test_static_cache_recipe_keeps_the_cache_writes():
    # HF's documented recipe: a static cache written in place (index_copy_) by the compiled
    # forward. A pass that drops unused in-place nodes loses every cache write: the model then
    # attends to zeros and generates garbage with no error.
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    model = tiny_llama()
    ref_tokens, ref_logits = _generate(model, ids, cache_implementation="static")
    torch._dynamo.reset()
    model.generation_config.cache_implementation = "static"
    model.forward = torch.compile(model.forward, backend=qcompile.backend(quantize_linears=False))
    tokens, logits = _generate(model, ids)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
