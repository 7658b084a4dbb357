"""Compile jinbetween's full-size programs for a GPU on a machine that has none, and read the plan XLA made.

XLA compiles for a GPU it is not attached to ("deviceless" ahead-of-time compilation) from a description of the
target (`bench/gpu_targets/*.txtpb`). The result is the program that GPU would run, except for what XLA chooses
by timing kernels on the device (autotuning): here every matmul goes to cuBLAS and every convolution to cuDNN's
heuristic pick. Per case, this reports:

- the memory plan: parameters and inputs, outputs and temporaries. Buffer assignment is exact, so their sum is
  the program's peak on the device up to autotuned workspaces (calibration in bench/NOTES.md);
- the kernels by class, and the bytes the memory-bound fusions move (what each reads of its inputs, plus what it
  writes): the quantity the UNet's ~2 TB/s elementwise passes scale with, measurable without a GPU;
- the compile time on this machine (no autotuning, so not the GPU's first-call time).

Set-up, in a virtual environment of its own (JAX's CUDA wheels are ~5 GB; no GPU or driver is needed):

    python3 -m venv .venv-gpuplan && . .venv-gpuplan/bin/activate && pip install "jax[cuda12]" && pip install -e .
    PYTHONPATH=. python bench/gpu_plan.py plan --cases unet/b2,run/gi --out bench/results/plan/plan.json
    PYTHONPATH=. python bench/gpu_plan.py calibrate --hlo X.hlo.txt.gz --trace X.trace.json.gz  # any machine
    python bench/gpu_plan.py table bench/results/plan/plan.json                                   # markdown

Cases (SVD-XT, bf16, 25 frames at 576×1024 unless --frames/--height/--width say otherwise):

  unet/b1, unet/b2[:maps=capture]  one UNet forward on B videos (B=2: one CFG call); `maps=capture|inject`: as
                                   GI's two directions run it
  vae/decode[:chunk=8,lean=0]      the decode of one video's latents
  encode/keyframes[:pairs=N]       the VAE and CLIP encoding of N pairs' keyframes, as `interpolate` batches them
  run/METHOD[:pairs=N]             the sampler program of METHOD (i2v, gi, trf, mpd, mpd-seq, vibid, mr-catr) on N pairs
                                   (N videos for i2v), as `interpolate` / `interpolate_batch` run it per device

`:shortcut=0` / `:attention=xla` / `:feedforward=pallas` / `:temporal=pallas` switch the UNet's kernels and
`:xla=PRESET` adds bench/perf.py's XLA flags; a case may take several (`unet/b2:feedforward=pallas,temporal=pallas`).
`calibrate` joins a device trace (`perf.py profile --trace-dir`) with its optimized HLO: the time and bytes of each
memory-bound kernel, hence the rate at which they run, for turning bytes here into milliseconds there.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/gpu_plan.py` from anywhere finds `bench.perf` and `jinbetween`
    sys.path.insert(0, str(ROOT))
TARGETS = {path.stem: path for path in sorted((ROOT / "bench" / "gpu_targets").glob("*.txtpb"))}
METHOD_NAMES = ("i2v", "gi", "trf", "mpd", "mpd-seq", "vibid", "mr-catr")
_UNET_OPTIONS = {"attention", "shortcut", "feedforward", "temporal", "xla"}
CASE_OPTIONS = {"unet": _UNET_OPTIONS | {"maps"}, "vae": {"chunk", "lean", "xla"}, "run": _UNET_OPTIONS | {"pairs"},
                "encode": {"pairs", "xla"}}
# Without autotuning, XLA's Triton matmul emitter finds no tiling for some of the UNet's shapes: send every matmul
# to cuBLAS, which is what the H200's autotuner picked for all of the UNet's large matmuls (bench/NOTES.md).
DEVICELESS_FLAGS = "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"


# --------------------------------------------------------------------------------------------------
# Reading optimized HLO: kernels and the bytes they move. Pure text processing, testable anywhere.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
# Ops that run as kernels of their own when they appear outside a fused computation.
_KERNEL_OPS = {"fusion", "custom-call", "convolution", "dot", "copy", "transpose", "reduce", "concatenate",
               "dynamic-update-slice", "scatter", "sort", "gather"}
# Elementwise ops (and free reshapes) through which a parameter reaches a slice element by element: a fusion that
# slices their result computes, and reads, only the sliced elements.
_PASS_THROUGH = {"bitcast", "convert", "reshape", "copy", "negate", "abs", "add", "subtract", "multiply", "divide",
                 "maximum", "minimum", "exponential", "log", "tanh", "logistic", "sqrt", "rsqrt", "select", "compare",
                 "and", "or", "not", "power", "clamp"}
MEMORY_BOUND_KINDS = ("kLoop", "kInput", "kCustom")


def array_elements(shape: str) -> int:
    """Elements of the first array in an HLO shape string (`bf16[2,3]{1,0}` → 6)."""
    match = _ARRAY.search(shape)
    return 0 if match is None else _product(match.group(2))


def shape_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape string (a tuple counts each element)."""
    return sum(_product(dims) * _DTYPE_BYTES[dtype] for dtype, dims in _ARRAY.findall(shape))


def _product(dims: str) -> int:
    n = 1
    for d in dims.split(","):
        n *= int(d) if d else 1
    return n


def computations(hlo: str) -> dict[str, list[tuple]]:
    """Instructions of each computation, its root last: (name, shape, op, operand names, attributes, raw operand
    text)."""
    found: dict[str, list[tuple]] = {}
    root_of: dict[int, tuple] = {}
    current = None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            current = found.setdefault(header.group(1), [])
            continue
        if line.startswith("}"):
            current = None
            continue
        match = current is not None and _INSTRUCTION.match(line)
        if match:
            name, shape, op, operands, attributes = match.groups()
            current.append((name, shape, op, re.findall(r"%([\w.\-]+)", operands), attributes, operands))
            if line.lstrip().startswith("ROOT "):
                root_of[id(current)] = current[-1]
    for body in found.values():  # the root goes last
        root = root_of.get(id(body))
        if root is not None:
            body.remove(root)
            body.append(root)
    return found


def parameter_reads(body: list[tuple]) -> dict[int, int]:
    """Bytes a fused computation reads of each of its parameters, by parameter number. A parameter that reaches
    only slices (through bitcasts, converts and elementwise ops) is read only where sliced: a GEGLU's two halves
    read all of it, a GroupNorm shift one image row per group."""
    users = collections.defaultdict(list)
    parameters = {}
    for name, shape, op, operands, _, raw in body:
        if op == "parameter":
            parameters[name] = (int(raw.strip() or 0), shape)
        for operand in operands:
            users[operand].append((name, op, shape))

    def elements_read(name: str, total: int) -> int:
        count = 0
        for user, op, shape in users.get(name, []):
            if op in ("slice", "dynamic-slice"):
                count += array_elements(shape)
            elif op in _PASS_THROUGH:
                count += elements_read(user, total)
            else:
                return total
        return min(count, total) if users.get(name) else total

    in_place = {target for target, _ in _updates_in_place(body)}
    reads = {}
    for name, (number, shape) in parameters.items():
        total = array_elements(shape)
        reads[number] = 0 if name in in_place else shape_bytes(shape) * elements_read(name, total) // max(total, 1)
    return reads


def _updates_in_place(body: list[tuple]) -> list[tuple[str, str]]:
    """(buffer parameter, update shape) of each dynamic-update-slice among a fusion's outputs: XLA writes the
    update into the buffer in place (`lax.map` / `fori_loop` outputs, scan carries), touching only its slice."""
    by_name = {entry[0]: entry for entry in body}

    def through_bitcasts(name: str) -> str:
        while name in by_name and by_name[name][2] == "bitcast":
            name = by_name[name][3][0]
        return name

    root = body[-1] if body else None
    outputs = root[3] if root and root[2] == "tuple" else [root[0]] if root else []
    found = []
    for output in map(through_bitcasts, outputs):
        if by_name.get(output, (None, None, None))[2] != "dynamic-update-slice":
            continue
        buffer, update = through_bitcasts(by_name[output][3][0]), by_name[output][3][1]
        if by_name.get(buffer, (None, None, None))[2] == "parameter":
            found.append((buffer, by_name[update][1]))
    return found


def fusion_writes(body: list[tuple], shape: str) -> int:
    """Bytes a fusion of output `shape` writes: an output updated in place writes only its update."""
    by_name = {entry[0]: entry for entry in body}
    written = shape_bytes(shape)
    for buffer, update in _updates_in_place(body):
        written += shape_bytes(update) - shape_bytes(by_name[buffer][1])
    return written


def executions(hlo: str, comps: dict[str, list[tuple]]) -> dict[str, int]:
    """How many times each non-fused computation runs per execution of the module: a while loop's body runs its
    known trip count (XLA annotates `lax.scan` / `fori_loop` / `lax.map` loops) times its caller's count; a called
    computation and every branch of a conditional run as often as their caller (an upper bound for branches)."""
    entry = re.search(r"^ENTRY %([\w.\-]+)", hlo, re.M)
    counts: dict[str, int] = {}
    pending = [(entry.group(1), 1)] if entry else []
    while pending:
        name, count = pending.pop()
        counts[name] = counts.get(name, 0) + count
        for _, _, op, _, attributes, _ in comps.get(name, []):
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attributes)
                body = re.search(r"body=%([\w.\-]+)", attributes)
                if body:
                    pending.append((body.group(1), count * (int(trips.group(1)) if trips else 1)))
            elif op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|true_computation|false_computation)=%([\w.\-]+)", attributes):
                    pending.append((callee, count))
                branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
                for callee in re.findall(r"%([\w.\-]+)", branches.group(1) if branches else ""):
                    pending.append((callee, count))
    return counts


def kernels(hlo: str) -> list[dict]:
    """The kernels of an optimized HLO module: every fusion, library call and unfused op of the computations that
    run (the entry, loop bodies, called computations, branches), with its class (`kind` of a fusion, target of a
    custom call), bytes read and written per launch, and launches per execution of the module (`runs`)."""
    comps = computations(hlo)
    shapes = {name: shape for body in comps.values() for name, shape, *_ in body}
    runs = executions(hlo, comps)
    found = []
    for computation, count in runs.items():
        for name, shape, op, operands, attributes, _ in comps.get(computation, []):
            if op not in _KERNEL_OPS:
                continue
            kind = re.search(r"kind=(\w+)", attributes)
            target = re.search(r'custom_call_target="([^"]+)"', attributes)
            callee = re.search(r"calls=%([\w.\-]+)", attributes)
            body = comps.get(callee.group(1), []) if callee else []
            written = shape_bytes(shape)
            if op == "fusion" and body:
                reads = parameter_reads(body)
                read = sum(reads.get(i, shape_bytes(shapes.get(o, ""))) for i, o in enumerate(operands))
                written = fusion_writes(body, shape)
            else:
                read = sum(shape_bytes(shapes.get(o, "")) for o in operands)
            kind_name = kind.group(1) if kind else ""
            found.append({"name": name, "op": op, "kind": kind_name or (target.group(1) if target else ""),
                          "read": read, "written": written, "shape": shape.split("{")[0], "runs": count,
                          "class": kernel_class(op, kind_name, target.group(1) if target else "",
                                                any(o == "dot" for _, _, o, *_ in body))})
    return found


def kernel_class(op: str, kind: str, target: str, fuses_matmul: bool) -> str:
    """matmul, convolution, attention, pallas (Triton kernels of jax.experimental.pallas), memory-bound (XLA's own
    loop/reduction/normalization fusions) or other."""
    if op == "custom-call":
        if "triton" in target:
            return "pallas"
        if "matmul" in target or "gemm" in target:
            return "matmul"
        if "conv" in target.lower():
            return "convolution"
        if "fmha" in target or "sdpa" in target.lower():
            return "attention"
        return "other"
    if op in ("dot",) or (op == "fusion" and kind == "kCustom" and fuses_matmul):
        return "matmul"
    if op == "convolution":
        return "convolution"
    if op == "fusion" and kind in MEMORY_BOUND_KINDS:
        return "memory-bound"
    return "other"


def summarize(found: list[dict]) -> dict:
    """Launches and bytes moved (read + written) per kernel class, per execution of the module."""
    by_class: dict[str, dict] = {}
    for k in found:
        entry = by_class.setdefault(k["class"], {"kernels": 0, "bytes": 0})
        entry["kernels"] += k["runs"]
        entry["bytes"] += (k["read"] + k["written"]) * k["runs"]
    return dict(sorted(by_class.items()))


# --------------------------------------------------------------------------------------------------
# Calibration: a device trace joined with its optimized HLO.


def calibrate(hlo_path: str, trace_path: str) -> dict:
    """Time, bytes and rate of the memory-bound kernels of a `perf.py profile` trace and its HLO."""
    hlo = gzip.open(hlo_path, "rt").read()
    by_name = {k["name"].replace(".", "_").replace("-", "_"): k for k in kernels(hlo)}
    trace = json.load(gzip.open(trace_path))
    gpus = {e["pid"] for e in trace["traceEvents"]
            if e.get("ph") == "M" and e.get("name") == "process_name" and "/device:GPU" in e["args"]["name"]}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("pid") in gpus]
    classes: dict[str, dict] = {}
    for event in events:
        k = by_name.get(event["name"])
        entry = classes.setdefault(k["class"] if k else "unmatched (library kernels)",
                                   {"ms": 0.0, "bytes": 0, "kernels": 0})
        entry["ms"] += event["dur"] / 1e3
        entry["kernels"] += 1
        entry["bytes"] += (k["read"] + k["written"]) if k else 0
    for entry in classes.values():
        entry["TB_per_s"] = entry["bytes"] / entry["ms"] / 1e9 if entry["ms"] and entry["bytes"] else None
    return {"hlo": hlo_path, "trace": trace_path, "by_class": classes}



# --------------------------------------------------------------------------------------------------
# Cases, compiled for the target GPU.


def parse_case(text: str) -> tuple[str, str, dict[str, str]]:
    head, _, tail = text.partition(":")
    kind, _, target = head.partition("/")
    options = dict(item.split("=", 1) for item in tail.split(",") if item) if tail else {}
    valid = {"unet": ("b1", "b2"), "vae": ("decode",), "encode": ("keyframes",), "run": METHOD_NAMES}
    if kind not in valid or target not in valid[kind]:
        raise SystemExit(f"unknown case {text!r}: unet/b1, unet/b2, vae/decode, encode/keyframes or run/METHOD "
                         f"(METHOD one of {METHOD_NAMES})")
    unknown = set(options) - CASE_OPTIONS[kind]
    if unknown:
        raise SystemExit(f"case {text!r}: unknown option(s) {sorted(unknown)}; {kind} takes "
                         f"{sorted(CASE_OPTIONS[kind])}")
    return kind, target, options


def target_device(target: str):
    """The one device of a deviceless topology of the target GPU."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc("jinbetween-plan", "cuda", target_config=TARGETS[target].read_text(),
                                                topology="1x1x1")
    except NotImplementedError as error:
        raise SystemExit("compiling for a GPU needs JAX's CUDA plugin: pip install \"jax[cuda12]\" in a virtual "
                         f"environment of its own (see this script's docstring); JAX said: {error}") from error
    return topology.devices[0]


def abstract_state(module, dtype, sharding):
    """(graphdef, state of ShapeDtypeStructs in `dtype` on `sharding`) of an NNX module built abstractly."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sharding), state)


def compile_case(case: str, args) -> dict:
    import jax
    import jax.numpy as jnp

    from bench import perf
    from jinbetween import hardware
    from jinbetween.conditioning import Conditioning
    from jinbetween.models import abstract_unet, abstract_vae
    from jinbetween.models.state import ModelState

    kind, target, options = parse_case(case)
    device = target_device(args.target)
    # The programs are compiled for the target, so kernels resolve as on it (cuDNN attention on Ampere or newer).
    # This runs in a process of its own (`run_child`), which ends after this one case.
    hardware.modern_gpu = lambda: True
    hardware.gpu_compute_capability = lambda: (9, 0)  # both targets are Hopper GPUs
    sharding = jax.sharding.SingleDeviceSharding(device)
    dtype = jnp.bfloat16

    def spec(shape, dt=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

    # The UNet switches as bench/perf.py sets them; XLA flags were set by `run_child`, before JAX started.
    sizes = perf.Sizes(argparse.Namespace(tiny=False, frames=args.frames, height=args.height, width=args.width))
    perf.apply_options(sizes, {k: v for k, v in options.items() if k != "xla"})
    unet_cfg, vae_cfg, encoder_cfg = sizes.unet, sizes.vae, sizes.encoder
    h, w = sizes.latent
    if kind == "unet":
        batch = int(target.removeprefix("b"))
        graphdef, state = abstract_state(abstract_unet(unet_cfg), dtype, sharding)
        inputs = (spec((batch, args.frames, h, w, unet_cfg.in_channels)), spec((batch,)),
                  spec((batch, 1, unet_cfg.cross_attention_dim[0])), spec((batch, 3)))
        fn, maps = perf.unet_forward(graphdef, state, inputs, options.get("maps"))
        maps = jax.tree.map(lambda s: spec(s.shape, s.dtype), maps)
        lowered = jax.jit(fn).lower(state, *inputs, *maps)
    elif kind == "vae":
        from jinbetween.models.vae import _decode_video

        lean = options.get("lean", "1") != "0"
        graphdef, state = abstract_state(abstract_vae(vae_cfg.replace(lean_decode=lean)), dtype, sharding)
        chunk = int(options.get("chunk", args.frames))
        latents = spec((args.frames, h, w, vae_cfg.latent_channels))
        lowered = jax.jit(lambda s, z: _decode_video(graphdef, s, z, chunk)).lower(state, latents)
    elif kind == "encode":
        from jinbetween.models import abstract_image_encoder
        from jinbetween.pipeline import _encode

        keyframes = 2 * int(options.get("pairs", 1))
        size = encoder_cfg.image_size
        vae = ModelState(*abstract_state(abstract_vae(vae_cfg), dtype, sharding))
        encoder = ModelState(*abstract_state(abstract_image_encoder(encoder_cfg), dtype, sharding))
        keys = jax.ShapeDtypeStruct((keyframes,), jax.random.key(0).dtype, sharding=sharding)
        lowered = _encode.lower(vae, encoder, spec((keyframes, args.height, args.width, 3)),
                                spec((keyframes, size, size, 3)), keys, None, spec((3,)))
    else:
        from jinbetween.models.delta import delta_shapes
        from jinbetween.pipeline import _method_config
        from jinbetween.samplers import METHODS, I2VConfig, sample_i2v

        pairs = int(options.get("pairs", 1))
        unet = ModelState(*abstract_state(abstract_unet(unet_cfg), dtype, sharding))
        cond = Conditioning(image_embeds=spec((pairs, 1, unet_cfg.cross_attention_dim[0])),
                            image_latent=spec((pairs, h, w, vae_cfg.latent_channels)),
                            clean_latent=spec((pairs, h, w, vae_cfg.latent_channels)),
                            added_time_ids=spec((pairs, 3)))
        keys = jax.ShapeDtypeStruct((pairs,), jax.random.key(0).dtype, sharding=sharding)
        if target == "i2v":
            lowered = sample_i2v.lower(unet, cond, keys, I2VConfig(num_frames=args.frames, num_steps=args.steps or 25))
        else:
            method = METHODS[target]
            cfg = _method_config(method, num_frames=args.frames, num_steps=args.steps)
            delta = {k: spec(s) for k, s in delta_shapes(unet_cfg).items()} if method.uses_delta else None
            lowered = method.sample.lower(unet, cond, cond, keys, cfg, delta=delta)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    plan = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes, "aliased": memory.alias_size_in_bytes}
    plan["peak"] = plan["arguments"] + plan["outputs"] + plan["temporaries"] - plan["aliased"]
    hlo = compiled.as_text()
    if args.hlo_dir:
        Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
        name = case.replace("/", "_").replace(":", "_").replace(",", "_").replace("=", "-")
        (Path(args.hlo_dir) / f"{name}.hlo.txt.gz").write_bytes(gzip.compress(hlo.encode()))
    return {"case": case, "target": args.target, "compile_s_here": compile_s, "memory_bytes": plan,
            "kernels": summarize(kernels(hlo)), "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def run_child(case: str, args) -> dict:
    """Compiles one case in a process of its own (its XLA flags, and no memory kept from other cases)."""
    from bench.perf import XLA_PRESETS

    options = parse_case(case)[2]
    flags = DEVICELESS_FLAGS + (" " + XLA_PRESETS[options["xla"]] if "xla" in options else "")
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
           "JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "case", case, "--target", args.target, "--frames", str(args.frames),
           "--height", str(args.height), "--width", str(args.width)]
    cmd += ["--steps", str(args.steps)] if args.steps else []
    cmd += ["--hlo-dir", args.hlo_dir] if args.hlo_dir else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    return {"case": case, "error": (done.stderr or done.stdout)[-3000:], "returncode": done.returncode}


def table(report: dict) -> str:
    """Markdown: per case, the planned peak (and its parts), the kernel launches and the bytes the memory-bound
    kernels move, per execution of the program."""
    lines = ["| case | peak GB (arguments + temporaries) | kernel launches | memory-bound GB moved | compile s here |",
             "|---|---|---|---|---|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| `{r['case']}` | error | | | |")
            continue
        memory, kinds = r["memory_bytes"], r["kernels"]
        launches = sum(k["kernels"] for k in kinds.values())
        moved = kinds.get("memory-bound", {}).get("bytes", 0)
        lines.append(f"| `{r['case']}` | {memory['peak'] / 1e9:.2f} ({memory['arguments'] / 1e9:.2f} + "
                     f"{memory['temporaries'] / 1e9:.2f}) | {launches} | {moved / 1e9:.1f} | "
                     f"{r['compile_s_here']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["plan", "case", "calibrate", "table"])
    parser.add_argument("case", nargs="?", help="(internal) the case a child process compiles; table: the JSON")
    parser.add_argument("--cases", default="unet/b1,unet/b2,vae/decode,run/i2v,run/gi")
    parser.add_argument("--target", default="h200", choices=sorted(TARGETS))
    parser.add_argument("--frames", type=int, default=25)
    parser.add_argument("--height", type=int, default=576)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, help="override the methods' step counts")
    parser.add_argument("--out", help="JSON report (plan, calibrate)")
    parser.add_argument("--hlo-dir", help="also write each case's optimized HLO here")
    parser.add_argument("--hlo", help="calibrate: the optimized HLO of a profiled program (.hlo.txt.gz)")
    parser.add_argument("--trace", help="calibrate: its device trace (.trace.json.gz)")
    args = parser.parse_args()
    from bench import perf

    if args.command == "case":
        print(json.dumps(compile_case(args.case, args)))
        return
    if args.command == "table":
        print(table(json.loads(Path(args.case).read_text())))
        return
    if args.command == "calibrate":
        if not (args.hlo and args.trace):
            raise SystemExit("calibrate needs --hlo and --trace (bench/perf.py profile --trace-dir writes both)")
        report = calibrate(args.hlo, args.trace)
    else:
        for case in perf.split_cases(args.cases):
            parse_case(case)
        report = {"what": "bench/gpu_plan.py plan (deviceless compile)", "target": args.target,
                  "frames": args.frames, "image": [args.height, args.width], "steps_override": args.steps,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "results": []}
        for case in perf.split_cases(args.cases):
            began = time.monotonic()
            result = run_child(case, args)
            result["wall_s"] = time.monotonic() - began
            report["results"].append(result)
            print(json.dumps(result)[:600], flush=True)
            _write(report, args.out)  # after every case, so a run cut short keeps what it finished
        return
    _write(report, args.out)
    print(json.dumps(report, indent=2))


def _write(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
