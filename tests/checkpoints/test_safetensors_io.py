"""Malformed safetensors files and indexes are a SafetensorsError naming the file and what is wrong, raised
when the file is opened (never an OverflowError, a MemoryError or a NumPy error later)."""

import json
import os
import struct

import numpy as np
import pytest

from checkpoints.safetensors_io import CheckpointFiles, SafetensorsError, SafetensorsFile, save_safetensors


def _write(path, header, data=b""):
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def test_a_good_file_reads_back(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_safetensors(tmp_path / "ok.safetensors", {"a": a})
    np.testing.assert_array_equal(SafetensorsFile(tmp_path / "ok.safetensors").get("a"), a)


@pytest.mark.parametrize("case,message", [
    ("garbage", "exceeds the file's"),
    ("huge_header", "header length 1152921504606846976 exceeds"),
    ("short", "not a readable safetensors file"),
    ("not_json", "not a readable safetensors file"),
    ("not_object", "its header is not a JSON object"),
    ("entry_not_object", "tensor 'a': its header entry is not an object"),
    ("bad_shape", "tensor 'a': shape [2, -3] is not a list of sizes"),
    ("bad_offsets", "tensor 'a': data_offsets [8, 4] are not [begin, end]"),
    ("past_end", "tensor 'a': its data ends at byte 1000000000, past the file's 24 bytes of data"),
    ("no_dtype", "tensor 'a': dtype None is not a dtype name"),
])
def test_malformed_files_are_named_when_opened(tmp_path, case, message):
    p = tmp_path / f"{case}.safetensors"
    entry = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    if case == "garbage":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif case == "huge_header":
        p.write_bytes(struct.pack("<Q", 1 << 60) + b"xx")
    elif case == "short":
        p.write_bytes(b"\x01\x02")
    elif case == "not_json":
        _write(p, b"{not json", bytes(24))
    elif case == "not_object":
        _write(p, [1, 2], bytes(24))
    else:
        change = {"entry_not_object": 5, "bad_shape": {**entry, "shape": [2, -3]},
                  "bad_offsets": {**entry, "data_offsets": [8, 4]},
                  "past_end": {**entry, "data_offsets": [0, 1_000_000_000]},
                  "no_dtype": {"shape": [2, 3], "data_offsets": [0, 24]}}[case]
        _write(p, {"a": change}, bytes(24))
    with pytest.raises(SafetensorsError, match="^" + str(p).replace(".", r"\.") + ": ") as e:
        SafetensorsFile(p)
    assert message in str(e.value)


def test_a_wrong_dtype_or_size_is_named_when_read(tmp_path):
    p = tmp_path / "w.safetensors"
    _write(p, {"a": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 16]}}, bytes(16))
    f = SafetensorsFile(p)
    with pytest.raises(SafetensorsError, match="tensor 'a' has unsupported dtype Q99"):
        f.get("a")
    with pytest.raises(SafetensorsError, match=r"tensor 'b' holds 8 bytes, its shape \(4,\) needs 16"):
        f.get("b")


@pytest.mark.parametrize("index,message", [
    ("{not json", "model.safetensors.index.json: not valid JSON"),
    ('[1]', "no weight_map of tensor names to file names"),
    ('{"weight_map": {"a": 5}}', "no weight_map of tensor names to file names"),
    ('{"weight_map": {"a": "../elsewhere.safetensors"}}', "is not a file name in this directory"),
])
def test_a_malformed_index_is_named(tmp_path, index, message):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(SafetensorsError, match=message):
        CheckpointFiles(tmp_path)


def test_a_file_the_index_lists_but_the_directory_lacks_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}')
    files = CheckpointFiles(tmp_path)
    with pytest.raises(SafetensorsError, match="gone.safetensors: listed in the index but missing"):
        files.shape("a")
    assert os.listdir(tmp_path) == ["model.safetensors.index.json"]
