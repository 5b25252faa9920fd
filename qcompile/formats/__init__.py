"""Quantized weight formats: the canonical layouts that are saved and that reference math reads."""
from .int4 import Int4Weight, pack_nibbles, unpack_nibbles
from .int8 import Int8Weight

FORMATS = {"int4": Int4Weight, "int8": Int8Weight}

__all__ = ["Int4Weight", "Int8Weight", "pack_nibbles", "unpack_nibbles", "FORMATS"]
