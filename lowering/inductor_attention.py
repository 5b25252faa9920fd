"""Inductor treatment of `qcompile::gqa_attention_kernel`.

CPU: a decomposition into the op's CPU path (`gqa_attention_sdpa`: for decode, at most
`DECODE_MAX_ROWS` query rows per K/V head, qcompile's C++ `decode_attention_kernel`; otherwise SDPA on
the grouped query rows, or SDPA's own GQA for causal prefill), so the compiled graph calls a kernel
with no Python in the loop; left opaque, every call would go through the
dispatcher into Python (~40 us a call at SmolLM2 decode shapes, benchmarks/results/attention_cpu.md;
30 layers x 40 us is ~8% of a 64 tok/s decode step). CUDA and other devices: the op stays an extern
call to its kernel (the Triton kernel on CUDA).
"""
from __future__ import annotations

import torch

from qcompile import _compat
from qcompile.ops.attention import gqa_attention_sdpa

OP = torch.ops.qcompile.gqa_attention_kernel.default
_registered = False


def _decompose(q, k, v, attn_mask=None, alibi_slopes=None, alibi_positions=None, scale=None, is_causal=False):
    if q.device.type != "cpu":
        return NotImplemented
    return gqa_attention_sdpa(q, k, v, attn_mask, alibi_slopes, alibi_positions, scale, is_causal)


def register() -> None:
    """Install the CPU decomposition (idempotent)."""
    global _registered
    if not _registered:
        _compat.register_inductor_decomposition(OP, _decompose)
        _registered = True
