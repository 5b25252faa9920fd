"""Hugging Face GPTQ checkpoints (AutoGPTQ, GPTQModel, transformers, vLLM) <-> qcompile's formats.

One GPTQ linear layer (in = K input features, out = N output features, G groups) is stored as
  qweight  int32 [ceil(K·bits/32), N]  codes packed along the input dimension, LSB first
  qzeros   int32 [G, ceil(N·bits/32)]  zero-points packed along the output dimension
  scales   fp16  [G, N]
  g_idx    int32 [K]                   group of each input channel (absent in old files: i // group)
  bias     (optional)
and means W[o, i] = scales[g, o] · (q[i, o] − z[g, o]) with g = g_idx[i]. Codes form one bit
stream per column: value i occupies bits [i·bits, (i+1)·bits) of the column's words, so at 3 bits
32 values fill 3 words and values 10 and 21 straddle two words (AutoGPTQ's packing).
Zero-points: checkpoint_format "gptq" (v1) stores z − 1 (kernels add the 1 back per field, so a
stored 2^bits − 1 means z = 2^bits); "gptq_v2" stores z.

Conversion keeps the integers: codes go to nibbles (2-4 bits, `Int4Weight`) or to codes − 128
(8 bits, `Int8Weight`), scales stay fp16, zero-points become fp16 numbers. A g_idx becomes
qcompile's input order: perm = stable argsort(g_idx) puts each group's channels side by side;
groups of unequal size (e.g. 576 inputs in groups of 128 leave a last group of 64) are stored as
groups of the gcd of their sizes with repeated scales, which is exact.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .int4 import Int4Weight, pack_nibbles, unpack_nibbles
from .int8 import Int8Weight

BITS = (2, 3, 4, 8)
ZERO_FORMATS = ("gptq", "gptq_v2")
QUANTIZE_CONFIG = "quantize_config.json"
TENSOR_NAMES = ("qweight", "qzeros", "scales", "g_idx")


# --- bit packing ------------------------------------------------------------------------------
def packed_words(count: int, bits: int) -> int:
    """int32 words that hold `count` codes of `bits` bits."""
    return math.ceil(count * bits / 32)


def unpack_bits(words: Tensor, bits: int, count: int) -> Tensor:
    """int32 [W, C] -> int32 [count, C]: the codes of each column's bit stream, LSB first.
    (int32 arithmetic, with right shifts made logical by a mask: half the memory of int64.)"""
    w = words.to(torch.int32)
    pos = torch.arange(count, device=words.device) * bits
    word, off = pos // 32, pos % 32
    keep = (1 << (32 - off)) - 1                                 # bits a logical right shift keeps
    keep = torch.where(keep >= 2**31, keep - 2**32, keep).to(torch.int32)[:, None]
    codes = (w[word] >> off[:, None].to(torch.int32)) & keep
    spill = (off + bits > 32).nonzero().flatten()                # codes that continue in the next word
    if len(spill):
        codes[spill] |= w[word[spill] + 1] << (32 - off[spill, None]).to(torch.int32)
    return codes & ((1 << bits) - 1)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """int [R, C] codes in 0..2^bits-1 -> int32 [ceil(R·bits/32), C], the inverse of `unpack_bits`."""
    v = codes.to(torch.int64)
    pos = torch.arange(v.shape[0], device=v.device) * bits
    word, off = pos // 32, (pos % 32)[:, None]
    out = torch.zeros(packed_words(v.shape[0], bits), v.shape[1], dtype=torch.int64, device=v.device)
    out.index_add_(0, word, (v << off) & 0xFFFFFFFF)  # fields do not overlap: adding is OR
    spill = (pos % 32 + bits > 32).nonzero().flatten()
    if len(spill):
        out.index_add_(0, word[spill] + 1, v[spill] >> (32 - off[spill]))
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


# --- config -----------------------------------------------------------------------------------
def find_config(path: Path) -> dict | None:
    """The GPTQ quantization config of checkpoint directory `path`, normalised, or None if it has none.

    Reads quantize_config.json (AutoGPTQ, GPTQModel) or config.json["quantization_config"]
    (transformers). Keys: bits, group_size (K for -1 is left to the caller: -1 kept), desc_act, sym,
    zero_format ("gptq" | "gptq_v2"), dynamic (GPTQModel per-module overrides, or None), source.
    """
    raw, source = None, None
    qc = path / QUANTIZE_CONFIG
    if qc.is_file():
        raw, source = _read_json(qc), qc
        raw.setdefault("quant_method", raw.get("method", "gptq"))  # AutoGPTQ files before quant_method
    elif (path / "config.json").is_file():
        cfg = _read_json(path / "config.json").get("quantization_config")
        if isinstance(cfg, dict):
            raw, source = cfg, path / "config.json"
    if raw is None:
        return None
    method = str(raw.get("quant_method", raw.get("method", ""))).lower()
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method {method!r}: qcompile reads GPTQ checkpoints (quant_method "
                              "'gptq') and its own (qcompile.save); re-export this model with one of them")
    fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
    if fmt not in ZERO_FORMATS:
        raise CheckpointError(f"{source}: checkpoint_format {fmt!r} keeps weights in a kernel-specific layout; "
                              f"qcompile reads {ZERO_FORMATS} (GPTQModel can convert: save with format='gptq')")
    pack_dtype = str(raw.get("pack_dtype", "int32")).removeprefix("torch.")
    if pack_dtype != "int32":
        raise CheckpointError(f"{source}: pack_dtype {pack_dtype!r}: qcompile reads int32-packed GPTQ tensors only")
    try:
        bits, group = int(raw["bits"]), int(raw.get("group_size", -1))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: 'bits' and 'group_size' must be integers, got "
                              f"bits={raw.get('bits')!r} group_size={raw.get('group_size')!r}") from None
    if bits not in BITS:
        raise CheckpointError(f"{source}: bits={bits}: qcompile reads GPTQ weights of {BITS} bits")
    if group != -1 and group <= 0:
        raise CheckpointError(f"{source}: group_size={group}: expected -1 (per channel) or a positive size")
    return {"bits": bits, "group_size": group, "desc_act": bool(raw.get("desc_act", False)),
            "sym": bool(raw.get("sym", True)), "zero_format": fmt, "dynamic": raw.get("dynamic") or None,
            "source": str(source)}


def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}): the checkpoint is corrupted") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


# --- one layer: GPTQ tensors -> qcompile format ---------------------------------------------------
def layer_bits(qweight_rows: int, in_features: int, where: str, expected: int) -> int:
    """The code width of a layer, read from its qweight's row count (GPTQModel's `dynamic` configs
    mix widths): `expected` (the config's) when it fits, else the one width that fits."""
    fits = [b for b in BITS if packed_words(in_features, b) == qweight_rows]
    if expected in fits:
        return expected
    if len(fits) != 1:
        raise CheckpointError(f"{where}.qweight has {qweight_rows} rows, which fits no GPTQ code width "
                              f"{BITS} for {in_features} input features (expected ceil({in_features}·bits/32)): "
                              "a corrupted file, or a checkpoint of a model with other layer sizes")
    return fits[0]


UNPACK_COLUMNS = 256


def to_qcompile(tensors: dict[str, Tensor], bits: int, zero_format: str, group_size: int,
                in_features: int, out_features: int, where: str) -> Int4Weight | Int8Weight:
    """One GPTQ layer's tensors (qweight, qzeros, scales, optional g_idx) as a qcompile format.

    `group_size` (-1: per channel) only rebuilds a missing g_idx. Raises CheckpointError naming
    the layer `where` for tensors that do not fit the layer or cannot be expressed.
    """
    k, n = in_features, out_features
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise CheckpointError(f"{where}.{name} is {t.dtype}: GPTQ packs codes in int32 words")
    if not scales.is_floating_point() or scales.dim() != 2 or scales.shape[1] != n:
        raise CheckpointError(f"{where}.scales is {scales.dtype} {tuple(scales.shape)}: expected float [groups, {n}]")
    groups = scales.shape[0]
    want = {"qweight": (packed_words(k, bits), n), "qzeros": (groups, packed_words(n, bits))}
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if tuple(t.shape) != want[name]:
            raise CheckpointError(f"{where}.{name} has shape {tuple(t.shape)}, expected {want[name]} for a "
                                  f"{bits}-bit layer with {k} inputs, {n} outputs and {groups} groups")
    g_idx = tensors.get("g_idx")
    if g_idx is None:
        g = k if group_size == -1 else group_size
        g_idx = torch.arange(k) // g
    if tuple(g_idx.shape) != (k,) or g_idx.is_floating_point():
        raise CheckpointError(f"{where}.g_idx is {g_idx.dtype} {tuple(g_idx.shape)}: expected integers [{k}]")
    g_idx = g_idx.long()
    if len(g_idx) and (g_idx.min() < 0 or g_idx.max() >= groups):
        raise CheckpointError(f"{where}.g_idx names groups {g_idx.min().item()}..{g_idx.max().item()}, "
                              f"but scales has {groups}")

    zeros = unpack_bits(qzeros.t(), bits, n).t()               # [G, N]
    if zero_format == "gptq":
        zeros = zeros + 1                                      # v1 stores z - 1

    perm = torch.sort(g_idx, stable=True).indices             # each group's channels side by side
    sizes = torch.bincount(g_idx, minlength=groups)
    d = math.gcd(*sizes[sizes > 0].tolist())
    if bits <= 4 and d % 2:
        raise CheckpointError(
            f"{where}: its groups (g_idx) have {sorted(set(sizes[sizes > 0].tolist()))} input channels; qcompile "
            f"stores a layer as equal groups of an even size (the gcd here is {d}), so this layer cannot be "
            "loaded without dequantizing: re-quantize it with a group size that divides its input features")
    stored_group = g_idx[perm[::d]]                            # checkpoint group of each stored group
    s = scales[stored_group].t().contiguous()                  # [N, K/d]
    z = zeros[stored_group].t().to(torch.float16).contiguous()
    if torch.equal(perm, torch.arange(k)):
        perm = None
    q = torch.empty(n, k, dtype=torch.uint8)                   # [N, K]: stored[:, j] = W[:, perm[j]]
    for c in range(0, n, UNPACK_COLUMNS):  # a block of outputs at a time: int32 temporaries stay small
        codes = unpack_bits(qweight[:, c:c + UNPACK_COLUMNS], bits, k)  # [K, block], the layer's input order
        q[c:c + UNPACK_COLUMNS] = (codes if perm is None else codes[perm]).t()
    if bits <= 4:
        return Int4Weight(pack_nibbles(q), s, z, d, bits, perm)
    if torch.all(z == 128):                                    # symmetric: the kernels' fast path
        z = None
    else:
        z = z - 128
    q = (q ^ 0x80).view(torch.int8)                            # code - 128, in place of a widening subtract
    if d == k and z is None:                                   # per channel: scales [N]
        return Int8Weight(q, s[:, 0].contiguous(), None, None, perm)
    return Int8Weight(q, s, z, d, perm)


# --- one layer: qcompile format -> GPTQ tensors ---------------------------------------------------
def from_qcompile(weight: Int4Weight | Int8Weight, zero_format: str, where: str) -> tuple[dict[str, Tensor], int, int]:
    """(tensors, bits, group_size) of a qcompile layer in GPTQ layout (group_size -1: per channel).

    Raises ValueError naming the layer `where` when it cannot be expressed: fractional or
    out-of-range zero-points, scales that fp16 does not hold exactly, shapes GPTQ cannot pack.
    """
    if zero_format not in ZERO_FORMATS:
        raise ValueError(f"checkpoint format {zero_format!r}: use one of {ZERO_FORMATS}")
    n, k = weight.out_features, weight.in_features
    bits = weight.bits
    if isinstance(weight, Int4Weight):
        codes = unpack_nibbles(weight.qweight.cpu()).to(torch.int64)
        if codes.max() >= 2**bits:
            raise ValueError(f"{where}: codes up to {codes.max().item()} do not fit its {bits} bits")
        scales, zeros, group = weight.scales.cpu(), weight.zeros.cpu().double(), weight.group_size
    else:  # int8 codes are stored minus 128, zero-points alike; symmetric means zero 128
        codes = weight.qweight.cpu().to(torch.int64) + 128
        per_channel = weight.group_size is None
        scales = weight.scales.cpu()[:, None] if per_channel else weight.scales.cpu()
        if weight.zeros is None:
            zeros = torch.full(scales.shape, 128.0, dtype=torch.float64)
        else:
            zeros = (weight.zeros.cpu()[:, None] if per_channel else weight.zeros.cpu()).double() + 128
        group = weight.group_size or k
    if bits == 3 and (k % 32 or n % 32):
        raise ValueError(f"{where}: 3-bit GPTQ packs 32 codes in 3 words; {k} inputs x {n} outputs are not multiples of 32")
    if (k * bits) % 32 or (n * bits) % 32:
        raise ValueError(f"{where}: {k} inputs x {n} outputs do not fill whole int32 words at {bits} bits")
    if not torch.equal(zeros, zeros.round()):
        raise ValueError(f"{where}: fractional zero-points (e.g. {zeros[zeros != zeros.round()][0].item():.4f}) have no "
                         "GPTQ encoding (GPTQ stores integer zero-points): quantize with integer zero-points "
                         "(GPTQ, or RTNConfig(search='minmax')) or save in qcompile's own format")
    low, high = (1, 2**bits) if zero_format == "gptq" else (0, 2**bits - 1)
    if zeros.min() < low or zeros.max() > high:
        hint = ("checkpoint format 'gptq' (v1) stores zero − 1 and cannot hold 0: save with format='gptq_v2'"
                if zero_format == "gptq" else "'gptq_v2' stores zero-points as they are: save with format='gptq'")
        raise ValueError(f"{where}: zero-points {zeros.min().item():.0f}..{zeros.max().item():.0f} are outside "
                         f"{low}..{high} for {bits} bits; {hint}")
    scales16 = scales.to(torch.float16)
    if not torch.equal(scales16.to(scales.dtype), scales) or not torch.isfinite(scales16).all():
        raise ValueError(f"{where}: its {scales.dtype} scales are not all exactly representable in fp16, which "
                         "GPTQ stores: quantize with scale_dtype=torch.float16 or save in qcompile's own format")
    g_idx = torch.arange(k) // group
    if weight.perm is not None:                                # stored column j is input perm[j]
        perm = weight.perm.long().cpu()
        original = torch.empty_like(codes)
        original[:, perm] = codes
        codes = original
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(k) // group
    stored_zeros = (zeros - (1 if zero_format == "gptq" else 0)).to(torch.int64)
    tensors = {
        "qweight": pack_bits(codes.t(), bits),                         # [K·bits/32, N]
        "qzeros": pack_bits(stored_zeros, bits).t().contiguous(),      # [G, N·bits/32]
        "scales": scales16.t().contiguous(),                           # [G, N]
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, bits, (-1 if group == k else group)
