"""The on-disk cache of the backend's quantized weights (passes/weight_cache.py): a later process
reads what an earlier one quantized, and gets exactly what quantizing again would give."""
import os
import warnings

import pytest
import torch

import qcompile
from qcompile.methods import rtn
from passes import weight_cache
from passes.context import STORE
from tests.conftest import tiny_llama

IDS = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILE_WEIGHT_CACHE", "1")
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path))
    return tmp_path / "weights"


def new_process():
    """What a new process starts from: no weights in memory, nothing compiled."""
    STORE.clear()
    torch._dynamo.reset()


def compiled_logits(model, backend=qcompile):
    new_process()
    with torch.no_grad():
        return torch.compile(model, backend=backend)(IDS).logits


def counting(monkeypatch):
    calls = []
    for name in ("quantize_int4", "quantize_int8"):
        real = getattr(rtn, name)
        monkeypatch.setattr(rtn, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    return calls


def test_a_new_process_reads_the_weights_and_gets_what_quantizing_gives(cache, monkeypatch):
    monkeypatch.setenv("QCOMPILE_WEIGHT_CACHE", "0")
    fresh = compiled_logits(tiny_llama())          # the reference: quantized, no cache
    assert not cache.exists()
    monkeypatch.setenv("QCOMPILE_WEIGHT_CACHE", "1")
    calls = counting(monkeypatch)
    first = compiled_logits(tiny_llama())
    made = len(calls)
    assert made > 0 and len(list(cache.glob("*.safetensors"))) > 0
    second = compiled_logits(tiny_llama())         # same weights, same recipe: read, not quantized
    assert len(calls) == made
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


def test_changed_weights_or_recipe_quantize_again(cache, monkeypatch):
    compiled_logits(tiny_llama())
    calls = counting(monkeypatch)
    changed = tiny_llama()
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.add_(0.01)
    got = compiled_logits(changed)
    assert len(calls) == 1                         # only the changed layer
    monkeypatch.setenv("QCOMPILE_WEIGHT_CACHE", "0")
    assert torch.equal(got, compiled_logits(changed))
    monkeypatch.setenv("QCOMPILE_WEIGHT_CACHE", "1")
    other = qcompile.backend(qcompile.RTNConfig(group_size=32))
    calls.clear()
    compiled_logits(tiny_llama(), other)
    assert len(calls) > 1


def test_a_damaged_file_is_made_again_with_a_warning(cache):
    reference = compiled_logits(tiny_llama())
    for f in cache.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="ignoring the cached quantized weight"):
        got = compiled_logits(tiny_llama())
    assert torch.equal(got, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # rewritten: read cleanly now
        assert torch.equal(compiled_logits(tiny_llama()), reference)


def test_the_folder_keeps_the_most_recently_used_files_within_its_limit(tmp_path):
    """Files of earlier processes (older than this one) go, least recently used first."""
    before = weight_cache._STARTED - 100
    for i in range(5):                             # f0 oldest ... f4 newest, 100 bytes each, all older
        f = tmp_path / f"f{i}.safetensors"         # than this process
        f.write_bytes(b"x" * 100)
        os.utime(f, (before + i, before + i))
    weight_cache._trim(tmp_path, limit=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f3.safetensors", "f4.safetensors"]
    (tmp_path / "f5.safetensors").write_bytes(b"x" * 1000)   # this process's: kept over the limit
    weight_cache._trim(tmp_path, limit=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f5.safetensors"]


def test_the_key_covers_every_byte_and_the_description():
    w = torch.randn(8, 16)
    key = weight_cache.digest("int4 g64", [w])
    assert key == weight_cache.digest("int4 g64", [w.clone()])
    bumped = w.clone()
    bumped.view(torch.int32)[3, 5] ^= 1            # one bit of one float
    assert weight_cache.digest("int4 g64", [bumped]) != key
    assert weight_cache.digest("int4 g32", [w]) != key
    assert weight_cache.digest("int4 g64", [w.to(torch.bfloat16)]) != key
    assert weight_cache.digest("int4 g64", [w.t()]) != key  # same values, another shape


def test_qcompile_graphs_never_come_from_aot_autograds_cache(tmp_path, monkeypatch):
    """A second compile of the same graphs with every cache on does not use AOTAutograd's (a hit there
    ran SmolLM2's decode graphs to other text: qcompile/_compat.compile_with_inductor), and computes the
    same logits."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    runs = []
    with torch._functorch.config.patch(enable_autograd_cache=True), \
            torch._inductor.config.patch(fx_graph_cache=True, force_disable_caches=False):
        for _ in range(2):
            counters.clear()
            runs.append(compiled_logits(tiny_llama()))
    assert not any(k.startswith("autograd_cache") for k in counters["aot_autograd"]), dict(counters["aot_autograd"])
    assert torch.equal(runs[0], runs[1])
