"""`jinbetween` command line: `convert` weights, `interpolate` between two keyframes, `batch` (many pairs over
every local device), `i2v` (image to video), `finetune` a GI backward delta on your videos, `verify` a weights dir,
`demo` and `toybench` on the toy world, `toytrain` the toy-world model.

Every command checks all of its arguments (its `check_*_arguments`) before it loads a model or writes anything: a bad
one is a one-line `error: …` on stderr and exit status 2, as are the library's own errors (`JinbetweenError`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

from jinbetween import atomic, checks
from jinbetween.checks import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from jinbetween.errors import ArgumentError, ConfigError, JinbetweenError
from jinbetween.video import RESIZE_MODES

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line that points to `--help` (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`.\n")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--repo", help="Hugging Face repo id, e.g. stabilityai/stable-video-diffusion-img2vid-xt")
    source.add_argument("--local-dir", help="a local diffusers SVD pipeline folder, or a lone model folder such as "
                                            "unet/")
    parser.add_argument("--revision", help="git revision of --repo (branch, tag or commit)")
    parser.add_argument("--variant", help="weights variant, e.g. fp16 (reads diffusion_pytorch_model.fp16.safetensors)")
    parser.add_argument("--out", required=True, help="output dir, e.g. weights/svd-xt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="storage dtype of the converted parameters (default float32: exact for fp16 sources; "
                             "the GI delta is always float32)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled .bin weights (can execute code: only for trusted sources)")
    gi = parser.add_argument_group("GI backward model", "GI's fine-tuned UNet as a delta on its base: OUT/gi_backward")
    gi.add_argument("--gi-unet", metavar="PATH",
                    help="GI's fine-tuned diffusers unet/ folder (or the folder holding it), e.g. "
                         "checkpoints/svd_reverse_motion_with_attnflip/unet; alone, or with --repo/--local-dir to "
                         "write the pipeline and the delta into the same --out")
    gi.add_argument("--gi-base", metavar="REPO_OR_PATH",
                    help="the UNet --gi-unet was fine-tuned from: a Hugging Face repo id (only its unet/ is "
                         "downloaded) or a local SVD pipeline or unet/ folder; for GI's release "
                         "stabilityai/stable-video-diffusion-img2vid (the 14-frame SVD, not SVD-XT)")
    gi.add_argument("--gi-variant", help="weights variant of --gi-unet (default: the plain safetensors file)")
    gi.add_argument("--gi-base-variant", help="weights variant of --gi-base, e.g. fp16")
    gi.add_argument("--gi-atol", type=float, default=0.0,
                    help="largest difference allowed between the untrained tensors of --gi-unet and --gi-base "
                         "(default 0: they must be equal)")


def check_convert_arguments(args: argparse.Namespace) -> None:
    """Raises ArgumentError unless `args` name something to convert, existing sources and a usable --out."""
    from jinbetween import weights

    if args.gi_unet and not args.gi_base:
        raise ArgumentError("--gi-unet needs --gi-base: pass the UNet it was fine-tuned from (for GI's release: "
                            "--gi-base stabilityai/stable-video-diffusion-img2vid)")
    if args.gi_base and not args.gi_unet:
        raise ArgumentError("--gi-base is the base of --gi-unet; pass --gi-unet too")
    if not (args.repo or args.local_dir or args.gi_unet):
        raise ArgumentError("nothing to convert: pass --repo or --local-dir (an SVD pipeline), --gi-unet with "
                            "--gi-base (GI's backward model as a delta), or both")
    for name, repo in (("--repo", args.repo), ("--gi-base", args.gi_base)):
        if repo and not Path(repo).exists() and not _is_repo_id(repo):
            checks.refuse(name, repo, "is neither an existing folder nor a Hugging Face repo id (OWNER/NAME)",
                          "check the path, or pass a repo id like stabilityai/stable-video-diffusion-img2vid")
    if args.local_dir:
        checks.input_path(args.local_dir, "--local-dir", "the diffusers folder", folder=True)
    if args.gi_unet:
        checks.input_path(args.gi_unet, "--gi-unet", "the fine-tuned UNet folder", folder=True)
    checks.number(args.gi_atol, "--gi-atol", "the tolerance", minimum=0, example=0)
    checks.output_dir(args.out, "--out")
    try:
        weights.check_out_dir(args.out)
    except ConfigError as err:
        raise ArgumentError(str(err)) from err


def _is_repo_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def run_convert(args: argparse.Namespace) -> None:
    from jinbetween import weights

    if args.repo or args.local_dir:
        if args.repo:
            folder = weights.download_pipeline(args.repo, revision=args.revision, variant=args.variant,
                                                  allow_pickle=args.allow_pickle)
            source_name = f"hf://{args.repo}" + (f"@{args.revision}" if args.revision else "")
        else:
            folder, source_name = args.local_dir, None
        out = weights.convert_pipeline(folder, args.out, variant=args.variant, dtype=DTYPES[args.dtype],
                                          allow_pickle=args.allow_pickle, source_name=source_name)
        print(f"converted {source_name or folder} -> {out}")
    if args.gi_unet:
        if Path(args.gi_base).exists():
            base, base_name = args.gi_base, None
        else:  # not a local folder: a hub repo id
            base = weights.download_unet(args.gi_base, variant=args.gi_base_variant, allow_pickle=args.allow_pickle)
            base_name = f"hf://{args.gi_base}"
        delta = weights.convert_gi_delta(args.gi_unet, base, args.out, variant=args.gi_variant,
                                            base_variant=args.gi_base_variant, allow_pickle=args.allow_pickle,
                                            atol=args.gi_atol, base_name=base_name)
        print(f"converted {args.gi_unet} as a delta on {base_name or base} -> {delta}")


def add_video_arguments(parser: argparse.ArgumentParser, *, out: bool = True) -> None:
    """Options shared by the generating commands (weights, output, size, conditioning, seed, dtype)."""
    parser.add_argument("--weights", help="converted weights dir or diffusers SVD pipeline folder (default: the "
                                           "shipped toy-world model, which models the toy world only)")
    if out:
        parser.add_argument("--out", default="out.mp4", help="output video, .mp4 or .gif (default out.mp4)")
    parser.add_argument("--height", type=int, help="video height, a multiple of 64 (default 576, or 1024 portrait)")
    parser.add_argument("--width", type=int, help="video width, a multiple of 64 (default 1024, or 576 portrait)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="how to fit the keyframes to height×width (default crop)")
    parser.add_argument("--motion-bucket-id", type=float, default=127, help="more motion when higher (default 127)")
    parser.add_argument("--noise-aug-strength", type=float, default=0.02, help="keyframe noise level (0.02)")
    parser.add_argument("--decode-chunk-size", type=int, help="frames decoded at once (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="parameter dtype (auto: bfloat16 on GPU, float32 on CPU)")
    add_verify_argument(parser)


PRECISIONS = ("full", "fp8")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", choices=PRECISIONS, default="full",
                        help="full (default): every product in the parameter dtype; fp8: the UNet's large matmuls and "
                             "convolutions in FP8 on a Hopper GPU, scaled by a short calibration run on the first "
                             "keyframes (README, 'FP8')")


def check_precision(args: argparse.Namespace) -> None:
    from jinbetween import hardware

    if args.precision == "fp8" and not hardware.hopper_gpu():
        import jax

        capability = hardware.gpu_compute_capability()
        here = (f"a GPU of compute capability {'.'.join(map(str, capability)) if capability else 'unknown'}"
                if jax.default_backend() == "gpu" else f"the {jax.default_backend()} backend")
        raise ConfigError(f"--precision fp8 needs an NVIDIA GPU of compute capability 9.0 or newer (H100, H200) for "
                          f"its FP8 tensor cores; this is {here}: use --precision full.")


def with_precision(pipe, args: argparse.Namespace, start, end, settings: dict):
    """Returns `pipe`, or with `--precision fp8` the pipeline with an FP8 UNet calibrated on `start`→`end` with the
    generation's own `interpolate` settings (its own short step count; no decoding or progress)."""
    if args.precision != "fp8":
        return pipe
    calibration = {k: v for k, v in settings.items()
                   if k not in ("num_inference_steps", "decode_chunk_size", "progress", "durations", "seam")}
    logging.getLogger(__name__).info("calibrating FP8 scales on a 4-step %s run", calibration.get("method", "vibid"))
    return pipe.with_fp8_unet(start, end, **calibration)


def add_verify_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="load the weights without checking their files against the sha256 recorded beside "
                             "them (faster on a first load; later loads use cached hashes anyway)")


def check_video_arguments(args: argparse.Namespace, keyframe: str, *, min_frames: int) -> None:
    """Raises ArgumentError (or the weights' and keyframe's own errors) unless the options shared by the
    generating commands are usable: weights that exist, a video size they accept, settings in range."""
    from jinbetween import video
    from jinbetween.pipeline import MAX_FPS, MIN_FPS, weights_info

    checks.seed(args.seed)
    if args.num_frames is not None:
        checks.integer(args.num_frames, "--num-frames", "the frame count" + (
            ", keyframes included," if min_frames > 2 else ""), minimum=min_frames, example=max(min_frames, 14))
    if args.steps is not None:
        checks.integer(args.steps, "--steps", "the denoising steps", minimum=1, example=25)
    if args.fps is not None:
        checks.number(args.fps, "--fps", "the frame rate", minimum=MIN_FPS, maximum=MAX_FPS, example=7)
    checks.number(args.motion_bucket_id, "--motion-bucket-id", "the motion bucket", minimum=0, example=127)
    checks.number(args.noise_aug_strength, "--noise-aug-strength", "the keyframe noise level", minimum=0,
                  example=0.02)
    if args.decode_chunk_size is not None:
        checks.integer(args.decode_chunk_size, "--decode-chunk-size", "the frames decoded at once", minimum=1,
                       example=8)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None:
            checks.integer(value, f"--{name}", f"the video {name}", minimum=1,
                           example=576 if name == "height" else 1024)
    info = weights_info(args.weights)
    video.check_size(*video_size(args, info, video.read_keyframe(keyframe)), info.size_multiple)


def video_size(args: argparse.Namespace, info, first_frame) -> tuple[int, int]:
    """Returns (height, width): --height/--width, else the weights' default size (turned portrait for a portrait
    keyframe)."""
    height, width = info.default_size if first_frame.shape[1] >= first_frame.shape[0] else info.default_size[::-1]
    return args.height or height, args.width or width


def check_method_arguments(args: argparse.Namespace) -> None:
    """Raises unless the --set options, --backward-delta and (for GI) a backward model are usable."""
    from jinbetween.pipeline import check_method_options, weights_info
    from jinbetween.weights.delta import BACKWARD_DELTA

    options = parse_options(args.options)
    check_method_options(args.method, options)
    if args.backward_delta:
        checks.input_path(args.backward_delta, "--backward-delta", "the backward delta", folder=True)
        if not (Path(args.backward_delta) / "delta.json").is_file():
            checks.refuse("--backward-delta", args.backward_delta, "holds no delta.json, so it is not a backward "
                          "delta", f"pass a fine-tune's RUN/{BACKWARD_DELTA} or a converted dir's {BACKWARD_DELTA}")
    elif (args.method == "gi" and not args.allow_untrained_backward
          and not weights_info(args.weights).has_backward_delta):
        raise ArgumentError("GI needs its backward model, and the weights have no gi_backward/: pass --backward-delta "
                            "PATH (from `jinbetween finetune` or `jinbetween convert --gi-unet`), another --method, "
                            "or --allow-untrained-backward for the paper's ablation without fine-tuning.")


def weights_or_default(weights: str | None) -> str | None:
    """Returns `weights`; None (the shipped toy-world model, see `Pipeline.from_pretrained`) is said in the log."""
    if not weights:
        logging.getLogger(__name__).info("no --weights: using the shipped toy-world model (it models the toy world "
                                         "only; see weights/README.md for SVD)")
    return weights or None


def add_bench_arguments(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    from jinbetween.toyworld.bench import METHODS

    parser.add_argument("--weights", help="a pipeline trained on the toy world (default: the shipped one)")
    parser.add_argument("--backward-delta", help="GI backward delta to use instead of the pipeline's own")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run beside the cross-fade baseline (default: all)")
    parser.add_argument("--steps", type=int, default=10 if demo else None,
                        help="denoising steps of every method (default: " +
                             ("10, for a CPU run in minutes)" if demo else "each method's own)"))
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--method-fps", action="store_true",
                        help="condition each method on its own default fps (MPD: 9, MR-CATR: 11) instead of the toy "
                             "world's 7, the only one the toy model was trained on")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="parameter dtype (auto: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE",
                        help="a config field given to every chosen method, e.g. --set max_guidance_scale=2.0 for an "
                             "ablation (each method must have it); repeatable")
    add_precision_argument(parser)
    if demo:
        parser.add_argument("--out-dir", default="demo", help="where the videos, sheets and metrics go (demo/)")
        parser.add_argument("--pairs", type=int, default=1, help="held-out keyframe pairs (default 1)")
    else:
        parser.add_argument("--pairs", type=int, default=50, help="held-out keyframe pairs (default 50)")
        parser.add_argument("--batch-size", type=int, default=25,
                            help="pairs generated at once (default 25: 50 pairs in two equal batches, one compile)")
        parser.add_argument("--out", help="also write the record as JSON here")


def check_bench_arguments(args: argparse.Namespace) -> None:
    """Checks the options of `demo` and `toybench` (see `add_bench_arguments`)."""
    from jinbetween.pipeline import check_method_options, weights_info
    from jinbetween.toyworld.world import SPLITS

    if args.steps is not None:
        checks.integer(args.steps, "--steps", "the denoising steps", minimum=1, example=10)
    checks.seed(args.seed)
    checks.integer(args.pairs, "--pairs", "the held-out pairs", minimum=1, maximum=len(SPLITS["test"]), example=1)
    if args.command == "demo":
        checks.output_dir(args.out_dir, "--out-dir")
    else:
        checks.integer(args.batch_size, "--batch-size", "the pairs generated at once", minimum=1, example=25)
        if args.out:
            checks.output_file(args.out, "--out", (".json",), "the benchmark record")
    options = parse_options(args.options)
    for method in args.methods:
        check_method_options(method, options)
    weights_info(args.weights)
    if args.backward_delta:
        checks.input_path(Path(args.backward_delta) / "delta.json", "--backward-delta", "the backward delta's "
                          "delta.json", folder=False)
    check_precision(args)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a converted weights dir (manifest.json), a release such as the toy-world "
                                    "model (release.json) or a backward delta (delta.json)")


def check_verify_arguments(args: argparse.Namespace) -> None:
    checks.input_path(args.dir, "dir", "the folder to verify", folder=True)


def run_verify(args: argparse.Namespace) -> None:
    from jinbetween import integrity

    count = integrity.verify_folder(args.dir)
    print(f"{args.dir}: all {count} files match their recorded sha256")


def _bench_pipeline(args: argparse.Namespace):
    import jax

    from jinbetween.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(weights_or_default(args.weights),
                                    dtype=None if args.dtype == "auto" else DTYPES[args.dtype])
    if args.backward_delta:
        pipe.load_backward_delta(args.backward_delta)
    if args.precision == "fp8":  # calibrated on a validation clip, never on the benchmark's test pairs
        from jinbetween.toyworld import world

        clip = world.video(world.split_seeds("validation", 1)[0])
        pipe = with_precision(pipe, args, clip[0], clip[-1], dict(method="vibid", fps=7, key=jax.random.key(0)))
    return pipe


def run_demo(args: argparse.Namespace) -> None:
    from jinbetween.toyworld import bench

    record = bench.demo(_bench_pipeline(args), args.out_dir, pairs=args.pairs, methods=args.methods,
                        num_steps=args.steps, seed=args.seed, method_fps=args.method_fps,
                        options=parse_options(args.options))
    print(bench.markdown_table(record["scores"]))
    print(f"\nDifference to the cross-fade, pair by pair:\n\n{bench.difference_table(record['versus_crossfade'])}")
    print(f"wrote the videos, contact sheet(s) and metrics.md to {args.out_dir}/")


def run_toybench(args: argparse.Namespace) -> None:
    from jinbetween.toyworld import bench

    def save(record: dict) -> None:
        if args.out:
            atomic.write_json(args.out, record)

    record = bench.toybench(_bench_pipeline(args), args.pairs, args.methods, seed=args.seed, num_steps=args.steps,
                            batch_size=args.batch_size, method_fps=args.method_fps,
                            options=parse_options(args.options), on_update=save)
    print(bench.markdown_table(record["scores"]))
    print(f"\nDifference to the cross-fade, pair by pair:\n\n{bench.difference_table(record['versus_crossfade'])}")
    if args.out:
        print(f"wrote {args.out}")


def load_and_size(args: argparse.Namespace, first_frame):
    """Returns (Pipeline, height, width): the weights in the chosen dtype and the checked video size
    (default: the pipeline's, turned portrait for a portrait keyframe)."""
    from jinbetween import video
    from jinbetween.pipeline import Pipeline, weights_info

    height, width = video_size(args, weights_info(args.weights), first_frame)
    pipe = Pipeline.from_pretrained(weights_or_default(args.weights),
                                    dtype=None if args.dtype == "auto" else DTYPES[args.dtype], verify=args.verify)
    video.check_size(height, width, pipe.size_multiple)
    return pipe, height, width


def add_i2v_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="the first frame (PNG, JPEG, ...)")
    add_video_arguments(parser)
    parser.add_argument("--sheet", help="also write a PNG contact sheet of the frames here")
    parser.add_argument("--num-frames", type=int, help="frames to generate (default: the model's, 25 for SVD-XT)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--fps", type=float, default=7, help="frame rate, conditions the motion and the output (7)")
    parser.add_argument("--min-guidance", type=float, default=1.0, help="guidance at the first frame (1.0)")
    parser.add_argument("--max-guidance", type=float, default=3.0, help="guidance at the last frame (3.0)")


def check_i2v_arguments(args: argparse.Namespace) -> None:
    checks.output_file(args.out, "--out", VIDEO_SUFFIXES, "the video")
    if args.sheet:
        checks.output_file(args.sheet, "--sheet", IMAGE_SUFFIXES, "the contact sheet")
        _distinct(args.out, args.sheet)
    checks.number(args.min_guidance, "--min-guidance", "a guidance scale", example=1.0)
    checks.number(args.max_guidance, "--max-guidance", "a guidance scale", example=3.0)
    check_video_arguments(args, args.image, min_frames=2)


def _distinct(out: str, sheet: str) -> None:
    if Path(out).absolute() == Path(sheet).absolute():
        checks.refuse("--sheet", sheet, "is also --out", "give the contact sheet its own file name")


def run_i2v(args: argparse.Namespace) -> None:
    import jax

    from jinbetween import video

    image = video.read_keyframe(args.image)
    pipe, height, width = load_and_size(args, image)
    frames = pipe.image_to_video(
        video.fit_image(image, height, width, args.resize), key=jax.random.key(args.seed),
        num_frames=args.num_frames, num_inference_steps=args.steps, fps=args.fps,
        motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
        min_guidance_scale=args.min_guidance, max_guidance_scale=args.max_guidance,
        decode_chunk_size=args.decode_chunk_size, progress=True)
    print(f"wrote {video.write_video(frames, args.out, fps=args.fps)} ({len(frames)} frames, {height}×{width})")
    if args.sheet:
        print(f"wrote {video.frame_grid(frames, args.sheet)}")


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    from jinbetween.sequence import SEAMS

    parser.add_argument("keyframes", nargs="+", metavar="KEYFRAME",
                        help="two keyframes (PNG, JPEG, ...), or more: one video through all of them, one segment of "
                             "--num-frames per gap, generated as one batch")
    add_video_arguments(parser)
    parser.add_argument("--sheet", help="PNG contact sheet of the frames, a grid with each frame's index (default: "
                                        "beside --out, *_sheet.png)")
    add_method_arguments(parser)
    add_precision_argument(parser)
    timing = parser.add_argument_group("timing of a sequence", "--num-frames sets the frames of every segment "
                                       "(keyframes included); --durations retimes each gap instead")
    timing.add_argument("--durations", nargs="+", type=float, metavar="SECONDS",
                        help="one duration per keyframe gap, shown as round(SECONDS × fps) frames kept evenly from "
                             "the gap's segment: at most --num-frames − 1 per gap (the model makes no more)")
    timing.add_argument("--seam", choices=SEAMS, default="shared",
                        help="how consecutive segments are joined (default shared: each segment as sampled, sharing "
                             "its boundary keyframe; smoothed: the boundary latents averaged and smoothed, see "
                             "README, 'Videos through many keyframes')")


def check_interpolate_arguments(args: argparse.Namespace) -> None:
    from jinbetween import sequence, video
    from jinbetween.pipeline import weights_info
    from jinbetween.samplers import METHODS

    checks.output_file(args.out, "--out", VIDEO_SUFFIXES, "the video")
    if args.sheet:
        checks.output_file(args.sheet, "--sheet", IMAGE_SUFFIXES, "the contact sheet")
        _distinct(args.out, args.sheet)
    check_method_arguments(args)
    sequence.check_keyframe_count(len(args.keyframes), "KEYFRAME")
    for keyframe in args.keyframes[1:]:
        video.read_keyframe(keyframe)
    check_video_arguments(args, args.keyframes[0], min_frames=3)
    check_precision(args)
    if args.durations is not None:
        info = weights_info(args.weights)
        sequence.gap_frames(args.durations, args.fps or METHODS[args.method].fps, args.num_frames or info.num_frames,
                            len(args.keyframes) - 1, "--durations")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the inbetweening methods (`interpolate` and `batch`)."""
    from jinbetween.samplers import METHODS

    parser.add_argument("--method", choices=sorted(METHODS), default="gi",
                        help="gi: Generative Inbetweening (needs a backward delta); trf: Time Reversal Fusion; "
                             "mpd / mpd-seq: Motion Prior Distillation on the TRF-like / ViBiD base; vibid: "
                             "ViBiDSampler; mr-catr: ViBiD with MR-CATR's conflict-aware backward update (default gi)")
    parser.add_argument("--num-frames", type=int, help="frames to generate, keyframes included (default: the "
                                                       "model's, 25 for SVD-XT)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the method's, 50 for GI and TRF, 25 for "
                                                  "MPD, ViBiD and MR-CATR)")
    parser.add_argument("--fps", type=float, help="frame rate the model is conditioned on and the video is written "
                                                  "at (default: the method's, 7, or 9 for MPD, 11 for MR-CATR)")
    parser.add_argument("--backward-delta", metavar="PATH",
                        help="GI backward delta to use (default: WEIGHTS/gi_backward when it exists)")
    parser.add_argument("--allow-untrained-backward", action="store_true",
                        help="run GI without a backward delta (the paper's 'w/o fine-tuning' ablation)")
    parser.add_argument("--set", dest="options", action="append", default=[], metavar="NAME=VALUE",
                        help="a field of the method's config, e.g. --set noise_injection_steps=0 (GI) or "
                             "--set faithful=true (TRF); repeatable")


def parse_options(pairs: list[str]) -> dict[str, object]:
    """{name: value} from NAME=VALUE strings; values are Python literals (true/false/none accepted), else text."""
    import ast

    options: dict[str, object] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ConfigError(f"--set {pair!r}: write NAME=VALUE, e.g. --set noise_injection_steps=0.")
        text = {"true": "True", "false": "False", "none": "None"}.get(text.lower(), text)
        try:
            options[name.strip()] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[name.strip()] = text
    return options


def run_interpolate(args: argparse.Namespace) -> None:
    import jax

    from jinbetween import video
    from jinbetween.samplers import METHODS

    options = parse_options(args.options)
    keyframes = [video.read_keyframe(path) for path in args.keyframes]
    pipe, height, width = load_and_size(args, keyframes[0])
    if args.backward_delta:
        pipe.load_backward_delta(args.backward_delta, verify=args.verify)
    fps = args.fps or METHODS[args.method].fps
    fitted = [video.fit_image(keyframe, height, width, args.resize) for keyframe in keyframes]
    settings = dict(method=args.method, key=jax.random.key(args.seed), num_frames=args.num_frames,
                    durations=args.durations, seam=args.seam, num_inference_steps=args.steps, fps=fps,
                    motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
                    decode_chunk_size=args.decode_chunk_size, progress=True,
                    allow_untrained_backward=args.allow_untrained_backward, **options)
    pipe = with_precision(pipe, args, fitted[0], fitted[1], settings)
    frames = pipe.interpolate_sequence(fitted, **settings)
    out = video.write_video(frames, args.out, fps=fps)
    sheet = video.frame_grid(frames, args.sheet or Path(out).with_name(Path(out).stem + "_sheet.png"))
    print(f"wrote {out} ({args.method}, {len(keyframes)} keyframes, {len(frames)} frames, {height}×{width}) and "
          f"{sheet}")


PAIR_FIELDS = ("start", "end", "keyframes", "out", "seed")


@dataclasses.dataclass(frozen=True)
class PairLine:
    """One video of a `batch` file: its line number, keyframe paths (two: a pair; more: a sequence), output path
    (relative to --out-dir), seed."""

    line: int
    keyframes: tuple[Path, ...]
    out: Path
    seed: int | None = None

    @property
    def start(self) -> Path:
        return self.keyframes[0]

    @property
    def end(self) -> Path:
        return self.keyframes[-1]


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pairs", help='JSON Lines file, one video per line: {"start": "a.png", "end": "b.png", '
                                      '"out": "ab.mp4", "seed": 3}, or {"keyframes": ["a.png", "b.png", "c.png"]} '
                                      'for one video through several keyframes (as `interpolate` with them); paths '
                                      'relative to the file\'s folder, "out" (relative to --out-dir, .mp4 or .gif) '
                                      'and "seed" optional')
    parser.add_argument("--out-dir", required=True, help="folder for the videos and summary.json")
    parser.add_argument("--format", choices=["mp4", "gif"], default="mp4",
                        help="video format of lines without an \"out\" (default mp4)")
    add_video_arguments(parser, out=False)
    add_method_arguments(parser)
    add_precision_argument(parser)
    parser.add_argument("--batch-size", type=int,
                        help="pairs generated at once, split evenly over the devices: a multiple of the device count "
                             "(default: one per device; more for small models)")
    parser.add_argument("--devices", type=int, help="use the first N local devices (default: all)")
    hosts = parser.add_argument_group(
        "several hosts", "Run the same command on every host: each process joins the run (jax.distributed), "
                         "generates its own contiguous block of the pairs on its own devices and writes those videos "
                         "and summary.process<i>.json. A pair's random draws do not depend on the process count.")
    hosts.add_argument("--distributed", action="store_true",
                       help="join a run that JAX detects (SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS with the "
                            "flags below)")
    hosts.add_argument("--coordinator-address", metavar="HOST:PORT", help="address of process 0 and a free port")
    hosts.add_argument("--num-processes", type=int, help="number of processes of the run")
    hosts.add_argument("--process-id", type=int, help="this process's index, 0 to num-processes − 1")


def check_batch_arguments(args: argparse.Namespace) -> None:
    checks.output_dir(args.out_dir, "--out-dir")
    if args.batch_size is not None:
        checks.integer(args.batch_size, "--batch-size", "the pairs generated at once", minimum=1, example=8)
    if args.devices is not None:
        checks.integer(args.devices, "--devices", "the device count", minimum=1, example=1)
    if args.num_processes is not None:
        checks.integer(args.num_processes, "--num-processes", "the process count", minimum=1, example=2)
    if args.process_id is not None:
        checks.integer(args.process_id, "--process-id", "the process index", minimum=0,
                       maximum=None if args.num_processes is None else args.num_processes - 1, example=0)
    check_method_arguments(args)
    pairs = read_pairs(args.pairs, args.format)
    check_video_arguments(args, str(pairs[0].start), min_frames=3)
    check_precision(args)


def read_pairs(path: str | Path, video_format: str = "mp4") -> list[PairLine]:
    """Returns the pairs of a `batch` JSON Lines file, every line checked (fields, keyframe files, output names);
    raises ConfigError listing each bad line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Pairs file {path} does not exist; check the path.")
    problems: list[str] = []
    pairs: list[PairLine] = []
    outs: dict[str, int] = {}  # output name -> line number
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"line {number}: not JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(entry, dict):
            problems.append(f"line {number}: a JSON {type(entry).__name__}, not an object")
            continue
        line_problems = _pair_problems(entry, path.parent, outs)
        if line_problems:
            problems.extend(f"line {number}: {problem}" for problem in line_problems)
            continue
        keyframes = tuple(path.parent / name for name in _line_keyframes(entry))
        out = entry.get("out") or f"{len(pairs):04d}_{keyframes[0].stem}_{keyframes[-1].stem}.{video_format}"
        if out in outs:
            problems.append(f'line {number}: its video would be {out!r}, as line {outs[out]}\'s; give it an "out"')
            continue
        outs[out] = number
        pairs.append(PairLine(number, keyframes, Path(out), entry.get("seed")))
    example = ('write each line as a JSON object like {"start": "a.png", "end": "b.png", "out": "ab.mp4", "seed": 3} '
               'or {"keyframes": ["a.png", "b.png", "c.png"]} ("out" and "seed" optional), keyframe paths relative '
               'to the file\'s folder.')
    if len(problems) == 1:
        raise ConfigError(f"{path} {problems[0]}; {example}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise ConfigError(f"{path} has {len(problems)} problems:\n  {shown}\n{example[0].upper()}{example[1:]}")
    if not pairs:
        raise ConfigError(f"{path} holds no pairs; write one JSON object per line.")
    return pairs


def _pair_problems(entry: dict, folder: Path, outs: dict[str, int]) -> list[str]:
    """Returns what is wrong with one line of a pairs file (nothing for a good line)."""
    from PIL import Image, UnidentifiedImageError

    problems = []
    unknown = sorted(set(entry) - set(PAIR_FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {unknown} (the fields are {', '.join(PAIR_FIELDS)})")
    if "keyframes" in entry:
        names = entry["keyframes"]
        if "start" in entry or "end" in entry:
            problems.append('both "keyframes" and "start"/"end"; give one or the other')
        if not isinstance(names, list) or len(names) < 2:
            problems.append('"keyframes" is not a list of two or more keyframe paths')
            names = []
        fields = [(f"keyframe {i}", name) for i, name in enumerate(names)]
    else:
        fields = [(field, entry.get(field)) for field in ("start", "end")]
    for field, name in fields:
        if not isinstance(name, str) or not name:
            problems.append(f'no "{field}" keyframe path')
        elif not (folder / name).is_file():
            problems.append(f"{field} keyframe {name} not found ({(folder / name).resolve()})")
        else:
            try:
                with Image.open(folder / name):
                    pass
            except (UnidentifiedImageError, OSError) as err:
                problems.append(f"{field} keyframe {name} is not a readable image ({err})")
    seed = entry.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        problems.append(f'"seed" {seed!r} is not a non-negative integer')
    out = entry.get("out")
    if out is not None:
        if not isinstance(out, str) or Path(out).suffix.lower() not in VIDEO_SUFFIXES:
            problems.append(f'"out" {out!r} is not a .mp4 or .gif file name')
        elif Path(out).is_absolute() or ".." in Path(out).parts:
            problems.append(f'"out" {out!r} leaves --out-dir; give a path inside it')
        elif out in outs:
            problems.append(f'"out" {out!r} is also line {outs[out]}\'s')
    return problems


def _line_keyframes(entry: dict) -> list[str]:
    """Returns the keyframe paths of a checked `batch` line: its "keyframes", or its "start" and "end"."""
    return entry["keyframes"] if "keyframes" in entry else [entry["start"], entry["end"]]


def join_processes(args: argparse.Namespace) -> tuple[int, int]:
    """Returns (process index, process count): (0, 1) unless the multi-host flags ask to join a run."""
    from jinbetween import distributed

    flags = (args.coordinator_address, args.num_processes, args.process_id)
    if not args.distributed and all(flag is None for flag in flags):
        return 0, 1
    return distributed.initialize(*flags)


def run_batch(args: argparse.Namespace) -> None:
    import itertools
    import time

    import jax

    from jinbetween import distributed, video
    from jinbetween.samplers import METHODS

    options = parse_options(args.options)
    pairs = read_pairs(args.pairs, args.format)
    process, processes = join_processes(args)
    share = distributed.process_share(len(pairs), process, processes)
    mine = pairs[share.start:share.stop]
    if not mine:
        print(f"process {process} of {processes}: no pairs left for this process ({len(pairs)} in all)")
        return
    devices = jax.local_devices()
    if args.devices is not None and not 1 <= args.devices <= len(devices):
        raise ConfigError(f"--devices {args.devices}: this process has {len(devices)} device(s).")
    mesh = distributed.local_mesh(devices[:args.devices])
    if args.batch_size is not None and args.batch_size % mesh.size:
        raise ArgumentError(f"--batch-size {args.batch_size} does not split over {mesh.size} devices; pass a multiple "
                            f"of {mesh.size}, or fewer --devices.")
    pipe, height, width = load_and_size(args, video.read_keyframe(mine[0].start))
    if args.backward_delta:
        pipe.load_backward_delta(args.backward_delta, verify=args.verify)
    fps = args.fps or METHODS[args.method].fps

    settings = dict(method=args.method, num_frames=args.num_frames, num_inference_steps=args.steps, fps=fps,
                    motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
                    decode_chunk_size=args.decode_chunk_size, progress=True,
                    allow_untrained_backward=args.allow_untrained_backward, **options)

    def fitted(line: PairLine) -> list:
        return [video.fit_image(video.read_keyframe(p), height, width, args.resize) for p in line.keyframes]

    first = fitted(mine[0])
    pipe = with_precision(pipe, args, first[0], first[1], {**settings, "key": jax.random.key(args.seed)})

    def videos():
        """Each line's video in file order, the line at index i keyed `fold_in(key, i)` or by its own seed: each run
        of consecutive pairs in batches over the devices, a sequence (more than two keyframes) as one batch of its
        segments."""
        base = jax.random.key(args.seed)
        lines = list(zip(share, mine))
        for is_pair, run in itertools.groupby(lines, key=lambda item: len(item[1].keyframes) == 2):
            run = list(run)
            if is_pair:
                yield from pipe.interpolate_batch(
                    ((*fitted(line), *(() if line.seed is None else (jax.random.key(line.seed),))) for _, line in run),
                    key=base, batch_size=args.batch_size, mesh=mesh, first_index=run[0][0], **settings)
            else:
                for index, line in run:
                    key = jax.random.key(line.seed) if line.seed is not None else jax.random.fold_in(base, index)
                    yield pipe.interpolate_sequence(fitted(line), key=key, mesh=mesh, **settings)

    out_dir = Path(args.out_dir)
    began, records = time.perf_counter(), []
    for index, pair, frames in zip(share, mine, videos()):
        written = video.write_video(frames, out_dir / pair.out, fps=fps)
        records.append({"line": pair.line, "start": str(pair.start), "end": str(pair.end),
                        **({"keyframes": [str(p) for p in pair.keyframes]} if len(pair.keyframes) > 2 else {}),
                        "out": str(written), "frames": len(frames),
                        **({"seed": pair.seed} if pair.seed is not None else {"seed": args.seed, "index": index})})
    seconds = time.perf_counter() - began
    summary = {"pairs_file": str(args.pairs), "method": args.method, "steps": args.steps, "fps": fps,
               "size": [height, width], "options": options, "batch_size": args.batch_size or mesh.size,
               "devices": [str(d) for d in mesh.devices.flat], "process": process, "processes": processes,
               "seconds": seconds, "pairs_per_second": len(records) / seconds, "videos": records}
    summary_path = out_dir / ("summary.json" if processes == 1 else f"summary.process{process}.json")
    atomic.write_json(summary_path, summary)
    print(f"wrote {len(records)} videos ({args.method}, {height}×{width}) to {out_dir}/ in {seconds:.1f} s "
          f"({len(records) / seconds:.2f} pairs/s on {mesh.size} device(s)) and {summary_path}")


def add_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="the base model: converted weights dir or diffusers SVD "
                                                         "pipeline folder (GI trained on the 14-frame SVD)")
    parser.add_argument("--videos", required=True, help="folder of videos (mp4, webm, gif, …) and/or frame folders")
    parser.add_argument("--out", required=True, help="run dir: checkpoints/, loss.jsonl, loss.png, gi_backward/")
    parser.add_argument("--steps", type=int, required=True, help="total optimizer steps of the run")
    parser.add_argument("--frames", type=int, default=14, help="frames per clip (default 14, as GI)")
    parser.add_argument("--stride", type=int, default=2, help="take every STRIDE-th source frame (default 2, as GI)")
    parser.add_argument("--height", type=int, default=576, help="clip height, a multiple of 64 (default 576)")
    parser.add_argument("--width", type=int, default=1024, help="clip width, a multiple of 64 (default 1024)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop", help="how frames are fitted (crop)")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per step (default 1, as GI)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every K steps (default 500)")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip order and the noise (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--attention", choices=["auto", "xla", "cudnn"], default="auto",
                        help="the UNet's spatial attention kernel (auto: cuDNN on a GPU in bf16; xla where cuDNN has "
                             "no backward pass for the sequence length, e.g. small models)")
    parser.add_argument("--remat", choices=["none", "high_res", "all"], default="none",
                        help="UNet blocks that recompute their activations in the backward pass (default none). "
                             "Measured for SVD, 14×576×1024, batch 1, H200: none 43.4 GB, 0.37 s/step; high_res "
                             "(the full-resolution blocks) 37.8 GB, 0.43 s; all 18.9 GB, 0.48 s")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="dtype of the frozen model (auto: bfloat16 on GPU, float32 on CPU); the trained "
                             "delta is always float32")
    add_verify_argument(parser)


def _finetune_configs(args: argparse.Namespace):
    """Returns the (RunConfig, TrainConfig) of the command's options (checked as they are made)."""
    from jinbetween import finetune

    run = finetune.RunConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                             save_every=args.save_every, keep=args.keep)
    return run, finetune.TrainConfig(learning_rate=args.lr, remat=args.remat)


def check_finetune_arguments(args: argparse.Namespace) -> None:
    from jinbetween import finetune, video
    from jinbetween.pipeline import weights_info

    checks.integer(args.steps, "--steps", "the optimizer steps", minimum=1, example=1000)
    checks.integer(args.frames, "--frames", "the frames per clip", minimum=2, example=14)
    checks.integer(args.stride, "--stride", "the source-frame stride", minimum=1, example=2)
    checks.integer(args.batch_size, "--batch-size", "the clips per step", minimum=1, example=1)
    checks.number(args.lr, "--lr", "the learning rate", above=0, example=1e-4)
    checks.integer(args.save_every, "--save-every", "the checkpoint interval", minimum=1, example=500)
    checks.integer(args.keep, "--keep", "the checkpoints kept", minimum=1, example=3)
    checks.seed(args.seed)
    checks.integer(args.height, "--height", "the clip height", minimum=1, example=576)
    checks.integer(args.width, "--width", "the clip width", minimum=1, example=1024)
    checks.input_path(args.videos, "--videos", "the video folder", folder=True)
    checks.output_dir(args.out, "--out")
    finetune.check_run_dir(args.out, args.resume)
    _finetune_configs(args)
    video.check_size(args.height, args.width, weights_info(args.weights).size_multiple)


def run_finetune(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from jinbetween import data, finetune
    from jinbetween.pipeline import Pipeline

    spec = data.ClipSpec(num_frames=args.frames, stride=args.stride, height=args.height, width=args.width,
                         resize=args.resize)
    dataset = data.VideoDataset.scan(args.videos, spec)
    print(f"{len(dataset.sources)} videos usable, {len(dataset.skipped)} skipped")
    run, train = _finetune_configs(args)
    pipe = Pipeline.from_pretrained(args.weights, dtype=None if args.dtype == "auto" else DTYPES[args.dtype],
                                    verify=args.verify, attention_impl=args.attention)
    with tqdm(total=args.steps, desc="fine-tune", unit="step") as bar:
        def on_step(step: int, metrics: dict) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{metrics['loss']:.4g}", refresh=True)

        delta = finetune.finetune(pipe, dataset, args.out, run, train, resume=args.resume, base_name=args.weights,
                                  on_step=on_step)
    out = Path(args.out)
    print(f"wrote {delta} (use: jinbetween interpolate … --method gi --backward-delta {delta}), "
          f"{out / finetune.LOG_FILE} and {out / finetune.LOSS_PLOT}")


def check_toytrain_arguments(args: argparse.Namespace) -> None:
    """Raises ArgumentError unless a training command is named (its own parser checks the rest)."""
    if not args.arguments:
        raise ArgumentError("toytrain needs a command: vae, unet, release, evaluate, ... (`jinbetween toytrain "
                            "--help` lists them).")


def run_toytrain(args: argparse.Namespace) -> None:
    from jinbetween.toyworld import train

    train.main(args.arguments)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="jinbetween", description="Generative inbetweening with SVD in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--compile-cache", metavar="DIR|off",
                        help="folder of compiled programs kept between runs, or off (default: "
                             "$JINBETWEEN_COMPILE_CACHE, else JAX_COMPILATION_CACHE_DIR, else ~/.cache/jinbetween/xla)")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert diffusers SVD weights into a jinbetween weights dir",
                                  description="Convert a diffusers SVD / SVD-XT snapshot (hub repo or local folder) "
                                              "into orbax checkpoints with a manifest.")
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert, check=check_convert_arguments)
    interpolate = commands.add_parser(
        "interpolate", help="generate the video between two keyframes, or through several (GI, TRF, MPD, ViBiD, MR-CATR)",
        description="Generative inbetweening: the frames between two keyframes with SVD and the chosen method; with "
                    "K keyframes, one video through all of them from K − 1 segments generated as one batch.")
    add_interpolate_arguments(interpolate)
    interpolate.set_defaults(run=run_interpolate, check=check_interpolate_arguments)
    batch = commands.add_parser(
        "batch", help="interpolate many keyframe pairs listed in a JSON Lines file, over every local device",
        description="Generates the video of every pair in PAIRS (one JSON object per line) with the chosen method, "
                    "in batches split over the local devices (one jitted program per batch, parameters "
                    "replicated), and writes each video and summary.json to --out-dir. Every line is checked "
                    "before the model loads. A pair's random draws do not depend on the number of devices "
                    "(videos are bit-identical on CPU).")
    add_batch_arguments(batch)
    batch.set_defaults(run=run_batch, check=check_batch_arguments)
    i2v = commands.add_parser("i2v", help="generate a video that starts at an image (plain SVD)",
                              description="Image to video with Stable Video Diffusion: EDM Euler sampling with "
                                          "per-frame classifier-free guidance, as diffusers' pipeline.")
    add_i2v_arguments(i2v)
    i2v.set_defaults(run=run_i2v, check=check_i2v_arguments)
    tune = commands.add_parser(
        "finetune", help="train a GI backward-motion delta on a folder of videos",
        description="GI's backward-motion fine-tune (Algorithm 1): trains the temporal attn1 W_v/W_o of the base "
                    "model on reversed clips, fed the frozen forward pass's 180°-rotated attention maps; "
                    "resumable; writes a delta that `interpolate --method gi` uses.")
    add_finetune_arguments(tune)
    tune.set_defaults(run=run_finetune, check=check_finetune_arguments)
    demo = commands.add_parser(
        "demo", help="interpolate held-out toy-world pairs with every method (CPU, minutes)",
        description="Runs every method on held-out keyframe pairs of the toy world with the shipped model and writes "
                    "the videos, a contact sheet (ground truth, cross-fade, each method) and a metrics table.")
    add_bench_arguments(demo, demo=True)
    demo.set_defaults(run=run_demo, check=check_bench_arguments)
    toybench = commands.add_parser(
        "toybench", help="score every method against toy-world ground truth (PSNR, SSIM, motion)",
        description="The ground-truth benchmark: N held-out toy-world pairs, each method's in-between frames "
                    "against the true frames and sprite paths, beside a linear cross-fade.")
    add_bench_arguments(toybench, demo=False)
    toybench.set_defaults(run=run_toybench, check=check_bench_arguments)
    verify = commands.add_parser(
        "verify", help="check a weights dir's files against the sha256 hashes recorded in it",
        description="Re-hashes every file of a converted weights dir (manifest.json), a release (release.json) or a "
                    "backward delta (delta.json) and compares them with the recorded sha256: exit status 0 if all "
                    "match, 2 naming the changed, missing or unexpected files otherwise.")
    add_verify_arguments(verify)
    verify.set_defaults(run=run_verify, check=check_verify_arguments)
    toytrain = commands.add_parser(
        "toytrain", help="train the toy-world model, its GI delta and its release (a GPU's work)", add_help=False,
        prefix_chars="+",  # every argument, options included, belongs to the training command
        description="The toy world's training commands (jinbetween.toyworld.train); `jinbetween toytrain --help` "
                    "lists them.")
    toytrain.add_argument("arguments", nargs=argparse.REMAINDER, help="a training command and its arguments")
    toytrain.set_defaults(run=run_toytrain, check=check_toytrain_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns the exit status: 0 done, 2 a bad argument or another error the user can act on
    (one `error:` line on stderr, nothing written), 130 interrupted."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error, already printed on one line (2)
        return exit_.code if isinstance(exit_.code, int) else 2
    from jinbetween import logs

    logs.configure(logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.check(args)
        if args.command not in ("convert", "verify", "toytrain"):  # nothing worth keeping, or a cache of its own
            from jinbetween import compile_cache

            folder = compile_cache.enable(args.compile_cache)
            logging.getLogger(__name__).debug("compilation cache: %s", folder or "off")
        args.run(args)
    except JinbetweenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; outputs are written whole or not at all, so run the command again (fine-tunes: "
              "with --resume).", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
