"""Image measures the composition benchmark's recogniser (recognise.py) is built from: colour
bands in HSV, 4-connected blobs and their shape, and a few whole-image statistics. numpy only;
images are HxWx3 uint8 or float in 0..255."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

Image = np.ndarray  # HxWx3, 0..255


# --- colour ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hsv:
    """Hue in degrees (0..360), saturation and value in 0..1, per pixel."""

    h: np.ndarray
    s: np.ndarray
    v: np.ndarray
    rgb: np.ndarray  # float32 0..255


def to_hsv(img: Image) -> Hsv:
    rgb = np.asarray(img, dtype=np.float32)[..., :3]
    a = rgb / 255.0
    mx, mn = a.max(axis=-1), a.min(axis=-1)
    d = mx - mn
    safe = np.maximum(d, 1e-6)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    h = np.where(
        mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = np.where(d > 1e-6, h * 60.0, 0.0)
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0.0)
    return Hsv(h, s, mx, rgb)


@dataclass(frozen=True)
class Band:
    """Pixels whose hue lies in [lo, hi] degrees (wrapping when lo > hi) with saturation and
    value in the given ranges; ``hue=None`` takes any hue (for white, black, grey)."""

    hue: tuple[float, float] | None
    sat: tuple[float, float] = (0.35, 1.0)
    val: tuple[float, float] = (0.35, 1.0)

    def mask(self, c: Hsv) -> np.ndarray:
        m = (c.s >= self.sat[0]) & (c.s <= self.sat[1]) & (c.v >= self.val[0])
        m &= c.v <= self.val[1]
        if self.hue is not None:
            lo, hi = self.hue
            m &= ((c.h >= lo) & (c.h <= hi)) if lo <= hi else ((c.h >= lo) | (c.h <= hi))
        return m


DARK = Band(None, (0.0, 1.0), (0.0, 0.3))
LIGHT = Band(None, (0.0, 0.3), (0.78, 1.0))


# --- blobs ----------------------------------------------------------------------------------


def label(mask: np.ndarray) -> np.ndarray:
    """4-connected components of ``mask``: 0 outside, else the smallest flat index + 1 of the
    component (min-label propagation with pointer jumping; a 64×64 image takes a few rounds)."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        cur = np.where(mask, lab, big)
        m = cur.copy()
        m[1:] = np.minimum(m[1:], cur[:-1])
        m[:-1] = np.minimum(m[:-1], cur[1:])
        m[:, 1:] = np.minimum(m[:, 1:], cur[:, :-1])
        m[:, :-1] = np.minimum(m[:, :-1], cur[:, 1:])
        m = np.where(mask, m, 0)
        flat = m.ravel()
        jumped = np.where(mask, flat[np.maximum(m, 1) - 1].reshape(h, w), 0)  # label's label
        new = np.minimum(m, np.where(mask, jumped, big))
        if np.array_equal(new, lab):
            return lab
        lab = new


@dataclass(frozen=True)
class Blob:
    mask: np.ndarray
    area: int
    top: int
    bottom: int  # exclusive
    left: int
    right: int  # exclusive
    clutter: float = 0.0  # share of the image outside the blob in the blob's own colours
    company: int = 0  # other marks next to it (see ``company``)

    @property
    def fill(self) -> float:
        """Area over bounding-box area: ~1 a square, ~0.79 a disc, ~0.4 a star."""
        return self.area / max(1, (self.bottom - self.top) * (self.right - self.left))

    @property
    def aspect(self) -> float:
        """Height over width: a standing figure is about twice as tall as wide."""
        return (self.bottom - self.top) / max(1, self.right - self.left)

    def share(self, mask: np.ndarray) -> float:
        return float((mask & self.mask).sum()) / max(1, self.area)


def blobs(mask: np.ndarray, min_area: int = 12, max_area: int = 1400) -> list[Blob]:
    """The components of plausible subject size, largest first (a subject's radius is 11–17 px
    in photos; generated ones run smaller, and a background-wide component is not a subject)."""
    lab = label(mask)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    out = []
    for i, n in zip(ids, counts, strict=True):
        if not min_area <= n <= max_area:
            continue
        m = lab == i
        ys, xs = np.nonzero(m)
        out.append(
            Blob(m, int(n), int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        )
    return sorted(out, key=lambda b: -b.area)


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        m = out.copy()
        m[1:] |= out[:-1]
        m[:-1] |= out[1:]
        m[:, 1:] |= out[:, :-1]
        m[:, :-1] |= out[:, 1:]
        out = m
    return out


def enclosed(inner: np.ndarray, outer: np.ndarray, sides: int = 3) -> float:
    """Share of ``inner`` pixels with ``outer`` pixels on at least ``sides`` of the four sides
    (left, right, above, below, anywhere along the row or column): spots inside a star, eyes
    inside a face; not the dark ground under a setting sun."""
    if not inner.any():
        return 0.0
    count = np.zeros(inner.shape, dtype=np.int8)
    for axis in (0, 1):
        for flip in (False, True):
            o = np.flip(outer, axis) if flip else outer
            seen = np.maximum.accumulate(o, axis=axis)
            count += np.flip(seen, axis) if flip else seen
    return float(((count >= sides) & inner).sum() / inner.sum())


def halves_ratio(b: Blob, axis: int) -> float:
    """Blob area in the first half of its box over the second (axis 0: top over bottom,
    1: left over right)."""
    lo, hi = (b.top, b.bottom) if axis == 0 else (b.left, b.right)
    mid = (lo + hi) / 2
    idx = np.arange(b.mask.shape[axis]) + 0.5
    first = idx < mid
    m = b.mask if axis == 0 else b.mask.T
    a, z = float(m[first].sum()), float(m[~first].sum())
    return a / max(z, 1.0)


# --- evidence -------------------------------------------------------------------------------


def ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi``, linear between (``lo > hi`` ramps down)."""
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    return ~dilate(~mask, r)


def close(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Join parts split by a pixel or two (a generated star's arms around its dark centre)."""
    return erode(dilate(mask, r), r) | mask


def subject_blobs(
    c: Hsv, bands: list[Band], join: int = 1, reach: int = 4
) -> tuple[list[Blob], list[np.ndarray]]:
    """Blobs of subject size: pixels of the first band (the body colour) with those of the
    other bands (details: spots, eyes, a dress) within ``reach`` px of it, closed over gaps of
    ``join`` px; and each band's pixel mask. Details far from the body, and the body colour
    elsewhere in the image (a blob's clutter), belong to the background: brick mortar, ocean
    crests and a scene's own colours must not grow a subject or pass for one."""
    masks = [b.mask(c) for b in bands]
    body = masks[0]
    near = dilate(body, reach)
    region = body | (np.logical_or.reduce(masks[1:]) & near) if len(masks) > 1 else body
    found = blobs(close(region, join))
    marks = marks_around(c)
    return [
        replace(b, clutter=float((body & ~b.mask).mean()), company=company(b, marks)) for b in found
    ], masks


def marks_around(c: Hsv) -> np.ndarray:
    """Vivid or dark pixels, leaving out the hue family that covers a quarter of the image or
    more (a scene or a style is ground, not marks)."""
    vivid = (c.s > 0.45) & (c.v > 0.3)
    family = ((c.h + 30) % 360 // 60).astype(int)  # red, yellow, green, cyan, blue, magenta
    sizes = [int((vivid & (family == k)).sum()) for k in range(6)]
    ground = int(np.argmax(sizes))
    if sizes[ground] > c.h.size / 4:
        vivid &= family != ground
    return vivid | (c.v < 0.25)


def company(b: Blob, marks: np.ndarray) -> int:
    """Separate marks (≥ 5 px) within 6 px of a blob: a subject on a world background or a
    scene has a few (its own loose bits, a second subject); a jumble of colour fragments, as
    merges that interfere paint, has many."""
    around = marks & ~b.mask & dilate(b.mask, 8)
    lab = label(around)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    ring = dilate(b.mask, 6)
    return len(set(np.unique(lab[ring])) & set(ids[counts >= 5]))


def best_blob(found: list[Blob], terms: Callable[[Blob], list[float]]) -> float:
    """Each blob's evidence is the weakest of ``figure`` and the concept's own ``terms`` (all
    must hold); the best blob wins."""
    return max((min([figure(b), *terms(b)]) for b in found), default=0.0)


def figure(b: Blob) -> float:
    """A subject is a blob of some size that stands out: its colour does not also cover the
    rest of the image (then it would be a piece of a background texture) and it is not one
    fragment among many (a jumble)."""
    return min(ramp(b.area, 12, 40), ramp(b.clutter, 0.2, 0.1), ramp(b.company, 4, 3))


def symmetric(b: Blob) -> float:
    """1 when the blob's left and right halves weigh about the same."""
    return ramp(abs(float(np.log(halves_ratio(b, 1)))), 0.4, 0.25)


def across(c: Hsv) -> float:
    """Brightness change down the image over change along it: > 1 for horizontal stripes."""
    v = c.rgb.mean(axis=-1)
    return float(np.abs(np.diff(v, axis=0)).sum() / max(np.abs(np.diff(v, axis=1)).sum(), 1e-6))


def texture(c: Hsv) -> float:
    """Mean brightness step between neighbouring pixels (0..255): ~5 or less for the base's
    blurred world backgrounds, 15 to 40 for brick courses and painted swirls."""
    v = c.rgb.mean(axis=-1)
    return float(np.abs(np.diff(v, axis=0)).mean() + np.abs(np.diff(v, axis=1)).mean())


def share(m: np.ndarray) -> float:
    return float(m.mean())
