"""Faults that must never pass silently or cost a finished output: NaN/Inf weights (named, at conversion and at load),
divergence during sampling (the move where it began), damaged weight files (sha256, cached by size and time), and
interrupted writes: a fine-tune killed while it writes a checkpoint resumes bit for bit, a killed conversion leaves
nothing that looks complete and runs again. Tiny random models on CPU.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file

from jinbetween import Pipeline, atomic, cli, config, data, integrity
from jinbetween.errors import ConfigError, CorruptWeightsError, DivergedError, IntegrityError, NonFiniteWeightsError
from jinbetween.finetune import LOG_FILE, RunConfig, TrainConfig, finetune
from jinbetween.models import naming
from jinbetween.samplers import Draws, StepProgram
from jinbetween.samplers.core import Move, run_program
from jinbetween.toyworld import world
from jinbetween.toyworld.world import WorldConfig
from jinbetween.video import write_video
from jinbetween.weights import load_unet, load_vae, loading, manifest, release
from jinbetween.weights.delta import load_delta
from jinbetween.weights.loading import UNET_COMPONENT
from jinbetween.weights.manifest import MANIFEST
from jinbetween.weights.tensors import write_safetensors

from tests.helpers import torch_single_thread  # noqa: F401 - autouse: torch on one thread
from tests.torch_reference import diffusers_svd_pipeline

H, W, F = 16, 24, 3
LATENT = (F, H // 2, W // 2, 4)
UNET_FILE = f"{UNET_COMPONENT.name}/{UNET_COMPONENT.stem}.safetensors"
POISONED = ("down_blocks.0.resnets.0.spatial_res_block.conv1.weight", "mid_block.attentions.0.proj_in.bias")


def scaled(module: nnx.Module, key: str, factor: float) -> nnx.Module:
    """Returns a copy of `module` with the parameter of torch name `key` multiplied by `factor`."""
    graphdef, state = nnx.split(module)
    flat = []
    for path, var in nnx.to_flat_state(state):
        if naming.torch_key(path) == key:
            var = var.replace(value=var.get_value() * factor)
        flat.append((path, var))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "diffusers"
    diffusers_svd_pipeline(seed=5).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(diffusers_dir):
    return Pipeline.from_pretrained(diffusers_dir)


@pytest.fixture(scope="module")
def converted(diffusers_dir, tmp_path_factory):
    return loading.convert_pipeline(diffusers_dir, tmp_path_factory.mktemp("converted") / "svd")


@pytest.fixture(scope="module")
def keyframes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keyframes")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder / "a.png", folder / "b.png"


def poison(folder, values=(np.nan, np.inf)) -> None:
    """Sets one element of each POISONED tensor of `folder`'s UNet safetensors to NaN / Inf."""
    tensors = load_file(folder / UNET_FILE)
    for key, value in zip(POISONED, values):
        tensors[key].flat[0] = value
    write_safetensors(folder / UNET_FILE, tensors)


def flip_middle(file, size: int = 4096) -> None:
    """Inverts `size` bytes in the middle of `file`, keeping its length."""
    data_ = bytearray(file.read_bytes())
    start = max(0, len(data_) // 2 - size // 2)
    data_[start:start + size] = bytes(b ^ 0xFF for b in data_[start:start + size])
    file.write_bytes(bytes(data_))


def hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# The Python entry points check their arguments before any work, as the CLI does.

API_CASES = [
    ("image_to_video", dict(num_inference_steps=0), "num_inference_steps=0"),
    ("image_to_video", dict(num_frames=0), "num_frames=0"),
    ("image_to_video", dict(fps=-5), "fps=-5"),
    ("image_to_video", dict(decode_chunk_size=0), "decode_chunk_size=0"),
    ("image_to_video", dict(noise_aug_strength=float("nan")), "noise_aug_strength=nan"),
    ("image_to_video", dict(max_guidance_scale=float("inf")), "max_guidance_scale=inf"),
    ("image_to_video", dict(output="png"), "output='png'"),
    ("image_to_video", dict(first_index=-1), "first_index=-1"),
    ("interpolate", dict(num_frames=2), "num_frames=2"),
    ("interpolate", dict(noise_injection_steps=-3), "noise_injection_steps=-3"),
    ("interpolate", dict(method="trf", num_steps=4), "num_steps is not a trf option"),
    ("interpolate", dict(method="fancy"), "Unknown method 'fancy'"),
    ("interpolate", dict(motion_bucket_id=-1), "motion_bucket_id=-1"),
    ("interpolate_batch", dict(batch_size=0), "batch_size=0"),
    ("interpolate_batch", dict(method="mpd", parallel_repeats=1.5), "parallel_repeats=1.5"),
]


@pytest.mark.parametrize("entry, kwargs, fragment", API_CASES, ids=[f"{e}-{f}" for e, _, f in API_CASES])
def test_pipeline_methods_refuse_bad_arguments_before_any_work(pipeline, monkeypatch, entry, kwargs, fragment):
    monkeypatch.setattr(Pipeline, "encode", lambda *a, **k: pytest.fail("started work before checking arguments"))
    image = np.zeros((H, W, 3), np.uint8)
    call = getattr(pipeline, entry)
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        if entry == "image_to_video":
            call(image, **kwargs)
        elif entry == "interpolate":
            call(image, image, **{"allow_untrained_backward": True, **kwargs})
        else:
            call([(image, image)], **{"allow_untrained_backward": True, **kwargs})


def test_a_good_pipeline_call_gets_to_work(pipeline, monkeypatch):
    """The negative control of the table above: valid arguments reach the keyframe encoding."""
    monkeypatch.setattr(Pipeline, "encode", lambda *a, **k: pytest.fail("reached encode"))
    with pytest.raises(pytest.fail.Exception, match="reached encode"):
        pipeline.interpolate(np.zeros((H, W, 3), np.uint8), np.zeros((H, W, 3), np.uint8), method="vibid",
                             num_frames=F, num_inference_steps=2)


def test_finetune_settings_are_checked_when_made():
    with pytest.raises(ConfigError, match="steps=0"):
        RunConfig(steps=0)
    with pytest.raises(ConfigError, match=re.escape("seed=-1")):
        RunConfig(steps=1, seed=-1)
    with pytest.raises(ConfigError, match=re.escape("learning_rate=-0.1")):
        TrainConfig(learning_rate=-0.1)
    with pytest.raises(ConfigError, match="remat='some'"):
        TrainConfig(remat="some")


# --------------------------------------------------------------------------------------------------
# Non-finite weights and results.


def test_conversion_refuses_nonfinite_tensors_by_name_and_writes_nothing(diffusers_dir, converted, tmp_path, capsys):
    source = shutil.copytree(diffusers_dir, tmp_path / "source")
    poison(source)
    out = tmp_path / "out"
    assert cli.main(["convert", "--local-dir", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("error: The UNet weights") and all(key in err for key in POISONED), err
    assert not out.exists() and hidden(tmp_path) == [], "the refused conversion left files"
    assert (converted / MANIFEST).exists(), "the unpoisoned folder converts (negative control)"


def test_loading_nonfinite_weights_names_the_model_and_the_tensors(pipeline, diffusers_dir, tmp_path):
    source = shutil.copytree(diffusers_dir, tmp_path / "source")
    poison(source)
    with pytest.raises(NonFiniteWeightsError, match="The UNet weights in .* hold NaN or Inf in 2 tensor") as err:
        Pipeline.from_pretrained(source)
    assert err.value.tensors == sorted(POISONED)
    assert not loading.nonfinite_parameters(pipeline.unet), "the unpoisoned folder loaded (negative control)"


def test_a_converted_dir_holding_nonfinite_weights_is_refused_at_load(pipeline, converted, tmp_path):
    """Weights written past the converter's check (hashes recorded, so only the finite check can catch them)."""
    copy = shutil.copytree(converted, tmp_path / "copy")
    params = {path: np.asarray(value) for path, value in naming.flat_params(pipeline.unet).items()}
    path = next(p for p in params if naming.torch_key(p) == POISONED[0])
    params[path] = params[path].copy()
    params[path].flat[3] = -np.inf
    entry = manifest.read_manifest(copy)["components"]["unet"]
    with manifest.updating(copy) as staging:
        manifest.write_component(staging, "unet", params, entry)
    with pytest.raises(NonFiniteWeightsError, match=f"UNet weights .* {POISONED[0]}"):
        load_unet(copy)


def test_the_step_where_sampling_diverged_is_named(pipeline, keyframes):
    start, end = (np.asarray(Image.open(k)) for k in keyframes)
    settings = dict(method="vibid", num_frames=F, num_inference_steps=3, output="latent")
    keys = jax.random.split(jax.random.key(0), 1)
    draws = Draws(jax.random.normal(keys[0], (1, *LATENT)), jax.random.normal(keys[0], (3, 1, *LATENT)))
    latents = pipeline.interpolate(start, end, draws=draws, **settings)
    assert np.isfinite(latents).all(), "finite draws sample normally (negative control)"
    bad = Draws(draws.initial, draws.moves.at[1, 0, 0, 0, 0, 0].set(jnp.inf))  # move 2's fresh noise
    with pytest.raises(DivergedError, match=r"vibid diverged: the latents of video 0 held NaN or Inf from sampler "
                                            r"move 2 of 3 on \(denoising step 2 of 3.*weights are finite") as err:
        pipeline.interpolate(start, end, draws=bad, **settings)
    assert err.value.move == 2


def test_run_program_reports_the_first_nonfinite_move_per_video():
    program = StepProgram.build([Move(0, i) for i in range(5)], np.linspace(5, 0, 6))

    def move(x, row, fresh):  # video 1 turns NaN at the fourth move and stays so; video 0 stays finite
        return x.at[1].multiply(jnp.where(row.step == 3, jnp.nan, 1.0))

    keys = jax.random.split(jax.random.key(0), 2)
    result = run_program(move, jnp.ones((2, 3)), program, keys)
    np.testing.assert_array_equal(result.diverged_at, [-1, 4])
    already = run_program(move, jnp.array([[np.inf] * 3, [1.0] * 3]), program, keys)
    np.testing.assert_array_equal(already.diverged_at, [0, 4])


def test_a_diverged_video_is_not_written_and_nonfinite_weights_are_named_instead(pipeline, diffusers_dir, keyframes,
                                                                                   tmp_path, capsys, monkeypatch):
    """Huge but finite UNet weights overflow in the first move: the CLI exits 2 naming it and writes no video;
    NaN weights handed to a Pipeline directly are named instead of reported as a divergence."""
    huge = Pipeline(scaled(pipeline.unet, "conv_in.weight", 1e30), pipeline.vae, pipeline.image_encoder)
    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *args, **kwargs: huge)  # what the CLI loads
    out = tmp_path / "v.gif"
    assert cli.main(["interpolate", *map(str, keyframes), "--weights", str(diffusers_dir), "--method", "vibid",
                     "--num-frames", str(F), "--steps", "3", "--height", str(H), "--width", str(W),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: vibid diverged") and "move 1 of 3" in err[-1], err
    assert not out.exists() and not (tmp_path / "v_sheet.png").exists() and hidden(tmp_path) == []
    nan = Pipeline(scaled(pipeline.unet, "conv_in.weight", np.nan), pipeline.vae, pipeline.image_encoder)
    start = np.asarray(Image.open(keyframes[0]))
    with pytest.raises(NonFiniteWeightsError, match="UNet weights in this pipeline .* conv_in.weight"):
        nan.interpolate(start, start, method="vibid", num_frames=F, num_inference_steps=3, progress=True)


def test_frames_decoded_to_nan_from_finite_latents_are_refused(pipeline):
    latents = jax.random.normal(jax.random.key(1), (1, *LATENT))
    assert np.isfinite(pipeline.decode(latents)).all(), "a finite decode passes (negative control)"
    with pytest.raises(DivergedError, match="VAE decoded frames holding NaN or Inf for video 0") as err:
        pipeline.decode(latents * 3e38)  # finite, but the first convolution overflows
    assert err.value.move is None


# --------------------------------------------------------------------------------------------------
# Weight integrity.


def test_flipped_bytes_in_a_converted_dir_are_named_at_load_and_by_verify(converted, tmp_path, capsys):
    assert cli.main(["verify", str(converted)]) == 0, "an intact dir verifies (negative control)"
    assert "match their recorded sha256" in capsys.readouterr().out
    copy = shutil.copytree(converted, tmp_path / "copy")
    record = manifest.read_manifest(copy)
    damaged = max((name for name in record["files"] if name.startswith("unet/")),
                  key=lambda name: (copy / name).stat().st_size)
    flip_middle(copy / damaged)
    with pytest.raises(IntegrityError, match=f"the UNet files in .* do not match their recorded sha256: 1 changed "
                                             f"\\({damaged}\\)") as err:
        Pipeline.from_pretrained(copy)
    assert err.value.files == [damaged]
    assert cli.main(["verify", str(copy)]) == 2
    assert damaged in capsys.readouterr().err


def test_the_hash_check_can_be_skipped(converted, tmp_path):
    copy = shutil.copytree(converted, tmp_path / "copy")
    record = manifest.read_manifest(copy)
    record["files"][next(name for name in record["files"] if name.startswith("vae/"))] = "0" * 64
    atomic.write_json(copy / MANIFEST, record)
    with pytest.raises(IntegrityError, match="the VAE files"):
        load_vae(copy)
    load_vae(copy, verify=False)


def test_flipped_bytes_in_the_shipped_release_are_refused_before_loading(tmp_path, capsys):
    copy = shutil.copytree(release.WEIGHTS, tmp_path / "toy")
    flip_middle(copy / UNET_FILE)
    with pytest.raises(IntegrityError, match=f"changed \\['{UNET_FILE}'\\]"):
        Pipeline.from_pretrained(copy)
    assert cli.main(["verify", str(copy)]) == 2 and UNET_FILE in capsys.readouterr().err
    assert cli.main(["verify", str(release.WEIGHTS)]) == 0, "the shipped release verifies (negative control)"


def test_hashes_are_cached_by_size_and_time_and_changes_are_rehashed(converted, tmp_path, monkeypatch):
    monkeypatch.setenv(integrity.CACHE_ENV, str(tmp_path / "sha256.json"))
    copy = shutil.copytree(converted, tmp_path / "copy")
    names = sorted(manifest.read_manifest(copy)["files"])
    past = time.time() - 60
    for name in names:
        os.utime(copy / name, (past, past))
    hashed = []
    real = integrity.sha256_of
    monkeypatch.setattr(integrity, "sha256_of", lambda file: hashed.append(file) or real(file))
    manifest.verify_component(copy, "unet", "UNet")
    first = len(hashed)
    assert first == sum(name.startswith("unet/") for name in names) and (tmp_path / "sha256.json").exists()
    manifest.verify_component(copy, "unet", "UNet")
    assert len(hashed) == first, "a second load re-hashed unchanged files"
    damaged = next(name for name in names if name.startswith("unet/") and (copy / name).stat().st_size > 8192)
    flip_middle(copy / damaged)
    os.utime(copy / damaged, (past + 1, past + 1))
    with pytest.raises(IntegrityError, match=damaged):
        manifest.verify_component(copy, "unet", "UNet")
    assert len(hashed) == first + 1, "exactly the changed file is hashed again"
    fresh = copy / next(name for name in names if name.startswith("vae/"))
    manifest.verify_component(copy, "vae", "VAE")
    os.utime(fresh)  # modified just now: within the timestamp resolution, so never taken from the cache
    before = len(hashed)
    manifest.verify_component(copy, "vae", "VAE")
    manifest.verify_component(copy, "vae", "VAE")
    assert hashed[before:].count(fresh.resolve()) == 2


@pytest.mark.parametrize("content, complaint", [('{"format_version": 99}', "has format_version 99, this jinbetween "
                                                 "reads 1"), ("[1]", "has format_version None"),
                                                ('{"format_', "is unreadable")],
                         ids=["other_version", "not_an_object", "truncated"])
@pytest.mark.parametrize("record, read, fix", [
    (MANIFEST, manifest.read_manifest, "convert the weights again"),
    ("delta.json", lambda folder: load_delta(folder, config.tiny()), "write the delta again"),
], ids=["manifest", "delta"])
def test_a_bad_versioned_record_is_refused_naming_the_file_and_the_fix(tmp_path, record, read, fix, content,
                                                                       complaint):
    (tmp_path / record).write_text(content)
    with pytest.raises(CorruptWeightsError) as raised:
        read(tmp_path)
    message = str(raised.value)
    assert f"{tmp_path / record} {complaint}" in message and message.endswith(f"; {fix}."), message


# --------------------------------------------------------------------------------------------------
# Interrupted writes.


def test_a_failed_write_leaves_the_previous_output_and_no_partial_file(tmp_path, monkeypatch):
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    path = write_video(frames, tmp_path / "v.gif")
    before = path.read_bytes()
    stale = tmp_path / ".v.gif.partial-999999999-dead.gif"  # left by a killed process (no such pid)
    stale.write_bytes(b"half")

    def fail(image, target, **kwargs):
        with open(target, "wb") as fh:
            fh.write(b"GIF89a half a video")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        write_video(frames + 255, path)
    assert path.read_bytes() == before and hidden(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic.replacing_dir(tmp_path / "folder") as staging:
            (staging / "half").write_text("x")
            raise RuntimeError
    assert not (tmp_path / "folder").exists() and hidden(tmp_path) == []


def test_an_interrupted_dataset_leaves_no_folder_and_is_written_again(tmp_path, monkeypatch):
    cfg = WorldConfig(height=32, width=32, num_frames=3)
    rendered = []

    def interrupted(seed, cfg):
        if rendered:
            raise KeyboardInterrupt
        rendered.append(seed)
        return real(seed, cfg)

    real = world.video
    monkeypatch.setattr(world, "video", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world.write_dataset(tmp_path, "validation", 2, cfg)
    assert list(tmp_path.iterdir()) == [], "the interrupted dataset left files"
    monkeypatch.setattr(world, "video", real)
    folder = world.write_dataset(tmp_path, "validation", 2, cfg)
    assert len([p for p in folder.iterdir() if p.is_dir()]) == 2 and (folder / "world.json").exists()


KILL_CONVERSION = """
import os, signal, sys
from jinbetween import checkpoint
from jinbetween.weights import loading
from jinbetween.weights import manifest
saved = []
real = checkpoint.save_tree
def save_tree(path, tree):  # killed while the second component (the VAE) is being written
    saved.append(path)
    if len(saved) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, tree)
manifest.save_tree = save_tree
loading.convert_pipeline(sys.argv[1], sys.argv[2])
"""


def test_a_conversion_killed_midway_leaves_nothing_complete_and_runs_again(diffusers_dir, converted, tmp_path):
    out = tmp_path / "svd"
    killed = subprocess.run([sys.executable, "-c", KILL_CONVERSION, str(diffusers_dir), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and hidden(tmp_path), "the killed conversion should leave only a hidden partial dir"
    assert cli.main(["convert", "--local-dir", str(diffusers_dir), "--out", str(out)]) == 0
    assert hidden(tmp_path) == [], "the re-run should remove the killed run's partial dir"
    assert integrity.verify_folder(out) == len(manifest.read_manifest(out)["files"]) > 0
    assert manifest.read_manifest(out)["components"].keys() == manifest.read_manifest(converted)["components"].keys()
    abstract = UNET_COMPONENT.abstract(loading.read_config(out, UNET_COMPONENT))
    again, reference = (naming.flat_params(loading.restore_component(d, "unet", abstract, jnp.float32))
                        for d in (out, converted))
    for path, value in reference.items():
        np.testing.assert_array_equal(again[path], value, err_msg=f"UNet {path}")


KILL_FINETUNE = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
from jinbetween import Pipeline, data
from jinbetween.finetune import RunConfig, TrainConfig, finetune
real = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):  # checkpoint 4's files are written, its commit has not happened
    if self._final_path.name == "4":
        os.kill(os.getpid(), signal.SIGKILL)
    return await real(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
weights, videos, out = sys.argv[1:]
dataset = data.VideoDataset.scan(videos, data.ClipSpec(num_frames=3, stride=2, height=16, width=24))
finetune(Pipeline.from_pretrained(weights), dataset, out, RunConfig(steps=5, batch_size=2, seed=3, save_every=2,
         prefetch=1), TrainConfig(learning_rate=1e-3))
"""


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Three frame folders of 6 frames: a square moving over a gradient."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for v in range(3):
        folder = root / f"clip{v}"
        folder.mkdir()
        background = np.linspace(0, 255, W)[None, :, None] * rng.uniform(0.3, 1, (1, 1, 3))
        for t in range(6):
            frame = np.broadcast_to(background, (H, W, 3)).copy()
            frame[4:10, 2 + 3 * t:8 + 3 * t] = 255 * rng.uniform(0, 1, 3)
            Image.fromarray(frame.astype(np.uint8)).save(folder / f"frame{t}.png")
    return root


def test_a_finetune_killed_while_writing_a_checkpoint_resumes_bit_for_bit(pipeline, diffusers_dir, videos,
                                                                          tmp_path):
    dataset = data.VideoDataset.scan(videos, data.ClipSpec(num_frames=F, stride=2, height=H, width=W))
    run, train = RunConfig(steps=5, batch_size=2, seed=3, save_every=2, prefetch=1), TrainConfig(learning_rate=1e-3)
    pipe = pipeline
    whole = finetune(pipe, dataset, tmp_path / "whole", run, train)
    parts = tmp_path / "parts"
    killed = subprocess.run([sys.executable, "-c", KILL_FINETUNE, str(diffusers_dir), str(videos), str(parts)],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = sorted(p.name for p in (parts / "checkpoints").iterdir())
    assert "2" in leftovers and "4" not in leftovers and any(".orbax-checkpoint-tmp" in n for n in leftovers), leftovers
    with open(parts / LOG_FILE, "a") as log:  # as if killed while appending a line too
        log.write('{"step": 5, "lo')
    resumed = finetune(pipe, dataset, parts, run, train, resume=True)
    assert sorted(p.name for p in (parts / "checkpoints").iterdir()) == ["2", "4", "5"], "a leftover remains"
    logged = [(tmp_path / d / LOG_FILE).read_text().splitlines() for d in ("whole", "parts")]
    assert [json.loads(line)["loss"] for line in logged[1]] == [json.loads(line)["loss"] for line in logged[0]]
    a, b = load_delta(whole, pipe.unet.config), load_delta(resumed, pipe.unet.config)
    for key in a:
        np.testing.assert_array_equal(np.asarray(b[key]), np.asarray(a[key]), err_msg=f"{key} differs after resume")


def test_a_diverging_finetune_stops_at_the_step_and_saves_nothing_of_it(pipeline, videos, tmp_path, monkeypatch):
    from jinbetween import finetune as finetune_module

    real = finetune_module.train_step

    def nan_at_step_2(unet, state, batch, key, cfg):
        state, metrics = real(unet, state, batch, key, cfg)
        return state, {**metrics, "loss": jnp.where(state.step == 2, jnp.nan, metrics["loss"])}

    monkeypatch.setattr(finetune_module, "train_step", nan_at_step_2)
    dataset = data.VideoDataset.scan(videos, data.ClipSpec(num_frames=F, stride=2, height=H, width=W))
    with pytest.raises(DivergedError, match=r"diverged at step 2 \(loss nan.*lower --lr.*last checkpoint \(1\)"):
        finetune(pipeline, dataset, tmp_path, RunConfig(steps=3, batch_size=2, save_every=1, prefetch=0),
                 TrainConfig(learning_rate=1e-3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]
    assert not (tmp_path / "gi_backward").exists()
