"""Torch-named tensors ──► NNX state, validated against an `nnx.eval_shape` target; converted dirs on disk.

Rules: a torch key `a.0.b.weight` is the NNX path `('a', 0, 'b', kernel|scale|embedding)`; Linear
weights are transposed, conv weights go OIHW → HWIO (OIDHW → DHWIO). Every key must be mapped and
every shape checked before any tensor data is read; half-precision tensors are upcast to float32
before any cast to the target dtype.

A converted dir holds `manifest.json` (configs, sources, sha256 of the source files, dtype) and one
orbax checkpoint per component (`unet/`, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jinbetween.checkpoint import restore_tree, save_tree
from jinbetween.config import UNetConfig
from jinbetween.errors import (CorruptWeightsError, KeyMismatchError, PickleRefusedError, ShapeMismatchError,
                               WeightsNotFoundError)

if TYPE_CHECKING:
    from jinbetween.models.unet import UNet

log = logging.getLogger(__name__)

Path_ = tuple[str | int, ...]
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_LEAF_FROM_TORCH_WEIGHT = ("kernel", "scale", "embedding")
_KERNEL_PERMUTATIONS = {2: (1, 0), 4: (2, 3, 1, 0), 5: (2, 3, 4, 1, 0)}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_LISTED = 20


# --------------------------------------------------------------------------------------------------
# Reading weight files.


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


def load_tensor(info: TensorInfo) -> np.ndarray:
    """Returns the tensor's data as float32 (floating types) or its own dtype."""
    dtype = np.dtype(_SAFETENSORS_DTYPES[info.dtype])
    with open(info.file, "rb") as fh:
        fh.seek(info.start)
        data = fh.read(info.end - info.start)
    array = np.frombuffer(data, dtype=dtype).reshape(info.shape)
    return array.astype(np.float32) if np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16 else array


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
        return cls({k: v.shape for k, v in arrays.items()},
                   lambda k: arrays[k].astype(np.float32) if np.issubdtype(arrays[k].dtype, np.floating)
                   else arrays[k], [], description)

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


# --------------------------------------------------------------------------------------------------
# Mapping torch names onto NNX paths.


def torch_key(path: Path_) -> str:
    """Returns the torch state-dict name of an NNX parameter path."""
    *parents, leaf = (str(p) for p in path)
    return ".".join(parents + ["weight" if leaf in _LEAF_FROM_TORCH_WEIGHT else leaf])


def to_nnx_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim in _KERNEL_PERMUTATIONS:
        return np.ascontiguousarray(array.transpose(_KERNEL_PERMUTATIONS[array.ndim]))
    return array


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Returns the torch shape whose NNX layout is `shape` (inverse of `to_nnx_layout`)."""
    if leaf == "kernel" and len(shape) in _KERNEL_PERMUTATIONS:
        perm = _KERNEL_PERMUTATIONS[len(shape)]
        return tuple(shape[perm.index(i)] for i in range(len(shape)))
    return tuple(shape)


def flat_params(module: nnx.Module) -> dict[Path_, jax.ShapeDtypeStruct]:
    """Returns {NNX path: value} of every nnx.Param of a (possibly abstract) module."""
    return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def _listing(names: list[str]) -> str:
    shown = "\n  ".join(names[:_MAX_LISTED])
    more = f"\n  ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def convert_tensors(source: TensorSource, target: Mapping[Path_, Any], *, model: str, dtype=jnp.float32,
                    rename: Callable[[str], str | None] | None = None,
                    progress: bool = False) -> dict[Path_, np.ndarray]:
    """Returns {NNX path: array in `dtype`} for every target parameter, after validating all keys and shapes.

    `rename` maps a source key to its canonical torch name, or None to drop it (non-persistent buffers).
    Raises KeyMismatchError (missing/unexpected keys, all listed) or ShapeMismatchError before reading data.
    """
    by_torch_key = {torch_key(path): path for path in target}
    sources: dict[str, str] = {}
    unexpected = []
    for key in source.shapes:
        name = rename(key) if rename else key
        if name is None:
            continue
        if name in by_torch_key:
            sources[name] = key
        else:
            unexpected.append(key)
    missing = sorted(k for k in by_torch_key if k not in sources)
    mismatches = []
    for name, key in sources.items():
        path = by_torch_key[name]
        expected = torch_shape(tuple(target[path].shape), str(path[-1]))
        if tuple(source.shapes[key]) != expected:
            mismatches.append((key, tuple(source.shapes[key]), expected))
    if missing or unexpected:
        shapes_note = f" ({len(mismatches)} shape mismatches too)" if mismatches else ""
        raise KeyMismatchError(
            f"{source.description} does not match the {model} architecture of this config{shapes_note}: "
            f"{len(missing)} missing key(s):{_listing(missing) if missing else ' none'}\n"
            f"{len(unexpected)} unexpected key(s):{_listing(sorted(unexpected)) if unexpected else ' none'}\n"
            "Check that the folder holds this model type and that its config.json belongs to these weights.",
            missing, sorted(unexpected))
    if mismatches:
        lines = [f"{k}: file {got}, config expects {want}" for k, got, want in mismatches]
        raise ShapeMismatchError(
            f"{source.description}: {len(mismatches)} tensor(s) have shapes that the {model} config does not "
            f"expect:{_listing(lines)}\nThe config.json does not describe these weights; use the config saved "
            "with them.", mismatches)
    out = {}
    target_dtype = np.dtype(dtype)
    for name, key in tqdm(sorted(sources.items()), desc=f"converting {model}", unit="tensor", disable=not progress):
        path = by_torch_key[name]
        out[path] = to_nnx_layout(source.load(key), str(path[-1])).astype(target_dtype)
    return out


def merge_params(module_abstract: nnx.Module, params: Mapping[Path_, Any]) -> nnx.Module:
    """Returns a concrete module: the abstract module's graph with `params` (a complete {path: array})."""
    graphdef, state = nnx.split(module_abstract)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


# --------------------------------------------------------------------------------------------------
# Converted dirs.


def nested(params: Mapping[Path_, Any]) -> dict[str, Any]:
    """{path: leaf} → nested dict with string keys (the checkpoint format)."""
    tree: dict[str, Any] = {}
    for path, leaf in params.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = leaf
    return tree


def flat_from_nested(tree: Mapping[str, Any], paths: Iterable[Path_]) -> dict[Path_, Any]:
    out = {}
    for path in paths:
        node = tree
        for part in path:
            node = node[str(part)]
        out[path] = node
    return out


def sha256_of(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeightsError(f"{folder / MANIFEST} is unreadable ({err}); convert the weights again.") from err
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise CorruptWeightsError(f"{folder / MANIFEST} has format_version {manifest.get('format_version')}, this "
                                  f"jinbetween reads {MANIFEST_VERSION}; convert the weights again.")
    return manifest


def write_component(out_dir: Path, component: str, params: Mapping[Path_, np.ndarray], entry: dict[str, Any]) -> None:
    """Saves one component's parameters under `out_dir/component` and records it in the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tree(out_dir / component, nested(params))
    manifest_file = out_dir / MANIFEST
    manifest = read_manifest(out_dir) if manifest_file.exists() else {"format_version": MANIFEST_VERSION,
                                                                       "components": {}}
    manifest["components"][component] = entry
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")


def restore_component(folder: Path, component: str, abstract: nnx.Module, dtype) -> nnx.Module:
    """Returns the module `abstract` filled from the converted checkpoint `folder/component`, cast to `dtype`."""
    target = flat_params(abstract)
    abstract_tree = nested({p: jax.ShapeDtypeStruct(v.shape, dtype) for p, v in target.items()})
    try:
        tree = restore_tree(folder / component, abstract_tree)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CorruptWeightsError(f"Cannot restore {folder / component} ({err}); convert the weights again.") from err
    return merge_params(abstract, flat_from_nested(tree, target))


# --------------------------------------------------------------------------------------------------
# The UNet component.

UNET_STEM = "diffusion_pytorch_model"


def _diffusers_unet_folder(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    if (path / "unet" / "config.json").exists():
        return path / "unet"
    raise WeightsNotFoundError(
        f"{path} is neither a diffusers unet folder (config.json + {UNET_STEM}.safetensors), an SVD pipeline folder "
        "(with unet/), nor a converted jinbetween dir (manifest.json); convert weights with "
        "`python convert_weights.py --repo stabilityai/stable-video-diffusion-img2vid-xt --out weights/svd-xt`.")


def _converted_root(path: Path) -> Path | None:
    for candidate in (path, path.parent):
        if (candidate / MANIFEST).exists():
            return candidate
    return None


def load_unet(path: str | os.PathLike, *, dtype=jnp.float32, variant: str | None = None,
              allow_pickle: bool = False, **runtime) -> "UNet":
    """Returns the UNet stored in a converted dir or a diffusers (pipeline or unet) folder, in `dtype`."""
    from jinbetween.models.unet import abstract_unet

    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"{path} does not exist; see weights/README.md for how to get weights.")
    root = _converted_root(path)
    if root is not None:
        entry = read_manifest(root)["components"].get("unet")
        if entry is None:
            raise WeightsNotFoundError(f"{root} has no unet component; convert a UNet into it.")
        config = UNetConfig.from_diffusers(entry["config"], **runtime)
        return restore_component(root, "unet", abstract_unet(config), dtype)
    folder = _diffusers_unet_folder(path)
    config = UNetConfig.from_diffusers(json.loads((folder / "config.json").read_text()), **runtime)
    abstract = abstract_unet(config)
    source = TensorSource.from_folder(folder, UNET_STEM, variant, allow_pickle)
    return merge_params(abstract, convert_tensors(source, flat_params(abstract), model="UNet", dtype=dtype))


def convert_unet(folder: str | os.PathLike, out_dir: str | os.PathLike, *, variant: str | None = None,
                 dtype=jnp.float32, allow_pickle: bool = False, source_name: str | None = None,
                 progress: bool = True) -> Path:
    """Converts a diffusers `unet/` folder into `out_dir/unet` (orbax) and records it in `out_dir/manifest.json`."""
    from jinbetween.models.unet import abstract_unet

    folder = _diffusers_unet_folder(Path(folder))
    config_dict = json.loads((folder / "config.json").read_text())
    abstract = abstract_unet(UNetConfig.from_diffusers(config_dict))
    source = TensorSource.from_folder(folder, UNET_STEM, variant, allow_pickle)
    params = convert_tensors(source, flat_params(abstract), model="UNet", dtype=dtype, progress=progress)
    entry = {
        "config": config_dict,
        "source": source_name or str(folder),
        "variant": variant,
        "dtype": np.dtype(dtype).name,
        "files": {f.name: sha256_of(f) for f in source.files},
        "num_parameters": int(sum(np.prod(a.shape) for a in params.values())),
    }
    out_dir = Path(out_dir)
    write_component(out_dir, "unet", params, entry)
    log.info("wrote %s/unet (%d tensors)", out_dir, len(params))
    return out_dir


# --------------------------------------------------------------------------------------------------
# Whole pipelines: a Hugging Face repo or a local diffusers folder ──► weights/NAME.

COMPONENTS = ("unet",)


def hub_allow_patterns(variant: str | None, allow_pickle: bool = False) -> list[str]:
    """Files of an SVD pipeline repo that conversion reads (nothing else is downloaded)."""
    suffix = f".{variant}" if variant else ""
    patterns = ["model_index.json", "unet/config.json", f"unet/{UNET_STEM}{suffix}.safetensors",
                f"unet/{UNET_STEM}.safetensors.index{suffix}.json", f"unet/{UNET_STEM}{suffix}-*.safetensors"]
    if allow_pickle:
        patterns += [f"unet/{UNET_STEM}{suffix}.bin", f"unet/{UNET_STEM}{suffix}-*.bin"]
    return patterns


def download_pipeline(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """Downloads the files conversion needs from the Hugging Face hub; returns the local snapshot folder."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=hub_allow_patterns(variant, allow_pickle)))
    except Exception as err:  # the hub client raises many types (network, auth, gated repo, missing revision)
        raise WeightsNotFoundError(
            f"Could not download {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub: {err}\n"
            "SVD repos are gated: accept the licence on the model page, run `huggingface-cli login`, check the "
            "network, or download the folder yourself and pass --local-dir.") from err


def convert_pipeline(folder: str | os.PathLike, out_dir: str | os.PathLike, *, variant: str | None = None,
                     dtype=jnp.float32, allow_pickle: bool = False, source_name: str | None = None) -> Path:
    """Converts every component found in a diffusers SVD folder (a pipeline folder or a lone `unet/`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{folder} is not a folder; pass a diffusers SVD pipeline or unet folder.")
    source_name = source_name or str(folder)
    return convert_unet(folder, out_dir, variant=variant, dtype=dtype, allow_pickle=allow_pickle,
                        source_name=source_name)
