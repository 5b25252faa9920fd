"""Read tensors, and slices of them, from a .safetensors file with plain file reads.

safetensors' own reader maps the file. A column slice of a mapped tensor touches every page of
it, and mapped pages count in the process's memory: a tensor-parallel rank reading a third of the
columns held more than the whole model (benchmarks/results/tp_cpu_memory.md). Here every tensor is
read into memory the process owns, and a slice reads its rows in chunks through a bounded buffer,
so a rank holds its shard, the replicated tensors and at most `CHUNK_BYTES` more.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian header
size, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets from the end
of the header; an optional "__metadata__" entry), then the data, little-endian, row-major.
"""
from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

CHUNK_BYTES = 8 << 20

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


class SafetensorsFile:
    """One .safetensors file: `keys()`, `shape(name)`, `get(name)` (the whole tensor) and
    `get_slice(name, index)` (a tuple of step-1 slices, one per leading dimension). Raises
    `CheckpointError` for a file that is not valid safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            size = self.path.stat().st_size
            head = self._file.read(8)
        except OSError as e:
            raise CheckpointError(f"{self.path} cannot be read ({e})") from None
        if len(head) < 8:
            raise self._corrupt("shorter than the 8-byte header size")
        (header_bytes,) = struct.unpack("<Q", head)
        if header_bytes > size - 8:
            raise self._corrupt(f"header size {header_bytes} exceeds the file ({size} bytes)")
        try:
            header = json.loads(self._file.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_bytes
        data_bytes = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            try:
                dtype = DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._corrupt(f"tensor {name!r}: unreadable or unsupported entry {entry!r} "
                                    f"(dtypes this reader knows: {sorted(DTYPES)})") from None
            nbytes = math.prod(shape) * dtype.itemsize
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_bytes or end - begin != nbytes:
                raise self._corrupt(f"tensor {name!r}: offsets {begin}..{end} do not hold shape {shape} "
                                    f"of {entry['dtype']} inside the {data_bytes} data bytes")
            self._entries[name] = (dtype, shape, self._data_start + begin)

    def _corrupt(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} cannot be read as safetensors ({why}): the file is corrupted")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, offset = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        self._read_into(out, offset)
        return out

    def get_slice(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        """`get(name)[index]` as a tensor of its own, reading only the rows the slice covers."""
        dtype, shape, offset = self._entries[name]
        if not shape or len(index) > len(shape) or any(not isinstance(s, slice) or s.step not in (None, 1)
                                                        for s in index):
            raise ValueError(f"get_slice({name!r}, {index!r}): give one step-1 slice per leading "
                             f"dimension of its shape {shape}")
        spans = [range(*s.indices(d)) for s, d in zip(index, shape)]
        rows, inner = spans[0], spans[1:]
        out = torch.empty((len(rows), *(len(r) for r in inner), *shape[len(index):]), dtype=dtype)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        start = offset + rows.start * row_bytes
        if all(len(r) == d for r, d in zip(inner, shape[1:])):  # whole rows: one read
            self._read_into(out, start)
            return out
        inner_index = (slice(None), *(slice(r.start, r.stop) for r in inner))
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        buffer = torch.empty((min(step, len(rows)), *shape[1:]), dtype=dtype)
        for r0 in range(0, len(rows), step):
            chunk = buffer[:min(step, len(rows) - r0)]
            self._read_into(chunk, start + r0 * row_bytes)
            out[r0:r0 + len(chunk)] = chunk[inner_index]
        return out

    def _read_into(self, out: torch.Tensor, offset: int) -> None:
        nbytes = out.numel() * out.element_size()
        if nbytes == 0:
            return
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(out.data_ptr())).cast("B")
        self._file.seek(offset)
        done = 0
        while done < nbytes:
            n = self._file.readinto(view[done:])
            if not n:
                raise self._corrupt(f"ends inside a tensor's data at byte {offset + done}")
            done += n

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
