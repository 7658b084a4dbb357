"""Notebook 03 (real SVD-XT) end to end on the lent GPU, offline, against random full-size SVD-XT weights (issue 26).

    python bench/notebook03_gpu.py weights /tmp/svd-xt-random          # random SVD-XT, converted layout, + GI delta
    python bench/notebook03_gpu.py weights /tmp/tiny-random --tiny     # the same with tiny models (a CPU check)
    python3 bench/notebook03_gpu.py gpu --out $OUT                     # on the GPU machine (bench/NOTES.md)

`weights` writes what `jinbetween convert` writes (manifest.json with sha256 of every file, one orbax checkpoint per
model, float16 as the notebook converts, and `gi_backward/`, a random delta, unless `--no-delta`), filled with
N(0, 0.02²) windows of one pool of normal draws as bench/perf.py's `random_module` (the values change neither the
speed nor the memory); no torch, diffusers or download. `gpu` installs the wheels carried in `.whl/nb03` into
/tmp/site (nbclient, ipykernel and their needs, which the GPU machine lacks), writes the random weights in /tmp,
executes notebooks/03_real_svd_xt_colab.ipynb with nbclient (JINBETWEEN_NB_OFFLINE=1, gif videos where PyAV is
missing) and writes to `--out`: the executed notebook (outputs over 1 MB replaced by a note of their size),
`summary.json` (seconds of each phase and cell, the lines the cells printed: GPU and settings, load, each method's
time and peak memory) and the keyframes and contact sheet PNGs. Each cell may run until `--budget-s` seconds after
the start; a cell that would run past it is stopped and what ran is still written.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_real_svd_xt_colab.ipynb"
OUTPUT_DIR_NAME = "03_real_svd_xt_colab"  # the notebook's OUT_DIR under JINBETWEEN_NB_OUT
WHEELS = ROOT / ".whl" / "nb03"
SITE = Path("/tmp/site")
LARGEST_OUTPUT = 1 << 20
STD = 0.02


def model_configs(tiny: bool):
    """Returns the (UNet, VAE, image encoder) configs: SVD-XT's, or tiny ones (the test suite's tiny pipeline)."""
    from jinbetween import config

    if tiny:
        # The pipeline resizes CLIP input to 224×224 whatever the config says: a 224-pixel encoder, 32-pixel patches.
        return config.tiny(), config.tiny_vae(), config.tiny_image_encoder().replace(image_size=224, patch_size=32)
    return config.svd_xt(), config.svd_vae(), config.svd_image_encoder()


def random_params(abstract, rng: np.random.Generator, dtype) -> dict:
    """Returns {NNX path: array in `dtype`} for every parameter of the abstract module: N(0, 0.02²) windows at random
    offsets into one pool of normal draws, each a view of the pool (memory: the largest parameter, not the model)."""
    from jinbetween.models.naming import flat_params

    shapes = {path: tuple(leaf.shape) for path, leaf in flat_params(abstract).items()}
    sizes = {path: int(np.prod(shape)) for path, shape in shapes.items()}
    pool = (rng.standard_normal(max(sizes.values()) + (1 << 20), np.float32) * np.float32(STD)).astype(dtype)
    starts = rng.integers(0, len(pool) - np.array(list(sizes.values())) + 1)
    return {path: pool[start:start + sizes[path]].reshape(shapes[path]) for path, start in zip(shapes, starts)}


def write_random_weights(out: Path, *, tiny: bool = False, delta: bool = True, seed: int = 0,
                         dtype=np.float16) -> dict:
    """Writes a converted dir of random weights at `out` (replaced whole); returns {model: parameter count}."""
    from jinbetween.models.delta import delta_shapes
    from jinbetween.weights import BACKWARD_DELTA, COMPONENTS, IMAGE_ENCODER_COMPONENT, save_delta
    from jinbetween.weights.manifest import record_in_manifest, updating, write_component

    configs = dict(zip((c.name for c in COMPONENTS), model_configs(tiny)))
    rng = np.random.default_rng(seed)
    counts = {}
    source = f"random N(0, {STD}²), seed {seed} (bench/notebook03_gpu.py)"
    with updating(out) as staging:
        for component in COMPONENTS:
            cfg = configs[component.name]
            params = random_params(component.abstract(cfg), rng, dtype)
            counts[component.name] = sum(int(a.size) for a in params.values())
            config_dict = cfg.to_transformers() if component is IMAGE_ENCODER_COMPONENT else cfg.to_diffusers()
            write_component(staging, component.name, params, {
                "config": config_dict, "source": source, "variant": None, "dtype": np.dtype(dtype).name,
                "files": {}, "num_parameters": counts[component.name]})
        if delta:
            unet_cfg = configs[COMPONENTS[0].name]
            tensors = {key: (STD * rng.standard_normal(shape, np.float32)) for key, shape in
                       sorted(delta_shapes(unet_cfg).items())}
            counts[BACKWARD_DELTA] = sum(int(a.size) for a in tensors.values())
            save_delta(staging / BACKWARD_DELTA, tensors, unet_cfg, source=source)
            record_in_manifest(staging, BACKWARD_DELTA, {"kind": "delta", "config": unet_cfg.to_diffusers(),
                                                         "source": source, "num_tensors": len(tensors),
                                                         "zero_tensors": 0})
    return counts


# --------------------------------------------------------------------------------------------------
# The GPU run.


def install_wheels(folder: Path) -> None:
    """Installs the wheels in `folder` into SITE and puts SITE first on this process's and its children's paths."""
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)
    sys.path[:0] = [str(SITE), str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    importlib.invalidate_caches()


def kernel_spec(folder: Path) -> str:
    """Writes a kernel spec of this interpreter under `folder` and points JUPYTER_PATH at it; returns its name."""
    name = "jinbetween-nb03"
    spec = folder / "kernels" / name
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jinbetween nb03", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(folder)
    return name


def _seconds(cell) -> float | None:
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not (start and end):
        return None
    return (datetime.fromisoformat(end.replace("Z", "+00:00")) -
            datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    if output.get("output_type") == "error":
        return f"{output.get('ename')}: {output.get('evalue')}"
    return output.get("data", {}).get("text/plain", "") if output.get("output_type") == "execute_result" else ""


def shrink_outputs(nb) -> None:
    """Replaces each output over LARGEST_OUTPUT bytes (the embedded videos) by a note of its size."""
    for cell in nb.cells:
        for i, output in enumerate(cell.get("outputs", [])):
            size = len(json.dumps(output))
            if size > LARGEST_OUTPUT:
                cell.outputs[i] = {"output_type": "stream", "name": "stdout",
                                   "text": f"[an output of {size / 2**20:.1f} MiB, left out by bench/notebook03_gpu.py]\n"}


def execute(out: Path, weights: Path, methods: str, steps: int | None, deadline: float, summary: dict) -> None:
    """Executes the notebook offline in /tmp/nb03; writes the executed notebook, its PNGs and `summary` to `out`."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    work = Path("/tmp/nb03")
    work.mkdir(parents=True, exist_ok=True)
    settings = {"JINBETWEEN_NB_OFFLINE": "1", "JINBETWEEN_NB_WEIGHTS": str(weights), "JINBETWEEN_NB_METHODS": methods,
                "JINBETWEEN_NB_OUT": str(work / "outputs"), "PYTHONUNBUFFERED": "1",
                "JINBETWEEN_NB_VIDEO": "mp4" if importlib.util.find_spec("av") else "gif"}
    if steps:
        settings["JINBETWEEN_NB_STEPS"] = str(steps)
    os.environ.update(settings)
    summary["settings"] = settings
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name=kernel_spec(work / "jupyter"), resources={"metadata": {"path": str(work)}},
                            timeout_func=lambda cell: max(1, int(deadline - time.time())))
    start = time.time()
    try:
        client.execute()
        summary["notebook"] = "completed"
    except CellExecutionError as err:
        summary["notebook"] = f"stopped: {err.ename}: {err.evalue}"
    except (CellTimeoutError, DeadKernelError) as err:  # past the budget; the kernel died (e.g. out of host memory)
        summary["notebook"] = f"stopped: {type(err).__name__}: {err}"
    finally:
        summary["phases_s"]["notebook"] = round(time.time() - start, 1)
        code = [cell for cell in nb.cells if cell.cell_type == "code"]
        summary["cells"] = [{"id": cell.get("id"), "seconds": _seconds(cell),
                             "printed": "".join(_text(o) for o in cell.get("outputs", []))[-3000:]}
                            for cell in code if cell.get("execution_count") is not None]
        shrink_outputs(nb)
        nbformat.write(nb, out / "03_real_svd_xt_colab.executed.ipynb")
        for name in ("keyframes.png", "sheet.png"):
            png = work / "outputs" / OUTPUT_DIR_NAME / name
            if png.is_file():
                (out / name).write_bytes(png.read_bytes())


def gpu(args) -> None:
    start = time.time()
    deadline = start + args.budget_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"phases_s": {}, "argv": sys.argv}

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=1))

    try:
        install_wheels(Path(args.wheels))
        summary["phases_s"]["install_wheels"] = round(time.time() - start, 1)
        save()
        t = time.time()
        # In a process of its own on the CPU: JAX in this one would take 75% of the GPU before the kernel starts.
        argv = [sys.executable, __file__, "weights", args.weights, "--seed", str(args.seed),
                *(["--tiny"] if args.tiny else []), *(["--no-delta"] if args.no_delta else [])]
        written = subprocess.run(argv, env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True, capture_output=True,
                                 text=True).stdout.splitlines()[-1]
        summary["parameters"] = json.loads(written)["parameters"]
        summary["phases_s"]["random_weights"] = round(time.time() - t, 1)
        summary["weights_bytes"] = sum(p.stat().st_size for p in Path(args.weights).rglob("*") if p.is_file())
        save()
        execute(out, Path(args.weights), args.methods, args.steps, deadline, summary)
    finally:
        summary["phases_s"]["total"] = round(time.time() - start, 1)
        save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    weights = commands.add_parser("weights", help="write a random SVD-XT converted dir")
    weights.add_argument("out", type=Path)
    weights.add_argument("--tiny", action="store_true", help="tiny models instead of SVD-XT's (a CPU check)")
    weights.add_argument("--no-delta", action="store_true", help="no gi_backward/ (GI then runs as the ablation)")
    weights.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("gpu", help="random weights, then the notebook offline, results to --out")
    run.add_argument("--out", required=True, help="where the executed notebook, summary.json and PNGs go ($OUT)")
    run.add_argument("--weights", default="/tmp/svd-xt-random", help="where the random weights are written")
    run.add_argument("--methods", default="gi mpd", help="JINBETWEEN_NB_METHODS (default: %(default)s)")
    run.add_argument("--steps", type=int, help="JINBETWEEN_NB_STEPS: fewer steps for every method (default: each "
                                                "method's official steps)")
    run.add_argument("--budget-s", type=float, default=570, help="no cell runs past this many seconds from the start")
    run.add_argument("--no-delta", action="store_true")
    run.add_argument("--tiny", action="store_true", help="tiny models (a CPU check of this script: the notebook then "
                                                         "stops at its GPU cell)")
    run.add_argument("--wheels", default=str(WHEELS), help="the carried wheels (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "weights":
        start = time.time()
        counts = write_random_weights(args.out, tiny=args.tiny, delta=not args.no_delta, seed=args.seed)
        print(json.dumps({"out": str(args.out), "parameters": counts, "seconds": round(time.time() - start, 1)}))
    else:
        gpu(args)


if __name__ == "__main__":
    main()
