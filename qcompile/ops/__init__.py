"""qcompile's custom ops: schema, fake (meta) implementation and float reference of each.

`linear`: the quantized matmuls (`qcompile::int4_mm`, `int8_mm`, `lut_mm`, their int8-activation
variants `int4_mm_a8`, `int8_mm_a8`, and `int8_embedding`) and
`PackedLinear`, a weight in a kernel's layout; `quik`: `qcompile::quik_mm` (QUIK: integer weights
times per-token integer activations, plus float outlier columns) and its kernel op `int8_gemm`;
`attention`: `qcompile::gqa_attention`. Kernels that serve them live in `qcompile.lowering`;
importing this package registers the ops.
"""
from . import attention  # noqa: F401  (registers torch.ops.qcompile.gqa_attention)
from .attention import GQA_ATTENTION, gqa_attention, gqa_attention_reference  # noqa: F401
from .linear import (  # noqa: F401
    A8_OPS, KERNEL_LOADERS, LAYOUT_OPS, QUANTIZED_LINEAR_OPS, ROW_BLOCK_OPS, PackedLinear, dequantize_int4, dequantize_int8,
    dequantize_lut, int4_mm, int4_mm_a8, int4_mm_g_idx_reference, int4_mm_reference, int8_embedding, int8_mm,
    int8_mm_a8, int8_mm_reference, lut_mm, lut_mm_reference,
)
from .quik import QUIK_MM, quik_mm, quik_mm_reference  # noqa: F401,E402
