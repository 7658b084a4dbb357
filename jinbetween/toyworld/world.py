"""A seeded toy world of falling, bouncing, spinning sprites over textured backgrounds, rendered as uint8 videos.

Units: lengths in frame heights (x to the right in [0, aspect], y downwards in [0, 1]), time in seconds, angles in
radians (clockwise on screen, since y points down). A scene does not know its resolution: the same seed gives the
same motion at any size of the same aspect ratio.

The motion runs one way in time. Gravity alone would not make it so (a parabola played backwards is a parabola under
the same gravity); what reversal breaks is dissipation: bounces lose energy, air drag and floor friction slow sprites
down, spin dies out, and dropped sprites hang still until they are let go.

Same seed, same bytes: random numbers come only from `Generator.random` (numpy keeps that stream stable across
versions, not the streams of its other methods), the simulation runs on Python floats with `math`, and rendering
uses only correctly rounded elementwise numpy operations (no per-pixel transcendental functions, no reductions, no
BLAS), so nothing depends on numpy's SIMD paths or a summation order.
"""

from __future__ import annotations

import bisect
import colorsys
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from jinbetween import atomic, video as video_io
from jinbetween.errors import ConfigError

SHAPES = ("disc", "ring", "square", "triangle")
MOTIONS = ("drop", "throw", "roll")
TEXTURES = ("stripes", "checker", "noise")
ENCODINGS = ("png", "mp4")

# Disjoint seed ranges, so no test video is ever a training video.
SPLITS = {"train": range(0, 1_000_000), "validation": range(1_000_000, 1_010_000),
          "test": range(1_010_000, 1_020_000)}

# Seed streams, so the scene draws and the background noise never share random numbers.
_SCENE_STREAM, _NOISE_STREAM = 0, 1
# Simulation modes of one sprite.
_HELD, _FREE, _REST = 0, 1, 2
# A bounce that would rise less than this (0.26 px at 128 px) ends in rest instead: otherwise a sprite would bounce
# ever lower forever.
_SETTLE_HEIGHT = 0.002
# On contact a sprite loses this fraction of its speed along the surface, and its spin moves this far towards rolling.
_GRIP = 0.15
_SPIN_COUPLING = 0.5
# Rate (1/s) at which a resting square or triangle tips onto its nearest flat side.
_TIP_RATE = 8.0
# Bisection steps that place a contact within one substep (1/120 s / 2^32: far below a pixel's worth of motion).
_BISECTIONS = 32
# More contacts than this within one substep means a sprite wedged in a corner; the rest wait for the next substep.
_MAX_CONTACTS = 6
# Sprite edges darken over this many frame heights (1.5 px at 128 px), and this much.
_OUTLINE_WIDTH, _OUTLINE_DARKEN = 0.012, 0.45

# Vertex directions of the polygons at angle 0 (y down): the square sits flat, the triangle points up.
_VERTICES = {"square": tuple(math.pi / 4 + k * math.pi / 2 for k in range(4)),
             "triangle": tuple(-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))}
# Rotations between flat-bottomed poses.
_FLAT_PERIOD = {"square": math.pi / 2, "triangle": 2 * math.pi / 3}
_LEFT, _RIGHT, _UP, _DOWN = range(4)
# The room's sides as (axis, outward sign, key of its position in `_Body.limits`, side of the sprite that touches it).
_WALLS = ((0, -1, "zero", _LEFT), (0, 1, "aspect", _RIGHT))
_BOUNDARIES = _WALLS + ((1, -1, "zero", _UP), (1, 1, "floor", _DOWN))

RGB = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """What to sample and how to film it: frame size and times, sprite counts and sizes, the laws of motion.

    `size`: range of sprite circumradii (frame heights). `gravity` (frame heights/s²), `drag` (air, 1/s),
    `friction` (floor, deceleration in units of gravity) and `spin_damping` (1/s) are the same for every scene;
    `restitution` is a per-sprite range. `max_speed` (frame heights/s) and `max_spin` (rad/s) bound launches.
    `substep` (s) is the grid on which contacts are looked for; each one found is then placed exactly.
    """

    height: int = 128
    width: int = 128
    num_frames: int = 14
    fps: float = 7.0
    min_sprites: int = 2
    max_sprites: int = 4
    shapes: tuple[str, ...] = SHAPES
    size: tuple[float, float] = (0.06, 0.12)
    gravity: float = 1.0
    drag: float = 0.2
    restitution: tuple[float, float] = (0.45, 0.8)
    friction: float = 0.3
    spin_damping: float = 0.8
    max_speed: float = 0.9
    max_spin: float = 5.0
    substep: float = 1 / 120

    def __post_init__(self):
        if self.height < 8 or self.width < 8 or self.num_frames < 1 or not self.fps > 0:
            raise ConfigError(f"WorldConfig {self.height}×{self.width}, {self.num_frames} frames at {self.fps} fps: "
                              f"use at least 8×8 pixels, one frame and a positive fps.")
        if not 1 <= self.min_sprites <= self.max_sprites:
            raise ConfigError(f"Sprite count range {self.min_sprites}..{self.max_sprites}: need 1 <= min <= max.")
        if not self.shapes or set(self.shapes) - set(SHAPES):
            raise ConfigError(f"shapes={self.shapes!r}; choose a non-empty subset of {SHAPES}.")
        if not 0 < self.size[0] <= self.size[1] <= 0.2 * min(1.0, self.aspect):
            raise ConfigError(f"Sprite size range {self.size} (frame heights): need 0 < low <= high <= "
                              f"{0.2 * min(1.0, self.aspect):.3g}, so sprites fit between the walls and the floor.")
        if not 0 <= self.restitution[0] <= self.restitution[1] < 1:
            raise ConfigError(f"restitution={self.restitution}: need 0 <= low <= high < 1 (bounces lose energy).")
        if min(self.gravity, self.drag, self.friction, self.spin_damping, self.max_speed, self.max_spin) < 0:
            raise ConfigError("gravity, drag, friction, spin_damping, max_speed and max_spin must be non-negative.")
        if not 0 < self.substep <= 0.05:
            raise ConfigError(f"substep={self.substep} s: use a positive step of at most 0.05 s (default 1/120).")

    @property
    def aspect(self) -> float:
        """Returns width / height: the x coordinate of the right wall."""
        return self.width / self.height

    @property
    def duration(self) -> float:
        """Returns the time of the last default frame, in seconds."""
        return (self.num_frames - 1) / self.fps

    @property
    def frame_times(self) -> np.ndarray:
        """Returns the default frame times `[num_frames]` in seconds: `k / fps`."""
        return np.arange(self.num_frames, dtype=np.float64) / self.fps


@dataclasses.dataclass(frozen=True)
class Sprite:
    """One sprite's looks and initial conditions.

    `radius`: circumradius (frame heights). `shade`: brightness change across the sprite, which makes a disc's spin
    visible. `motion`: "drop" (held still until `release` seconds, then falls), "throw" (flies from t=0) or "roll"
    (starts on the floor, rolling or sliding). `position` (x, y) of the centre, `velocity`, `angle` and `spin`
    (rad/s) at t=0; `restitution`: the fraction of normal speed kept in a bounce.
    """

    shape: str
    radius: float
    colour: RGB
    shade: float
    motion: str
    position: tuple[float, float]
    velocity: tuple[float, float]
    angle: float
    spin: float
    release: float
    restitution: float


@dataclasses.dataclass(frozen=True)
class Background:
    """A static backdrop: a wall with a four-corner colour gradient and a low-contrast texture, over a ground band.

    `corners`: wall colours at top-left, top-right, bottom-left, bottom-right. `ground`: ground colours at its top
    edge and at the frame's bottom. `texture` (one of TEXTURES) with `contrast`, `frequency` (cycles per frame
    height) and `orientation` (radians); `grain`: amplitude of fine noise; `noise_seed` seeds both noises.
    """

    corners: tuple[RGB, RGB, RGB, RGB]
    ground: tuple[RGB, RGB]
    texture: str
    contrast: float
    frequency: float
    orientation: float
    grain: float
    noise_seed: int


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything that decides a video except its size and frame times: laws, backdrop, sprites (back to front).

    `aspect`: width / height it was sampled for; `floor`: y of the ground's top edge, where sprites land.
    """

    seed: int
    aspect: float
    floor: float
    gravity: float
    drag: float
    friction: float
    spin_damping: float
    background: Background
    sprites: tuple[Sprite, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
    """Sprite states at `times [T]` (s): `position [T, N, 2]` (x, y of the centres), `velocity [T, N, 2]`,
    `angle [T, N]` and `spin [T, N]` (rad/s), in scene units; N follows the scene's sprite order."""

    times: np.ndarray
    position: np.ndarray
    velocity: np.ndarray
    angle: np.ndarray
    spin: np.ndarray


class _Draw:
    """Uniform draws built on `Generator.random` alone, whose stream numpy keeps stable across versions."""

    def __init__(self, seed: int, stream: int):
        self._rng = np.random.default_rng([seed, stream])

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(self._rng.random())

    def integer(self, low: int, high: int) -> int:
        """Returns an integer in [low, high], both included."""
        return low + min(int(self.uniform() * (high - low + 1)), high - low)

    def choice(self, options):
        return options[self.integer(0, len(options) - 1)]


def sample_scene(seed: int, cfg: WorldConfig = WorldConfig()) -> Scene:
    """Returns the scene of `seed` (a non-negative int) under `cfg`; the same pair always gives the same scene."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Scene seed {seed!r}: use a non-negative int (see split_seeds).")
    seed = int(seed)
    draw = _Draw(seed, _SCENE_STREAM)
    floor = draw.uniform(0.84, 0.94)
    background, lightness = _sample_background(draw, seed)
    count = draw.integer(cfg.min_sprites, cfg.max_sprites)
    first_hue = draw.uniform()
    sprites = tuple(_sample_sprite(draw, cfg, floor, (first_hue + (i + draw.uniform(-0.15, 0.15)) / count) % 1.0,
                                   lightness) for i in range(count))
    return Scene(seed=seed, aspect=cfg.aspect, floor=floor, gravity=cfg.gravity, drag=cfg.drag,
                 friction=cfg.friction, spin_damping=cfg.spin_damping, background=background, sprites=sprites)


def _hsv(hue: float, saturation: float, value: float) -> RGB:
    return tuple(min(max(c, 0.0), 1.0) for c in colorsys.hsv_to_rgb(hue % 1.0, saturation, value))


def _sample_background(draw: _Draw, seed: int) -> tuple[Background, float]:
    """Returns a backdrop of muted colours and its wall's mean value (the sprites are coloured to stand out)."""
    hue, saturation, value = draw.uniform(), draw.uniform(0.05, 0.3), draw.uniform(0.3, 0.85)
    corners = tuple(_hsv(hue + draw.uniform(-0.06, 0.06), saturation * draw.uniform(0.6, 1.4),
                         value + draw.uniform(-0.12, 0.12)) for _ in range(4))
    ground_top = _hsv(draw.uniform(), draw.uniform(0.1, 0.4), value * draw.uniform(0.45, 0.8))
    ground_bottom = tuple(c * draw.uniform(0.7, 0.95) for c in ground_top)
    background = Background(corners=corners, ground=(ground_top, ground_bottom), texture=draw.choice(TEXTURES),
                            contrast=draw.uniform(0.03, 0.08), frequency=draw.uniform(3.0, 10.0),
                            orientation=draw.uniform(0.0, math.pi), grain=draw.uniform(0.01, 0.03), noise_seed=seed)
    return background, value


def _sample_sprite(draw: _Draw, cfg: WorldConfig, floor: float, hue: float, backdrop_value: float) -> Sprite:
    """Returns one sprite of hue `hue`, placed wholly inside the room [0, aspect] × [0, floor]."""
    shape = draw.choice(cfg.shapes)
    radius = draw.uniform(*cfg.size)
    # Saturated sprites, darker on light walls and brighter on dark ones, so they never melt into the backdrop.
    value = draw.uniform(0.35, 0.7) if backdrop_value > 0.55 else draw.uniform(0.75, 1.0)
    colour = _hsv(hue, draw.uniform(0.55, 0.95), value)
    shade = draw.uniform(0.1, 0.3)
    restitution = draw.uniform(*cfg.restitution)
    pick = draw.uniform()
    motion = "drop" if pick < 0.35 else "throw" if pick < 0.8 else "roll"
    if motion == "roll" and shape in _FLAT_PERIOD:
        angle = _FLAT_PERIOD[shape] * draw.integer(0, 3)
    else:
        angle = draw.uniform(0.0, 2 * math.pi)
    left, right, up, down = _extents(shape, radius, angle)
    x = draw.uniform(left, cfg.aspect - right)
    velocity, spin, release = (0.0, 0.0), 0.0, 0.0
    if motion == "drop":
        y = draw.uniform(up, max(up, min(0.55, floor - down - 0.2)))
        release = draw.uniform(0.0, 0.4 * cfg.duration)
    elif motion == "throw":
        y = draw.uniform(up, floor - down - 0.05)
        speed, heading = cfg.max_speed * draw.uniform(0.3, 1.0), draw.uniform(-math.pi, 0.0)
        velocity = (speed * math.cos(heading), speed * math.sin(heading))
        spin = draw.uniform(-cfg.max_spin, cfg.max_spin)
    else:
        y = floor - down
        velocity = (cfg.max_speed * draw.uniform(0.25, 0.8) * draw.choice((-1.0, 1.0)), 0.0)
        spin = velocity[0] / radius if shape not in _FLAT_PERIOD else 0.0
    return Sprite(shape=shape, radius=radius, colour=colour, shade=shade, motion=motion, position=(x, y),
                  velocity=velocity, angle=angle, spin=spin, release=release, restitution=restitution)


def _extent(shape: str, radius: float, angle: float, side: int) -> tuple[float, float]:
    """Returns how far a sprite at `angle` reaches from its centre towards `side`, and that reach's d/d(angle)."""
    offsets = _VERTICES.get(shape)
    if offsets is None:
        return radius, 0.0
    best, slope = -2.0, 0.0
    for offset in offsets:
        c, s = math.cos(angle + offset), math.sin(angle + offset)
        reach, turn = ((-c, s), (c, -s), (-s, -c), (s, c))[side]
        if reach > best:
            best, slope = reach, turn
    return radius * best, radius * slope


def _extents(shape: str, radius: float, angle: float) -> tuple[float, float, float, float]:
    """Returns the sprite's reach (left, right, up, down) from its centre at `angle`."""
    return tuple(_extent(shape, radius, angle, side)[0] for side in range(4))


class _Body:
    """One sprite's motion: a list of segments `(start time, mode, state)`, each advanced in closed form.

    A state is `(x, y, vx, vy, angle, spin)`. A new segment starts only at a contact or a release, and every state
    inside a segment is computed from the segment's start, so the state at time t never depends on which other times
    were asked for. Contacts are looked for on the fixed substep grid and placed by bisection.
    """

    def __init__(self, scene: Scene, sprite: Sprite, substep: float):
        self.sprite, self.substep = sprite, substep
        self.shape, self.radius = sprite.shape, sprite.radius
        self.gravity, self.drag, self.spin_damping = scene.gravity, scene.drag, scene.spin_damping
        self.deceleration = scene.friction * scene.gravity
        self.floor, self.aspect = scene.floor, scene.aspect
        self.rest_speed = math.sqrt(2 * scene.gravity * _SETTLE_HEIGHT)
        self.limits = {"zero": 0.0, "aspect": scene.aspect, "floor": scene.floor}
        state = (*sprite.position, *sprite.velocity, sprite.angle, sprite.spin)
        if sprite.motion == "roll":
            self.segments = [(0.0, _REST, self._settle(state))]
        elif sprite.motion == "drop" and sprite.release > 0:
            self.segments = [(0.0, _HELD, (*sprite.position, 0.0, 0.0, sprite.angle, 0.0))]
        else:
            self.segments = [(0.0, _FREE, state)]
        self.starts = [0.0]
        self.steps = 0

    def state_at(self, t: float) -> tuple[float, ...]:
        """Returns the state at time `t`, the centre kept inside the room."""
        while self.steps * self.substep <= t:
            self._step()
        index = bisect.bisect_right(self.starts, t) - 1
        start, mode, state = self.segments[index]
        x, y, vx, vy, angle, spin = self._advance(mode, state, t - start)
        left, right, up, down = _extents(self.shape, self.radius, angle)
        # A turning polygon can reach past a wall between contacts; keep what is drawn inside the room.
        x, y = min(max(x, left), self.aspect - right), min(max(y, up), self.floor - down)
        return x, y, vx, vy, angle, spin

    def _step(self) -> None:
        """Simulates substep `self.steps`, appending a segment for each contact or release in it."""
        lo, hi = self.steps * self.substep, (self.steps + 1) * self.substep
        for _ in range(_MAX_CONTACTS):
            event = self._next_event(lo, hi)
            if event is None:
                break
            self.segments.append(event)
            self.starts.append(event[0])
        self.steps += 1

    def _next_event(self, lo: float, hi: float) -> tuple[float, int, tuple] | None:
        """Returns the first segment starting in [lo, hi] after the current one, or None."""
        start, mode, state = self.segments[-1]
        if mode == _HELD:
            return (self.sprite.release, _FREE, state) if self.sprite.release <= hi else None
        lo = max(lo, start)
        end = self._advance(mode, state, hi - start)
        first = None
        for boundary in _BOUNDARIES if mode == _FREE else _WALLS:
            if self._gap(end, boundary) <= 0:
                continue
            t = self._contact_time(mode, state, start, boundary, lo, hi)
            axis, sign = boundary[:2]
            touching = self._advance(mode, state, t - start)
            if sign * touching[2 + axis] > 0 and (first is None or t < first[0]):
                first = (t, boundary, touching)
        if first is None:
            return None
        t, boundary, touching = first
        return (t, *self._bounce(mode, touching, boundary))

    def _gap(self, state: tuple, boundary: tuple) -> float:
        """Returns how far the sprite reaches past `boundary` (positive: through it)."""
        axis, sign, limit, side = boundary
        return sign * (state[axis] - self.limits[limit]) + _extent(self.shape, self.radius, state[4], side)[0]

    def _contact_time(self, mode: int, state: tuple, start: float, boundary: tuple, lo: float, hi: float) -> float:
        """Returns the last time in [lo, hi] before the sprite first reaches `boundary` (lo if it already has)."""
        if self._gap(self._advance(mode, state, lo - start), boundary) > 0:
            return lo
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            if self._gap(self._advance(mode, state, mid - start), boundary) > 0:
                hi = mid
            else:
                lo = mid
        return lo

    def _bounce(self, mode: int, state: tuple, boundary: tuple) -> tuple[int, tuple]:
        """Returns the mode and state just after touching `boundary`: normal speed scaled by -restitution, some
        speed along the surface lost, spin pulled towards rolling; a bounce too low to see comes to rest."""
        x, y, vx, vy, angle, spin = state
        axis, sign = boundary[:2]
        velocity = [vx, vy]
        velocity[axis] *= -self.sprite.restitution
        if mode == _REST:
            return _REST, self._settle((x, y, velocity[0], 0.0, angle, spin))
        velocity[1 - axis] *= 1 - _GRIP
        rolling = sign * velocity[0] / self.radius if axis == 1 else -sign * velocity[1] / self.radius
        spin += _SPIN_COUPLING * (rolling - spin)
        if boundary[3] == _DOWN and abs(velocity[1]) < self.rest_speed:
            return _REST, self._settle((x, y, velocity[0], 0.0, angle, spin))
        return _FREE, (x, y, *velocity, angle, spin)

    def _settle(self, state: tuple) -> tuple:
        """Returns `state` put on the floor: its lowest point on the floor line, a round sprite rolling."""
        x, _, vx, _, angle, spin = state
        if self.shape not in _FLAT_PERIOD:
            spin = vx / self.radius
        return x, self.floor - _extent(self.shape, self.radius, angle, _DOWN)[0], vx, 0.0, angle, spin

    def _advance(self, mode: int, state: tuple, dt: float) -> tuple:
        """Returns the state `dt` seconds after `state` with no contact in between."""
        if mode == _HELD:
            return state
        return self._fly(state, dt) if mode == _FREE else self._rest(state, dt)

    def _fly(self, state: tuple, dt: float) -> tuple:
        """Free flight under gravity and linear air drag, spin decaying exponentially (closed form)."""
        x, y, vx, vy, angle, spin = state
        k, g, c = self.drag, self.gravity, self.spin_damping
        # f1 = ∫₀ᵗ e^{-ks} ds and f2 = ∫₀ᵗ f1: the drag-free limits when k = 0.
        if k > 0:
            decay, f1 = math.exp(-k * dt), -math.expm1(-k * dt) / k
            f2 = (dt - f1) / k
        else:
            decay, f1, f2 = 1.0, dt, 0.5 * dt * dt
        turn = -math.expm1(-c * dt) / c if c > 0 else dt
        return (x + vx * f1, y + vy * f1 + g * f2, vx * decay, vy * decay + g * f1, angle + spin * turn,
                spin * math.exp(-c * dt))

    def _rest(self, state: tuple, dt: float) -> tuple:
        """On the floor: constant friction deceleration until stopped; round sprites roll, polygons tip flat."""
        x, y, vx, vy, angle, spin = state
        a = self.deceleration
        if vx == 0 or a == 0:
            x1, vx1 = x + vx * dt, vx
        elif dt * a >= abs(vx):
            x1, vx1 = x + 0.5 * vx * abs(vx) / a, 0.0
        else:
            x1, vx1 = x + dt * (vx - 0.5 * math.copysign(a, vx) * dt), vx - math.copysign(a * dt, vx)
        if self.shape not in _FLAT_PERIOD:
            return x1, y, vx1, 0.0, angle + (x1 - x) / self.radius, vx1 / self.radius
        # Critically damped tipping onto the nearest flat side, from the spin the sprite landed with: no jolt.
        period = _FLAT_PERIOD[self.shape]
        flat = period * round(angle / period)
        offset, rate = angle - flat, spin + _TIP_RATE * (angle - flat)
        decay = math.exp(-_TIP_RATE * dt)
        angle1 = flat + (offset + rate * dt) * decay
        spin1 = (rate - _TIP_RATE * (offset + rate * dt)) * decay
        down, slope = _extent(self.shape, self.radius, angle1, _DOWN)
        return x1, self.floor - down, vx1, -slope * spin1, angle1, spin1


def trajectory(scene: Scene, times, substep: float = WorldConfig.substep) -> Trajectory:
    """Returns the sprites' states at `times` (seconds, >= 0, any order)."""
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ValueError(f"Frame times {times.tolist()}: give a 1-D sequence of finite times >= 0 (seconds).")
    states = np.zeros((len(times), len(scene.sprites), 6))
    for j, sprite in enumerate(scene.sprites):
        body = _Body(scene, sprite, substep)
        for i, t in enumerate(times.tolist()):
            states[i, j] = body.state_at(t)
    return Trajectory(times=times, position=states[..., 0:2], velocity=states[..., 2:4], angle=states[..., 4],
                      spin=states[..., 5])


def render(scene: Scene, cfg: WorldConfig = WorldConfig(), frame_times=None) -> np.ndarray:
    """Returns the video of `scene` as uint8 `[F, cfg.height, cfg.width, 3]`, at `frame_times` (seconds; default
    `cfg.frame_times`). A frame depends only on its own time, so any finer or partial grid agrees with the default."""
    if abs(scene.aspect - cfg.aspect) > 1e-9:
        raise ConfigError(f"Scene {scene.seed} was sampled for aspect {scene.aspect:.4g} and cannot be filmed at "
                          f"{cfg.height}×{cfg.width}; render at the same aspect ratio or sample it with this config.")
    times = cfg.frame_times if frame_times is None else frame_times
    states = trajectory(scene, times, cfg.substep)
    scale = float(cfg.height)
    backdrop, ground = _backdrop(scene, cfg.height, cfg.width)
    frames = np.empty((len(states.times), cfg.height, cfg.width, 3), np.uint8)
    for f in range(len(frames)):
        canvas = backdrop.copy()
        for j, sprite in enumerate(scene.sprites):
            _draw_shadow(canvas, ground, sprite, states.position[f, j], scene.floor, scale)
        for j, sprite in enumerate(scene.sprites):
            _draw_sprite(canvas, sprite, states.position[f, j], float(states.angle[f, j]), scale)
        frames[f] = (np.clip(canvas, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return frames


def video(seed: int, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
    """Returns the video of `seed` as uint8 `[cfg.num_frames, cfg.height, cfg.width, 3]`."""
    return render(sample_scene(seed, cfg), cfg)


def _pixel_centres(count: int, scale: float) -> np.ndarray:
    """Returns the scene coordinates of `count` pixel centres along one axis, as float64 `[count]`."""
    return (np.arange(count, dtype=np.float64) + 0.5) / scale


def _wave(xs: np.ndarray, ys: np.ndarray, a: float, b: float) -> np.ndarray:
    """Returns sin(a·x + b·y) on the grid `[len(ys), len(xs)]`, from 1-D sines and cosines only (math.sin on a few
    hundred numbers instead of numpy's per-pixel sin, whose last bits depend on the CPU's SIMD path)."""
    sx = np.array([math.sin(a * x) for x in xs.tolist()], np.float32)
    cx = np.array([math.cos(a * x) for x in xs.tolist()], np.float32)
    sy = np.array([math.sin(b * y) for y in ys.tolist()], np.float32)
    cy = np.array([math.cos(b * y) for y in ys.tolist()], np.float32)
    return sx[None, :] * cy[:, None] + cx[None, :] * sy[:, None]


def _value_noise(xs: np.ndarray, ys: np.ndarray, frequency: float, seed: int, octave: int) -> np.ndarray:
    """Returns smooth value noise in [-1, 1] on the grid `[len(ys), len(xs)]`, `frequency` cells per unit."""
    u, v = xs * frequency, ys * frequency
    grid = 2 * np.random.default_rng([seed, _NOISE_STREAM, octave]).random(
        (int(v[-1]) + 2, int(u[-1]) + 2)).astype(np.float32) - 1
    iu, iv = u.astype(np.int64), v.astype(np.int64)
    fu, fv = (u - iu).astype(np.float32), (v - iv).astype(np.float32)
    # Quintic fade: the noise is smooth across cell edges.
    fu, fv = fu ** 3 * (fu * (fu * 6 - 15) + 10), fv ** 3 * (fv * (fv * 6 - 15) + 10)
    top = grid[iv][:, iu] * (1 - fu) + grid[iv][:, iu + 1] * fu
    bottom = grid[iv + 1][:, iu] * (1 - fu) + grid[iv + 1][:, iu + 1] * fu
    return top * (1 - fv[:, None]) + bottom * fv[:, None]


def _backdrop(scene: Scene, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the backdrop float32 `[H, W, 3]` in [0, 1] and the ground's coverage float32 `[H, 1]`."""
    bg, scale = scene.background, float(height)
    xs, ys = _pixel_centres(width, scale), _pixel_centres(height, scale)
    corners = np.asarray(bg.corners, np.float32)
    fx = (xs / scene.aspect).astype(np.float32)[None, :, None]
    fy = ys.astype(np.float32)[:, None, None]
    wall = (corners[0] * (1 - fx) + corners[1] * fx) * (1 - fy) + (corners[2] * (1 - fx) + corners[3] * fx) * fy
    cycles = 2 * math.pi * bg.frequency
    a, b = cycles * math.cos(bg.orientation), cycles * math.sin(bg.orientation)
    if bg.texture == "stripes":
        texture = _wave(xs, ys, a, b)
    elif bg.texture == "checker":
        texture = np.clip(3 * _wave(xs, ys, a, b) * _wave(xs, ys, -b, a), -1.0, 1.0)
    else:
        texture = 0.65 * _value_noise(xs, ys, bg.frequency, bg.noise_seed, 0) + 0.35 * _value_noise(
            xs, ys, 2 * bg.frequency, bg.noise_seed, 1)
    wall = wall * (1 + bg.contrast * texture)[..., None]
    top, bottom = np.asarray(bg.ground, np.float32)
    depth = np.clip((ys - scene.floor) / (1 - scene.floor), 0, 1).astype(np.float32)[:, None, None]
    ground = (top * (1 - depth) + bottom * depth) * (1 + 0.06 * _value_noise(xs, ys * 4, 12.0, bg.noise_seed, 2))[
        ..., None]
    # Antialiased floor line: the ground's coverage of each pixel row.
    covered = np.clip(_pixel_centres(height, 1.0) + 0.5 - scene.floor * scale, 0, 1).astype(np.float32)[:, None]
    image = wall * (1 - covered[..., None]) + ground * covered[..., None]
    image = image * (1 + bg.grain * _value_noise(xs, ys, 40.0, bg.noise_seed, 3))[..., None]
    return image.astype(np.float32), covered


def _window(centre: float, reach: float, size: int) -> tuple[int, int]:
    """Returns the pixel range [start, stop) along one axis that can be touched within `reach` px of `centre` px."""
    return max(int(math.floor(centre - reach)) - 1, 0), min(int(math.ceil(centre + reach)) + 1, size)


def _draw_shadow(canvas: np.ndarray, ground: np.ndarray, sprite: Sprite, position: np.ndarray, floor: float,
                 scale: float) -> None:
    """Darkens the ground under a sprite: a soft ellipse, fainter the higher the sprite is."""
    x, y = float(position[0]), float(position[1])
    strength = 0.35 * max(0.0, 1 - (floor - y - sprite.radius) / 0.6)
    if strength <= 0:
        return
    cx, cy = x * scale, (floor + 0.3 * sprite.radius) * scale
    rx, ry = sprite.radius * scale, 0.35 * sprite.radius * scale
    (x0, x1), (y0, y1) = _window(cx, rx, canvas.shape[1]), _window(cy, ry, canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / ry
    falloff = np.clip(1 - dx[None, :] ** 2 - dy[:, None] ** 2, 0, 1)
    canvas[y0:y1, x0:x1] *= (1 - strength * falloff ** 2 * ground[y0:y1])[..., None]


def _signed_distance(shape: str, u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    """Returns the signed distance (negative inside) to a shape of circumradius `radius` at the origin, in the
    sprite's own frame `(u, v)` (v down), all in pixels."""
    if shape in ("disc", "ring"):
        distance = np.sqrt(u * u + v * v) - radius
        return distance if shape == "disc" else np.abs(distance + 0.2 * radius) - 0.2 * radius
    if shape == "square":
        half = radius / math.sqrt(2)
        qu, qv = np.abs(u) - half, np.abs(v) - half
        outside = np.sqrt(np.maximum(qu, 0) ** 2 + np.maximum(qv, 0) ** 2)
        return outside + np.minimum(np.maximum(qu, qv), 0)
    # Equilateral triangle pointing up (Inigo Quilez's exact distance), with half side r.
    k, r = math.sqrt(3), radius * math.sqrt(3) / 2
    px, py = np.abs(u) - r, -v + r / k
    fold = px + k * py > 0
    px, py = np.where(fold, (px - k * py) / 2, px), np.where(fold, (-k * px - py) / 2, py)
    px = px - np.clip(px, -2 * r, 0)
    return -np.sqrt(px * px + py * py) * np.sign(py)


def _draw_sprite(canvas: np.ndarray, sprite: Sprite, position: np.ndarray, angle: float, scale: float) -> None:
    """Composites one sprite onto `canvas [H, W, 3]` with analytic antialiasing: coverage from the signed distance
    at the pixel centre, so sub-pixel motion changes the edge pixels smoothly."""
    cx, cy, radius = float(position[0]) * scale, float(position[1]) * scale, sprite.radius * scale
    (x0, x1), (y0, y1) = _window(cx, radius, canvas.shape[1]), _window(cy, radius, canvas.shape[0])
    if x0 >= x1 or y0 >= y1:
        return
    dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
    cos, sin = math.cos(angle), math.sin(angle)
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    distance = _signed_distance(sprite.shape, u, v, radius)
    alpha = np.clip(0.5 - distance, 0, 1)
    brightness = 1 + sprite.shade * np.clip((u - v) / (math.sqrt(2) * radius), -1, 1)
    edge = np.clip(distance + 0.5 + _OUTLINE_WIDTH * scale, 0, 1)
    colour = np.asarray(sprite.colour, np.float32) * (brightness * (1 - _OUTLINE_DARKEN * edge))[..., None]
    region = canvas[y0:y1, x0:x1]
    region += alpha[..., None] * (colour - region)


def split_seeds(split: str, n: int) -> list[int]:
    """Returns the first `n` seeds of `split` (one of SPLITS)."""
    if split not in SPLITS:
        raise ValueError(f"Split {split!r}; choose one of {sorted(SPLITS)}.")
    if not 0 <= n <= len(SPLITS[split]):
        raise ValueError(f"{n} videos of split {split!r}: it holds 0..{len(SPLITS[split])}.")
    return list(SPLITS[split][:n])


def write_dataset(out_dir: str | os.PathLike, split: str, n: int, cfg: WorldConfig = WorldConfig(), *,
                  encoding: str = "png") -> Path:
    """Returns `out_dir/split` after writing the first `n` videos of `split` there, for `data.VideoDataset.scan`.

    `encoding` "png" writes one lossless frame folder per video (`<seed>/000.png`, …), "mp4" one H.264 file per
    video (`<seed>.mp4`, lossy). `world.json` records the split, seeds, encoding and config; a folder whose
    `world.json` matches is complete and is returned as is. The folder is written beside `out_dir/split` and renamed
    into place when done, so an interrupted run leaves no partial dataset under that name.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r}; choose one of {ENCODINGS}.")
    seeds = split_seeds(split, n)
    folder = Path(out_dir) / split
    manifest = {"split": split, "seeds": [seeds[0], seeds[-1] + 1] if seeds else [], "encoding": encoding,
                "config": dataclasses.asdict(cfg)}
    manifest = json.loads(json.dumps(manifest))
    record = folder / "world.json"
    if record.is_file() and json.loads(record.read_text()) == manifest:
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty and holds no toy-world dataset of {n} {split} videos with "
                              f"this config; remove it or choose another out_dir.")
    with atomic.replacing_dir(folder) as staging:
        for seed in seeds:
            frames = video(seed, cfg)
            if encoding == "mp4":
                video_io.write_video(frames, staging / f"{seed:07d}.mp4", fps=cfg.fps)
                continue
            frame_dir = staging / f"{seed:07d}"
            frame_dir.mkdir()
            for k, frame in enumerate(frames):
                Image.fromarray(frame).save(frame_dir / f"{k:03d}.png", compress_level=1)
        (staging / record.name).write_text(json.dumps(manifest, indent=1))
    return folder
