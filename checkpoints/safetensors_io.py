"""Zero-copy reads of safetensors files as NumPy memory maps, bfloat16 and fp8 included.

``safetensors``' own NumPy front end refuses bfloat16 and fp8, the dtypes real
checkpoints hold, and its Flax front end materialises whole tensors on the
default device. The format is an 8-byte header length, a JSON header of
``{name: {dtype, shape, data_offsets}}`` and the raw bytes, so a memory map
serves every dtype and lets each device's shard read only its own slice.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Tensors of one .safetensors file, each a read-only memmap view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._data_start = 8 + header_len
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        entry = self._header[name]
        return tuple(entry["shape"]), entry["dtype"]

    def get(self, name: str) -> np.ndarray:
        entry = self._header.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if raw.size != expected:
            raise SafetensorsError(
                f"{self.path}: tensor {name!r} holds {raw.size} bytes, its shape {shape} "
                f"needs {expected}")
        return raw.view(dtype).reshape(shape)


class CheckpointFiles:
    """Every tensor of a Hugging Face checkpoint directory, single file or sharded."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}      # tensor name -> file name
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map", {})
            for name, fname in weight_map.items():
                self.where[name] = fname
        else:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            if not names:
                raise SafetensorsError(f"{self.directory}: no *.safetensors files")
            for fname in names:
                for name in self._file(fname).keys():
                    self.where[name] = fname

    def _file(self, fname: str) -> SafetensorsFile:
        if fname not in self._files:
            path = os.path.join(self.directory, fname)
            if not os.path.isfile(path):
                raise SafetensorsError(f"{path}: listed in the index but missing")
            self._files[fname] = SafetensorsFile(path)
        return self._files[fname]

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: str) -> str:
        return os.path.join(self.directory, self.where[name])

    def get(self, name: str) -> np.ndarray:
        return self._file(self.where[name]).get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header alone (nothing is read)."""
        return self._file(self.where[name]).info(name)[0]


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any dtype above, bfloat16 included) as one safetensors file."""
    names = {np.dtype(v): k for k, v in _DTYPES.items()}
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        code = names.get(a.dtype)
        if code is None:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be written")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
