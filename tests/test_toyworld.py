"""The toy world: seeded determinism, shapes, splits, sprites inside the room, smooth motion that runs one way in
time, frames at arbitrary times, and datasets that the fine-tune loader reads."""

import dataclasses
import hashlib

import numpy as np
import pytest

from jinbetween import data, toyworld
from jinbetween.errors import ConfigError
from jinbetween.toyworld import WorldConfig

CFG = WorldConfig()
# Inradius / circumradius: how far every shape reaches from its centre whatever its angle.
INRADIUS = {"disc": 1.0, "ring": 1.0, "square": 0.5 ** 0.5, "triangle": 0.5}
# Digests of seed 0 under the default config. A deliberate change to the generator changes them (update them then);
# any other change means datasets written before can no longer be regenerated from their seeds.
SCENE_0_SHA256 = "43c992487db726d85570e879a04f8628e6b70ae7d2cbc76fb25f726d5ba00e83"
VIDEO_0_SHA256 = "d3acf4c3bd6621cc2e0d37baa27e880a593a622bfff9b7a2ddb7473b72dac9bd"


def _energy(scene: toyworld.Scene, position: np.ndarray, velocity: np.ndarray) -> np.ndarray:
    """Returns each sprite's kinetic plus potential energy `[T, N]` (per unit mass, height above the floor)."""
    return 0.5 * (velocity ** 2).sum(-1) + scene.gravity * (scene.floor - position[..., 1])


def test_same_seed_gives_identical_bytes():
    assert toyworld.sample_scene(11, CFG) == toyworld.sample_scene(11, CFG)
    np.testing.assert_array_equal(toyworld.video(11, CFG), toyworld.video(11, CFG))


def test_seed_0_is_pinned():
    scene = hashlib.sha256(repr(toyworld.sample_scene(0, CFG)).encode()).hexdigest()
    assert scene == SCENE_0_SHA256, f"the scene of seed 0 changed: sha256 {scene}"
    frames = hashlib.sha256(toyworld.video(0, CFG).tobytes()).hexdigest()
    assert frames == VIDEO_0_SHA256, f"the scene of seed 0 is unchanged but its video changed: sha256 {frames}"


def test_different_seeds_give_different_videos():
    digests = {hashlib.sha256(toyworld.video(seed, CFG).tobytes()).hexdigest() for seed in range(12)}
    assert len(digests) == 12, f"12 seeds gave only {len(digests)} distinct videos"


@pytest.mark.parametrize("cfg", [CFG, WorldConfig(height=64, width=96, num_frames=5, fps=10.0, max_sprites=2)])
def test_video_shape_and_dtype(cfg):
    frames = toyworld.video(3, cfg)
    assert frames.shape == (cfg.num_frames, cfg.height, cfg.width, 3) and frames.dtype == np.uint8
    assert cfg.min_sprites <= len(toyworld.sample_scene(3, cfg).sprites) <= cfg.max_sprites


def test_splits_are_disjoint_and_named():
    ranges = sorted(toyworld.SPLITS.values(), key=lambda r: r.start)
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop <= b.start, f"seed ranges {a} and {b} overlap"
    assert toyworld.split_seeds("validation", 3) == [1_000_000, 1_000_001, 1_000_002]
    with pytest.raises(ValueError, match="choose one of"):
        toyworld.split_seeds("dev", 3)
    with pytest.raises(ValueError, match="holds 0..10000"):
        toyworld.split_seeds("test", 10_001)


def test_sprites_stay_inside_the_room():
    times = np.arange(0, 2 * CFG.duration, 1 / 50)
    for seed in range(50):
        scene = toyworld.sample_scene(seed, CFG)
        states = toyworld.trajectory(scene, times)
        reach = np.array([s.radius * INRADIUS[s.shape] for s in scene.sprites])
        x, y = states.position[..., 0], states.position[..., 1]
        worst = max((reach - x).max(), (x + reach - scene.aspect).max(), (reach - y).max(),
                    (y + reach - scene.floor).max())
        assert worst <= 1e-9, f"seed {seed}: a sprite reaches {worst:.3g} frame heights out of the room"


def test_sprite_is_drawn_where_its_trajectory_says():
    # Recolouring one sprite changes exactly its own pixels, weighted symmetrically about its centre.
    for seed in range(3):
        scene = toyworld.sample_scene(seed, CFG)
        centres = toyworld.trajectory(scene, CFG.frame_times).position * CFG.height
        for j, sprite in enumerate(scene.sprites):
            white, black = (dataclasses.replace(scene, sprites=(dataclasses.replace(sprite, shade=0.0, colour=c),))
                            for c in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
            weight = np.abs(toyworld.render(white, CFG).astype(float) - toyworld.render(black, CFG)).sum(-1)
            ys, xs = np.mgrid[:CFG.height, :CFG.width] + 0.5
            drawn = np.stack([(weight * xs).sum((1, 2)), (weight * ys).sum((1, 2))], -1) / weight.sum((1, 2))[:, None]
            error = np.abs(drawn - centres[:, j]).max()
            assert error < 0.1, f"seed {seed} sprite {j} ({sprite.shape}) drawn {error:.3f} px from its centre"


def test_motion_exists_and_is_smooth():
    for seed in range(20):
        frames = toyworld.video(seed, CFG).astype(np.int16)
        change = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
        # Dropped sprites may hang still in the first frames and sprites may come to rest in the last ones.
        assert (change > 0).sum() >= (CFG.num_frames - 1) // 2, f"seed {seed}: frame changes {change.round(2)}"
        assert change.max() < 25, f"seed {seed}: a frame differs from the previous by {change.max():.1f}/255 on average"
        steps = np.abs(np.diff(toyworld.trajectory(toyworld.sample_scene(seed, CFG), CFG.frame_times).position, axis=0))
        assert steps.max() < 0.2, f"seed {seed}: a sprite moves {steps.max():.3f} frame heights in one frame"


def test_sub_pixel_motion_is_visible():
    scene = toyworld.sample_scene(0, CFG)
    frames = toyworld.render(scene, CFG, [1.0, 1.001])
    moved = np.abs(np.diff(toyworld.trajectory(scene, [1.0, 1.001]).position, axis=0)).max() * CFG.height
    assert moved < 0.25, f"the test meant a sub-pixel step, got {moved:.3f} px"
    assert not np.array_equal(frames[0], frames[1]), f"a {moved:.3f} px step left every pixel unchanged"


def test_dropped_sprites_hang_still_then_fall_from_rest():
    checked = 0
    for seed in range(30):
        scene = toyworld.sample_scene(seed, CFG)
        for j, sprite in enumerate(scene.sprites):
            if sprite.motion != "drop":
                continue
            times = [0.0, 0.5 * sprite.release, sprite.release, sprite.release + 0.05, sprite.release + 0.1]
            states = toyworld.trajectory(scene, times)
            np.testing.assert_array_equal(states.position[:3, j], [sprite.position] * 3)
            assert np.all(states.velocity[:3, j] == 0)
            vy = states.velocity[2:, j, 1]
            assert 0 < vy[1] < vy[2], f"seed {seed} sprite {j}: vertical speeds {vy} after release"
            checked += 1
    assert checked >= 10


def test_forward_and_reversed_videos_separate_by_energy_drift():
    # Gravity cannot tell the direction of time (reversal keeps accelerations), dissipation can: mechanical energy
    # only drains forward, so a reversed video gains it. The statistic sees positions and velocities only; a
    # reversed video has the frames in the opposite order and every velocity negated.
    forward, backward = [], []
    for seed in range(50):
        scene = toyworld.sample_scene(seed, CFG)
        states = toyworld.trajectory(scene, CFG.frame_times)
        for position, velocity, out in ((states.position, states.velocity, forward),
                                        (states.position[::-1], -states.velocity[::-1], backward)):
            energy = _energy(scene, position, velocity).sum(-1)
            out.append(energy[-1] - energy[0])
    assert max(forward) < -0.1 < 0.1 < min(backward), (
        f"energy drift forward {max(forward):.3f} (should be < -0.1), reversed {min(backward):.3f} (should be > 0.1)")


def test_energy_never_rises_along_a_video():
    times = np.arange(0, CFG.duration, 1 / 70)
    for seed in range(20):
        scene = toyworld.sample_scene(seed, CFG)
        states = toyworld.trajectory(scene, times)
        rise = np.diff(_energy(scene, states.position, states.velocity), axis=0).max()
        assert rise < 2e-3, f"seed {seed}: a sprite gains {rise:.4f} energy within 1/70 s"


def test_frames_at_any_times_agree_with_the_default_grid():
    scene = toyworld.sample_scene(5, CFG)
    frames = toyworld.video(5, CFG)
    np.testing.assert_array_equal(toyworld.render(scene, CFG, CFG.frame_times), frames)
    # k/7 and 2k/14 are the same float, so the doubled grid holds the default one.
    np.testing.assert_array_equal(toyworld.render(scene, CFG, np.arange(2 * CFG.num_frames - 1) / 14)[::2], frames)
    np.testing.assert_array_equal(toyworld.render(scene, CFG, CFG.frame_times[::-3]), frames[::-3])


def test_write_dataset_is_read_by_the_training_loader(tmp_path):
    cfg = WorldConfig(num_frames=6)
    folder = toyworld.write_dataset(tmp_path, "validation", 3, cfg)
    dataset = data.VideoDataset.scan(folder, data.ClipSpec(num_frames=6, stride=1, height=128, width=128))
    assert len(dataset) == 3 and not dataset.skipped
    seeds = toyworld.split_seeds("validation", 3)
    for index, seed in enumerate(seeds):
        np.testing.assert_array_equal(dataset.read_clip(index, 0), toyworld.video(seed, cfg))
    first_frame = folder / f"{seeds[0]:07d}" / "000.png"
    written = first_frame.stat().st_mtime_ns
    assert toyworld.write_dataset(tmp_path, "validation", 3, cfg) == folder
    assert first_frame.stat().st_mtime_ns == written, "a complete dataset was written again"
    with pytest.raises(FileExistsError, match="remove it or choose another out_dir"):
        toyworld.write_dataset(tmp_path, "validation", 4, cfg)


def test_write_dataset_as_mp4(tmp_path):
    folder = toyworld.write_dataset(tmp_path, "test", 1, CFG, encoding="mp4")
    dataset = data.VideoDataset.scan(folder, data.ClipSpec(num_frames=14, stride=1, height=128, width=128))
    assert [s.num_frames for s in dataset.sources] == [14]
    error = np.abs(dataset.read_clip(0, 0).astype(int) - toyworld.video(toyworld.split_seeds("test", 1)[0])).mean()
    assert error < 3, f"the mp4 differs from the rendered frames by {error:.2f}/255 on average"


def test_bad_inputs_name_the_fix():
    with pytest.raises(ConfigError, match="restitution"):
        WorldConfig(restitution=(0.5, 1.2))
    with pytest.raises(ConfigError, match="choose a non-empty subset"):
        WorldConfig(shapes=("hexagon",))
    with pytest.raises(ConfigError, match="same aspect ratio"):
        toyworld.render(toyworld.sample_scene(0, CFG), WorldConfig(width=256))
    with pytest.raises(ValueError, match="non-negative int"):
        toyworld.sample_scene(-1, CFG)
    with pytest.raises(ValueError, match="finite times >= 0"):
        toyworld.render(toyworld.sample_scene(0, CFG), CFG, [0.0, -1.0])


def test_toy_model_configs_fit_together_and_stay_small():
    import jax
    from flax import nnx

    from jinbetween.models import abstract_image_encoder, abstract_unet, abstract_vae
    from jinbetween.toyworld import models

    unet, vae, encoder = models.unet_config(), models.vae_config(), models.image_encoder_config()
    world = WorldConfig()
    assert encoder.projection_dim == unet.cross_attention_dim[0]
    assert vae.latent_channels == unet.out_channels and unet.in_channels == 2 * vae.latent_channels
    assert world.height % (vae.downsample_factor * unet.downsample_factor) == 0
    assert world.height // vae.downsample_factor == unet.sample_size and world.num_frames == unet.num_frames
    counts = [sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nnx.state(m)))
              for m in (abstract_unet(unet), abstract_vae(vae), abstract_image_encoder(encoder))]
    assert 2 * sum(counts) < 50e6, f"{counts} parameters: over 50 MB in bf16"
