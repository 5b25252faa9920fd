"""Graph rewrites on Dynamo graphs, run in order by the backend.

Each pass is ``fn(gm, ctx) -> summary``: it finds its pattern, checks it is safe, replaces it with
qcompile ops and records its decisions in ``ctx.report``. Passes know formats and ops, never kernels.
"""
from .context import PassContext, WeightStore, STORE
from .attention import rewrite_attention
from .linear import quantize_linears

# The passes touch disjoint nodes (linears read parameters; attention reads activations), so the order
# does not change the result; attention runs second so that pass 0 stays the linear pass in reports.
PASSES = [
    ("linear", quantize_linears),
    ("attention", rewrite_attention),
]

__all__ = ["PASSES", "PassContext", "WeightStore", "STORE"]
