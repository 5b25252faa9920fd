"""Graph rewrites on Dynamo graphs, run in order by the backend.

Each pass is ``fn(gm, ctx) -> summary``: it finds its pattern, checks it is safe, replaces it with
qcompile ops and records its decisions in ``ctx.report``. Passes know formats and ops, never kernels.
"""
from .context import PassContext, WeightStore, STORE
from .attention import rewrite_attention
from .linear import quantize_linears
from .fuse_quantized import fuse_quantized

# The passes touch disjoint nodes (linears read parameters; attention reads activations; the fusion
# reads ops quantized ahead of time), so the order does not change the result; the linear pass comes
# first so that it reports the ops the fusion then merges, and reports keep pass 0 linear, 1 attention.
PASSES = [
    ("linear", quantize_linears),
    ("attention", rewrite_attention),
    ("fuse_quantized", fuse_quantized),
]

__all__ = ["PASSES", "PassContext", "WeightStore", "STORE"]
