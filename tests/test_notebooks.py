"""The notebooks in notebooks/: 01, 02 and 04 run end to end on CPU with the shipped toy-world model and small
settings (`test_notebook_executes[...]`, a few minutes together); 03 (real SVD-XT on a Colab GPU) cannot run here, so
its code is compiled and every jinbetween name, call keyword and CLI option it uses is checked to exist and be public,
and its cells up to the keyframes run in this process on tiny random weights, with its offline switch and without
(its downloads recorded instead of made).

The notebooks run in a kernel of this interpreter, in a temporary directory, with the small settings passed through
the environment variables their `parameters` cell reads. The kernels inherit the test run's JAX compilation cache
(conftest.py), and this module's tests run one after the other in one worker, so a program that two notebooks compile
(GI at 1 step, keyframe encoding, decoding) is compiled once.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COLAB_URL = "https://colab.research.google.com/github/jinbetween/jinbetween/blob/main/notebooks/{}"
KERNEL = "jinbetween-tests"
CELL_TIMEOUT_S = 900

# Small settings for CI, as each notebook's parameters cell reads them.
SMALL = {"JINBETWEEN_NB_STEPS": "1"}
EXECUTED = {
    "01_quickstart": ({}, ["GI.gif", "sheet.png", "sequence_grid.png", "GI_through_3_keyframes.gif"]),
    "02_samplers_compared": ({"JINBETWEEN_NB_METHODS": "trf gi mpd vibid mr-catr"},
                             ["sheet.png", "psnr_per_frame.png", "attention_maps.png", "GI.gif", "MPD.gif",
                              "MR-CATR.gif"]),
    "04_finetune_backward_delta": ({"JINBETWEEN_NB_FINETUNE_STEPS": "3", "JINBETWEEN_NB_FINETUNE_BATCH": "1",
                                    "JINBETWEEN_NB_TOY_VIDEOS": "3"},
                                   ["loss_curve.png", "GI_fine-tuned_here.gif", "GI_shipped_delta.gif", "sheet.png",
                                    "finetune/loss.jsonl", "finetune/gi_backward/delta.json"]),
}
COLAB_ONLY = "03_real_svd_xt_colab"


def _notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.fixture
def notebook_env(tmp_path, monkeypatch) -> Path:
    """Returns the working dir; sets a kernel spec of this interpreter and the environment the kernel inherits."""
    jupyter = tmp_path / "jupyter"
    spec = jupyter / "kernels" / KERNEL
    spec.mkdir(parents=True)
    # Our own spec, so that a `python3` kernel in the user's Jupyter dirs cannot stand in for this interpreter.
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jinbetween tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    assert os.environ.get("JAX_COMPILATION_CACHE_DIR"), "conftest.py gives every process of the run one cache"
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("JINBETWEEN_NB_OUT", str(work / "outputs"))
    return work


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


@pytest.mark.parametrize("name", sorted(EXECUTED))
def test_notebook_executes(name, notebook_env, monkeypatch):
    settings, expected_files = EXECUTED[name]
    for key, value in {**SMALL, **settings}.items():
        monkeypatch.setenv(key, value)
    nb = _notebook(name)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(notebook_env)}})
    try:
        client.execute()
    finally:
        nbformat.write(nb, notebook_env / f"{name}.executed.ipynb")  # for a look after a failure
    out_dir = notebook_env / "outputs" / name
    missing = [f for f in expected_files if not (out_dir / f).is_file() or (out_dir / f).stat().st_size == 0]
    assert not missing, f"{name} did not write {missing}; it wrote {sorted(p.name for p in out_dir.rglob('*'))}"
    outputs = _outputs(nb)  # a cell that raised has already failed the test (nbclient's CellExecutionError)
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    gifs = [out for out in outputs if "data:image/gif;base64," in out.get("data", {}).get("text/html", "")]
    assert images and gifs, f"{name} displayed {len(images)} PNG images and {len(gifs)} animated GIFs; wanted both"
    strays = sorted(p.name for p in NOTEBOOKS.iterdir() if p.suffix not in (".ipynb", ".md"))
    assert not strays, f"something wrote {strays} into notebooks/"
    if name == "04_finetune_backward_delta":
        logged = (out_dir / "finetune" / "loss.jsonl").read_text().splitlines()
        assert len(logged) == int(settings["JINBETWEEN_NB_FINETUNE_STEPS"]), f"loss.jsonl has {len(logged)} lines"


@pytest.mark.parametrize("name", sorted([*EXECUTED, COLAB_ONLY]))
def test_notebook_is_saved_clean_with_badge_install_and_parameters(name):
    nb = _notebook(name)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    dirty = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not dirty, f"{name}: code cells {dirty} hold outputs; save the notebook cleared"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# "), f"{name}: no title cell first"
    assert COLAB_URL.format(f"{name}.ipynb") in first.source, f"{name}: no Open in Colab badge for itself"
    assert "find_spec(\"jinbetween\") is None" in code[0].source, f"{name}: the first code cell is not the install"
    tagged = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1 and "os.environ" in tagged[0].source, f"{name}: needs one env-driven parameters cell"


# --------------------------------------------------------------------------------------------------
# The Colab notebook, statically.


def _python_source(source: str) -> str:
    """The cell as the kernel runs it: IPython turns `!shell` and `%magic` lines into `get_ipython()` calls."""
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager().transform_cell(source)


def _resolve(dotted: str):
    """Returns the object a dotted jinbetween name denotes, importing submodules on the way; AttributeError if none."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part) and inspect.ismodule(obj):
            try:
                importlib.import_module(".".join(parts[:i + 1]))
            except ModuleNotFoundError:
                pass
        obj = getattr(obj, part)
    return obj


def _chain(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None unless the chain ends in a plain name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *reversed(parts)] if isinstance(node, ast.Name) else None


def _instance_attributes(cls: type) -> set[str]:
    """The names a class's instances have: its attributes and everything its methods assign to `self.NAME`."""
    tree = ast.parse(inspect.getsource(cls).strip())
    assigned = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name) and node.value.id == "self" and isinstance(node.ctx, ast.Store)}
    return set(dir(cls)) | assigned


def _check_jinbetween_usage(tree: ast.Module, aliases: dict[str, str], instances: dict[str, type]) -> list[str]:
    """Returns the problems of one cell (names that do not exist or are private, keywords a callee does not take);
    updates `aliases` (local name -> dotted jinbetween name) and `instances` (variable -> jinbetween class)."""
    problems = []

    def check(dotted: str):
        if any(part.startswith("_") for part in dotted.split(".")):
            problems.append(f"{dotted} is private")
            return None
        try:
            return _resolve(dotted)
        except (AttributeError, ModuleNotFoundError):
            problems.append(f"{dotted} does not exist")
            return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jinbetween":
                    check(alias.name)
                    aliases[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else "jinbetween"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "jinbetween":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if check(dotted) is not None:
                    aliases[alias.asname or alias.name] = dotted
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and len(node.targets) == 1:
            chain, target = _chain(node.value.func), node.targets[0]
            if chain and chain[0] in aliases and isinstance(target, ast.Name):
                made = _resolve(".".join([aliases[chain[0]], *chain[1:]]))
                owner = getattr(made, "__self__", made)  # a classmethod constructor, or the class itself
                if inspect.isclass(owner) and owner.__module__.startswith("jinbetween"):
                    instances[target.id] = owner
    outermost = {id(child) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 for child in [node.value] if isinstance(child, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in outermost:
            chain = _chain(node)
            if chain and chain[0] in aliases:
                check(".".join([aliases[chain[0]], *chain[1:]]))
            elif chain and chain[0] in instances and chain[1] not in _instance_attributes(instances[chain[0]]):
                problems.append(f"{instances[chain[0]].__name__} has no attribute {chain[1]!r}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.keywords:
            continue
        chain = _chain(node.func)
        if chain and chain[0] in aliases:
            try:
                callee = _resolve(".".join([aliases[chain[0]], *chain[1:]]))
            except (AttributeError, ModuleNotFoundError):
                continue  # reported above
        elif chain and chain[0] in instances and len(chain) == 2:
            callee = getattr(instances[chain[0]], chain[1], None)
        else:
            continue
        if callable(callee):
            try:
                inspect.signature(callee).bind_partial(**{k.arg: None for k in node.keywords if k.arg})
            except TypeError as err:
                problems.append(f"{'.'.join(chain)}(...): {err}")
    return problems


def _cli_lines(source: str) -> list[list[str]]:
    """The `!jinbetween ...` shell lines of a cell as argument lists, each `{python expression}` as a placeholder."""
    commands = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("!jinbetween "):
            commands.append(shlex.split(re.sub(r"\{[^}]*\}", "PLACEHOLDER", stripped[1:]))[1:])
    return commands


def test_colab_notebook_code_compiles_and_uses_only_existing_public_jinbetween_names():
    from jinbetween import cli

    nb = _notebook(COLAB_ONLY)
    aliases, instances, problems, commands = {}, {}, [], []
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        source = _python_source(cell.source)
        compile(source, f"{COLAB_ONLY} code cell {i}", "exec")
        problems += [f"cell {i}: {p}" for p in _check_jinbetween_usage(ast.parse(source), aliases, instances)]
        commands += _cli_lines(cell.source)
    assert {"jb"} <= set(aliases) and "pipe" in instances, f"expected `import jinbetween as jb` and a pipeline; " \
                                                          f"found {aliases}, {instances}"
    assert not problems, "\n".join(problems)
    assert len(commands) >= 2, f"expected the convert commands as `!jinbetween convert ...` lines, got {commands}"
    parser = cli.build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"`jinbetween {' '.join(argv)}` does not parse (see the usage message above)")


# --------------------------------------------------------------------------------------------------
# The Colab notebook's set-up cells (install, parameters, offline check, login, conversion, GI delta, load, keyframes),
# run in this process: its GPU cell replaced by CPU settings, every download recorded instead of made.


class _Downloads(list):
    """What the cells asked to fetch: `!shell` lines (`get_ipython().system`), Hugging Face logins, URLs."""

    def system(self, command: str) -> None:
        self.append(command.split()[0] if command.split()[0] != "jinbetween" else " ".join(command.split()[:3]))


@pytest.fixture(scope="module")
def tiny_converted_weights(tmp_path_factory) -> dict[str, Path]:
    """Converted dirs of tiny random models, with a random GI delta and without, as bench/notebook03_gpu.py writes
    SVD-XT's: {"delta": dir, "no delta": dir}."""
    from bench import notebook03_gpu

    root = tmp_path_factory.mktemp("nb03")
    dirs = {"delta": root / "with-delta", "no delta": root / "without-delta"}
    for kind, out in dirs.items():
        notebook03_gpu.write_random_weights(out, tiny=True, delta=kind == "delta")
    return dirs


def _run_colab_setup(monkeypatch, tmp_path, env: dict[str, str], until: str) -> tuple[dict, _Downloads]:
    """Runs notebook 03's code cells in order up to the first whose source holds `until` (that cell included), with
    `env` as its JINBETWEEN_NB_* settings; returns (the cells' namespace, what they asked to download)."""
    import huggingface_hub
    import urllib.request

    from PIL import Image

    downloads = _Downloads()

    def urlretrieve(url, filename):
        downloads.append(url)
        Image.new("RGB", (96, 64), "gray").save(filename)
        return str(filename), None

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "notebook_login", lambda: downloads.append("notebook_login"))
    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    for key in [k for k in os.environ if k.startswith("JINBETWEEN_NB_")]:
        monkeypatch.delenv(key)
    for key, value in {"JINBETWEEN_NB_OUT": str(tmp_path / "outputs"), "JINBETWEEN_NB_HEIGHT": "64",
                       "JINBETWEEN_NB_WIDTH": "96", **env}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # the notebook's relative defaults (weights/svd-xt, checkpoints) land here
    namespace = {"__name__": "__main__", "get_ipython": lambda: downloads}
    for i, cell in enumerate(c for c in _notebook(COLAB_ONLY).cells if c.cell_type == "code"):
        if "DECODE_CHUNK =" in cell.source:  # the GPU cell: nvidia-smi, XLA's memory variables
            namespace.update(DTYPE="float32", ATTENTION="auto", DECODE_CHUNK=2)
        else:
            exec(compile(_python_source(cell.source), f"{COLAB_ONLY} code cell {i}", "exec"), namespace)
        if until in cell.source:
            return namespace, downloads
    raise AssertionError(f"no code cell of {COLAB_ONLY} holds {until!r}")


def test_colab_notebook_offline_refuses_unconverted_weights_in_one_line(monkeypatch, tmp_path):
    missing = tmp_path / "no-weights"
    with pytest.raises(FileNotFoundError) as raised:
        _run_colab_setup(monkeypatch, tmp_path, {"JINBETWEEN_NB_OFFLINE": "1", "JINBETWEEN_NB_WEIGHTS": str(missing)},
                         until="get_token")
    message = str(raised.value)
    assert "\n" not in message and str(missing) in message and "JINBETWEEN_NB_WEIGHTS" in message, \
        f"the offline refusal should be one line naming the folder and the variable to set; got {message!r}"
    # Control: online, the same missing folder passes that cell and goes on to log in and convert.
    _, downloads = _run_colab_setup(monkeypatch, tmp_path, {"JINBETWEEN_NB_WEIGHTS": str(missing)}, until="get_token")
    assert downloads == ["notebook_login"], f"online without weights the login cell should log in; got {downloads}"


def test_colab_notebook_offline_refuses_to_pip_install_jinbetween(monkeypatch, tmp_path):
    import importlib.util
    import subprocess

    installs = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "jinbetween" else
                        real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda argv, **kw: installs.append(argv[1:4]) or
                        subprocess.CompletedProcess(argv, 0, stdout=""))
    with pytest.raises(RuntimeError, match=r"^JINBETWEEN_NB_OFFLINE=1 forbids installing jinbetween[^\n]*$"):
        _run_colab_setup(monkeypatch, tmp_path, {"JINBETWEEN_NB_OFFLINE": "1"}, until="find_spec")
    assert installs == [], f"offline, the install cell ran {installs}"
    _run_colab_setup(monkeypatch, tmp_path, {}, until="find_spec")  # control: online it installs with pip
    assert ["-m", "pip", "install"] in installs, f"online, the install cell should pip install; it ran {installs}"


def test_colab_notebook_offline_loads_converted_weights_and_draws_keyframes_without_downloads(
        monkeypatch, tmp_path, tiny_converted_weights):
    offline = {"JINBETWEEN_NB_OFFLINE": "1", "JINBETWEEN_NB_WEIGHTS": str(tiny_converted_weights["delta"])}
    namespace, downloads = _run_colab_setup(monkeypatch, tmp_path, offline, until="fit_image")
    assert downloads == [], f"offline, the cells asked to download {downloads}"
    assert namespace["pipe"].backward_delta is not None, "the random GI delta in gi_backward/ was not loaded"
    start, end = namespace["start"], namespace["end"]
    assert start.shape == end.shape == (64, 96, 3), f"keyframes {start.shape}, {end.shape}; wanted (64, 96, 3)"
    assert np.abs(start.astype(int) - end.astype(int)).mean() > 1, "the drawn keyframes are (nearly) the same image"
    no_delta = {**offline, "JINBETWEEN_NB_WEIGHTS": str(tiny_converted_weights["no delta"])}
    _, downloads = _run_colab_setup(monkeypatch, tmp_path, no_delta, until="gi_unet_folders")
    assert downloads == [], f"offline without a GI delta, the GI cell asked to download {downloads}"
    # Controls: online the same cells fetch the example keyframes and GI's UNet, and without weights log in and convert.
    online = {"JINBETWEEN_NB_WEIGHTS": str(tiny_converted_weights["delta"])}
    _, downloads = _run_colab_setup(monkeypatch, tmp_path, online, until="fit_image")
    assert len(downloads) == 2 and all(u.startswith("https://") for u in downloads), \
        f"online the keyframes cell should fetch GI's example pair; it asked for {downloads}"
    _, downloads = _run_colab_setup(monkeypatch, tmp_path, {"JINBETWEEN_NB_WEIGHTS": str(tmp_path / "none")},
                                    until="gi_unet_folders")
    assert downloads == ["notebook_login", "jinbetween convert --repo", "gdown"], \
        f"online without weights: expected a login, the conversion and GI's download; got {downloads}"
