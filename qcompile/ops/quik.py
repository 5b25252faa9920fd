"""QUIK's op (Ashkboos et al., 2024): integer weights × per-token integer activations, plus a few
input columns ("outliers") kept in float.

    qcompile::quik_mm(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits)

computes ``x @ W.T`` for a weight held as

- ``qweight`` int8 [N, K_int]: signed weight codes on a symmetric grid, column j being input
  channel ``int_idx[j]``; ``scales`` [N, G]: one scale per output row and group of K_int / G stored
  columns (G = 1: per channel); ``rowsum`` int32 [N, G]: the sum of each group's codes;
- ``fp_weight`` [N, k]: the float columns of the outlier input channels ``fp_idx``.

At run time x's int columns are quantized per token (`quantize_activations`, asymmetric, the one
definition every path uses) and multiplied in integers; with a = s_x·(q − z) per token and
w = s_w·c per group:

    y[m, n] = s_x[m] · Σ_g s_w[n, g] · (acc[g, m, n] − z[m] · rowsum[n, g]) + x[m, fp_idx] @ fp_weight[n]ᵀ

where ``acc[g] = q[:, group g] @ c[:, group g]ᵀ`` is exact int32 (`qcompile::int8_gemm`, the only
kernel; CPU: oneDNN's s8s8s32 GEMM, VNNI where the CPU has it, called from `lowering/cpu_kernels.cpp`). Everything around it is plain torch
ops, so under ``torch.compile`` Inductor fuses the activation quantization with what produces x
and the epilogue with what reads y.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .kernels import load_kernels as _load_kernels

ACT_BITS = (4, 8)

_lib = torch.library.Library("qcompile", "FRAGMENT")
_lib.define("quik_mm(Tensor x, Tensor qweight, Tensor scales, Tensor rowsum, Tensor int_idx, Tensor fp_idx, "
            "Tensor fp_weight, int act_bits, int out_features=-1) -> Tensor")
# int32 [G, M, N]: a [M, K] @ b[N, K]ᵀ summed within each of G equal groups of K (exact integers)
_lib.define("int8_gemm(Tensor a, Tensor b, int groups) -> Tensor")
# the whole layer on a blocked weight (`block_weight`): x [..., K] -> [..., n], quantization included
_lib.define("quik_linear(Tensor x, Tensor int_idx, Tensor fp_idx, Tensor b, Tensor scales, Tensor rowsum, "
            "Tensor wf, int act_bits, int n) -> Tensor")


def quantize_activations(x: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token asymmetric quantization of x [..., K] to `bits` bits: the one definition of the
    activation grid (the kernels, the reference and the accuracy simulation all call this).

    The range [min, max] of each row is widened to hold 0 (so 0 is exact and the zero-point is an
    integer code), scale s = (max − min) / (2^bits − 1) (1 for an all-zero row), zero-point
    z = round(−min / s), codes q = clamp(round(x / s) + z, 0, 2^bits − 1), computed in float32.
    Returns (q − 2^(bits−1) as int8, z − 2^(bits−1) as float32 [..., 1], s float32 [..., 1]):
    the shift makes 8-bit codes fit int8 and leaves q − z unchanged, so x ≈ s·(q' − z')."""
    maxq = 2**bits - 1
    half = 2 ** (bits - 1)
    xf = x.float()
    lo = xf.amin(-1, keepdim=True).clamp(max=0)
    hi = xf.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.round(-lo / s)
    q = torch.clamp(torch.round(xf / s) + z, 0, maxq)
    return (q - half).to(torch.int8), z - half, s


def fake_quantize_activations(x: Tensor, bits: int) -> Tensor:
    """x rounded to its per-token grid and back (`quantize_activations`), in x's dtype."""
    q, z, s = quantize_activations(x, bits)
    return (s * (q.float() - z)).to(x.dtype)


def _check(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits) -> None:
    n, k_int = qweight.shape
    k = k_int + fp_idx.numel()
    if not x.is_floating_point():
        raise TypeError(f"qcompile::quik_mm: input must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"qcompile::quik_mm: input has {x.shape[-1]} features in its last dimension, the "
                         f"quantized weight expects {k} ({k_int} integer + {fp_idx.numel()} float columns)")
    if qweight.dtype != torch.int8:
        raise TypeError(f"qcompile::quik_mm: qweight must be int8, got {qweight.dtype}")
    if scales.dim() != 2 or scales.shape[0] != n or k_int % scales.shape[1] or rowsum.shape != scales.shape:
        raise ValueError(f"qcompile::quik_mm: scales {tuple(scales.shape)} and rowsum {tuple(rowsum.shape)} "
                         f"must both be [{n}, G] with G dividing {k_int}")
    if int_idx.shape != (k_int,) or fp_weight.shape != (n, fp_idx.numel()):
        raise ValueError(f"qcompile::quik_mm: int_idx {tuple(int_idx.shape)} must be [{k_int}] and fp_weight "
                         f"{tuple(fp_weight.shape)} [{n}, {fp_idx.numel()}]")
    if act_bits not in ACT_BITS:
        raise ValueError(f"qcompile::quik_mm: act_bits={act_bits}: use one of {ACT_BITS}")


def quik_mm(x: Tensor, qweight: Tensor, scales: Tensor, rowsum: Tensor, int_idx: Tensor, fp_idx: Tensor,
            fp_weight: Tensor, act_bits: int, out_features: int = -1) -> Tensor:
    """x [..., K] @ W.T for a QUIK weight (see the module docstring); any device with an
    `int8_gemm` (the reference serves every device). A blocked weight (`block_weight`, 3-D
    qweight: what the CPU kernel reads; `out_features` then says N) runs `quik_linear` instead,
    the whole layer in one pass."""
    if qweight.dim() == 3:
        return _quik_mm_blocked(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits, out_features)
    _check(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits)
    _load_kernels(x.device)
    n, k_int = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q, z, s = quantize_activations(x2.index_select(-1, int_idx), act_bits)
    acc = torch.ops.qcompile.int8_gemm(q, qweight, scales.shape[1])              # int32 [G, M, N]
    corrected = acc - z.to(torch.int32)[None] * rowsum.t()[:, None, :]          # exact, in int32
    y = s * (corrected.float() * scales.t().float()[:, None, :]).sum(0)
    if fp_idx.numel():
        y = y + x2.index_select(-1, fp_idx).float() @ fp_weight.float().t()
    return y.to(x.dtype).reshape(*lead, n)


def _quik_mm_blocked(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits, n) -> Tensor:
    k_int = int_idx.numel()
    if not 0 < n <= qweight.shape[0] * BLOCK_N:
        raise ValueError(f"qcompile::quik_mm: a blocked weight needs out_features (got {n}) to say how many of "
                         f"its {qweight.shape[0] * BLOCK_N} rows are real")
    if not x.is_floating_point():
        raise TypeError(f"qcompile::quik_mm: input must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] != k_int + fp_idx.numel():
        raise ValueError(f"qcompile::quik_mm: input has {x.shape[-1]} features in its last dimension, the "
                         f"quantized weight expects {k_int + fp_idx.numel()} ({k_int} integer + {fp_idx.numel()} "
                         "float columns)")
    if act_bits not in ACT_BITS:
        raise ValueError(f"qcompile::quik_mm: act_bits={act_bits}: use one of {ACT_BITS}")
    _load_kernels(x.device)
    return torch.ops.qcompile.quik_linear(x, int_idx, fp_idx, qweight, scales, rowsum, fp_weight, act_bits, n)


# --- the blocked weight the CPU kernel reads (chosen at load time: lowering.pack) -----------------
BLOCK_N = 16  # output channels side by side: one 512-bit vpdpbusd operand holds 16 channels x 4 inputs


def block_weight(qweight: Tensor, scales: Tensor, rowsum: Tensor, fp_weight: Tensor, bits: int,
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(b, scales, rowsum, fp_weight) in `quik_linear`'s layout. 16 output channels go side by side
    and each channel's inputs in runs of 4:

    - 8-bit codes: b int8 [N/16, Kp/4, 64], byte 4·l + j of block t is channel l's code at k = 4t + j;
    - 4-bit codes: b uint8 [N/16, Kp/8, 64], byte 4·l + j of block t holds code(8t + j) + 8 in its
      low nibble and code(8t + 4 + j) + 8 in its high nibble (two codes a byte, unpacked in registers);
    - scales float32, rowsum int32: [N/16, G, 16]; fp_weight float32 [N/16, F, 16].

    N is padded to 16 channels (code 0, scale 0) and, per channel (G = 1), K to whole runs (code 0)."""
    n, k = qweight.shape
    g = scales.shape[1]
    run = 8 if bits <= 4 else 4
    if g > 1 and (k // g) % run:
        raise ValueError(f"block_weight: groups of {k // g} inputs do not split into runs of {run}")
    nb, kp = -(-n // BLOCK_N), -(-k // run) * run
    codes = torch.zeros(nb * BLOCK_N, kp, dtype=torch.int16, device=qweight.device)
    codes[:n, :k] = qweight
    if bits <= 4:
        u = (codes + 8).to(torch.uint8).reshape(nb, BLOCK_N, kp // 8, 2, 4)   # [nb, l, t, half, j]
        b = (u[:, :, :, 0] | (u[:, :, :, 1] << 4)).permute(0, 2, 1, 3)        # [nb, t, l, j]
    else:
        b = codes.to(torch.int8).reshape(nb, BLOCK_N, kp // 4, 4).permute(0, 2, 1, 3)
    pad = lambda t, dt: torch.cat([t.to(dt), t.new_zeros(nb * BLOCK_N - n, t.shape[1], dtype=dt)])  # noqa: E731
    blocks = lambda t: t.reshape(nb, BLOCK_N, -1).transpose(1, 2).contiguous()  # noqa: E731
    return (b.reshape(nb, -1, 4 * BLOCK_N).contiguous(), blocks(pad(scales, torch.float32)),
            blocks(pad(rowsum, torch.int32)), blocks(pad(fp_weight, torch.float32)))


def unblock_weight(b: Tensor, scales: Tensor, rowsum: Tensor, fp_weight: Tensor, n: int, k: int,
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`block_weight`'s inverse: (qweight int8 [n, k], scales float32 [n, G], rowsum int32 [n, G],
    fp_weight float32 [n, F])."""
    nb, blocks, _ = b.shape
    if b.dtype == torch.uint8:
        u = b.reshape(nb, blocks, BLOCK_N, 4)
        codes = torch.stack([u & 15, u >> 4], dim=3).to(torch.int16) - 8             # [nb, t, l, half, j]
        codes = codes.permute(0, 2, 1, 3, 4).reshape(nb * BLOCK_N, blocks * 8)
    else:
        codes = b.reshape(nb, blocks, BLOCK_N, 4).permute(0, 2, 1, 3).reshape(nb * BLOCK_N, blocks * 4)
    flat = lambda t: t.transpose(1, 2).reshape(nb * BLOCK_N, -1)[:n]  # noqa: E731
    return codes[:n, :k].to(torch.int8).contiguous(), flat(scales), flat(rowsum), flat(fp_weight)


def quik_linear_reference(x: Tensor, int_idx: Tensor, fp_idx: Tensor, b: Tensor, scales: Tensor, rowsum: Tensor,
                          wf: Tensor, act_bits: int, n: int) -> Tensor:
    """`quik_linear` from `quantize_activations` and the unblocked weight, summed in float64 (any device)."""
    qweight, s, _, fp = unblock_weight(b, scales, rowsum, wf, n, int_idx.numel())
    x2 = x.reshape(-1, x.shape[-1])
    q, z, sx = quantize_activations(x2.index_select(-1, int_idx), act_bits)
    g = qweight.shape[1] // s.shape[1]
    w = s.double().repeat_interleave(g, dim=1) * qweight.double()
    y = sx.double() * ((q.double() - z.double()) @ w.t()) + x2.index_select(-1, fp_idx).double() @ fp.double().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.register_fake("qcompile::quik_linear")
def _(x, int_idx, fp_idx, b, scales, rowsum, wf, act_bits, n):
    return x.new_empty(*x.shape[:-1], n)


def int8_gemm_reference(a: Tensor, b: Tensor, groups: int) -> Tensor:
    """Exact int32 [G, M, N] group sums of a [M, K] int8 @ b [N, K]ᵀ int8, in float64 (any device)."""
    m, k = a.shape
    g = k // groups
    acc = torch.einsum("mgk,ngk->gmn", a.double().reshape(m, groups, g), b.double().reshape(b.shape[0], groups, g))
    return acc.to(torch.int32)


@torch.library.register_fake("qcompile::int8_gemm")
def _(a, b, groups):
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.shape[-1] != b.shape[-1] or a.shape[-1] % groups:
        raise ValueError(f"qcompile::int8_gemm: int8 [M, K] @ int8 [N, K]ᵀ in {groups} groups of K, got "
                         f"{a.dtype} {tuple(a.shape)} and {b.dtype} {tuple(b.shape)}")
    return a.new_empty(groups, a.shape[0], b.shape[0], dtype=torch.int32)


def quik_mm_reference(x: Tensor, qweight: Tensor, scales: Tensor, rowsum: Tensor, int_idx: Tensor,
                      fp_idx: Tensor, fp_weight: Tensor, act_bits: int, out_features: int = -1) -> Tensor:
    """The same product in float64 from the dequantized operands (tests): x's int columns rounded
    to their grid, times s_w·c, plus the float columns. Takes the canonical or the blocked weight."""
    if qweight.dim() == 3:
        qweight, scales, rowsum, fp_weight = unblock_weight(qweight, scales, rowsum, fp_weight, out_features,
                                                            int_idx.numel())
    _check(x, qweight, scales, rowsum, int_idx, fp_idx, fp_weight, act_bits)
    x2 = x.reshape(-1, x.shape[-1])
    xq = fake_quantize_activations(x2.index_select(-1, int_idx).float(), act_bits).double()
    g = qweight.shape[1] // scales.shape[1]
    w = scales.double().repeat_interleave(g, dim=1) * qweight.double()
    y = xq @ w.t() + x2.index_select(-1, fp_idx).double() @ fp_weight.double().t()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


_lib.impl("quik_mm", quik_mm, "CompositeImplicitAutograd")
_lib.impl("int8_gemm", int8_gemm_reference, "CompositeExplicitAutograd")
_lib.impl("quik_linear", quik_linear_reference, "CompositeExplicitAutograd")

QUIK_MM = torch.ops.qcompile.quik_mm.default
