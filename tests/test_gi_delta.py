"""GI backward-delta conversion: Δ = fine-tuned − base on the temporal attn1 W_v/W_o, and every refusal."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from flax import nnx

from jinbetween import config
from jinbetween.cli import main as cli_main
from jinbetween.errors import ConfigError, DeltaMismatchError, ShapeMismatchError, WeightsNotFoundError
from jinbetween.models import UNet
from jinbetween.models.delta import delta_keys, with_delta
from jinbetween.models.state import ModelState
from jinbetween.weights import load_unet
from jinbetween.weights.delta import BACKWARD_DELTA, GI_BASE_REPO, convert_gi_delta, load_delta
from jinbetween.weights.hub import download_unet
from jinbetween.weights.manifest import MANIFEST, record_in_manifest

from tests.torch_reference import diffusers_unet

CFG = config.tiny()
FROZEN_BIAS = "down_blocks.0.attentions.0.temporal_transformer_blocks.0.attn1.to_out.0.bias"
FROZEN_CONV = "down_blocks.0.resnets.0.spatial_res_block.conv1.weight"


def perturbed(unet: torch.nn.Module, keys, scale: float, seed: int = 7) -> torch.nn.Module:
    """Returns a copy of `unet` with N(0, scale²) noise added to the parameters `keys`."""
    out = copy.deepcopy(unet)
    params = dict(out.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in keys:
            params[key].add_(scale * torch.randn(params[key].shape, generator=generator))
    return out


def params_by_key(unet: UNet) -> dict[str, np.ndarray]:
    from jinbetween.models.naming import torch_key

    return {torch_key(path): np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(unet))}


@pytest.fixture(scope="module")
def base_torch():
    return diffusers_unet(CFG, seed=3)


@pytest.fixture(scope="module")
def gi(base_torch, tmp_path_factory):
    """(base pipeline folder holding unet/, fine-tuned unet/ folder, expected Δ in NNX layout [in, out])."""
    root = tmp_path_factory.mktemp("gi")
    base_torch.save_pretrained(root / "base" / "unet")
    finetuned = perturbed(base_torch, delta_keys(CFG), scale=0.05)
    finetuned.save_pretrained(root / "finetuned" / "unet")
    base_sd, ft_sd = base_torch.state_dict(), finetuned.state_dict()
    expected = {key: (ft_sd[key] - base_sd[key]).numpy().T for key in delta_keys(CFG)}
    return root / "base", root / "finetuned" / "unet", expected


@pytest.fixture(scope="module")
def converted(gi, tmp_path_factory):
    base, finetuned, _ = gi
    return convert_gi_delta(finetuned, base / "unet", tmp_path_factory.mktemp("out"))


@pytest.fixture(scope="module")
def other_architecture(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other") / "unet"
    diffusers_unet(CFG.replace(block_out_channels=(32, 96)), seed=4).save_pretrained(folder)
    return folder


def test_delta_is_the_torch_difference_in_nnx_layout(gi, converted):
    _, _, expected = gi
    delta = load_delta(converted, CFG)
    assert sorted(delta) == sorted(expected) and len(delta) == 8
    for key, want in expected.items():
        got = np.asarray(delta[key])
        assert got.shape == want.shape, f"{key}: shape {got.shape} vs {want.shape}"
        np.testing.assert_array_equal(got, want, err_msg=f"{key}: Δ differs from the torch difference")
    # GI adds the delta to SVD-XT: only names and shapes must match, not the frame count.
    assert sorted(load_delta(converted, config.tiny().replace(num_frames=25))) == sorted(expected)


def test_base_plus_delta_reproduces_the_finetuned_unet(gi, converted):
    base, finetuned, _ = gi
    merged = params_by_key(with_delta(ModelState.of(load_unet(base)), load_delta(converted, CFG)).merge())
    want = params_by_key(load_unet(finetuned))
    assert merged.keys() == want.keys()
    trained = set(delta_keys(CFG))
    for key, value in want.items():
        if key in trained:  # base + (ft − base) rounds once in float32
            np.testing.assert_allclose(merged[key], value, rtol=0, atol=1e-6, err_msg=f"{key}: base + Δ ≠ fine-tuned")
        else:
            np.testing.assert_array_equal(merged[key], value, err_msg=f"{key}: untrained parameter changed")


def test_delta_records_its_sources(gi, converted):
    base, finetuned, _ = gi
    meta = json.loads((converted / "delta.json").read_text())
    entry = json.loads((converted.parent / MANIFEST).read_text())["components"][BACKWARD_DELTA]
    for record in (meta, entry):
        assert record["source"] == str(finetuned) and record["base"] == str(base / "unet")
        assert list(record["files"]) == list(record["base_files"]) == ["diffusion_pytorch_model.safetensors"]
    assert meta["unet_config"] == CFG.to_diffusers() and entry["zero_tensors"] == 0 and entry["num_tensors"] == 8


def test_untrained_differences_refuse_and_are_named(base_torch, gi, tmp_path):
    base, _, _ = gi
    bad = tmp_path / "bad"
    perturbed(base_torch, [*delta_keys(CFG), FROZEN_BIAS, FROZEN_CONV], scale=0.05).save_pretrained(bad)
    with pytest.raises(DeltaMismatchError) as err:
        convert_gi_delta(bad, base, tmp_path / "out")
    message = str(err.value)
    assert sorted(k for k, _ in err.value.differences) == sorted([FROZEN_BIAS, FROZEN_CONV]), message
    assert f"{FROZEN_BIAS}: max |difference|" in message and FROZEN_CONV in message and "2 of the" in message
    assert GI_BASE_REPO in message and "SVD-XT" in message
    assert not (tmp_path / "out" / BACKWARD_DELTA).exists()


def test_tolerance_admits_rounding_sized_differences(base_torch, gi, tmp_path):
    base, _, _ = gi
    folder = tmp_path / "rounded"
    perturbed(base_torch, [*delta_keys(CFG), FROZEN_CONV], scale=1e-6).save_pretrained(folder)
    with pytest.raises(DeltaMismatchError, match=FROZEN_CONV):
        convert_gi_delta(folder, base, tmp_path / "exact")
    assert (convert_gi_delta(folder, base, tmp_path / "tolerant", atol=1e-4) / "delta.json").exists()


def test_different_architectures_refuse(gi, other_architecture, tmp_path):
    base, _, _ = gi
    with pytest.raises(ConfigError, match="block_out_channels"):
        convert_gi_delta(other_architecture, base, tmp_path / "out")


def test_identical_unet_gives_a_zero_delta_and_a_warning(gi, tmp_path, caplog):
    base, _, _ = gi
    same = tmp_path / "same"
    same.mkdir()
    (same / "diffusion_pytorch_model.safetensors").symlink_to(base / "unet" / "diffusion_pytorch_model.safetensors")
    config_json = json.loads((base / "unet" / "config.json").read_text())
    (same / "config.json").write_text(json.dumps({**config_json, "num_frames": 14}))  # holds no parameter
    with caplog.at_level(logging.WARNING, logger="jinbetween.weights.delta"):
        path = convert_gi_delta(same, base, tmp_path / "out")
    assert "all 8 delta tensors are zero" in caplog.text
    assert all(not np.any(v) for v in load_delta(path, CFG).values())


def test_delta_must_fit_the_unet_already_in_out(gi, tmp_path):
    base, finetuned, _ = gi
    out = tmp_path / "out"
    out.mkdir()
    record_in_manifest(out, "unet", {"config": CFG.replace(block_out_channels=(32, 96)).to_diffusers()})
    with pytest.raises(ShapeMismatchError, match="another UNet config"):
        convert_gi_delta(finetuned, base, out)


def test_cli_writes_the_pipeline_and_the_delta_into_one_dir(gi, tmp_path):
    base, finetuned, expected = gi
    out = tmp_path / "out"
    assert cli_main(["convert", "--local-dir", str(base), "--gi-unet", str(finetuned), "--gi-base", str(base),
                     "--out", str(out)]) == 0
    assert sorted(json.loads((out / MANIFEST).read_text())["components"]) == [BACKWARD_DELTA, "unet"]
    key = next(iter(expected))
    np.testing.assert_array_equal(load_delta(out / BACKWARD_DELTA, CFG)[key], expected[key], err_msg=key)


def test_cli_gi_base_repo_id_downloads_only_its_unet(gi, tmp_path, monkeypatch):
    import huggingface_hub

    base, finetuned, _ = gi
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(base))
    out = tmp_path / "out"
    assert cli_main(["convert", "--gi-unet", str(finetuned), "--gi-base", GI_BASE_REPO, "--out", str(out)]) == 0
    entries = json.loads((out / MANIFEST).read_text())["components"]
    assert list(entries) == [BACKWARD_DELTA] and entries[BACKWARD_DELTA]["base"] == f"hf://{GI_BASE_REPO}"
    download_unet(GI_BASE_REPO, variant="fp16")
    assert [c["repo_id"] for c in calls] == [GI_BASE_REPO] * 2
    assert all(p.startswith("unet/") for c in calls for p in c["allow_patterns"]), calls[-1]["allow_patterns"]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[-1]["allow_patterns"]


def test_gi_base_download_failure_suggests_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="--gi-base"):
        download_unet(GI_BASE_REPO, variant="fp16")


@pytest.mark.parametrize("args, complaint", [
    (["--gi-unet", "ft"], "--gi-unet needs --gi-base"),
    (["--gi-base", GI_BASE_REPO], "pass --gi-unet too"),
    ([], "nothing to convert"),
])
def test_incomplete_gi_arguments_are_usage_errors(args, complaint, tmp_path, capsys):
    assert cli_main(["convert", *args, "--out", str(tmp_path / "out")]) == 2
    assert complaint in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_delta_without_a_delta_says_how_to_get_one(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="convert_weights.py --gi-unet .* --gi-base"):
        load_delta(tmp_path, CFG)
