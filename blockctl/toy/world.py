"""A procedural captioned world: one colored shape on a patterned, neutral background.

Fast (numpy on a fixed 64x64 grid, thousands of images per second), seeded and deterministic.
Backgrounds use neutral mid-tones only, so a shape's color can be read off the image exactly
(the benchmark relies on it). Some (color, shape, background) triples are held out of
pretraining so the benchmark measures prompt following rather than memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockctl.toy.vocab import BACKGROUNDS, COLORS, SHAPES

SIZE = 64
COLOR_RGB: dict[str, tuple[int, int, int]] = dict(COLORS)
COLOR_NAMES: tuple[str, ...] = tuple(c for c, _ in COLORS)

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


@dataclass(frozen=True)
class Scene:
    """What one world image shows; ``shape``/``color`` are None for a bare background."""

    color: str | None
    shape: str | None
    background: str
    cx: float
    cy: float
    r: float
    caption: str


def _neutral(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation mid-tone, far from every shape color including white and black."""
    level = rng.uniform(95.0, 165.0)
    tint = rng.uniform(-12.0, 12.0, size=3)
    return np.clip(level + tint, 0, 255).astype(np.float32)


def draw_background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 HxWx3 image in 0..255 of the named pattern."""
    a, b = _neutral(rng), _neutral(rng)
    while np.abs(a - b).mean() < 25:  # two tones that are visibly different
        b = _neutral(rng)
    if kind == "plain":
        return np.broadcast_to(a, (SIZE, SIZE, 3)).copy()
    if kind == "striped":
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(6, 12)
        u = _XX * np.cos(theta) + _YY * np.sin(theta)
        m = (np.floor(u / (period / 2)) % 2).astype(np.float32)[..., None]
        return a * m + b * (1 - m)
    if kind == "checkered":
        cell = rng.uniform(5, 10)
        ox, oy = rng.uniform(0, cell, size=2)
        m = ((np.floor((_XX + ox) / cell) + np.floor((_YY + oy) / cell)) % 2)[..., None]
        return a * m + b * (1 - m)
    if kind == "gradient":
        theta = rng.uniform(0, 2 * np.pi)
        u = (_XX - SIZE / 2) * np.cos(theta) + (_YY - SIZE / 2) * np.sin(theta)
        t = np.clip(u / SIZE + 0.5, 0, 1)[..., None]
        lo, hi = np.minimum(a, b) - 20, np.maximum(a, b) + 20
        return lo * (1 - t) + hi * t
    if kind == "noisy":
        noise = rng.normal(0, 14, size=(SIZE, SIZE, 1)).astype(np.float32)
        return np.clip(a + noise, 80, 180)
    if kind == "dotted":
        cell = rng.uniform(7, 11)
        ox, oy = rng.uniform(0, cell, size=2)
        dx = (_XX + ox) % cell - cell / 2
        dy = (_YY + oy) % cell - cell / 2
        m = (dx * dx + dy * dy < (cell * 0.28) ** 2).astype(np.float32)[..., None]
        return b * m + a * (1 - m)
    raise ValueError(f"unknown background {kind!r}")


def _polygon(cx: float, cy: float, r: float, n: int, phase: float) -> np.ndarray:
    """Inside of a regular n-gon: every half-plane test at once."""
    inside = np.ones((SIZE, SIZE), dtype=bool)
    apothem = r * np.cos(np.pi / n)
    for k in range(n):
        ang = phase + (k + 0.5) * 2 * np.pi / n
        inside &= (_XX - cx) * np.cos(ang) + (_YY - cy) * np.sin(ang) < apothem
    return inside


def _segment(x0: float, y0: float, x1: float, y1: float, width: float) -> np.ndarray:
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((_XX - x0) * vx + (_YY - y0) * vy) / (vx * vx + vy * vy), 0, 1)
    px, py = x0 + t * vx - _XX, y0 + t * vy - _YY
    return px * px + py * py < (width / 2) ** 2


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean HxW mask of a shape of radius ``r`` centred at (cx, cy)."""
    dx, dy = _XX - cx, _YY - cy
    d = np.sqrt(dx * dx + dy * dy)
    if shape == "circle":
        return d < r
    if shape == "ring":
        return (d < r) & (d > r * 0.55)
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) < r * 0.8
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) < r
    if shape == "triangle":
        return _polygon(cx, cy + r * 0.15, r * 1.05, 3, np.pi / 2)  # apex up
    if shape == "hexagon":
        return _polygon(cx, cy, r, 6, 0.0)
    if shape == "cross":
        w = r * 0.33
        return ((np.abs(dx) < w) & (np.abs(dy) < r)) | ((np.abs(dy) < w) & (np.abs(dx) < r))
    if shape == "star":
        ang = np.arctan2(dy, dx) + np.pi / 2
        k = np.abs(((ang * 5 / (2 * np.pi)) % 1.0) - 0.5) * 2  # 1 at the tips, 0 between
        return d < r * (0.45 + 0.55 * k**2)
    if shape == "person":
        w = max(2.0, r * 0.22)
        head = (dx * dx + (_YY - (cy - r * 0.65)) ** 2) < (r * 0.3) ** 2
        body = _segment(cx, cy - r * 0.35, cx, cy + r * 0.3, w)
        arms = _segment(cx - r * 0.6, cy - r * 0.1, cx + r * 0.6, cy - r * 0.1, w)
        leg1 = _segment(cx, cy + r * 0.3, cx - r * 0.45, cy + r, w)
        leg2 = _segment(cx, cy + r * 0.3, cx + r * 0.45, cy + r, w)
        return head | body | arms | leg1 | leg2
    raise ValueError(f"unknown shape {shape!r}")


def caption_for(color: str | None, shape: str | None, background: str, form: int = 0) -> str:
    """The caption forms the world teaches (form 0 is the canonical benchmark form)."""
    if shape is None:
        return f"a {background} background"
    thing = f"{color} {shape}" if color else shape
    if form == 1:
        return f"a photo of a {thing} on a {background} background"
    if form == 2:
        return f"a {thing}"
    if form == 3:
        return f"a photo of a {thing}"
    return f"a {thing} on a {background} background"


def _held_out() -> frozenset[tuple[str, str, str]]:
    """48 fixed (color, shape, background) triples never drawn in pretraining."""
    rng = np.random.default_rng(12345)
    triples = [(c, s, b) for c in COLOR_NAMES for s in SHAPES for b in BACKGROUNDS]
    idx = rng.choice(len(triples), size=48, replace=False)
    return frozenset(triples[i] for i in sorted(idx))


HELD_OUT: frozenset[tuple[str, str, str]] = _held_out()


def held_out_captions() -> list[str]:
    """The benchmark's 48 captions, in a fixed order."""
    return [caption_for(c, s, b) for c, s, b in sorted(HELD_OUT)]


def random_scene(rng: np.random.Generator, allow_held_out: bool = False) -> Scene:
    """Draw a scene; captions vary in form so partial prompts ("a photo of a star") work."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    cx, cy = rng.uniform(18, 46, size=2)
    r = float(rng.uniform(9, 17))
    if rng.random() < 0.04:
        return Scene(None, None, background, cx, cy, r, caption_for(None, None, background))
    while True:
        color = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        if allow_held_out or (color, shape, background) not in HELD_OUT:
            break
    u = rng.random()
    form = 0 if u < 0.55 else 1 if u < 0.75 else 2 if u < 0.9 else 3
    shown_color: str | None = color
    if form in (2, 3) and rng.random() < 0.3:
        shown_color = None  # "a photo of a star": any color will do
    return Scene(
        color, shape, background, cx, cy, r, caption_for(shown_color, shape, background, form)
    )


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 HxWx3 image of ``scene`` (``rng`` draws the background's pattern details)."""
    img = draw_background(scene.background, rng)
    if scene.shape is not None and scene.color is not None:
        m = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)
        img[m] = np.asarray(COLOR_RGB[scene.color], dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def sample_batch(n: int, seed: int, allow_held_out: bool = False) -> tuple[np.ndarray, list[Scene]]:
    """``n`` images (uint8 NxHxWx3) and their scenes, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, allow_held_out) for _ in range(n)]
    images = np.stack([render_scene(s, rng) for s in scenes])
    return images, scenes


def parse_caption(caption: str) -> tuple[str | None, str | None, str | None]:
    """(color, shape, background) named in a world caption, each None if absent."""
    words = caption.replace(",", " ").split()
    color = next((w for w in words if w in COLOR_RGB), None)
    shape = next((w for w in words if w in SHAPES), None)
    background = next((w for w in words if w in BACKGROUNDS), None)
    return color, shape, background
