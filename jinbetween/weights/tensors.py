"""Safetensors files: reading (header index, tensors on demand, torch pickles when allowed) and writing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from jinbetween import atomic
from jinbetween.errors import CorruptWeightsError, PickleRefusedError, WeightsNotFoundError

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NUMPY_TO_SAFETENSORS = {np.dtype(v).name: k for k, v in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a safetensors file lives."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_safetensors_index(file: Path) -> dict[str, TensorInfo]:
    """Returns the tensors listed in a safetensors header, checking that the file holds all their bytes."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header of {header_len} bytes does not fit in a {size}-byte file")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CorruptWeightsError(f"{file} is not a readable safetensors file ({err}); it is probably a truncated "
                                  "download: delete it and download it again.") from err
    base = 8 + header_len
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if meta["dtype"] not in _SAFETENSORS_DTYPES:
            raise CorruptWeightsError(f"{file}: tensor {key} has unsupported dtype {meta['dtype']}.")
        if base + end > size:
            raise CorruptWeightsError(f"{file} is truncated: tensor {key} needs bytes up to {base + end} but the "
                                      f"file has {size}; delete it and download it again.")
        tensors[key] = TensorInfo(file, meta["dtype"], tuple(meta["shape"]), base + start, base + end)
    return tensors


def as_float32(array: np.ndarray) -> np.ndarray:
    """Returns floating tensors as float32 (fp16 and bf16 convert exactly), other tensors unchanged."""
    floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    return array.astype(np.float32) if floating else array


def load_tensor(info: TensorInfo) -> np.ndarray:
    """Returns the tensor's data, floating types as float32."""
    with open(info.file, "rb") as fh:
        fh.seek(info.start)
        data = fh.read(info.end - info.start)
    return as_float32(np.frombuffer(data, dtype=_SAFETENSORS_DTYPES[info.dtype]).reshape(info.shape))


def find_weight_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    """Returns the safetensors file(s) of a diffusers/transformers model folder (single, variant or sharded)."""
    suffix = f".{variant}" if variant else ""
    single = folder / f"{stem}{suffix}.safetensors"
    if single.exists():
        return [single]
    index = folder / (f"{stem}.safetensors.index{suffix}.json")
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise WeightsNotFoundError(f"{index} lists shards that are not in {folder}: {missing}; download them.")
        return [folder / s for s in shards]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" Found {found}: pass the matching --variant." if found else ""
    raise WeightsNotFoundError(f"No {single.name} (or sharded index) in {folder}.{hint}")


def find_pickled_files(folder: Path, stem: str, variant: str | None = None) -> list[Path]:
    suffix = f".{variant}" if variant else ""
    return sorted(folder.glob(f"{stem}{suffix}.bin")) + sorted(folder.glob(f"{stem}{suffix}-*.bin"))


def read_pickled(files: list[Path]) -> dict[str, np.ndarray]:
    """Loads torch pickles with `weights_only=True` (needs torch)."""
    try:
        import torch
    except ImportError as err:
        raise PickleRefusedError("Reading pickled .bin weights needs PyTorch: `pip install torch`.") from err
    tensors = {}
    for file in files:
        for key, value in torch.load(file, map_location="cpu", weights_only=True).items():
            tensors[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
    return tensors


class TensorSource:
    """Torch-named tensors of one model folder: shapes known up front, data read on demand."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], load: Callable[[str], np.ndarray],
                 files: list[Path], description: str):
        self.shapes = dict(shapes)
        self.load = load
        self.files = files
        self.description = description

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], description: str = "in-memory tensors") -> "TensorSource":
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return cls({k: v.shape for k, v in arrays.items()}, lambda k: as_float32(arrays[k]), [], description)

    @classmethod
    def from_folder(cls, folder: Path, stem: str, variant: str | None = None,
                    allow_pickle: bool = False) -> "TensorSource":
        try:
            files = find_weight_files(folder, stem, variant)
        except WeightsNotFoundError:
            pickled = find_pickled_files(folder, stem, variant)
            if not pickled:
                raise
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{folder} has only pickled weights ({[p.name for p in pickled]}); pickles can run code when "
                    "loaded. Prefer a .safetensors download, or pass --allow-pickle if you trust the source.")
            return cls.from_arrays(read_pickled(pickled), f"{folder} (pickled)")
        index: dict[str, TensorInfo] = {}
        for file in files:
            index.update(read_safetensors_index(file))
        return cls({k: v.shape for k, v in index.items()}, lambda k: load_tensor(index[k]), files, str(folder))



def is_finite(array: Any) -> bool:
    """Returns whether a (host or device) array holds no NaN or Inf; integer arrays always do."""
    array = np.asarray(array)
    floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    return not floating or bool(np.isfinite(array).all())




def write_safetensors(file: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes `tensors` as one safetensors file (keys sorted, data 8-byte aligned by the header's padding)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        array = tensors[key]
        header[key] = {"dtype": _NUMPY_TO_SAFETENSORS[array.dtype.name], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with atomic.replacing(file) as temporary, open(temporary, "wb") as fh:
        fh.write(len(encoded).to_bytes(8, "little"))
        fh.write(encoded)
        for key in sorted(tensors):
            fh.write(np.ascontiguousarray(tensors[key]).tobytes())


