"""A run's progress as a carry file (`jinbetween.toyworld.carry`): quantization error, refusals, the CLI round trip."""

import dataclasses
import io
import json
import lzma
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from jinbetween import config
from jinbetween.models import VAE, ImageEncoder, UNet
from jinbetween.models.state import abstract
from jinbetween.pipeline import Pipeline
from jinbetween.toyworld import carry, train

META = {"base": "base-folder", "base_sha256": {"unet/w.safetensors": "aa"}, "step": 7}


def random_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(0, 0.05, (64, 128)).astype(np.float32),
            "b": rng.normal(0, 1.0, (20_000,)).astype(np.float32),
            "c": rng.normal(0, 0.3, (3, 3, 8, 16)).astype(np.float32),
            "unchanged": rng.normal(0, 1.0, (5, 7)).astype(np.float32),
            "spiky": rng.normal(0, 1.0, (100_000,)).astype(np.float32)}


def trained(base: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """`base` plus Gaussian differences of very different sizes per tensor; `spiky` also gets three huge entries."""
    rng = np.random.default_rng(seed)
    sizes = {"a": 1e-3, "b": 0.02, "c": 3e-5, "unchanged": 0.0, "spiky": 1e-3}
    ema = {k: (v + rng.normal(0, sizes[k], v.shape)).astype(np.float32) for k, v in base.items()}
    ema["spiky"][[5, 50_000, 99_999]] += np.float32([10.0, -7.0, 12.0])
    return ema


@pytest.mark.parametrize("step_fraction", [0.25, 0.5])
def test_reconstruction_error_is_the_rounding_error_of_the_step_and_outliers_come_back_exactly(step_fraction):
    base = random_params()
    ema = trained(base)
    recon, meta = carry.unpack(carry.pack(ema, base, step_fraction=step_fraction, meta=META), base)
    assert meta == META
    for key in ("a", "b", "c"):
        d = ema[key] - base[key]
        error = (recon[key] - base[key]) - d
        s = step_fraction * np.sqrt(np.mean(np.square(d, dtype=np.float64)))
        rms = float(np.sqrt(np.mean(np.square(error, dtype=np.float64))))
        # The rounding error is uniform on [−s/2, s/2]: rms s/√12 (to ~3% over 1152 entries, the smallest tensor).
        assert rms == pytest.approx(s / np.sqrt(12), rel=0.1), f"{key}: rms error {rms:.3g}, step {s:.3g}"
        rounding = 2 * np.finfo(np.float32).eps * np.max(np.abs(ema[key]))  # of base + difference in float32
        assert np.max(np.abs(error)) <= s / 2 + rounding, f"{key}: an error beyond half a step"
    np.testing.assert_array_equal(recon["unchanged"], base["unchanged"])
    d = ema["spiky"] - base["spiky"]
    for i in (5, 50_000, 99_999):  # the stored difference is exact: base + d in float32
        assert recon["spiky"][i] == base["spiky"][i] + d[i], f"outlier {i}: {recon['spiky'][i]} ≠ base + {d[i]}"
    assert carry.describe(carry.pack(ema, base, step_fraction=step_fraction, meta=META))["outliers"] == 3


def test_a_changed_base_changes_the_result_and_its_hashes_are_refused():
    base = random_params()
    blob = carry.pack(trained(base), base, meta=META)
    recon, _ = carry.unpack(blob, base)
    other = {k: v + np.float32(0.01) for k, v in base.items()}
    moved, _ = carry.unpack(blob, other)
    assert all(np.allclose(moved[k] - recon[k], 0.01, atol=1e-6) for k in base), "the base did not shift the result"
    with pytest.raises(ValueError, match=r"packed against the base 'base-folder' with weight files .*'aa'"):
        carry.unpack(blob, base, base_hashes={"unet/w.safetensors": "bb"})
    carry.unpack(blob, base, base_hashes=META["base_sha256"])


def test_another_format_and_other_bytes_are_refused():
    base = random_params()
    stored = dict(np.load(io.BytesIO(lzma.decompress(carry.pack(trained(base), base, meta=META)))))
    layout = {**json.loads(stored["layout"].tobytes()), "format": "jinbetween-toyworld-carry-0"}
    stored["layout"] = np.frombuffer(json.dumps(layout).encode(), np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **stored)
    with pytest.raises(ValueError, match="format 'jinbetween-toyworld-carry-0'; this version reads"):
        carry.unpack(lzma.compress(buffer.getvalue()), base)
    with pytest.raises(ValueError, match="Not a carry file"):
        carry.unpack(b"not a carry", base)


def test_missing_keys_mismatched_shapes_and_nonfinite_values_are_refused_by_name():
    base = random_params()
    ema = trained(base)
    with pytest.raises(ValueError, match="Parameter b is in the base but not in the EMA"):
        carry.pack({k: v for k, v in ema.items() if k != "b"}, base, meta=META)
    with pytest.raises(ValueError, match=r"Parameter c has shape \(3, 3, 8, 15\) in the EMA but \(3, 3, 8, 16\)"):
        carry.pack({**ema, "c": ema["c"][..., :15]}, base, meta=META)
    with pytest.raises(ValueError, match="Parameter a of the EMA holds NaN or Inf"):
        carry.pack({**ema, "a": np.where(ema["a"] > 0, np.nan, ema["a"])}, base, meta=META)
    blob = carry.pack(ema, base, meta=META)
    with pytest.raises(ValueError, match="Parameter spiky is in the carry but not in the base"):
        carry.unpack(blob, {k: v for k, v in base.items() if k != "spiky"})
    with pytest.raises(ValueError, match=r"Parameter a has shape \(64, 128\) in the carry but \(128, 64\)"):
        carry.unpack(blob, {**base, "a": base["a"].T})


def random_model(cls, model_config, seed: int):
    """`cls(model_config)` with Gaussian parameters: drawing them on the host is seconds faster than nnx's init."""
    rng = np.random.default_rng(seed)
    graphdef, shapes = nnx.split(abstract(cls, model_config))
    return nnx.merge(graphdef, jax.tree.map(lambda a: rng.normal(0, 0.05, a.shape).astype(np.float32), shapes))


def tiny_pipeline_folder(folder):
    pipeline = Pipeline(random_model(UNet, config.tiny(), 0), random_model(VAE, config.tiny_vae(), 1),
                        random_model(ImageEncoder, config.tiny_image_encoder(), 2), default_size=(32, 32))
    pipeline.save_pretrained(folder, dtype=jax.numpy.bfloat16)
    # What belongs to the base model only, and must not reach an unpacked folder.
    (folder / "release.json").write_text("{}\n")
    (folder / "gi_backward").mkdir()
    (folder / "gi_backward" / "delta.json").write_text("{}\n")
    return folder


def test_cli_packs_an_exported_ema_and_a_run_and_unpacks_a_folder_that_loads_base_plus_difference(tmp_path, capsys):
    base_folder = tiny_pipeline_folder(tmp_path / "base")
    base = carry.base_params(base_folder)
    rng = np.random.default_rng(0)
    ema = {k: v + rng.normal(0, 0.01 * np.sqrt(np.mean(v ** 2)) + 1e-6, v.shape).astype(np.float32)
           for k, v in base.items()}
    np.savez(tmp_path / "ema.npz", step=np.asarray(12), **ema)  # as bench/toy_export_ema.py writes it

    carry.main(["pack", "--ema", str(tmp_path / "ema.npz"), "--base", str(base_folder), "--out",
                str(tmp_path / "ema.carry")])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bytes"] == (tmp_path / "ema.carry").stat().st_size and printed["step"] == 12
    assert printed["relative_error"] == pytest.approx(0.25 / np.sqrt(12), rel=0.1), printed
    assert printed["difference_to_base"] == pytest.approx(0.01, rel=0.1), printed  # the noise drawn: 1% of each rms

    # The same EMA in a run's checkpoint, against the run's init folder, packs to the same difference.
    cfg = train.UNetTrainConfig(batch_size=2)
    run = train.Run(tmp_path / "run")
    run.write_record({"config": dataclasses.asdict(cfg), "seed": 0, "init": str(base_folder)})
    _, state = train.init_train_state(train._load_trainables(base_folder, 0), cfg)
    ema_state = jax.tree_util.tree_map_with_path(lambda p, _: ema[jax.tree_util.keystr(p)], state.ema)
    run.save_state(dataclasses.replace(state, ema=ema_state, step=np.int32(12)))
    carry.main(["pack", "--run", str(run.folder), "--out", str(tmp_path / "run.carry")])
    blobs = [(tmp_path / name).read_bytes() for name in ("ema.carry", "run.carry")]
    from_ema, from_run = (carry.unpack(blob, base)[0] for blob in blobs)
    for key in base:
        np.testing.assert_array_equal(from_run[key], from_ema[key], err_msg=f"--run and --ema differ at {key}")

    out = tmp_path / "unpacked"
    carry.main(["unpack", "--carry", str(tmp_path / "ema.carry"), "--base", str(base_folder), "--out", str(out)])
    loaded = carry.base_params(out)
    for key in base:
        np.testing.assert_array_equal(loaded[key], from_ema[key], err_msg=f"the unpacked folder differs at {key}")
    assert not (out / "release.json").exists() and not (out / "gi_backward").exists()
    assert (out / "vae/diffusion_pytorch_model.safetensors").read_bytes() == \
        (base_folder / "vae/diffusion_pytorch_model.safetensors").read_bytes()
    assert Pipeline.from_pretrained(out, dtype=jax.numpy.float32).default_size == (32, 32)
    # Unpacking is deterministic, so a later carry packed against this folder finds it again by its hashes.
    carry.main(["unpack", "--carry", str(tmp_path / "ema.carry"), "--base", str(base_folder), "--out",
                str(tmp_path / "again")])
    assert carry.base_hashes_of(tmp_path / "again") == carry.base_hashes_of(out)

    with pytest.raises(SystemExit, match="exists and is not empty"):
        carry.main(["unpack", "--carry", str(tmp_path / "ema.carry"), "--base", str(base_folder), "--out", str(out)])
    other = tmp_path / "other"
    shutil.copytree(base_folder, other)
    with open(other / "image_encoder/model.safetensors", "ab") as file:
        file.write(b"\0")
    with pytest.raises(SystemExit, match=f"packed against the base '{base_folder}'"):
        carry.main(["unpack", "--carry", str(tmp_path / "ema.carry"), "--base", str(other), "--out",
                    str(tmp_path / "refused")])
