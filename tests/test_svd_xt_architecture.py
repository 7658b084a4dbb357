"""The full SVD-XT UNet, built abstractly (no weights allocated), against diffusers' state dict key for key."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jinbetween import config
from jinbetween.conversion import flat_params, torch_key, torch_shape
from jinbetween.models import abstract_unet, temporal_attention_layers

KEYS_FILE = Path(__file__).parent / "data" / "svd_xt_unet_keys.txt"  # dumped from diffusers 0.42.1 on the meta device


def reference_keys() -> dict[str, tuple[int, ...]]:
    keys = {}
    with open(KEYS_FILE) as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            name, shape = line.rstrip("\n").split("\t")
            keys[name] = tuple(int(s) for s in shape.strip("[]").split(", ") if s)
    return keys


@pytest.fixture(scope="module")
def svd_xt_torch_shapes() -> dict[str, tuple[int, ...]]:
    params = flat_params(abstract_unet(config.svd_xt()))
    return {torch_key(path): torch_shape(tuple(v.shape), str(path[-1])) for path, v in params.items()}


def test_svd_xt_matches_reference_key_dump(svd_xt_torch_shapes):
    reference = reference_keys()
    missing = sorted(set(reference) - set(svd_xt_torch_shapes))
    unexpected = sorted(set(svd_xt_torch_shapes) - set(reference))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (svd_xt_torch_shapes[k], reference[k]) for k in reference if svd_xt_torch_shapes[k] != reference[k]}
    assert not wrong, f"shape mismatches (ours, diffusers): {dict(list(wrong.items())[:10])}"
    assert len(svd_xt_torch_shapes) == 1428
    assert sum(int(np.prod(s)) for s in svd_xt_torch_shapes.values()) == 1_524_623_082


def test_svd_xt_matches_diffusers_meta_model(svd_xt_torch_shapes):
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        reference = UNetSpatioTemporalConditionModel()
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == svd_xt_torch_shapes


def test_svd_xt_has_sixteen_temporal_self_attention_layers():
    layers = temporal_attention_layers(config.svd_xt())
    assert len(layers) == 16
    assert layers[0] == "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1"
    assert layers[6] == "mid_block.attentions.0.temporal_transformer_blocks.0.attn1"
    assert layers[-1] == "up_blocks.3.attentions.2.temporal_transformer_blocks.0.attn1"
