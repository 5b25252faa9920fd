"""Quantized weight formats: the canonical layouts that are saved and that reference math reads."""
from .int4 import Int4Weight, pack_nibbles, unpack_nibbles
from .int8 import Int8Weight
from .lut import LutWeight

FORMATS = {"int4": Int4Weight, "int8": Int8Weight, "lut": LutWeight}

__all__ = ["Int4Weight", "Int8Weight", "LutWeight", "pack_nibbles", "unpack_nibbles", "FORMATS"]
