"""Conversion of diffusers UNet folders: variants, shards, pickles, converted dirs and the specific errors."""

import copy
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jinbetween import config
from jinbetween.cli import main as cli_main
from jinbetween.errors import (CorruptWeightsError, KeyMismatchError, PickleRefusedError, ShapeMismatchError,
                               WeightsNotFoundError)
from jinbetween.models import UNet
from jinbetween.weights import load_unet
from jinbetween.weights.hub import download_pipeline, hub_allow_patterns
from jinbetween.weights.loading import UNET_COMPONENT

from tests.torch_reference import diffusers_unet

UNET_STEM = UNET_COMPONENT.stem
WEIGHTS = f"{UNET_STEM}.safetensors"


@pytest.fixture(scope="module")
def reference():
    return diffusers_unet(config.tiny(), seed=2)


@pytest.fixture
def unet_folder(reference, tmp_path):
    folder = tmp_path / "unet"
    reference.save_pretrained(folder)
    return folder


def params_of(unet: UNet) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(unet))}


def rewrite_weights(folder, edit) -> None:
    tensors = load_file(folder / WEIGHTS)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS)


def test_wrong_shape_is_reported_with_both_shapes(unet_folder):
    key = "down_blocks.0.resnets.0.spatial_res_block.conv1.weight"
    rewrite_weights(unet_folder, lambda t: t.update({key: t[key][:16]}))
    with pytest.raises(ShapeMismatchError, match="conv1.weight: file \\(16, 32, 3, 3\\), config expects "
                                                 "\\(32, 32, 3, 3\\)") as err:
        load_unet(unet_folder)
    assert [m[0] for m in err.value.mismatches] == [key]


def test_missing_key_is_listed(unet_folder):
    key = "mid_block.attentions.0.temporal_transformer_blocks.0.attn1.to_v.weight"
    rewrite_weights(unet_folder, lambda t: t.pop(key))
    with pytest.raises(KeyMismatchError, match="1 missing key") as err:
        load_unet(unet_folder)
    assert err.value.missing == [key] and err.value.unexpected == []


def test_unexpected_key_is_listed(unet_folder):
    rewrite_weights(unet_folder, lambda t: t.update({"lora.up.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(KeyMismatchError, match="lora.up.weight") as err:
        load_unet(unet_folder)
    assert err.value.unexpected == ["lora.up.weight"] and err.value.missing == []


@pytest.mark.parametrize("keep_bytes", [4, 100, -1000])
def test_truncated_file_is_reported_as_corrupt(unet_folder, keep_bytes):
    data = (unet_folder / WEIGHTS).read_bytes()
    (unet_folder / WEIGHTS).write_bytes(data[:keep_bytes])
    with pytest.raises(CorruptWeightsError, match="download it again"):
        load_unet(unet_folder)


def test_missing_weights_file_names_what_was_found(unet_folder):
    (unet_folder / WEIGHTS).rename(unet_folder / f"{UNET_STEM}.fp16.safetensors")
    with pytest.raises(WeightsNotFoundError, match="pass the matching --variant"):
        load_unet(unet_folder)


def test_not_a_weights_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_unet(tmp_path / "nowhere")
    with pytest.raises(WeightsNotFoundError, match="convert_weights.py"):
        load_unet(tmp_path)


def test_fp16_variant_is_upcast_exactly(reference, tmp_path):
    folder = tmp_path / "unet"
    copy.deepcopy(reference).half().save_pretrained(folder, variant="fp16")
    loaded = params_of(load_unet(folder, variant="fp16"))
    fp32 = params_of(load_unet(_save(reference, tmp_path / "fp32")))
    for path, value in fp32.items():
        np.testing.assert_array_equal(loaded[path], value.astype(np.float16).astype(np.float32), err_msg=str(path))


def test_bfloat16_load_casts_from_float32(unet_folder):
    bf16 = params_of(load_unet(unet_folder, dtype=jnp.bfloat16))
    fp32 = params_of(load_unet(unet_folder))
    for path, value in fp32.items():
        assert bf16[path].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(bf16[path], value.astype(ml_dtypes.bfloat16), err_msg=str(path))


def test_sharded_checkpoint_loads_like_a_single_file(reference, unet_folder, tmp_path):
    sharded = tmp_path / "sharded"
    reference.save_pretrained(sharded, max_shard_size="100KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single, split = params_of(load_unet(unet_folder)), params_of(load_unet(sharded))
    assert single.keys() == split.keys()
    for path in single:
        np.testing.assert_array_equal(single[path], split[path])


def test_pickled_weights_need_explicit_permission(reference, unet_folder, tmp_path):
    pickled = tmp_path / "pickled"
    reference.save_pretrained(pickled, safe_serialization=False)
    assert not list(pickled.glob("*.safetensors"))
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_unet(pickled)
    allowed = params_of(load_unet(pickled, allow_pickle=True))
    safe = params_of(load_unet(unet_folder))
    for path in safe:
        np.testing.assert_array_equal(allowed[path], safe[path])


def test_convert_writes_manifest_with_hashes(reference, unet_folder, tmp_path):
    import hashlib

    out = tmp_path / "weights" / "tiny"
    assert cli_main(["convert", "--local-dir", str(unet_folder), "--out", str(out), "--dtype", "bfloat16"]) == 0
    entry = json.loads((out / "manifest.json").read_text())["components"]["unet"]
    assert entry["files"] == {WEIGHTS: hashlib.sha256((unet_folder / WEIGHTS).read_bytes()).hexdigest()}
    assert entry["dtype"] == "bfloat16" and entry["config"]["block_out_channels"] == [32, 64]
    assert entry["num_parameters"] == sum(p.numel() for p in reference.parameters())
    restored = params_of(load_unet(out, dtype=jnp.float32))
    direct = params_of(load_unet(unet_folder))
    for path in direct:  # stored as bf16, restored as fp32: exactly the bf16 rounding of the source
        np.testing.assert_array_equal(restored[path], direct[path].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_pipeline_folder_is_accepted(unet_folder, tmp_path):
    pipeline = tmp_path / "pipeline"
    shutil.copytree(unet_folder, pipeline / "unet")
    (pipeline / "model_index.json").write_text("{}")
    assert cli_main(["convert", "--local-dir", str(pipeline), "--out", str(tmp_path / "out")]) == 0
    for a, b in zip(params_of(load_unet(pipeline)).values(),
                    params_of(load_unet(tmp_path / "out" / "unet")).values()):
        np.testing.assert_array_equal(a, b)


def test_cli_prints_errors_without_traceback(unet_folder, capsys):
    rewrite_weights(unet_folder, lambda t: t.pop("conv_in.bias"))
    assert cli_main(["convert", "--local-dir", str(unet_folder), "--out", str(unet_folder.parent / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "conv_in.bias" in err and "Traceback" not in err


def test_hub_download_failure_suggests_local_dir(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="--local-dir"):
        download_pipeline("stabilityai/stable-video-diffusion-img2vid-xt", variant="fp16")


def test_hub_patterns_fetch_only_the_needed_files():
    patterns = hub_allow_patterns("fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
    assert not any(p.endswith(".bin") for p in patterns)
    assert any(p.endswith(".bin") for p in hub_allow_patterns("fp16", allow_pickle=True))


def _save(module, folder):
    module.save_pretrained(folder)
    return folder
