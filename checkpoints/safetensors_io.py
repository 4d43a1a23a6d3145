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


def _check_entry(path: str, name: str, entry, data_bytes: int) -> None:
    """A header entry's dtype, shape and offsets, checked so that reading it cannot fail in NumPy."""
    def bad(what):
        raise SafetensorsError(f"{path}: tensor {name!r}: {what}")
    if not isinstance(entry, dict):
        bad("its header entry is not an object")
    if not isinstance(entry.get("dtype"), str):
        bad(f"dtype {entry.get('dtype')!r} is not a dtype name")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        bad(f"shape {shape!r} is not a list of sizes")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        bad(f"data_offsets {offsets!r} are not [begin, end]")
    if offsets[1] > data_bytes:
        bad(f"its data ends at byte {offsets[1]}, past the file's {data_bytes} bytes of data")


class SafetensorsFile:
    """Tensors of one .safetensors file, each a read-only memmap view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise SafetensorsError(f"{self.path}: not a safetensors file (its header length {header_len} "
                                           f"exceeds the file's {size} bytes)")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError, RecursionError) as e:
            if isinstance(e, SafetensorsError):
                raise
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: not a safetensors file (its header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_bytes = size - 8 - header_len
        for name, entry in header.items():
            _check_entry(self.path, name, entry, data_bytes)
        self._header = header
        self._data_start = 8 + header_len
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self._header)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        entry = self._header.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path}: no tensor {name!r}")
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


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointFiles:
    """Every tensor of a Hugging Face checkpoint directory, single file or sharded."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, "model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}      # tensor name -> file name
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
            except (OSError, ValueError, RecursionError) as e:
                raise SafetensorsError(f"{index_path}: not valid JSON ({e})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise SafetensorsError(f"{index_path}: no weight_map of tensor names to file names")
            for name, fname in weight_map.items():
                if os.path.basename(fname) != fname:
                    raise SafetensorsError(f"{index_path}: {fname!r} is not a file name in this directory")
                self.where[name] = fname
        elif os.path.isfile(os.path.join(self.directory, "model.safetensors")):
            # as transformers: without an index only model.safetensors is read (a copy beside it is not)
            for name in self._file("model.safetensors").keys():
                self.where[name] = "model.safetensors"
        else:
            names = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            if not names:
                if os.path.isdir(os.path.join(self.directory, "params")):
                    raise SafetensorsError(f"{self.directory}: no *.safetensors files; its params/ folder makes it a "
                                           f"jaxdyn checkpoint, but one without its jaxdyn_checkpoint.json "
                                           f"(damaged or incomplete): convert again")
                torch_files = sorted(n for n in os.listdir(self.directory) if n.endswith((".bin", ".pt", ".pth")))
                if torch_files:
                    raise SafetensorsError(f"{self.directory}: no *.safetensors files (found {torch_files[0]}: PyTorch "
                                           f"checkpoints are not read; save the model as safetensors, e.g. "
                                           f"model.save_pretrained(DIR, safe_serialization=True))")
                raise SafetensorsError(f"{self.directory}: no *.safetensors files")
            for fname in names:
                for name in self._file(fname).keys():
                    if name in self.where:
                        raise SafetensorsError(
                            f"{self.directory}: tensor {name!r} is in both {self.where[name]} and {fname}, and no "
                            f"model.safetensors.index.json says which to read")
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

    def check_float(self, name: str) -> None:
        """SafetensorsError unless tensor ``name`` holds floats (F16, BF16, F32, F64): an 8-bit or integer weight
        without its quantization's scales would be served as its raw values."""
        dtype = self._file(self.where[name]).info(name)[1]
        if dtype not in FLOAT_DTYPES:
            raise SafetensorsError(f"{self.file_of(name)}: tensor {name!r} is {dtype}, not a float weight (F16, BF16 "
                                   f"or F32); a quantized checkpoint needs its quantization_config, which jaxdyn "
                                   f"does not load")


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
