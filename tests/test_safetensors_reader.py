"""qcompile's safetensors reader (plain reads, bounded slices) against the safetensors library."""
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcompile.errors import CheckpointError
from qcompile.formats import safetensors_reader
from qcompile.formats.safetensors_reader import SafetensorsFile


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(37, 50, generator=g),
        "bf16": torch.randn(9, 130, generator=g).bfloat16(),
        "f16_3d": torch.randn(6, 5, 7, generator=g).half(),
        "i32": torch.randint(-2**31, 2**31 - 1, (40, 24), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 256, (33, 17), generator=g, dtype=torch.uint8),
        "i64_1d": torch.randint(-10**12, 10**12, (101,), generator=g, dtype=torch.int64),
        "bool": torch.rand(4, 4, generator=g) > 0.5,
        "f8": torch.randn(8, 16, generator=g).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 8),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def test_whole_tensors_equal_the_safetensors_library(tmp_path, tensors):
    save_file(tensors, tmp_path / "t.safetensors", metadata={"format": "pt"})
    reference = load_file(tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == sorted(reference)
        for name, ref in reference.items():
            got = f.get(name)
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.float8_e4m3fn else got,
                               ref.view(torch.uint8) if ref.dtype == torch.float8_e4m3fn else ref), name


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 20])  # one row per read, a few rows, everything at once
def test_row_and_column_slices_equal_slicing_the_whole_tensor(tmp_path, tensors, monkeypatch, chunk_bytes):
    monkeypatch.setattr(safetensors_reader, "CHUNK_BYTES", chunk_bytes)
    save_file(tensors, tmp_path / "t.safetensors")
    reference = load_file(tmp_path / "t.safetensors")
    cases = [("f32", (slice(5, 30),)), ("f32", (slice(None), slice(10, 22))), ("f32", (slice(3, 9), slice(0, 50))),
             ("bf16", (slice(None), slice(64, 130))), ("i32", (slice(None), slice(8, 16))),
             ("u8", (slice(1, 32), slice(3, 4))), ("f16_3d", (slice(None), slice(1, 4))),
             ("f16_3d", (slice(2, 5), slice(0, 5), slice(6, 7))), ("i64_1d", (slice(50, 101),)),
             ("f32", (slice(None), slice(20, 20)))]
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        for name, index in cases:
            got = f.get_slice(name, index)
            want = reference[name][index]
            assert got.is_contiguous() and got.shape == want.shape and torch.equal(got, want), (name, index)


def test_a_slice_holds_only_its_own_storage(tmp_path):
    save_file({"w": torch.arange(64 * 256, dtype=torch.float32).view(64, 256)}, tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        part = f.get_slice("w", (slice(None), slice(0, 32)))
    assert part.untyped_storage().nbytes() == 64 * 32 * 4


def test_a_slice_with_a_step_or_too_many_dimensions_is_refused(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        with pytest.raises(ValueError, match="step-1 slice"):
            f.get_slice("w", (slice(0, 4, 2),))
        with pytest.raises(ValueError, match="step-1 slice"):
            f.get_slice("w", (slice(None), slice(None), slice(None)))


def _write(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,why", [
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "offsets 0..16"),
    ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16, "do not hold shape"),
    ({"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported entry"),
    (["not", "an", "object"], b"", "not a JSON object"),
])
def test_a_corrupted_file_is_a_checkpoint_error_that_says_what(tmp_path, header, data, why):
    _write(tmp_path / "t.safetensors", header, data)
    with pytest.raises(CheckpointError, match=why):
        SafetensorsFile(tmp_path / "t.safetensors")


def test_a_truncated_file_is_a_checkpoint_error(tmp_path):
    (tmp_path / "short.safetensors").write_bytes(b"\x05\0\0")
    with pytest.raises(CheckpointError, match="8-byte header size"):
        SafetensorsFile(tmp_path / "short.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        SafetensorsFile(tmp_path / "huge.safetensors")
