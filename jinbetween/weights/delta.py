"""GI's backward delta on disk: an orbax tree plus `delta.json` (the UNet config, sources, sha256 of its files);
and its extraction from a fine-tuned diffusers UNet and the UNet it was fine-tuned from (`convert_gi_delta`).

The GI conversion (`convert_weights.py --gi-unet`) and the fine-tune both write this format with `save_delta`;
`Pipeline` reads it with `load_delta`. The delta itself is `jinbetween.models.delta`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jinbetween import atomic, integrity
from jinbetween.checkpoint import restore_tree, save_tree
from jinbetween.config import UNetConfig
from jinbetween.errors import (ConfigError, CorruptWeightsError, DeltaMismatchError, NonFiniteWeightsError,
                               WeightsNotFoundError)
from jinbetween.integrity import sha256_of
from jinbetween.models.delta import check_delta, delta_between, delta_keys, delta_shapes
from jinbetween.models.naming import Path_, flat_params, torch_key
from jinbetween.models.unet import abstract_unet
from jinbetween.weights.loading import UNET_COMPONENT, _listing, _read_json, component_folder, convert_tensors
from jinbetween.weights.manifest import (MANIFEST, check_out_dir, read_manifest, read_versioned_record,
                                        record_in_manifest, updating)
from jinbetween.weights.tensors import TensorSource

log = logging.getLogger(__name__)

BACKWARD_DELTA = "gi_backward"
DELTA_FORMAT_VERSION = 1
_META = "delta.json"


def _nonfinite(delta: Mapping[str, np.ndarray]) -> list[str]:
    return sorted(key for key, value in delta.items() if not np.isfinite(np.asarray(value)).all())


def _refuse_nonfinite(tensors: list[str], where: str, fix: str) -> None:
    shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
    raise NonFiniteWeightsError(f"The backward delta {where} holds NaN or Inf in {len(tensors)} tensor(s): {shown}; "
                                f"{fix}.", tensors)


def save_delta(path: str | os.PathLike, delta: Mapping[str, np.ndarray], cfg: UNetConfig, **meta) -> Path:
    """Writes a delta checkpoint (orbax tree + delta.json with the UNet config, `meta` and the sha256 of the tree's
    files) atomically, replacing `path`; returns `path`. A delta holding NaN or Inf is refused."""
    path = Path(path)
    check_delta(delta, cfg, str(path))
    delta = {key: np.asarray(value, np.float32) for key, value in delta.items()}
    nonfinite = _nonfinite(delta)
    if nonfinite:
        _refuse_nonfinite(nonfinite, f"for {path}", "it was not written: the training diverged, lower the learning "
                          "rate or resume from an earlier checkpoint")
    with atomic.replacing_dir(path) as staging:
        save_tree(staging / "tree", delta)
        record = {"format_version": DELTA_FORMAT_VERSION, "keys": sorted(delta), "unet_config": cfg.to_diffusers(),
                  **meta, "sha256": integrity.hash_files(staging, integrity.files_under(staging))}
        atomic.write_json(staging / _META, record)
    return path


def load_delta(path: str | os.PathLike, cfg: UNetConfig, *, verify: bool = True) -> dict[str, jax.Array]:
    """Returns the delta saved at `path` (float32), checked against the UNet config it will be added to, against the
    sha256 of its files when delta.json records them (deltas written since they do; `verify=False` skips that) and
    for NaN or Inf."""
    path = Path(path)
    if not (path / _META).exists():
        raise WeightsNotFoundError(
            f"{path} holds no backward delta ({_META} missing). Convert GI's released UNet with "
            "`python convert_weights.py --gi-unet PATH/unet --gi-base stabilityai/stable-video-diffusion-img2vid "
            "--out weights/NAME`, or train one with `jinbetween finetune`.")
    record = read_versioned_record(path / _META, DELTA_FORMAT_VERSION, "write the delta again")
    shapes = delta_shapes(cfg)
    if sorted(record.get("keys", [])) != sorted(shapes):
        check_delta({k: np.zeros(0) for k in record.get("keys", [])}, cfg, str(path))
    if verify and "sha256" in record:
        integrity.verify_files(path, record["sha256"], what="the backward delta's files",
                               fix="write or convert the delta again, or skip this check with --no-verify "
                                   "(verify=False)")
    abstract = {key: jax.ShapeDtypeStruct(shape, jnp.float32) for key, shape in shapes.items()}
    try:
        delta = restore_tree(path / "tree", abstract)
    except (ValueError, KeyError, FileNotFoundError) as err:
        raise CorruptWeightsError(f"Cannot restore the delta at {path} ({err}); write it again.") from err
    nonfinite = _nonfinite(delta)
    if nonfinite:
        _refuse_nonfinite(nonfinite, f"at {path}", "write, convert or train it again")
    return delta


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
    """Returns `out_dir/gi_backward`, where it wrote Δ = fine-tuned − base over the delta keys (`jinbetween.models.delta`).

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


