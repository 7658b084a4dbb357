"""The full-size SVD models, built abstractly (no weights allocated), against the reference state dicts key for key."""

from pathlib import Path

import numpy as np
import pytest
import torch

from jinbetween import config
from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae, temporal_attention_layers
from jinbetween.models.naming import flat_params, torch_key, torch_shape

DATA = Path(__file__).parent / "data"  # key dumps of diffusers 0.42.1 / transformers 5.23.0 models on the meta device


def reference_keys(name: str = "svd_xt_unet_keys.txt") -> dict[str, tuple[int, ...]]:
    """Returns {torch key: shape} from a key dump in tests/data."""
    keys = {}
    with open(DATA / name) as fh:
        for line in fh:
            if line.startswith("#"):
                continue
            name, shape = line.rstrip("\n").split("\t")
            keys[name] = tuple(int(s) for s in shape.strip("[]").split(", ") if s)
    return keys


def torch_shapes(abstract_module) -> dict[str, tuple[int, ...]]:
    """Returns {torch key: torch shape} of an abstract NNX module, as our converter maps it."""
    return {torch_key(path): torch_shape(tuple(v.shape), str(path[-1]))
            for path, v in flat_params(abstract_module).items()}


def assert_same_keys(ours: dict, reference: dict) -> None:
    missing = sorted(set(reference) - set(ours))
    unexpected = sorted(set(ours) - set(reference))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    wrong = {k: (ours[k], reference[k]) for k in reference if ours[k] != reference[k]}
    assert not wrong, f"shape mismatches (ours, reference): {dict(list(wrong.items())[:10])}"


@pytest.fixture(scope="module")
def svd_xt_torch_shapes() -> dict[str, tuple[int, ...]]:
    return torch_shapes(abstract_unet(config.svd_xt()))


def test_svd_xt_matches_reference_key_dump(svd_xt_torch_shapes):
    assert_same_keys(svd_xt_torch_shapes, reference_keys("svd_xt_unet_keys.txt"))
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


def test_svd_vae_matches_reference_key_dump_and_diffusers():
    from diffusers import AutoencoderKLTemporalDecoder

    ours = torch_shapes(abstract_vae(config.svd_vae()))
    assert_same_keys(ours, reference_keys("svd_xt_vae_keys.txt"))
    assert len(ours) == 374 and sum(int(np.prod(s)) for s in ours.values()) == 97_742_847
    with torch.device("meta"):
        reference = AutoencoderKLTemporalDecoder(**{k: v for k, v in config.svd_vae().to_diffusers().items()
                                                    if not k.startswith("_")})
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == ours


def test_svd_image_encoder_matches_reference_key_dump_and_transformers():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    ours = torch_shapes(abstract_image_encoder(config.svd_image_encoder()))
    assert_same_keys(ours, reference_keys("clip_vision_keys.txt"))
    assert len(ours) == 520 and sum(int(np.prod(s)) for s in ours.values()) == 632_076_800
    with torch.device("meta"):
        reference = CLIPVisionModelWithProjection(CLIPVisionConfig(**config.svd_image_encoder().to_transformers()))
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == ours
