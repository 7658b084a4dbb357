#!/usr/bin/env python
"""Convert diffusers SVD / SVD-XT weights into orbax checkpoints under weights/ (same as `jinbetween convert`).

    python convert_weights.py --repo stabilityai/stable-video-diffusion-img2vid-xt --variant fp16 --out weights/svd-xt
    python convert_weights.py --local-dir path/to/svd_reverse_motion_with_attnflip/unet --out weights/gi-unet
"""

import argparse
import sys

from jinbetween.cli import add_convert_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(parser)
    parser.parse_args()  # --help and argument errors here, with this script's name
    sys.exit(main(["convert", *sys.argv[1:]]))
