"""The models' load and save: diffusers/transformers folders and converted dirs <-> NNX modules.

Every key is mapped and every shape checked against an `nnx.eval_shape` target before any tensor data is read;
half-precision tensors are upcast to float32 before any cast to the target dtype; tensors holding NaN or Inf are
refused, by name, at conversion and at load.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jinbetween import atomic
from jinbetween.checkpoint import restore_tree
from jinbetween.config import ImageEncoderConfig, UNetConfig, VAEConfig
from jinbetween.errors import (CorruptWeightsError, KeyMismatchError, NonFiniteWeightsError, ShapeMismatchError,
                               WeightsNotFoundError)
from jinbetween.integrity import sha256_of
from jinbetween.models.image_encoder import ImageEncoder, abstract_image_encoder
from jinbetween.models.naming import (Path_, flat_params, merge_params, to_nnx_layout, torch_key, torch_layout,
                                      torch_shape)
from jinbetween.models.unet import UNet, abstract_unet
from jinbetween.models.vae import VAE, abstract_vae
from jinbetween.weights.manifest import (MANIFEST, check_out_dir, flat_from_nested, nested, read_manifest, updating,
                                         verify_component, write_component)
from jinbetween.weights.tensors import TensorSource, is_finite, write_safetensors

log = logging.getLogger(__name__)

_MAX_LISTED = 20
_NAMED_INLINE = 3


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


def load_unet(path: str | os.PathLike, *, dtype=jnp.float32, **options) -> UNet:
    """Returns the UNet of a diffusers `unet/` folder, an SVD pipeline folder, or a converted jinbetween dir.

    `options`: `variant`, `allow_pickle`, `verify` (see `load_component`) and config switches such as
    `attention_impl`, `cross_attention_shortcut`, `feedforward_impl` or `temporal_attention_impl`.
    """
    return load_component(path, UNET_COMPONENT, dtype=dtype, **options)


def load_vae(path: str | os.PathLike, *, dtype=jnp.float32, **options) -> VAE:
    """Returns the VAE of a diffusers `vae/` folder, an SVD pipeline folder, or a converted jinbetween dir."""
    return load_component(path, VAE_COMPONENT, dtype=dtype, **options)


def load_image_encoder(path: str | os.PathLike, *, dtype=jnp.float32, **options) -> ImageEncoder:
    """Returns the image encoder of a transformers `image_encoder/` folder, an SVD pipeline folder, or a converted
    jinbetween dir."""
    return load_component(path, IMAGE_ENCODER_COMPONENT, dtype=dtype, **options)


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
# Export: jinbetween models ──► diffusers/transformers folders (for models trained here, like the toy world's).

def export_params(module: nnx.Module, dtype=np.float32) -> dict[str, np.ndarray]:
    """Returns {torch state-dict key: array in torch layout and `dtype`} of every parameter of `module`."""
    return {torch_key(path): torch_layout(np.asarray(value, np.float32), str(path[-1])).astype(dtype)
            for path, value in flat_params(module).items()}



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
