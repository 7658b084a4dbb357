#!/usr/bin/env python
"""Convert diffusers SVD / SVD-XT weights into orbax checkpoints under weights/ (same as `jinbetween convert`).

    python convert_weights.py --repo stabilityai/stable-video-diffusion-img2vid-xt --variant fp16 --out weights/svd-xt

GI's fine-tuned backward UNet, stored as a delta on the 14-frame SVD it was fine-tuned from (only the base's
unet/ is downloaded), alone or beside the SVD-XT pipeline it is later added to:

    python convert_weights.py --gi-unet checkpoints/svd_reverse_motion_with_attnflip/unet \\
        --gi-base stabilityai/stable-video-diffusion-img2vid --out weights/svd-xt
    python convert_weights.py --repo stabilityai/stable-video-diffusion-img2vid-xt --variant fp16 \\
        --gi-unet checkpoints/svd_reverse_motion_with_attnflip/unet \\
        --gi-base stabilityai/stable-video-diffusion-img2vid --out weights/gi
"""

import argparse
import sys

from jinbetween.cli import add_convert_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_arguments(parser)
    parser.parse_args()  # --help with this script's name; `main` checks the arguments before converting
    sys.exit(main(["convert", *sys.argv[1:]]))
