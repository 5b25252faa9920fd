"""The Triton GQA attention kernel, checked on CPU through Triton's interpreter against float64.

As in tests/test_triton_int4.py, TRITON_INTERPRET=1 must be set before triton is imported, so the
cases run in a child process (this file as a script) that prints one JSON line per case.

Tolerance (`_tolerance`): inputs are exact in float64 (rounded to their dtype first). The kernel
computes scores in fp32 (error <= D u32 |q|.|k| scale + u32 |s| per score, which moves each
softmax weight by that much relatively), rounds the weights to the input dtype for the P @ V dot
(unit roundoff u), accumulates in fp32 and rounds the output once. So per output entry
|y - y64| <= (u + ds) * sum_j p_j |v_j| + u |y64|; we allow twice that.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.interpreter import check, run_children

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


# --- the child process --------------------------------------------------------------------------------
def _inputs(b, hq, hkv, L, S, d, dv, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, L, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, S, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, S, dv, generator=gen).to(dtype)
    return q, k, v


def _tolerance(q, k, v, attn_mask, slopes, positions, scale, is_causal):
    from qcompile.ops.attention import attention_bias, gqa_attention_reference

    b, hq, L, d = q.shape
    hkv, S = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    u, u32 = UNIT_ROUNDOFF[q.dtype], UNIT_ROUNDOFF[torch.float32]
    ref = gqa_attention_reference(q, k, v, attn_mask, slopes, positions, scale, is_causal)
    qa = q.double().abs().reshape(b, hkv, g, L, d)
    s_abs = torch.einsum("bkgld,bksd->bkgls", qa, k.double().abs()).reshape(b, hq, L, S) * scale
    bias = attention_bias(q, k, attn_mask, slopes, positions, is_causal, torch.float64)
    total = s_abs + (bias.abs().nan_to_num(posinf=0.0) if bias is not None else 0)
    ds = (d * u32 * s_abs + 2 * u32 * total).amax(-1, keepdim=True)
    # sum_j p_j |v_j|: the reference's softmax weights applied to |v|
    pv = gqa_attention_reference(q, k, v.abs(), attn_mask, slopes, positions, scale, is_causal)
    return ref, 2 * ((u + ds) * pv + u * ref.abs()) + 1e-12


def _compare(y, q, ref, tol):
    err = (y.double() - ref).abs()
    ratio = (err / tol).max().item() if err.numel() else 0.0
    return {"ok": bool(y.dtype == q.dtype and torch.isfinite(y).all() and ratio <= 1),
            "err_over_tol": ratio, "max_err": err.max().item() if err.numel() else 0.0}


def _run(name, q, k, v, mask=None, slopes=None, positions=None, scale=None, causal=False, **launch):
    from qcompile.lowering.triton_attention import gqa_attention_triton

    y = gqa_attention_triton(q, k, v, mask, slopes, positions, scale, causal, **launch)
    return name, _compare(y, q, *_tolerance(q, k, v, mask, slopes, positions, scale, causal))


def _decode_cases():
    """One query position against a cache: every decode config, 1 and 3 key splits, G = 3 / 8 / 1."""
    from qcompile.ops.attention import alibi_slopes
    from qcompile.lowering import triton_attention as ta

    for hq, hkv in ((6, 2), (8, 1), (4, 4)):
        q, k, v = _inputs(2, hq, hkv, 1, 300, 24, 24, torch.float32)  # 3 splits of 128 keys (last partial)
        for c in ta.DECODE_CONFIGS:
            for splits in (1, 3):
                yield _run(f"decode-{hq}/{hkv}-{tuple(c)}-s{splits}", q, k, v, config=c, num_splits=splits)
        pad = torch.ones(2, 1, 1, 300, dtype=torch.bool)
        pad[1, ..., :5] = False  # left padding of row 1
        yield _run(f"decode-{hq}/{hkv}-boolmask-alibi", q, k, v, pad, alibi_slopes(hq), num_splits=3)
        positions = (torch.arange(300)[None] - torch.tensor([[0], [5]])).clamp(min=0)
        yield _run(f"decode-{hq}/{hkv}-alibi-positions", q, k, v, pad, alibi_slopes(hq), positions, num_splits=2)


def _prefill_cases():
    """Causal prefill with every prefill config; masks (bool, float, broadcast), ALiBi, Dv != D."""
    from qcompile.ops.attention import alibi_slopes
    from qcompile.lowering import triton_attention as ta

    q, k, v = _inputs(1, 4, 2, 40, 40, 32, 32, torch.float32)
    for c in ta.PREFILL_CONFIGS:
        yield _run(f"prefill-causal-{tuple(c)}", q, k, v, causal=True, config=c)
    gen = torch.Generator().manual_seed(1)
    yield _run("prefill-floatmask-perhead", q, k, v, torch.randn(1, 4, 40, 40, generator=gen))
    keep = torch.rand(1, 1, 40, 40, generator=gen) > 0.3
    keep[..., 3, :] = False  # a row that sees no key: zeros
    yield _run("prefill-boolmask-emptyrow", q, k, v, keep)
    yield _run("prefill-alibi-causal", q, k, v, None, alibi_slopes(4), causal=True, scale=0.3)
    q, k, v = _inputs(2, 6, 3, 9, 21, 16, 40, torch.float32)  # L < S, Dv != D, broadcast mask
    yield _run("prefill-dv-broadcastmask", q, k, v, torch.randn(1, 1, 1, 21, generator=gen))


def _dtype_cases():
    from qcompile.ops.attention import alibi_slopes

    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _inputs(1, 9, 3, 1, 50, 64, 64, dtype)
        yield _run(f"dtype-decode-{dtype}", q, k, v, num_splits=2)
        q, k, v = _inputs(1, 6, 2, 24, 24, 64, 64, dtype)
        yield _run(f"dtype-prefill-alibi-{dtype}", q, k, v, None, alibi_slopes(6), causal=True)


def _fix_interpreter_bf16_dot():
    from tests.test_triton_int4 import _fix_interpreter_bf16_dot as fix

    fix()


CHILD_PARTS = (("decode",), ("prefill", "dtype"))


def _child_main(parts) -> None:
    _fix_interpreter_bf16_dot()
    sections = {"decode": _decode_cases, "prefill": _prefill_cases, "dtype": _dtype_cases}
    for part in parts:
        for case, result in sections[part]():
            print(json.dumps({"case": case, **result}), flush=True)


# --- the tests ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    return run_children(__file__, CHILD_PARTS)


def test_decode_every_config_and_split_matches_float64(results):
    from qcompile.lowering.triton_attention import DECODE_CONFIGS

    check(results, "decode-", 3 * (2 * len(DECODE_CONFIGS) + 2))


def test_prefill_causal_masks_alibi_match_float64(results):
    from qcompile.lowering.triton_attention import PREFILL_CONFIGS

    check(results, "prefill-", len(PREFILL_CONFIGS) + 4)


def test_half_precision_matches_float64(results):
    check(results, "dtype-", 4)


def test_config_choice_and_bad_configs():
    ta = pytest.importorskip("qcompile.lowering.triton_attention")
    assert ta.choose_config(1, 3).block_m == 16            # decode: G heads in one 16-row tile
    assert ta.choose_config(1, 32).block_m == 32           # more heads than 16: a taller tile
    assert ta.choose_config(512, 3) == ta.PREFILL_CONFIGS[0]
    assert ta.choose_splits(4, 1, 4096, 64, torch.device("cpu")) == 1
    q, k, v = _inputs(1, 4, 1, 1, 8, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="block_m"):
        ta.gqa_attention_triton(q, k, v, config=ta.AttentionConfig(8, 32, 2, 2))
    with pytest.raises(NotImplementedError, match="fp16/bf16/fp32"):
        ta.gqa_attention_triton(q.double(), k.double(), v.double())


if __name__ == "__main__":
    _child_main(sys.argv[1:])
