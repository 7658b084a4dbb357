"""`jinbetween` command line: `jinbetween convert ...` (more sub-commands follow the samplers)."""

from __future__ import annotations

import argparse
import logging
import sys

from jinbetween.errors import JinbetweenError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jinbetween", description="Generative inbetweening with SVD in JAX.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert diffusers SVD weights into a jinbetween weights dir",
                                  description="Convert a diffusers SVD / SVD-XT snapshot (hub repo or local folder) "
                                              "into orbax checkpoints with a manifest.")
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert)
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
