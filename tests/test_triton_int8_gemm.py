"""The Triton kernel of qcompile::int8_gemm (QUIK's integer part), run on CPU through Triton's
interpreter (TRITON_INTERPRET=1, set in child processes before triton is imported, as in
tests/test_triton_int4.py): every config, per-channel and grouped, ragged K (QUIK's K - outliers),
exact against int64 sums."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.interpreter import check, run_children


def _cases():
    from qcompile.lowering import triton_int8_gemm as tg

    g = torch.Generator().manual_seed(0)
    for m, n, k, groups in ((1, 72, 547, 1), (5, 64, 256, 4), (40, 96, 192, 3), (130, 80, 128, 1)):
        a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        want = torch.einsum("mgk,ngk->gmn", a.long().reshape(m, groups, -1), b.long().reshape(n, groups, -1))
        for i, c in enumerate(tg.DECODE_CONFIGS + tg.PREFILL_CONFIGS):
            got = tg.int8_gemm_triton(a, b, groups, c)
            yield f"int8gemm-m{m}-n{n}-k{k}-g{groups}-c{i}", {"ok": bool(got.dtype == torch.int32 and
                                                                          torch.equal(got.long(), want))}


def _child_main(parts) -> None:
    for case, result in _cases():
        print(json.dumps({"case": case, **result}), flush=True)


@pytest.fixture(scope="module")
def results():
    pytest.importorskip("triton")
    return run_children(__file__, [["all"]])


def test_every_config_is_exact(results):
    from qcompile.lowering import triton_int8_gemm as tg

    check(results, "int8gemm-", 4 * len(tg.DECODE_CONFIGS + tg.PREFILL_CONFIGS))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
