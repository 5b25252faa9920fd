"""qcompile::decode_attention_kernel (the CPU path's attention for a few query rows per K/V head): the
C++ kernel in each ISA variant against float64 attention, its no-compiler reference, and that
decode under torch.compile calls it instead of SDPA."""
import pytest
import torch

import qcompile
from qcompile.ops.attention import decode_attention_reference, gqa_attention_reference
from tests.conftest import CPU_ISAS as ISAS, cpu_kernel_ops as ops, tiny_llama


def float64_attention(q, k, v, mask, scale):
    """The op's float64 oracle, each of q's R rows a query position of its own K/V head."""
    return gqa_attention_reference(q, k, v, mask, scale=scale)


SHAPES = {  # (B, H, R, D, Dv, S): R = query rows per K/V head (G heads x L tokens)
    "smollm2-decode": (1, 3, 3, 64, 64, 207),
    "one-chunk-per-head": (2, 2, 5, 64, 64, 40),
    "long-cache-many-chunks": (1, 2, 4, 128, 128, 1500),
    "dims-not-multiple-of-16": (2, 3, 2, 24, 40, 77),
    "dv-not-64-block": (1, 1, 7, 80, 96, 300),
    "one-key": (1, 2, 1, 16, 16, 1),
}


def _inputs(B, H, R, D, Dv, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, R, D, generator=g), torch.randn(B, H, S, D, generator=g) * 2,
            torch.randn(B, H, S, Dv, generator=g))


def _masks(B, H, R, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    causal_like = torch.ones(1, 1, R, S, dtype=torch.bool)
    causal_like[..., S // 2 + 1:] = False  # a static cache: the positions not yet written are hidden
    per_head = torch.randn(B, H, R, S, generator=g)
    per_head[..., : S // 3] = float("-inf")  # whole leading chunks hidden: their maxima are -inf
    return {"none": None, "bool-broadcast": causal_like, "float-broadcast": torch.randn(1, 1, 1, S, generator=g),
            "float-per-head": per_head}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_matches_float64_attention(isa, shape):
    B, H, R, D, Dv, S = SHAPES[shape]
    q, k, v = _inputs(B, H, R, D, Dv, S)
    for kind, mask in _masks(B, H, R, S).items():
        out = ops(isa).decode_attention_kernel(q, k, v, mask, D ** -0.5)
        ref = float64_attention(q, k, v, mask, D ** -0.5)
        assert out.shape == (B, H, R, Dv) and out.dtype == torch.float32 and out.is_contiguous()
        assert (out.double() - ref).abs().max() < 2e-6, (kind, (out.double() - ref).abs().max())


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_reads_a_static_cache_in_place_and_zeros_rows_that_see_nothing(isa):
    B, H, R, D, S = 2, 3, 3, 64, 50
    cache_k, cache_v = torch.randn(B, H, S + 30, D), torch.randn(B, H, S + 30, D)
    k, v = cache_k[:, :, 10:10 + S], cache_v[:, :, 10:10 + S]  # a strided view, as a sliced cache is
    q = torch.randn(B, H, R, D)
    mask = torch.ones(B, 1, R, S, dtype=torch.bool)
    mask[1, :, 2] = False  # batch 1's last row sees no key
    out = ops(isa).decode_attention_kernel(q, k, v, mask, 0.2)
    ref = float64_attention(q, k.contiguous(), v.contiguous(), mask, 0.2)
    assert (out.double() - ref).abs().max() < 2e-6
    assert torch.equal(out[1, :, 2], torch.zeros(H, D))
    # the no-compiler reference agrees, the hidden row included
    assert (decode_attention_reference(q, k, v, mask, 0.2).double() - ref).abs().max() < 2e-6


def test_kernel_rejects_what_it_cannot_run():
    q, k, v = _inputs(1, 2, 3, 16, 16, 9)
    op = ops("native").decode_attention_kernel
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), v.double(), None, 0.25)
    with pytest.raises(RuntimeError, match="do not match"):
        op(q, k[:, :1], v, None, 0.25)
    with pytest.raises(RuntimeError, match="mask must be float32 or bool"):
        op(q, k, v, torch.zeros(1, 1, 3, 9, dtype=torch.int32), 0.25)


def test_gqa_attention_decode_uses_the_kernel_and_matches_float64():
    from torch.profiler import profile

    q, k, v = torch.randn(2, 9, 1, 64), torch.randn(2, 3, 120, 64), torch.randn(2, 3, 120, 64)
    pad = torch.ones(2, 1, 1, 120, dtype=torch.bool)
    pad[0, ..., 100:] = False
    with profile() as prof:
        out = torch.ops.qcompile.gqa_attention(q, k, v, pad)
    names = {e.name for e in prof.events()}
    assert "qcompile::decode_attention_kernel" in names and not any("scaled_dot_product" in n for n in names), names
    assert (out.double() - gqa_attention_reference(q, k, v, pad)).abs().max() < 2e-6


def test_compiled_static_cache_decode_calls_the_kernel_and_matches_eager():
    from torch._inductor.utils import run_and_get_code
    from transformers import StaticCache

    torch.manual_seed(0)
    model = tiny_llama(num_key_value_heads=2).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    compiled = torch.compile(model, backend=qcompile.backend(quantize_linears=False))
    with torch.no_grad():
        logits = {}
        for name, m in (("eager", model), ("compiled", compiled)):
            cache = StaticCache(config=model.config, max_cache_len=16)
            model(input_ids=ids, past_key_values=cache, use_cache=True)  # eager prefill
            step = dict(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([6]))
            if name == "compiled":
                out, code = run_and_get_code(m, **step)
                assert "decode_attention_kernel" in "\n".join(code)
                assert "scaled_dot_product" not in "\n".join(code)
            else:
                out = m(**step)
            logits[name] = out.logits
    assert (logits["compiled"] - logits["eager"]).abs().max() < 1e-4


def test_inductor_cache_key_holds_the_kernel_choice(monkeypatch):
    """The decomposition picks the kernel by DECODE_MAX_ROWS when a graph is traced, so Inductor's
    on-disk graph cache must not serve a graph traced under another value."""
    from qcompile.backend import _cache_salt
    from qcompile.ops import attention

    default = _cache_salt().uuid()
    assert _cache_salt().uuid() == default
    monkeypatch.setattr(attention, "DECODE_MAX_ROWS", 0)
    assert _cache_salt().uuid() != default
