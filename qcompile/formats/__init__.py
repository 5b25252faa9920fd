"""Quantized weight formats: the canonical layouts that are saved and that reference math reads."""
from .int4 import Int4Weight, pack_nibbles, unpack_nibbles
from .int8 import Int8Weight
from .lut import LutWeight
from .quik import QuikWeight

import torch

FORMATS = {"int4": Int4Weight, "int8": Int8Weight, "lut": LutWeight, "quik": QuikWeight}


def standalone(t: torch.Tensor) -> torch.Tensor:
    """`t` on the CPU in a storage of its own: safetensors refuses tensors that share one (the
    row slices `colocate_siblings` makes)."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


__all__ = ["Int4Weight", "Int8Weight", "LutWeight", "QuikWeight", "pack_nibbles", "unpack_nibbles", "FORMATS", "standalone"]
