"""`jinbetween` command line: `convert` weights, `i2v` (image to video); more commands follow the samplers."""

from __future__ import annotations

import argparse
import logging
import sys

from jinbetween.errors import JinbetweenError
from jinbetween.video import RESIZE_MODES

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--repo", help="Hugging Face repo id, e.g. stabilityai/stable-video-diffusion-img2vid-xt")
    source.add_argument("--local-dir", help="a local diffusers SVD pipeline folder, or a lone unet/ folder "
                                            "(e.g. GI's fine-tuned UNet)")
    parser.add_argument("--revision", help="git revision of --repo (branch, tag or commit)")
    parser.add_argument("--variant", help="weights variant, e.g. fp16 (reads diffusion_pytorch_model.fp16.safetensors)")
    parser.add_argument("--out", required=True, help="output dir, e.g. weights/svd-xt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="storage dtype of the converted parameters (default float32: exact for fp16 sources)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pickled .bin weights (can execute code: only for trusted sources)")


def run_convert(args: argparse.Namespace) -> None:
    from jinbetween import conversion

    if args.repo:
        folder = conversion.download_pipeline(args.repo, revision=args.revision, variant=args.variant,
                                              allow_pickle=args.allow_pickle)
        source_name = f"hf://{args.repo}" + (f"@{args.revision}" if args.revision else "")
    else:
        folder, source_name = args.local_dir, None
    out = conversion.convert_pipeline(folder, args.out, variant=args.variant, dtype=DTYPES[args.dtype],
                                      allow_pickle=args.allow_pickle, source_name=source_name)
    print(f"converted {source_name or folder} -> {out}")


def add_i2v_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="the first frame (PNG, JPEG, ...)")
    parser.add_argument("--weights", required=True, help="converted weights dir or diffusers SVD pipeline folder")
    parser.add_argument("--out", default="out.mp4", help="output video, .mp4 or .gif (default out.mp4)")
    parser.add_argument("--sheet", help="also write a PNG contact sheet of the frames here")
    parser.add_argument("--height", type=int, help="video height, a multiple of 64 (default 576, or 1024 portrait)")
    parser.add_argument("--width", type=int, help="video width, a multiple of 64 (default 1024, or 576 portrait)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="how to fit the image to height×width (default crop)")
    parser.add_argument("--num-frames", type=int, help="frames to generate (default: the model's, 25 for SVD-XT)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    parser.add_argument("--fps", type=float, default=7, help="frame rate, conditions the motion and the output (7)")
    parser.add_argument("--motion-bucket-id", type=float, default=127, help="more motion when higher (default 127)")
    parser.add_argument("--noise-aug-strength", type=float, default=0.02, help="keyframe noise level (0.02)")
    parser.add_argument("--min-guidance", type=float, default=1.0, help="guidance at the first frame (1.0)")
    parser.add_argument("--max-guidance", type=float, default=3.0, help="guidance at the last frame (3.0)")
    parser.add_argument("--decode-chunk-size", type=int, help="frames decoded at once (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                        help="parameter dtype (auto: bfloat16 on GPU, float32 on CPU)")


def run_i2v(args: argparse.Namespace) -> None:
    import jax

    from jinbetween import video
    from jinbetween.pipeline import Pipeline

    image = video.read_keyframe(args.image)
    pipe = Pipeline.from_pretrained(args.weights, dtype=None if args.dtype == "auto" else DTYPES[args.dtype])
    height, width = pipe.default_size if image.shape[1] >= image.shape[0] else pipe.default_size[::-1]
    height, width = args.height or height, args.width or width
    video.check_size(height, width, pipe.size_multiple)
    frames = pipe.image_to_video(
        video.fit_image(image, height, width, args.resize), key=jax.random.key(args.seed),
        num_frames=args.num_frames, num_inference_steps=args.steps, fps=args.fps,
        motion_bucket_id=args.motion_bucket_id, noise_aug_strength=args.noise_aug_strength,
        min_guidance_scale=args.min_guidance, max_guidance_scale=args.max_guidance,
        decode_chunk_size=args.decode_chunk_size, progress=True)
    print(f"wrote {video.write_video(frames, args.out, fps=args.fps)} ({len(frames)} frames, {height}×{width})")
    if args.sheet:
        print(f"wrote {video.contact_sheet([frames], args.sheet)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jinbetween", description="Generative inbetweening with SVD in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert diffusers SVD weights into a jinbetween weights dir",
                                  description="Convert a diffusers SVD / SVD-XT snapshot (hub repo or local folder) "
                                              "into orbax checkpoints with a manifest.")
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert)
    i2v = commands.add_parser("i2v", help="generate a video that starts at an image (plain SVD)",
                              description="Image to video with Stable Video Diffusion: EDM Euler sampling with "
                                          "per-frame classifier-free guidance, as diffusers' pipeline.")
    add_i2v_arguments(i2v)
    i2v.set_defaults(run=run_i2v)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        args.run(args)
    except JinbetweenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
