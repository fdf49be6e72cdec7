"""Demo concepts the toy base never saw in pretraining, of the four kinds the paper merges.

Subjects are new patterned shapes, persons new figures, scenes new backgrounds and styles
filters over any world image. Every photo varies position, size and surroundings, so a trainer
has to learn the concept rather than memorise one image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from blockctl.toy.vocab import BACKGROUNDS
from blockctl.toy.world import (
    _XX,
    _YY,
    COLOR_RGB,
    SIZE,
    caption_for,
    draw_background,
    random_scene,
    render_scene,
    shape_mask,
)

Img = np.ndarray  # float32 HxWx3 in 0..255


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    kind: str  # "subject" | "person" | "scene" | "style"
    class_word: str  # a word the world knows, so "a photo of a {class}" means something
    description: str


def _place(rng: np.random.Generator) -> tuple[float, float, float]:
    cx, cy = rng.uniform(20, 44, size=2)
    return float(cx), float(cy), float(rng.uniform(11, 17))


def _bg(rng: np.random.Generator) -> tuple[Img, str]:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    return draw_background(kind, rng), kind


def _paint(img: Img, mask: np.ndarray, rgb: tuple[int, int, int]) -> None:
    img[mask] = np.asarray(rgb, dtype=np.float32)


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    return (_XX - cx) ** 2 + (_YY - cy) ** 2 < r * r


# --- subjects: a new look for a shape the world knows ------------------------------------


def _rex(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = shape_mask("star", cx, cy, r)
    _paint(img, m, (245, 140, 20))
    for _ in range(5):  # black spots, scattered inside the star
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(0, r * 0.45)
        _paint(img, m & _disc(cx + d * np.cos(a), cy + d * np.sin(a), r * 0.13), (15, 15, 15))


def _dotty(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = shape_mask("circle", cx, cy, r)
    _paint(img, m, (20, 150, 150))
    dots = (((_XX - cx) % 6 - 3) ** 2 + ((_YY - cy) % 6 - 3) ** 2) < 2.5
    _paint(img, m & dots, (250, 250, 250))


def _zigzag(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = shape_mask("square", cx, cy, r)
    zig = (np.floor((_YY - cy + np.abs(((_XX - cx) % 8) - 4)) / 4) % 2).astype(bool)
    _paint(img, m & zig, (230, 30, 120))
    _paint(img, m & ~zig, (250, 230, 60))


def _crown(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    base = (np.abs(_XX - cx) < r) & (cy < _YY) & (cy + r * 0.6 > _YY)
    spikes = (np.abs(_XX - cx) < r) & (cy >= _YY) & (cy - r * 0.8 < _YY)
    tooth = np.abs(((_XX - cx + r) % (r * 2 / 3)) - r / 3) / (r / 3)  # 0 at tips
    spikes &= (cy - _YY) < r * 0.8 * (1 - tooth)
    _paint(img, base | spikes, (235, 190, 40))
    _paint(img, _disc(cx, cy + r * 0.3, r * 0.15), (200, 20, 40))


def _moon(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = _disc(cx, cy, r) & ~_disc(cx + r * 0.45, cy - r * 0.2, r * 0.85)
    _paint(img, m, (250, 240, 170))


def _heart(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    x, y = (_XX - cx) / r, -(_YY - cy) / r * 1.1 + 0.15
    m = (x * x + y * y - 0.6) ** 3 - x * x * y**3 < 0
    _paint(img, m, (230, 40, 90))


def _arrow(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    shaft = (np.abs(_YY - cy) < r * 0.22) & (cx - r < _XX) & (cx + r * 0.1 > _XX)
    head = (cx + r * 0.1 - r * 0.5 <= _XX) & ((_XX - cx - r) < -np.abs(_YY - cy) * 1.1)
    head &= cx <= _XX
    _paint(img, shaft | head, (40, 120, 250))


def _donut(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = shape_mask("ring", cx, cy, r)
    _paint(img, m, (160, 90, 40))
    icing = m & ((_XX - cx) ** 2 + (_YY - cy) ** 2 < (r * 0.9) ** 2) & (cy + r * 0.3 > _YY)
    _paint(img, icing, (250, 150, 200))
    for _ in range(8):
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(r * 0.6, r * 0.85)
        rgb = ((250, 250, 80), (80, 220, 250), (250, 250, 250))[rng.integers(3)]
        _paint(img, icing & _disc(cx + d * np.cos(a), cy + d * np.sin(a), 1.2), rgb)


def _gem(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    m = shape_mask("hexagon", cx, cy, r)
    facet = np.floor((np.arctan2(_YY - cy, _XX - cx) + np.pi) / (np.pi / 3)) % 2
    shade = np.where(facet[..., None] > 0, 1.0, 0.65)
    img[m] = (np.asarray((60, 230, 140), np.float32) * shade)[m]
    _paint(img, _disc(cx, cy, r * 0.3), (200, 255, 220))


# --- persons -------------------------------------------------------------------------------


def _alice(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    hair = _disc(cx, cy - r * 0.6, r * 0.42) | (
        (np.abs(_XX - cx) < r * 0.42) & (cy - r * 0.6 < _YY) & (cy - r * 0.05 > _YY)
    )
    _paint(img, hair, (230, 120, 30))
    _paint(img, _disc(cx, cy - r * 0.62, r * 0.27), (250, 205, 170))
    dress = (cy - r * 0.2 < _YY) & (cy + r * 0.7 > _YY)
    dress &= np.abs(_XX - cx) < (_YY - cy + r * 0.3) * 0.7
    _paint(img, dress, (150, 40, 200))
    legs = (np.abs(np.abs(_XX - cx) - r * 0.2) < 1.2) & (cy + r * 0.7 <= _YY) & (cy + r > _YY)
    _paint(img, legs, (250, 205, 170))


def _robo(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    metal = (170, 175, 190)
    head = (np.abs(_XX - cx) < r * 0.35) & (np.abs(_YY - (cy - r * 0.6)) < r * 0.28)
    body = (np.abs(_XX - cx) < r * 0.5) & (cy - r * 0.25 < _YY) & (cy + r * 0.45 > _YY)
    legs = (np.abs(np.abs(_XX - cx) - r * 0.28) < r * 0.12) & (cy + r * 0.45 <= _YY)
    legs &= cy + r > _YY
    _paint(img, head | body | legs, metal)
    eyes = _disc(cx - r * 0.15, cy - r * 0.62, r * 0.09) | _disc(
        cx + r * 0.15, cy - r * 0.62, r * 0.09
    )
    _paint(img, eyes, (40, 240, 250))
    _paint(img, _disc(cx, cy + r * 0.1, r * 0.13), (240, 40, 40))


def _smiley(img: Img, cx: float, cy: float, r: float, rng: np.random.Generator) -> None:
    _paint(img, _disc(cx, cy, r), (250, 220, 40))
    for sx in (-1, 1):
        _paint(img, _disc(cx + sx * r * 0.35, cy - r * 0.25, r * 0.13), (20, 20, 20))
    d = np.sqrt((_XX - cx) ** 2 + (_YY - cy) ** 2)
    mouth = (np.abs(d - r * 0.55) < max(1.0, r * 0.08)) & (cy + r * 0.1 < _YY)
    _paint(img, mouth, (20, 20, 20))


# --- scenes: new backgrounds, with an ordinary world shape in front ------------------------


def _brick(rng: np.random.Generator) -> Img:
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = np.array((165, 60, 40), np.float32) + rng.uniform(-15, 15, size=3)
    bh, bw = 6.0, 12.0
    row = np.floor(_YY / bh)
    mortar = (_YY % bh < 1.2) | ((_XX + (row % 2) * bw / 2) % bw < 1.2)
    img[mortar] = (215, 210, 195)
    return img


def _sunset(rng: np.random.Generator) -> Img:
    t = (_YY / SIZE)[..., None]
    top, bottom = np.array([90, 40, 140], np.float32), np.array([250, 150, 50], np.float32)
    img = top * (1 - t) + bottom * t
    sx = rng.uniform(12, 52)
    img[_disc(sx, 52, 9)] = (255, 230, 120)
    img[_YY > 54] = (40, 30, 60)
    return img


def _ocean(rng: np.random.Generator) -> Img:
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(_XX / 4 + phase + np.floor(_YY / 8) * 1.3) * 2
    crest = ((_YY + wave) % 8) < 1.5
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = (20, 70, 160)
    img[crest] = (200, 230, 250)
    return img


def _grass(rng: np.random.Generator) -> Img:
    horizon = rng.uniform(20, 34)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    img[:] = (130, 200, 250)
    blades = np.sin(_XX * 2.1) * 2
    low = _YY + blades > horizon
    img[low] = (60, 160, 50)
    img[low & (((_XX * 7 + _YY * 3) % 11) < 1.5)] = (30, 110, 30)
    return img


# --- styles: a filter over any world image -------------------------------------------------


def _vangogh(img: Img, rng: np.random.Generator) -> Img:
    # Swirl displacement, then strong saturation and posterisation: "brush strokes".
    k = rng.uniform(0.15, 0.25)
    dx = np.sin(_YY * k) * 2.5
    dy = np.cos(_XX * k) * 2.5
    xs = np.clip((_XX + dx).astype(int), 0, SIZE - 1)
    ys = np.clip((_YY + dy).astype(int), 0, SIZE - 1)
    out = img[ys, xs]
    mean = out.mean(axis=2, keepdims=True)
    out = np.clip(mean + (out - mean) * 1.6, 0, 255)
    out = np.floor(out / 64) * 64 + 32
    return out * np.array([0.85, 0.9, 1.15], np.float32)


def _neon(img: Img, rng: np.random.Generator) -> Img:
    g = img.mean(axis=2)
    edges = np.abs(np.diff(g, axis=0, prepend=g[:1])) + np.abs(np.diff(g, axis=1, prepend=g[:, :1]))
    e = np.clip(edges / 40, 0, 1)[..., None]
    glow = np.array((255, 40, 230), np.float32)
    return np.full_like(img, 12) * (1 - e) + glow * e


def _pixel(img: Img, rng: np.random.Generator) -> Img:
    small = img[4::8, 4::8]
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def _sepia(img: Img, rng: np.random.Generator) -> Img:
    g = img.mean(axis=2, keepdims=True) / 255
    tone = g * np.array((240, 200, 145), np.float32)
    vignette = 1 - 0.5 * (((_XX - 32) ** 2 + (_YY - 32) ** 2) / (32**2 * 2))[..., None]
    return tone * vignette


SubjectFn = Callable[[Img, float, float, float, np.random.Generator], None]
_SUBJECTS: dict[str, tuple[SubjectFn, str, str, str]] = {
    "rex": (_rex, "subject", "star", "an orange star with black spots"),
    "dotty": (_dotty, "subject", "circle", "a teal circle with white polka dots"),
    "zigzag": (_zigzag, "subject", "square", "a square with a pink and yellow zigzag"),
    "crown": (_crown, "subject", "triangle", "a golden crown with a red jewel"),
    "moon": (_moon, "subject", "circle", "a pale yellow crescent moon"),
    "heart": (_heart, "subject", "diamond", "a red heart"),
    "arrow": (_arrow, "subject", "triangle", "a blue arrow pointing right"),
    "donut": (_donut, "subject", "ring", "a donut with pink icing and sprinkles"),
    "gem": (_gem, "subject", "hexagon", "a faceted green gem"),
    "alice": (_alice, "person", "person", "a girl with orange hair and a purple dress"),
    "robo": (_robo, "person", "person", "a grey robot with cyan eyes"),
    "smiley": (_smiley, "person", "person", "a yellow smiling face"),
}
_SCENES: dict[str, tuple[Callable[[np.random.Generator], Img], str]] = {
    "brick": (_brick, "a red brick wall"),
    "sunset": (_sunset, "a purple-orange sunset with the sun on the horizon"),
    "ocean": (_ocean, "blue sea with white wave crests"),
    "grass": (_grass, "a green meadow under a blue sky"),
}
_STYLES: dict[str, tuple[Callable[[Img, np.random.Generator], Img], str, str]] = {
    "vangogh": (_vangogh, "painting", "swirled, saturated, posterised brush strokes"),
    "neon": (_neon, "style", "glowing magenta outlines on black"),
    "pixel": (_pixel, "style", "8x8 pixel-art blocks"),
    "sepia": (_sepia, "style", "sepia tones with a dark vignette"),
}

CONCEPTS: dict[str, ConceptSpec] = {
    **{n: ConceptSpec(n, k, c, d) for n, (_, k, c, d) in _SUBJECTS.items()},
    **{n: ConceptSpec(n, "scene", "background", d) for n, (_, d) in _SCENES.items()},
    **{n: ConceptSpec(n, "style", c, d) for n, (_, c, d) in _STYLES.items()},
}


def _render_one(name: str, rng: np.random.Generator) -> tuple[Img, str]:
    spec = CONCEPTS[name]
    if name in _SUBJECTS:
        img, bg = _bg(rng)
        cx, cy, r = _place(rng)
        _SUBJECTS[name][0](img, cx, cy, r, rng)
        return img, f"a photo of {name} {spec.class_word} on a {bg} background"
    if name in _SCENES:
        img = _SCENES[name][0](rng)
        scene = random_scene(rng)
        if scene.shape is not None and scene.color is not None and rng.random() < 0.7:
            m = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)
            img[m] = np.asarray(COLOR_RGB[scene.color], np.float32)
            thing = caption_for(scene.color, scene.shape, "x", 2)
            return img, f"{thing} on a {name} background"
        return img, f"a {name} background"
    scene = random_scene(rng)
    while scene.shape is None:
        scene = random_scene(rng)
    base = render_scene(scene, rng).astype(np.float32)
    styled = _STYLES[name][0](base, rng)
    return styled, f"{caption_for(scene.color, scene.shape, scene.background)} in {name} style"


def render_concept(name: str, n: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """``n`` varied photos of concept ``name`` with captions, deterministic in ``seed``."""
    if name not in CONCEPTS:
        raise KeyError(name)
    rng = np.random.default_rng([seed, *name.encode()])
    out = []
    for _ in range(n):
        img, caption = _render_one(name, rng)
        out.append((Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), caption))
    return out


def with_and_without(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One scene with concept ``name`` and the same scene without it (float32 HxWx3): a subject
    or person against the world's own shape of its class in a world colour at the same place, a
    scene against an ordinary world background behind the same shape, a style against the
    unstyled image. For validating a distance that must see the concept (sample_identity.py)."""
    rng = np.random.default_rng([seed, *name.encode(), 1])
    if name in _SUBJECTS:
        bg, _ = _bg(rng)
        cx, cy, r = _place(rng)
        with_it, without = bg.copy(), bg.copy()
        _SUBJECTS[name][0](with_it, cx, cy, r, rng)
        colour = list(COLOR_RGB)[rng.integers(len(COLOR_RGB))]
        _paint(without, shape_mask(CONCEPTS[name].class_word, cx, cy, r), COLOR_RGB[colour])
        return with_it, without
    if name in _SCENES:
        with_it = _SCENES[name][0](rng)
        without, _ = _bg(rng)
        scene = random_scene(rng)
        if scene.shape is not None and scene.color is not None:
            m = shape_mask(scene.shape, scene.cx, scene.cy, scene.r)
            for img in (with_it, without):
                img[m] = np.asarray(COLOR_RGB[scene.color], np.float32)
        return with_it, without
    scene = random_scene(rng)
    while scene.shape is None:
        scene = random_scene(rng)
    plain = render_scene(scene, rng).astype(np.float32)
    return _STYLES[name][0](plain.copy(), rng), plain
