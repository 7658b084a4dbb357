"""UNetConfig: presets, diffusers round trip, and clear errors for what jinbetween does not implement."""

import dataclasses

import pytest

from jinbetween import config
from jinbetween.errors import ConfigError

# unet/config.json of stabilityai/stable-video-diffusion-img2vid-xt (as published; svd_port.md §1.2).
SVD_XT_JSON = {
    "_class_name": "UNetSpatioTemporalConditionModel", "_diffusers_version": "0.24.0.dev0",
    "addition_time_embed_dim": 256, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                         "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"],
    "in_channels": 8, "layers_per_block": 2, "num_attention_heads": [5, 10, 20, 20], "num_frames": 25,
    "out_channels": 4, "projection_class_embeddings_input_dim": 768, "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                       "CrossAttnUpBlockSpatioTemporal"],
}


def test_svd_xt_json_gives_the_svd_xt_preset():
    assert config.UNetConfig.from_diffusers(SVD_XT_JSON) == config.svd_xt()
    assert config.UNetConfig.from_diffusers({**SVD_XT_JSON, "num_frames": 14}) == config.svd()


@pytest.mark.parametrize("preset", [config.svd_xt, config.svd, config.tiny])
def test_diffusers_round_trip(preset):
    cfg = preset()
    assert config.UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_diffusers_defaults_equal_svd_xt():
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    with torch.device("meta"):
        saved_config = dict(UNetSpatioTemporalConditionModel().config)  # what save_pretrained writes
    # diffusers' defaults are the SVD-XT network; only the unused sample_size is unset (96 in the published json).
    assert config.UNetConfig.from_diffusers(saved_config) == config.svd_xt().replace(sample_size=None)


def test_runtime_switches_are_not_architecture():
    cfg = config.UNetConfig.from_diffusers(SVD_XT_JSON, attention_impl="xla", cross_attention_shortcut=False,
                                           feedforward_impl="pallas", temporal_attention_impl="pallas")
    assert cfg.attention_impl == "xla" and not cfg.cross_attention_shortcut and cfg.feedforward_impl == "pallas"
    assert cfg.temporal_attention_impl == "pallas"
    switches = {"attention_impl", "cross_attention_shortcut", "feedforward_impl", "temporal_attention_impl"}
    assert not switches & set(cfg.to_diffusers())


def test_unsupported_block_type_is_named():
    bad = {**SVD_XT_JSON, "down_block_types": ["CrossAttnDownBlock2D"] + SVD_XT_JSON["down_block_types"][1:]}
    with pytest.raises(ConfigError, match="CrossAttnDownBlock2D"):
        config.UNetConfig.from_diffusers(bad)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="time_cond_proj_dim"):
        config.UNetConfig.from_diffusers({**SVD_XT_JSON, "time_cond_proj_dim": 256})


def test_other_model_class_is_refused():
    with pytest.raises(ConfigError, match="UNet2DConditionModel"):
        config.UNetConfig.from_diffusers({**SVD_XT_JSON, "_class_name": "UNet2DConditionModel"})


def test_nested_transformer_layers_are_refused():
    with pytest.raises(ConfigError, match="nested"):
        config.UNetConfig.from_diffusers({**SVD_XT_JSON, "transformer_layers_per_block": [[1, 2], 1, 1, 1]})


@pytest.mark.parametrize("change,message", [
    (dict(block_out_channels=(320, 640, 1280, 1000)), "divisible by the 32"),
    (dict(num_attention_heads=(5, 10, 20, 7)), "not divisible by num_attention_heads"),
    (dict(layers_per_block=(2, 2)), "entries but there are 4 down blocks"),
    (dict(attention_impl="flash"), "attention_impl"),
    (dict(feedforward_impl="triton"), "feedforward_impl"),
    (dict(temporal_attention_impl="cudnn"), "temporal_attention_impl"),
])
def test_inconsistent_configs_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(config.svd_xt(), **change)


def test_config_is_hashable_for_static_use():
    assert hash(config.svd_xt()) == hash(config.svd_xt())
