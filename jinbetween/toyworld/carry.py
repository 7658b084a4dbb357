"""A stage-2 run's progress as a small file: its float32 EMA minus the float32 parameters of the base pipeline it
started from, quantized and compressed, so that a session's progress can be committed and the next session can
rebuild a float32 pipeline folder to start a new run from (`--init`).

Each tensor's difference d is stored as round(d / s) in int8 with one scale s = step_fraction · rms(d) per tensor;
the entries that do not fit in [−127, 127] are stored exactly, as (flat index, d). The reconstruction's error is
then the rounding error, uniform in [−s/2, s/2] (rms s/√12) on the other entries. Parameters are keyed by
`jax.tree_util.keystr` of the leaf paths of `TrainState.ema` (as `bench/toy_export_ema.py` writes them); the file
records the sha256 of the base's UNet and image encoder weights, and unpacking against another base is refused.

    python -m jinbetween.toyworld.carry pack --run RUN --base jinbetween/toyworld/weights --out progress.carry
    python -m jinbetween.toyworld.carry pack --ema ema.npz --base jinbetween/toyworld/weights --out progress.carry
    python -m jinbetween.toyworld.carry unpack --carry progress.carry --base jinbetween/toyworld/weights --out INIT
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import lzma
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jinbetween import atomic
from jinbetween.integrity import hash_files
from jinbetween.toyworld import train
from jinbetween.weights.loading import IMAGE_ENCODER_COMPONENT, UNET_COMPONENT, save_model_folder

FORMAT = "jinbetween-toyworld-carry-1"
QMAX = 127
TRAINED = (UNET_COMPONENT, IMAGE_ENCODER_COMPONENT)
# What an unpacked folder takes from its base unchanged; gi_backward/ and release.json describe the base model only.
UNCHANGED = ("vae", "scheduler", "feature_extractor", "model_index.json")

log = logging.getLogger(__name__)


def _check_shapes(a: dict[str, tuple], b: dict[str, tuple], a_name: str, b_name: str) -> None:
    for key in sorted(set(a) ^ set(b)):
        present, absent = (a_name, b_name) if key in a else (b_name, a_name)
        raise ValueError(f"Parameter {key} is in the {present} but not in the {absent}.")
    for key in sorted(a):
        if tuple(a[key]) != tuple(b[key]):
            raise ValueError(f"Parameter {key} has shape {tuple(a[key])} in the {a_name} but {tuple(b[key])} in the "
                             f"{b_name}.")


def _check_finite(params: dict[str, np.ndarray], name: str) -> None:
    for key in sorted(params):
        if not np.all(np.isfinite(params[key])):
            raise ValueError(f"Parameter {key} of the {name} holds NaN or Inf.")


def _shapes(params: dict[str, np.ndarray]) -> dict[str, tuple]:
    return {k: np.shape(v) for k, v in params.items()}


def pack(ema: dict[str, np.ndarray], base: dict[str, np.ndarray], *, step_fraction: float = 0.25,
         meta: dict) -> bytes:
    """Returns `ema − base` quantized per tensor at step `step_fraction` · rms (outliers exact), with `meta`
    (JSON-serializable: the base's hashes, the step), as lzma-compressed `np.savez` bytes."""
    if not step_fraction > 0:
        raise ValueError(f"step_fraction must be positive, not {step_fraction}.")
    _check_shapes(_shapes(ema), _shapes(base), "EMA", "base")
    _check_finite(ema, "EMA")
    _check_finite(base, "base")
    keys = sorted(base)
    arrays, scales, counts, indices, values = {}, [], [], [], []
    for i, key in enumerate(keys):
        d = (np.asarray(ema[key], np.float32) - np.asarray(base[key], np.float32)).ravel()
        if not np.all(np.isfinite(d)):
            raise ValueError(f"Parameter {key}: the difference EMA − base overflows float32.")
        scale = np.float32(step_fraction * np.sqrt(np.mean(np.square(d, dtype=np.float64))))
        q = np.round(d / scale) if scale > 0 else np.zeros(0, np.float32)
        outside = np.flatnonzero(np.abs(q) > QMAX)
        q[outside] = 0
        arrays[f"q{i}"] = q.astype(np.int8)
        scales.append(scale)
        counts.append(len(outside))
        indices.append(outside.astype(np.int32))
        values.append(d[outside])
    layout = {"format": FORMAT, "step_fraction": step_fraction, "keys": keys,
              "shapes": [list(np.shape(base[k])) for k in keys], "outliers": counts, "meta": meta}
    buffer = io.BytesIO()
    np.savez(buffer, layout=np.frombuffer(json.dumps(layout).encode(), np.uint8),
             scales=np.asarray(scales, np.float32),
             outlier_index=np.concatenate([np.zeros(0, np.int32), *indices]),
             outlier_value=np.concatenate([np.zeros(0, np.float32), *values]), **arrays)
    return lzma.compress(buffer.getvalue(), preset=9)


def _open(blob: bytes) -> tuple[dict, np.lib.npyio.NpzFile]:
    try:
        stored = np.load(io.BytesIO(lzma.decompress(blob)), allow_pickle=False)
        layout = json.loads(stored["layout"].tobytes())
    except (lzma.LZMAError, ValueError, KeyError, OSError) as err:
        raise ValueError(f"Not a carry file ({err}).") from err
    if layout.get("format") != FORMAT:
        raise ValueError(f"The carry file has format {layout.get('format')!r}; this version reads {FORMAT!r}.")
    return layout, stored


def describe(blob: bytes) -> dict:
    """Returns the carry's format, step fraction, parameter and outlier counts, and its meta."""
    layout, _ = _open(blob)
    return {"format": layout["format"], "step_fraction": layout["step_fraction"], "tensors": len(layout["keys"]),
            "params": int(sum(np.prod(s, dtype=np.int64) for s in layout["shapes"])),
            "outliers": int(sum(layout["outliers"])), "meta": layout["meta"]}


def _check_base(meta: dict, base_hashes: dict[str, str]) -> None:
    if base_hashes != meta.get("base_sha256"):
        raise ValueError(f"This carry was packed against the base {meta.get('base', '?')!r} with weight files "
                         f"{meta.get('base_sha256')}; the given base has {base_hashes}.")


def unpack(blob: bytes, base: dict[str, np.ndarray], *,
           base_hashes: dict[str, str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Returns (base + the dequantized difference in float32, the meta). `base_hashes` (`base_hashes_of` the base
    folder), when given, must be those the carry was packed against."""
    layout, stored = _open(blob)
    meta = layout["meta"]
    if base_hashes is not None:
        _check_base(meta, base_hashes)
    shapes = {k: tuple(s) for k, s in zip(layout["keys"], layout["shapes"])}
    _check_shapes(shapes, _shapes(base), "carry", "base")
    _check_finite(base, "base")
    scales, starts = stored["scales"], np.cumsum([0, *layout["outliers"]])
    index, value = stored["outlier_index"], stored["outlier_value"]
    params = {}
    for i, key in enumerate(layout["keys"]):
        d = (stored[f"q{i}"].astype(np.float32) * scales[i] if scales[i] > 0
             else np.zeros(int(np.prod(shapes[key], dtype=np.int64)), np.float32))
        d[index[starts[i]:starts[i + 1]]] = value[starts[i]:starts[i + 1]]
        params[key] = np.asarray(base[key], np.float32) + d.reshape(shapes[key])
    return params, meta


# Pipeline folders and runs ──► parameter dicts, and back.


def base_hashes_of(folder: Path) -> dict[str, str]:
    """Returns {relative path: sha256} of the UNet's and the image encoder's safetensors files in `folder`."""
    names = sorted(str(p.relative_to(folder)) for c in TRAINED for p in (folder / c.name).glob("*.safetensors"))
    if not names:
        raise ValueError(f"{folder} has no unet/ or image_encoder/ safetensors files.")
    return hash_files(folder, names)


def params_of(state: nnx.State) -> dict[str, np.ndarray]:
    """Returns {keystr of the leaf path: float32 array} of a TrainState's `params` or `ema`."""
    return {jax.tree_util.keystr(path): np.asarray(leaf, np.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _start(folder: Path) -> tuple[train.Trainables, nnx.GraphDef, train.TrainState]:
    init = train._load_trainables(folder, 0)
    return init, *train.init_train_state(init, train.UNetTrainConfig())


def base_params(folder: Path) -> dict[str, np.ndarray]:
    """Returns the float32 parameters of the pipeline `folder` (its UNet and image encoder), keyed as an EMA."""
    return params_of(_start(folder)[2].params)


def run_ema(run_folder: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Path, int]:
    """Returns (the EMA of the run's newest checkpoint, the parameters of its init folder, that folder, the step)."""
    run = train.Run(run_folder)
    record = run.record()
    folder = train._init_folder(record)
    if folder is None:
        raise ValueError(f"{run_folder} started from scratch: a carry needs the pipeline folder the run started from.")
    _, state = train.init_train_state(train._load_trainables(folder, record["seed"]), run.config())
    restored = run.restore_state(state)
    if restored is None:
        raise ValueError(f"{run_folder} has no checkpoint yet.")
    return params_of(restored.ema), params_of(state.params), folder, int(restored.step)


def read_ema(path: Path) -> tuple[dict[str, np.ndarray], int]:
    """Returns (the parameters, the step) of an EMA exported by `bench/toy_export_ema.py`."""
    with np.load(path, allow_pickle=False) as stored:
        return {k: stored[k] for k in stored.files if k != "step"}, int(stored["step"])


def pack_params(ema: dict[str, np.ndarray], base_folder: Path, *, step: int, step_fraction: float,
                base: dict[str, np.ndarray] | None = None) -> bytes:
    """Returns `pack` of `ema` against the pipeline `base_folder` (its parameters `base`, loaded if not given),
    with the base's path and hashes and the EMA's step as meta."""
    base = base_params(base_folder) if base is None else base
    return pack(ema, base, step_fraction=step_fraction,
                meta={"base": str(base_folder), "base_sha256": base_hashes_of(base_folder), "step": step})


def relative_error(ema: dict[str, np.ndarray], base: dict[str, np.ndarray], blob: bytes) -> float:
    """Returns |reconstructed difference − difference| / |difference| over all parameters."""
    recon, _ = unpack(blob, base)
    error = sum(float(np.sum(np.square((recon[k] - base[k]) - (ema[k] - base[k]), dtype=np.float64))) for k in base)
    norm = sum(float(np.sum(np.square(np.asarray(ema[k], np.float32) - base[k], dtype=np.float64))) for k in base)
    return float(np.sqrt(error / norm)) if norm else 0.0


def difference_to_base(ema: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    """Returns |ema − base| / |base| over all parameters: with `relative_error`, the reconstruction's error relative
    to the weights, to set against their bf16 rounding (~2⁻⁹ relative)."""
    difference = sum(float(np.sum(np.square(np.asarray(ema[k], np.float32) - base[k], dtype=np.float64))) for k in base)
    norm = sum(float(np.sum(np.square(base[k], dtype=np.float64))) for k in base)
    return float(np.sqrt(difference / norm)) if norm else 0.0


def unpack_folder(blob: bytes, base_folder: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Returns `unpack` of `blob` against the pipeline `base_folder`, whose hashes are checked before it is loaded."""
    _check_base(describe(blob)["meta"], base_hashes_of(base_folder))
    return unpack(blob, base_params(base_folder))


def write_pipeline(params: dict[str, np.ndarray], base_folder: Path, out: Path) -> Path:
    """Writes the pipeline folder `out`: the UNet and image encoder holding `params` in float32, the rest copied
    from `base_folder` unchanged. Returns `out`."""
    init, graphdef, state = _start(base_folder)
    _check_shapes(_shapes(params), _shapes(params_of(state.params)), "parameters", "base")
    filled = jax.tree_util.tree_map_with_path(lambda path, _: jnp.asarray(params[jax.tree_util.keystr(path)]),
                                              state.params)
    trained = train.trainables_of(graphdef, filled, init)
    with atomic.replacing_dir(out) as staging:
        for module, component in ((trained.unet, UNET_COMPONENT), (trained.image_encoder, IMAGE_ENCODER_COMPONENT)):
            save_model_folder(module, staging / component.name, component, dtype=np.float32)
        for name in UNCHANGED:
            source = base_folder / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            elif source.exists():
                shutil.copy2(source, staging / name)
    return out


# The commands.


def pack_run(args: argparse.Namespace) -> None:
    """`pack`: the run's EMA (its newest checkpoint, or an exported --ema) minus its base, as a small carry file;
    prints its size, the difference's relative error, the outliers and the step."""
    if (args.run is None) == (args.ema is None) or (args.ema is not None and args.base is None):
        raise SystemExit("pack needs either --run RUN (and optionally --base WEIGHTS), or --ema EMA.npz with --base "
                         "WEIGHTS.")
    try:
        if args.run is not None:
            ema, base, folder, step = run_ema(args.run)
            if args.base is not None and args.base.resolve() != folder.resolve():  # against other weights than
                # the run's start (the shipped ones, for a run started from an unpacked carry)
                folder, base = args.base, base_params(args.base)
        else:
            (ema, step), folder = read_ema(args.ema), args.base
            base = base_params(folder)
        start = time.monotonic()
        blob = pack_params(ema, folder, step=step, step_fraction=args.step_fraction, base=base)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    seconds = time.monotonic() - start
    with atomic.replacing(args.out) as temporary:
        temporary.write_bytes(blob)
    described = describe(blob)
    print(json.dumps({"out": str(args.out), "bytes": len(blob), "step": step, "step_fraction": args.step_fraction,
                      "relative_error": relative_error(ema, base, blob),
                      "difference_to_base": difference_to_base(ema, base),
                      "outlier_fraction": described["outliers"] / described["params"],
                      "pack_seconds": round(seconds, 1)}))


def unpack_run(args: argparse.Namespace) -> None:
    """`unpack`: the float32 pipeline folder of a carry file's base + difference, to start a run from (`--init`)."""
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"{args.out} exists and is not empty; unpack writes a new folder.")
    try:
        params, meta = unpack_folder(args.carry.read_bytes(), args.base)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    write_pipeline(params, args.base, args.out)
    log.info(json.dumps({"stage": "unpack", "out": str(args.out), "step": meta.get("step")}))


def main(argv: list[str] | None = None) -> None:
    """Runs `pack` or `unpack` (`python -m jinbetween.toyworld.carry COMMAND ...`)."""
    from jinbetween import logs

    parser = argparse.ArgumentParser(prog="python -m jinbetween.toyworld.carry", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="the run's EMA minus its base as a small file to commit")
    pack.add_argument("--run", type=Path, help="the run folder: its newest checkpoint against its init folder")
    pack.add_argument("--ema", type=Path, help="or an EMA exported by bench/toy_export_ema.py, with --base")
    pack.add_argument("--base", type=Path, help="the pipeline folder to difference against (default: the run's "
                      "init folder; needed with --ema)")
    pack.add_argument("--out", required=True, type=Path, help="the carry file to write")
    pack.add_argument("--step-fraction", type=float, default=0.25,
                      help="quantization step as a fraction of each tensor's rms difference")
    pack.set_defaults(run_command=pack_run)

    unpack = commands.add_parser("unpack", help="a float32 pipeline folder from a carry file and its base")
    unpack.add_argument("--carry", required=True, type=Path, help="the file `pack` wrote")
    unpack.add_argument("--base", required=True, type=Path, help="the pipeline folder it was packed against")
    unpack.add_argument("--out", required=True, type=Path, help="the pipeline folder to write (new or empty)")
    unpack.set_defaults(run_command=unpack_run)
    args = parser.parse_args(argv)
    logs.configure()
    args.run_command(args)


if __name__ == "__main__":
    main()
