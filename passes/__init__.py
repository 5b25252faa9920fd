"""Graph rewrites on Dynamo graphs, run in order by the backend.

Each pass is ``fn(gm, ctx) -> summary``: it finds its pattern, checks it is safe, replaces it with
qcompile ops and records its decisions in ``ctx.report``. Passes know formats and ops, never kernels.
"""
from .context import PassContext, WeightStore, STORE
from .linear import quantize_linears

PASSES = [
    ("linear", quantize_linears),
]

__all__ = ["PASSES", "PassContext", "WeightStore", "STORE"]
