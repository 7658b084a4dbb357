"""Torch-named tensors ──► NNX state, validated against an `nnx.eval_shape` target; converted dirs on disk.

Rules: a torch key `a.0.b.weight` is the NNX path `('a', 0, 'b', kernel|scale|embedding)`; Linear
weights are transposed, conv weights go OIHW → HWIO (OIDHW → DHWIO). Every key must be mapped and
every shape checked before any tensor data is read; half-precision tensors are upcast to float32
before any cast to the target dtype.

A converted dir holds `manifest.json` (configs, sources, sha256 of the source files, dtype, and the sha256 of
each of its own files) and one orbax checkpoint per component (`unet/`, ...), and may hold GI's backward model as
a weight delta (`gi_backward/`, see `jinbetween.delta`) made by `convert_gi_delta`. A conversion writes into a
staging copy that replaces the dir whole when it is done, so an interrupted one leaves the dir as it was; tensors
holding NaN or Inf are refused, by name, at conversion and at load; loading checks the component's file hashes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jinbetween import atomic, integrity
from jinbetween.checkpoint import restore_tree, save_tree
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig
from jinbetween.delta import BACKWARD_DELTA, check_delta, delta_between, delta_keys, delta_shapes, save_delta
from jinbetween.errors import (ConfigError, CorruptWeightsError, DeltaMismatchError, KeyMismatchError,
                               NonFiniteWeightsError, PickleRefusedError, ShapeMismatchError, WeightsNotFoundError)
from jinbetween.integrity import sha256_of
from jinbetween.models.image_encoder import abstract_image_encoder
from jinbetween.models.unet import abstract_unet
from jinbetween.models.vae import abstract_vae

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
_NAMED_INLINE = 3


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
    out, nonfinite, overflowing = {}, [], []
    target_dtype = np.dtype(dtype)
    for name, key in tqdm(sorted(sources.items()), desc=f"converting {model}", unit="tensor", disable=not progress):
        path = by_torch_key[name]
        value = source.load(key)
        converted = to_nnx_layout(value, str(path[-1])).astype(target_dtype)
        if not is_finite(value):
            nonfinite.append(key)
        elif not is_finite(converted):
            overflowing.append(key)
        out[path] = converted
    if nonfinite:
        raise_nonfinite(model, source.description, nonfinite)
    if overflowing:
        raise NonFiniteWeightsError(
            f"{source.description}: {len(overflowing)} {model} tensor(s) overflow {target_dtype.name} "
            f"({_inline(overflowing)}); convert or load them in float32 (--dtype float32).", overflowing)
    return out


def is_finite(array: Any) -> bool:
    """Returns whether a (host or device) array holds no NaN or Inf; integer arrays always do."""
    array = np.asarray(array)
    floating = np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16
    return not floating or bool(np.isfinite(array).all())


def nonfinite_parameters(module: nnx.Module) -> list[str]:
    """Returns the torch names of the parameters of `module` that hold NaN or Inf, sorted."""
    return sorted(torch_key(path) for path, value in flat_params(module).items() if not is_finite(value))


def _inline(names: list[str]) -> str:
    more = f" and {len(names) - _NAMED_INLINE} more" if len(names) > _NAMED_INLINE else ""
    return ", ".join(names[:_NAMED_INLINE]) + more


def raise_nonfinite(model: str, where: str, tensors: list[str]) -> None:
    """Raises NonFiniteWeightsError: the `model` weights in `where` hold NaN or Inf in `tensors`."""
    raise NonFiniteWeightsError(
        f"The {model} weights in {where} hold NaN or Inf in {len(tensors)} tensor(s): {_inline(sorted(tensors))}; "
        "they are damaged or their training diverged: download, convert or train them again.", sorted(tensors))


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


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeightsError(f"{folder / MANIFEST} is unreadable ({err}); convert the weights again.") from err
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise CorruptWeightsError(f"{folder / MANIFEST} has format_version {manifest.get('format_version')}, this "
                                  f"jinbetween reads {MANIFEST_VERSION}; convert the weights again.")
    return manifest


def record_in_manifest(out_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Sets `name`'s entry in `out_dir/manifest.json` (created if absent), keeping the other entries."""
    manifest_file = out_dir / MANIFEST
    manifest = read_manifest(out_dir) if manifest_file.exists() else {"format_version": MANIFEST_VERSION,
                                                                       "components": {}}
    manifest["components"][name] = entry
    atomic.write_json(manifest_file, manifest)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """Returns `out_dir` if a conversion may write there: absent, an empty folder, or a converted dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a folder for the converted weights.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise ConfigError(f"--out {out_dir} holds files but no {MANIFEST}, so it is not a converted dir; choose a new "
                          "folder (or a converted dir to add to).")
    return out_dir


@contextlib.contextmanager
def updating(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yields a staging copy of the converted dir `out_dir` to change (hard links of its files; empty if it does not
    exist). When the block ends normally the sha256 of each of its files is recorded in its manifest and it replaces
    `out_dir` whole; otherwise it is removed, so an interrupted conversion leaves `out_dir` as it was."""
    out_dir = check_out_dir(out_dir)
    with atomic.replacing_dir(out_dir) as staging:
        if out_dir.exists():
            shutil.copytree(out_dir, staging, copy_function=_link_or_copy, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".*"))
        yield staging
        _record_file_hashes(staging, out_dir)


def _record_file_hashes(staging: Path, previous: Path) -> None:
    """Writes the sha256 of every file of the converted dir `staging` into its manifest; files still shared with the
    dir it replaces (`previous`) keep the hash recorded there."""
    manifest = read_manifest(staging)
    recorded = manifest.get("files", {})
    files = {}
    for name in integrity.files_under(staging, skip=(MANIFEST,)):
        shared = name in recorded and (previous / name).is_file() and os.path.samefile(staging / name, previous / name)
        files[name] = recorded[name] if shared else sha256_of(staging / name)
    manifest["files"] = files
    atomic.write_json(staging / MANIFEST, manifest)


def write_component(out_dir: Path, component: str, params: Mapping[Path_, np.ndarray], entry: dict[str, Any]) -> None:
    """Saves one component's parameters under `out_dir/component` (replacing it whole) and records it in the
    manifest; call inside `updating`."""
    with atomic.replacing_dir(out_dir / component) as folder:
        save_tree(folder, nested(params))
    record_in_manifest(out_dir, component, entry)


def verify_component(root: Path, component: str, model: str) -> None:
    """Raises IntegrityError unless the files of `root/component` match the sha256 recorded in `root`'s manifest
    (cached by size and modification time); a manifest without hashes (an older jinbetween's) is let through."""
    files = read_manifest(root).get("files")
    if files is None:
        log.warning("%s records no file hashes (converted by an older jinbetween), so %s is not verified; convert "
                    "it again to record them", root, component)
        return
    expected = {name: digest for name, digest in files.items() if name.startswith(f"{component}/")}
    if not expected:
        raise CorruptWeightsError(f"{root / MANIFEST} lists no files of {component}/; convert the weights again.")
    integrity.verify_files(root, expected, what=f"the {model} files",
                           fix="convert the weights again, or skip this check with --no-verify (verify=False)")


def restore_component(folder: Path, component: str, abstract: nnx.Module, dtype, model: str = "") -> nnx.Module:
    """Returns the module `abstract` filled from the converted checkpoint `folder/component`, cast to `dtype`;
    raises NonFiniteWeightsError if a tensor holds NaN or Inf."""
    target = flat_params(abstract)
    abstract_tree = nested({p: jax.ShapeDtypeStruct(v.shape, dtype) for p, v in target.items()})
    try:
        tree = restore_tree(folder / component, abstract_tree)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CorruptWeightsError(f"Cannot restore {folder / component} ({err}); convert the weights again.") from err
    params = flat_from_nested(tree, target)
    nonfinite = [torch_key(path) for path, value in params.items() if not is_finite(value)]
    if nonfinite:
        raise_nonfinite(model or component, str(folder / component), nonfinite)
    return merge_params(abstract, params)


# --------------------------------------------------------------------------------------------------
# Components: how each model's folder, config and weights are found.


@dataclass(frozen=True)
class Component:
    """One model of an SVD pipeline: its folder name, weight-file stem, config parser and abstract builder."""

    name: str
    model: str
    stem: str
    class_name: str
    parse_config: Callable[..., Any]
    abstract: Callable[[Any], nnx.Module]
    rename: Callable[[str], str | None] | None = None


_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _legacy_vae_names(key: str) -> str:
    """Maps pre-0.14 diffusers VAE attention names (`query`, `key`, `value`, `proj_attn`) to today's."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION_NAMES and "attentions" in parts:
        return ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key


def _drop_position_ids(key: str) -> str | None:
    """Older transformers checkpoints store the non-persistent `position_ids` buffer; it is not a parameter."""
    return None if key.endswith("embeddings.position_ids") else key


UNET_COMPONENT = Component("unet", "UNet", "diffusion_pytorch_model", "UNetSpatioTemporalConditionModel",
                           UNetConfig.from_diffusers, abstract_unet)
VAE_COMPONENT = Component("vae", "VAE", "diffusion_pytorch_model", "AutoencoderKLTemporalDecoder",
                          VAEConfig.from_diffusers, abstract_vae, _legacy_vae_names)
IMAGE_ENCODER_COMPONENT = Component("image_encoder", "image encoder", "model", "CLIPVisionModelWithProjection",
                                    ImageEncoderConfig.from_transformers, abstract_image_encoder, _drop_position_ids)
COMPONENTS = (UNET_COMPONENT, VAE_COMPONENT, IMAGE_ENCODER_COMPONENT)
PIPELINE_CONFIGS = {"scheduler": "scheduler/scheduler_config.json",
                    "feature_extractor": "feature_extractor/preprocessor_config.json",
                    "model_index": "model_index.json"}


def _class_name(config: Mapping[str, Any]) -> str:
    return config.get("_class_name") or (config.get("architectures") or ["?"])[0]


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptWeightsError(f"{file} is not readable JSON ({err}); download it again.") from err


def component_folder(path: Path, component: Component) -> Path:
    """Returns the folder holding `component`'s config.json: `path` itself or `path/<component.name>`."""
    if (path / "config.json").exists():
        found = _class_name(_read_json(path / "config.json"))
        if found == component.class_name:
            return path
        if not (path / component.name / "config.json").exists():
            raise WeightsNotFoundError(f"{path}/config.json describes a {found}, not a {component.class_name}; "
                                       f"point at the {component.name}/ folder of an SVD pipeline.")
    if (path / component.name / "config.json").exists():
        return path / component.name
    raise WeightsNotFoundError(
        f"{path} is neither a {component.model} folder (config.json + {component.stem}.safetensors), an SVD pipeline "
        f"folder (with {component.name}/), nor a converted jinbetween dir (manifest.json); convert weights with "
        "`python convert_weights.py --repo stabilityai/stable-video-diffusion-img2vid-xt --out weights/svd-xt`.")


def _converted_root(path: Path) -> Path | None:
    for candidate in (path, path.parent):
        if (candidate / MANIFEST).exists():
            return candidate
    return None


def read_config(path: str | os.PathLike, component: Component, **runtime) -> Any:
    """Returns `component`'s config from a converted dir or a diffusers/transformers folder, reading no weights.

    `runtime` overrides config switches that do not change the parameters (e.g. `attention_impl`).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"{path} does not exist; see weights/README.md for how to get weights.")
    root = _converted_root(path)
    if root is not None:
        entry = read_manifest(root)["components"].get(component.name)
        if entry is None:
            raise WeightsNotFoundError(f"{root} has no {component.name} component; convert a folder that has one.")
        return component.parse_config(entry["config"], **runtime)
    return component.parse_config(_read_json(component_folder(path, component) / "config.json"), **runtime)


def load_component(path: str | os.PathLike, component: Component, *, dtype=jnp.float32, variant: str | None = None,
                   allow_pickle: bool = False, verify: bool = True, **runtime) -> nnx.Module:
    """Returns `component`'s model from a converted dir or a diffusers/transformers folder, in `dtype`.

    A converted dir's files are first checked against the sha256 in its manifest (`verify=False` skips that); a
    tensor holding NaN or Inf is refused by name. `runtime` overrides config switches that do not change the
    parameters (e.g. `attention_impl`).
    """
    path = Path(path)
    config = read_config(path, component, **runtime)
    root = _converted_root(path)
    if root is not None:
        if verify:
            verify_component(root, component.name, component.model)
        return restore_component(root, component.name, component.abstract(config), dtype, component.model)
    abstract = component.abstract(config)
    folder = component_folder(path, component)
    source = TensorSource.from_folder(folder, component.stem, variant, allow_pickle)
    return merge_params(abstract, convert_tensors(source, flat_params(abstract), model=component.model, dtype=dtype,
                                                  rename=component.rename))


def convert_component(folder: Path, out_dir: Path, component: Component, *, variant: str | None = None,
                      dtype=jnp.float32, allow_pickle: bool = False, source_name: str | None = None) -> None:
    """Converts one diffusers/transformers model folder into `out_dir/<component.name>` and the manifest (call
    inside `updating(out_dir)`)."""
    config_dict = _read_json(folder / "config.json")
    abstract = component.abstract(component.parse_config(config_dict))
    source = TensorSource.from_folder(folder, component.stem, variant, allow_pickle)
    params = convert_tensors(source, flat_params(abstract), model=component.model, dtype=dtype,
                             rename=component.rename, progress=True)
    write_component(out_dir, component.name, params, {
        "config": config_dict,
        "source": source_name or str(folder),
        "variant": variant,
        "dtype": np.dtype(dtype).name,
        "files": {f.name: sha256_of(f) for f in source.files},
        "num_parameters": int(sum(np.prod(a.shape) for a in params.values())),
    })
    log.info("wrote %s/%s (%d tensors)", out_dir, component.name, len(params))


# --------------------------------------------------------------------------------------------------
# Whole pipelines: a Hugging Face repo or a local diffusers folder ──► weights/NAME.


def component_patterns(component: Component, variant: str | None, allow_pickle: bool = False) -> list[str]:
    """Hub file patterns of one component's config and weights (single, sharded, and pickled if allowed)."""
    c, suffix = component, f".{variant}" if variant else ""
    patterns = [f"{c.name}/config.json", f"{c.name}/{c.stem}{suffix}.safetensors",
                f"{c.name}/{c.stem}.safetensors.index{suffix}.json", f"{c.name}/{c.stem}{suffix}-*.safetensors"]
    if allow_pickle:
        patterns += [f"{c.name}/{c.stem}{suffix}.bin", f"{c.name}/{c.stem}{suffix}-*.bin"]
    return patterns


def hub_allow_patterns(variant: str | None, allow_pickle: bool = False) -> list[str]:
    """Files of an SVD pipeline repo that conversion reads (nothing else is downloaded)."""
    patterns = list(PIPELINE_CONFIGS.values())
    for c in COMPONENTS:
        patterns += component_patterns(c, variant, allow_pickle)
    return patterns


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], local_option: str) -> Path:
    import huggingface_hub

    try:
        return Path(huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # the hub client raises many types (network, auth, gated repo, missing revision)
        raise WeightsNotFoundError(
            f"Could not download {repo_id}{'@' + revision if revision else ''} from the Hugging Face hub: {err}\n"
            "SVD repos are gated: accept the licence on the model page, run `huggingface-cli login`, check the "
            f"network, or download the folder yourself and pass {local_option}.") from err


def download_pipeline(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                      allow_pickle: bool = False) -> Path:
    """Downloads the files conversion needs from the Hugging Face hub; returns the local snapshot folder."""
    return _snapshot(repo_id, revision, hub_allow_patterns(variant, allow_pickle), "--local-dir")


def download_unet(repo_id: str, *, revision: str | None = None, variant: str | None = None,
                  allow_pickle: bool = False) -> Path:
    """Downloads only an SVD repo's `unet/` config and weights; returns the snapshot folder (holding `unet/`)."""
    return _snapshot(repo_id, revision, component_patterns(UNET_COMPONENT, variant, allow_pickle),
                     "its path as --gi-base")


def convert_pipeline(folder: str | os.PathLike, out_dir: str | os.PathLike, *, variant: str | None = None,
                     dtype=jnp.float32, allow_pickle: bool = False, source_name: str | None = None) -> Path:
    """Converts every model found in a diffusers SVD folder (a pipeline folder or a lone model folder).

    A pipeline's scheduler and feature-extractor configs are recorded in the manifest.
    """
    folder, out_dir = Path(folder), check_out_dir(out_dir)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{folder} is not a folder; pass a diffusers SVD pipeline or model folder.")
    source_name = source_name or str(folder)
    if (folder / "config.json").exists():
        found = _class_name(_read_json(folder / "config.json"))
        matches = [c for c in COMPONENTS if c.class_name == found]
        if not matches:
            raise WeightsNotFoundError(f"{folder}/config.json describes a {found}; jinbetween converts "
                                       f"{[c.class_name for c in COMPONENTS]} or SVD pipeline folders.")
        with updating(out_dir) as staging:
            convert_component(folder, staging, matches[0], variant=variant, dtype=dtype, allow_pickle=allow_pickle,
                              source_name=source_name)
        return out_dir
    present = [c for c in COMPONENTS if (folder / c.name / "config.json").exists()]
    if not present:
        raise WeightsNotFoundError(f"{folder} has none of {[c.name + '/' for c in COMPONENTS]}; pass an SVD pipeline "
                                   "folder (as downloaded from the hub) or one model's folder.")
    with updating(out_dir) as staging:
        for component in present:
            convert_component(folder / component.name, staging, component, variant=variant, dtype=dtype,
                              allow_pickle=allow_pickle, source_name=f"{source_name}/{component.name}")
        manifest = read_manifest(staging)
        manifest["pipeline"] = {key: _read_json(folder / rel) for key, rel in PIPELINE_CONFIGS.items()
                                if (folder / rel).exists()}
        atomic.write_json(staging / MANIFEST, manifest)
    return out_dir


# --------------------------------------------------------------------------------------------------
# GI's backward model: a fine-tuned diffusers UNet ──► a weight delta on its base (`weights/NAME/gi_backward`).

GI_BASE_REPO = "stabilityai/stable-video-diffusion-img2vid"
# Config fields that size no parameter: a fine-tune may change them (e.g. its frame count) and stay a delta.
_PARAMETER_FREE_UNET_FIELDS = ("num_frames", "sample_size")


def _existing_unet_folder(path: str | os.PathLike, role: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"The {role} UNet {path} does not exist; pass a diffusers unet/ folder or an SVD "
                                   "pipeline folder that holds one.")
    return component_folder(path, UNET_COMPONENT)


def _config_differences(finetuned: UNetConfig, base: UNetConfig) -> dict[str, tuple[Any, Any]]:
    """Returns {field: (fine-tuned value, base value)} for every diffusers config field where the two differ."""
    a, b = finetuned.to_diffusers(), base.to_diffusers()
    return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


def _describe(differences: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {ft} vs {base}" for key, (ft, base) in differences.items())


def _read_unet(folder: Path, target: Mapping[Path_, Any], variant: str | None, allow_pickle: bool,
               model: str) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Returns ({torch key: float32 array in NNX layout} of every UNet tensor, the weight files read)."""
    source = TensorSource.from_folder(folder, UNET_COMPONENT.stem, variant, allow_pickle)
    params = convert_tensors(source, target, model=model, progress=True)
    return {torch_key(path): value for path, value in params.items()}, source.files


def _frozen_differences(finetuned: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], trained: set[str],
                        atol: float) -> list[tuple[str, float]]:
    """Returns (key, max |difference|) of each tensor outside `trained` differing by more than `atol`, largest first."""
    differences = []
    for key, value in finetuned.items():
        if key not in trained:
            difference = float(np.max(np.abs(value - base[key]), initial=0.0))
            if not difference <= atol:  # NaN counts as a difference
                differences.append((key, difference))
    return sorted(differences, key=lambda item: -item[1])


def _check_fits_converted_unet(out_dir: Path, cfg: UNetConfig, gi_folder: Path) -> None:
    """Raises KeyMismatchError / ShapeMismatchError if a delta of `cfg` does not fit the UNet converted in `out_dir`."""
    converted = read_manifest(out_dir)["components"].get(UNET_COMPONENT.name)
    if converted is not None:
        placeholders = {key: np.broadcast_to(np.float32(0), shape) for key, shape in delta_shapes(cfg).items()}
        check_delta(placeholders, UNetConfig.from_diffusers(converted["config"]),
                    f"The delta of {gi_folder} (for the UNet converted in {out_dir})")


def convert_gi_delta(gi_unet: str | os.PathLike, base: str | os.PathLike, out_dir: str | os.PathLike, *,
                     variant: str | None = None, base_variant: str | None = None, allow_pickle: bool = False,
                     atol: float = 0.0, source_name: str | None = None, base_name: str | None = None) -> Path:
    """Returns `out_dir/gi_backward`, where it wrote Δ = fine-tuned − base over the delta keys (`jinbetween.delta`).

    `gi_unet` is GI's fine-tuned `unet/` folder (or a folder holding one), `base` the diffusers SVD folder it was
    fine-tuned from (for GI's release, `stabilityai/stable-video-diffusion-img2vid`: the 14-frame SVD). Every
    tensor outside the delta keys must be equal in both (within `atol`), else DeltaMismatchError lists them. The
    delta is recorded in `out_dir/manifest.json`; if `out_dir` already holds a converted UNet, the delta must fit it.
    `source_name` / `base_name` are what the records call the two sources (default: their paths).
    """
    gi_folder, base_folder = _existing_unet_folder(gi_unet, "fine-tuned"), _existing_unet_folder(base, "base")
    out_dir = check_out_dir(out_dir)
    config_dict = _read_json(gi_folder / "config.json")
    cfg = UNET_COMPONENT.parse_config(config_dict)
    base_cfg = UNET_COMPONENT.parse_config(_read_json(base_folder / "config.json"))
    differences = _config_differences(cfg, base_cfg)
    architectural = {k: v for k, v in differences.items() if k not in _PARAMETER_FREE_UNET_FIELDS}
    if architectural:
        raise ConfigError(
            f"The fine-tuned UNet {gi_folder} and the base {base_folder} have different architectures "
            f"({_describe(architectural)}), so one was not fine-tuned from the other. Pass the UNet it was "
            f"fine-tuned from as the base (for GI's released UNet: {GI_BASE_REPO}).")
    if differences:
        log.info("fine-tuned and base configs differ only in fields without parameters: %s", _describe(differences))
    if (out_dir / MANIFEST).exists():
        _check_fits_converted_unet(out_dir, cfg, gi_folder)

    target = flat_params(abstract_unet(cfg))
    finetuned, gi_files = _read_unet(gi_folder, target, variant, allow_pickle, "fine-tuned UNet")
    base_params, base_files = _read_unet(base_folder, target, base_variant, allow_pickle, "base UNet")
    trained = set(delta_keys(cfg))
    frozen = _frozen_differences(finetuned, base_params, trained, atol)
    if frozen:
        listed = [f"{key}: max |difference| {difference:.3g}" for key, difference in frozen]
        frames = (" (their configs' num_frames differ too: {} vs {})".format(*differences["num_frames"])
                  if "num_frames" in differences else "")
        raise DeltaMismatchError(
            f"The fine-tuned UNet {gi_folder} was not made from the base {base_folder}: {len(frozen)} of the "
            f"{len(finetuned) - len(trained)} tensors outside the temporal attn1 to_v/to_out.0 weights differ"
            f"{f' by more than {atol:g}' if atol else ''}{frames}:{_listing(listed)}\n"
            f"A backward delta changes only those {len(trained)} weights, so the base must be the exact UNet the "
            f"fine-tune started from. GI's released UNet was fine-tuned from {GI_BASE_REPO} (the 14-frame SVD), "
            f"not from SVD-XT: pass --gi-base {GI_BASE_REPO} or its local folder. If the differences are only "
            "rounding (one side stored in fp16), read the base in the same precision (--gi-base-variant) or allow "
            "a tolerance (--gi-atol).", frozen)

    delta = delta_between(finetuned, base_params, cfg)
    zero = sum(not np.any(value) for value in delta.values())
    if zero == len(delta):
        log.warning("all %d delta tensors are zero: %s equals the base %s on the trained weights, so the backward "
                    "model will be the base model", len(delta), gi_folder, base_folder)
    else:
        log.info("delta: %d tensors, %d all zero, max |Δ| %.3g", len(delta), zero,
                 max(float(np.abs(value).max()) for value in delta.values()))
    record = {"source": source_name or str(gi_folder), "base": base_name or str(base_folder), "variant": variant,
              "base_variant": base_variant, "atol": atol, "files": {f.name: sha256_of(f) for f in gi_files},
              "base_files": {f.name: sha256_of(f) for f in base_files}}
    with updating(out_dir) as staging:
        save_delta(staging / BACKWARD_DELTA, delta, cfg, **record)
        record_in_manifest(staging, BACKWARD_DELTA, {"kind": "delta", "config": config_dict, **record,
                                                     "num_tensors": len(delta), "zero_tensors": zero})
    path = out_dir / BACKWARD_DELTA
    log.info("wrote %s (%d tensors)", path, len(delta))
    return path


# --------------------------------------------------------------------------------------------------
# Export: jinbetween models ──► diffusers/transformers folders (for models trained here, like the toy world's).

_NUMPY_TO_SAFETENSORS = {np.dtype(v).name: k for k, v in _SAFETENSORS_DTYPES.items()}


def torch_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Returns an NNX-layout parameter in torch's layout (inverse of `to_nnx_layout`)."""
    if leaf == "kernel" and array.ndim in _KERNEL_PERMUTATIONS:
        return np.ascontiguousarray(array.transpose(np.argsort(_KERNEL_PERMUTATIONS[array.ndim])))
    return array


def export_params(module: nnx.Module, dtype=np.float32) -> dict[str, np.ndarray]:
    """Returns {torch state-dict key: array in torch layout and `dtype`} of every parameter of `module`."""
    return {torch_key(path): torch_layout(np.asarray(value, np.float32), str(path[-1])).astype(dtype)
            for path, value in flat_params(module).items()}


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


def save_model_folder(module: nnx.Module, folder: str | os.PathLike, component: Component, *, dtype=np.float32,
                      max_shard_bytes: int | None = None) -> Path:
    """Writes `module` as a diffusers/transformers model folder: `config.json` and its safetensors weights in
    `dtype`, sharded with an index (as `save_pretrained` does) when they exceed `max_shard_bytes`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = module.config
    config_dict = config.to_transformers() if component is IMAGE_ENCODER_COMPONENT else config.to_diffusers()
    atomic.write_json(folder / "config.json", config_dict)
    tensors = export_params(module, dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    for key in sorted(tensors):
        if max_shard_bytes and shards[-1] and sum(a.nbytes for a in shards[-1].values()) + tensors[key].nbytes > \
                max_shard_bytes:
            shards.append({})
        shards[-1][key] = tensors[key]
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_safetensors(folder / f"{component.stem}.safetensors", tensors, metadata)
        return folder
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{component.stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / name, shard, metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    atomic.write_json(folder / f"{component.stem}.safetensors.index.json", index)
    return folder
