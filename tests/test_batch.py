"""Batch generation over devices: `Pipeline.interpolate_batch`, `jinbetween batch` and `jinbetween.distributed`.

JAX fixes the number of devices when it starts, so the sharded runs happen once, in a subprocess with 4 fake CPU
devices (`sharded_worker`); it saves its videos and observations and the tests check them here. The shipped
toy-world model at 64×64, 3 frames and two ViBiD steps keeps the subprocess near a minute on 2 cores: one set of
compilations for 4 devices, one for 1 device (which `interpolate` shares), and the CLI reuses the first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from jinbetween import distributed, pipeline
from jinbetween.cli import main as cli_main
from jinbetween.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEVICES, PAIRS, SIZE = 4, 5, 64
RUN = dict(method="vibid", num_inference_steps=2, num_frames=3)
OWN_SEED = 3  # pair OWN_PAIR carries its own key: jax.random.key(OWN_SEED)
OWN_PAIR = 3
# 4 devices against 1, in [0, 1] frame units: exact. XLA rewrites `x / s` (s a scalar) as `x · (1/s)` in one-device
# programs but not in partitioned ones, a one-ulp difference that sampling steps grow; the schedule and samplers
# therefore write such divisions as multiplications by reciprocals, which leave XLA nothing to rewrite.
FOUR_VS_ONE_DEVICE_ATOL = 0.0


def keyframe(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def sharded_worker(out: str) -> None:
    """Runs in a process with 4 devices: the same pairs on 4 devices, on 1, and through `interpolate`; the CLI."""
    from jinbetween import Pipeline
    from jinbetween.samplers import METHODS

    assert jax.device_count() == DEVICES, jax.devices()
    out_dir = Path(out)
    pipe = Pipeline.from_pretrained()
    key = jax.random.key(7)
    pairs = [(keyframe(2 * i), keyframe(2 * i + 1)) for i in range(PAIRS)]
    pairs[OWN_PAIR] = (*pairs[OWN_PAIR], jax.random.key(OWN_SEED))
    fetched, fetch = [], pipeline._fetch

    def recording_fetch(videos, output):
        if isinstance(videos, jax.Array):
            fetched.append({"output": output, "spec": list(videos.sharding.spec),
                            "devices": len(videos.sharding.device_set),
                            "shards": [list(shard.data.shape) for shard in videos.addressable_shards]})
        return fetch(videos, output)

    pipeline._fetch = recording_fetch
    videos = {
        "four_devices": list(pipe.interpolate_batch(pairs, key=key, batch_size=DEVICES, output="float", **RUN)),
        "one_device": list(pipe.interpolate_batch(pairs, key=key, mesh=distributed.local_mesh(jax.devices()[:1]),
                                                  output="float", **RUN)),
        "interpolate": [pipe.interpolate(*pair[:2], key=pair[2] if len(pair) == 3 else key,
                                         first_index=0 if len(pair) == 3 else i, output="float", **RUN)
                        for i, pair in enumerate(pairs)],
    }
    list(pipe.interpolate_batch(pairs, key=key, batch_size=DEVICES, output="latent", **RUN))  # records the latents
    pipeline._fetch = fetch
    cfg = METHODS["vibid"].config(num_frames=RUN["num_frames"], num_steps=RUN["num_inference_steps"],
                                  sigma_min=pipe.sigma_min, sigma_max=pipe.sigma_max)
    sampler = distributed.per_device(pipeline._pair_sampler("vibid", cfg), distributed.local_mesh(),
                                     (False, True, True, True))
    try:
        pipe.interpolate_batch(pairs, batch_size=6, **RUN)
        batch_size_error = None
    except ConfigError as err:
        batch_size_error = str(err)

    cli = out_dir / "cli"
    cli.mkdir()
    for i in range(3):
        Image.fromarray(keyframe(100 + i)).save(cli / f"k{i}.png")
    lines = [{"start": "k0.png", "end": "k1.png"}, {"start": "k1.png", "end": "k2.png", "out": "named.gif"},
             {"start": "k2.png", "end": "k0.png", "seed": 5}]
    (cli / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    Pipeline.from_pretrained = lambda *args, **kwargs: pipe  # the same weights, loaded once: saves seconds
    code = cli_main(["batch", str(cli / "pairs.jsonl"), "--out-dir", str(cli / "videos"), "--method", "vibid",
                     "--steps", "2", "--num-frames", "3", "--height", str(SIZE), "--width", str(SIZE),
                     "--batch-size", str(DEVICES)])

    np.savez(out_dir / "videos.npz", **{name: np.stack(v) for name, v in videos.items()})
    (out_dir / "record.json").write_text(json.dumps({
        "fetched": fetched, "sampler_compilations": sampler._cache_size(), "batch_size_error": batch_size_error,
        "cli_code": code, "one_device_compilations": METHODS["vibid"].sample._cache_size()}))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(videos by run, observations, output folder) of `sharded_worker`."""
    out = tmp_path_factory.mktemp("sharded")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}".strip()
    done = subprocess.run(
        [sys.executable, "-c", f"from tests.test_batch import sharded_worker; sharded_worker({str(out)!r})"],
        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, f"the 4-device worker failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    with np.load(out / "videos.npz") as videos:
        return {name: videos[name] for name in videos.files}, json.loads((out / "record.json").read_text()), out


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str, atol: float = 0) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    differing = np.abs(actual - expected) > atol
    assert not differing.any(), (f"{what}: {differing.sum()} of {differing.size} values differ by more than "
                                 f"{atol:g}, by up to {np.abs(actual - expected).max():.3g}")


def test_four_devices_give_the_one_device_videos(sharded):
    videos, _, _ = sharded
    assert videos["four_devices"].shape == (PAIRS, RUN["num_frames"], SIZE, SIZE, 3)
    assert_identical(videos["four_devices"], videos["one_device"], "4 devices vs 1 device", FOUR_VS_ONE_DEVICE_ATOL)


def test_batch_videos_equal_interpolate_pair_by_pair(sharded):
    videos, _, _ = sharded
    assert_identical(videos["one_device"], videos["interpolate"], "interpolate_batch on 1 device vs interpolate")
    assert np.abs(videos["interpolate"][0] - videos["interpolate"][1]).max() > 0.1, "pairs should differ"


def test_sampler_latents_and_frames_are_split_over_four_devices(sharded):
    _, record, _ = sharded
    latents = [f for f in record["fetched"] if f["output"] == "latent"]
    frames = [f for f in record["fetched"] if f["output"] == "float"]
    assert latents and frames, record["fetched"]
    for fetched in latents + frames:
        assert fetched["devices"] == DEVICES and fetched["spec"] == ["batch"], fetched
        assert [shard[0] for shard in fetched["shards"]] == [1] * DEVICES, f"one pair per device: {fetched}"
    assert frames[0]["shards"][0][1:] == [RUN["num_frames"], SIZE, SIZE, 3]


def test_interpolate_runs_the_one_device_batch_program(sharded):
    _, record, _ = sharded
    assert record["one_device_compilations"] == 1, "interpolate and a one-device batch compiled ViBiD separately"


def test_a_short_last_chunk_is_padded_and_compiles_nothing_new(sharded):
    videos, record, _ = sharded
    assert len(videos["four_devices"]) == PAIRS, "padding copies must not be yielded"
    assert len([f for f in record["fetched"] if f["output"] == "float"]) == 2, "5 pairs in chunks of 4: 2 chunks"
    assert record["sampler_compilations"] == 1, "the padded last chunk recompiled the sampler"
    assert "batch_size=6 does not split over 4 devices" in record["batch_size_error"]


def test_cli_batch_writes_every_video_and_a_summary(sharded):
    from jinbetween.video import read_video

    _, record, out = sharded
    assert record["cli_code"] == 0
    folder = out / "cli" / "videos"
    summary = json.loads((folder / "summary.json").read_text())
    written = [Path(v["out"]).name for v in summary["videos"]]
    assert written == ["0000_k0_k1.mp4", "named.gif", "0002_k2_k0.mp4"]
    assert [v.get("index") for v in summary["videos"]] == [0, 1, None] and summary["videos"][2]["seed"] == 5
    assert len(summary["devices"]) == DEVICES and summary["batch_size"] == DEVICES
    for name in written:
        assert read_video(folder / name).shape == (RUN["num_frames"], SIZE, SIZE, 3), name


def test_bad_pair_lines_are_all_reported_before_the_model_loads(tmp_path, monkeypatch, capsys):
    Image.fromarray(keyframe(0)).save(tmp_path / "a.png")
    (tmp_path / "not_an_image.png").write_text("text")
    lines = ['{"start": "a.png", "end": "a.png"}', '{"start": "a.png", "end": "missing.png"}', "{oops",
             '{"start": "a.png"}', '{"start": "a.png", "end": "a.png", "strat": 1}',
             '{"start": "a.png", "end": "not_an_image.png"}', '{"start": "a.png", "end": "a.png", "out": "v.avi"}',
             '{"start": "a.png", "end": "a.png", "seed": "x"}', "",
             '{"start": "a.png", "end": "a.png", "out": "0000_a_a.mp4"}',
             '{"start": "a.png", "end": "a.png", "out": "0002_a_a.mp4"}', '{"start": "a.png", "end": "a.png"}']
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the pairs file was checked")

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", no_loading)
    assert cli_main(["batch", str(tmp_path / "pairs.jsonl"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for expected in ("line 2: end keyframe missing.png not found", "line 3: not JSON", 'line 4: no "end"',
                     "line 5: unknown field(s) ['strat']", "line 6: end keyframe not_an_image.png is not a readable",
                     "line 7: \"out\" 'v.avi' is not a .mp4 or .gif", "line 8: \"seed\" 'x'",
                     "line 10: \"out\" '0000_a_a.mp4' is also line 1's",
                     "line 12: its video would be '0002_a_a.mp4', as line 11's"):
        assert expected in err, f"{expected!r} missing from:\n{err}"
    assert not re.search(r"^ *line (1|9|11):", err, re.MULTILINE), f"a good line was reported:\n{err}"
    (tmp_path / "empty.jsonl").write_text("\n")
    assert cli_main(["batch", str(tmp_path / "empty.jsonl"), "--out-dir", str(tmp_path / "out")]) == 2
    assert "holds no pairs" in capsys.readouterr().err


def test_multi_host_flags_are_checked_before_joining(tmp_path, capsys):
    Image.fromarray(keyframe(0)).save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text('{"start": "a.png", "end": "a.png"}\n')
    base = ["batch", str(tmp_path / "pairs.jsonl"), "--out-dir", str(tmp_path / "out")]
    assert cli_main([*base, "--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id",
                     "2"]) == 2
    assert "--process-id 2: out of range, the process index must be ≥ 0 and ≤ 1" in capsys.readouterr().err
    assert cli_main([*base, "--coordinator-address", "10.0.0.1", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "write HOST:PORT" in capsys.readouterr().err
    jax.devices()  # JAX has started: joining a run now must say so rather than hang
    with pytest.raises(ConfigError, match="call it first, before loading a pipeline"):
        distributed.initialize("localhost:1234", 2, 0, timeout_s=1)


def test_pair_chunks_pad_with_the_last_pair_and_fold_in_each_index():
    key, own = jax.random.key(1), jax.random.key(9)
    pairs = [(keyframe(i), keyframe(10 + i)) for i in range(5)]
    pairs[2] = (*pairs[2], own)
    chunks = list(pipeline._pair_chunks(pairs, 4, key, first_index=20))
    assert [chunk[0] for chunk in chunks] == [4, 1]
    count, starts, ends, keys = chunks[1]
    assert starts.shape == (4, SIZE, SIZE, 3) and (starts == pairs[4][0]).all() and (ends == pairs[4][1]).all()
    expected = [jax.random.fold_in(key, 20 + i) for i in range(5)]
    expected[2] = jax.random.fold_in(own, 0)  # what interpolate(start, end, key=own) uses
    got = [*chunks[0][3], *chunks[1][3][:1]]
    for i, (a, b) in enumerate(zip(got, expected)):
        assert (jax.random.key_data(a) == jax.random.key_data(b)).all(), f"pair {i} has the wrong key"
    assert all((jax.random.key_data(k) == jax.random.key_data(keys[0])).all() for k in keys), "padding keys"
    with pytest.raises(ConfigError, match="Pair 0 is a ndarray"):
        next(pipeline._pair_chunks([keyframe(0)], 4, key, 0))


def test_process_shares_split_the_pairs_in_order_once():
    for n in range(12):
        for count in range(1, 5):
            shares = [distributed.process_share(n, i, count) for i in range(count)]
            assert [i for share in shares for i in share] == list(range(n)), (n, count)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1, (n, count)


def test_meshes_must_be_one_dimensional_and_list_devices_once():
    device = jax.devices()[0]
    with pytest.raises(ConfigError, match="listed twice"):
        distributed.local_mesh([device, device])
    with pytest.raises(ConfigError, match="must be 1-D"):
        distributed.check_mesh(Mesh(np.array([[device]]), ("a", "b")))
    assert distributed.local_mesh().size == len(jax.local_devices())
