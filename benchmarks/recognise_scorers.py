"""One scorer per demo concept of the toy world (blockctl/toy/concepts.py): a number from the
image that says "this concept is present", 0 when a condition fails and growing with the
evidence (each scorer's comment says what it looks at).

Generated samples come from a 64×64 toy base that paints with the world's own colours, so the
colour bands are wide (the base paints the heart's pink-red as red-orange and alice's purple
dress as blue); what keeps a concept apart from a world shape of the same colour is the
structure each scorer also demands (rex's dark spots, the heart's wide top, alice's hair above
her dress, brick's courses).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from recognise_features import (
    DARK,
    LIGHT,
    Band,
    Blob,
    Hsv,
    across,
    best_blob,
    enclosed,
    halves_ratio,
    ramp,
    share,
    subject_blobs,
    symmetric,
    texture,
)

Scorer = Callable[[Hsv], float]

ORANGE_YELLOW = Band((18, 66), (0.45, 1.0), (0.5, 1.0))
YELLOW = Band((38, 70), (0.45, 1.0), (0.55, 1.0))
RED = Band((335, 24), (0.5, 1.0), (0.45, 1.0))
TEAL_BLUE = Band((165, 245), (0.35, 1.0), (0.3, 1.0))
BLUE = Band((195, 250), (0.45, 1.0), (0.45, 1.0))
CYAN = Band((165, 200), (0.35, 1.0), (0.5, 1.0))
PINK = Band((290, 355), (0.2, 1.0), (0.5, 1.0))
PURPLE_BLUE = Band((200, 300), (0.4, 1.0), (0.35, 1.0))
GREEN = Band((100, 175), (0.35, 1.0), (0.35, 1.0))
PALE_YELLOW = Band((38, 70), (0.12, 0.6), (0.75, 1.0))
BROWN = Band((10, 40), (0.45, 1.0), (0.3, 0.75))
PALE_GREEN = Band((90, 180), (0.08, 0.45), (0.8, 1.0))
MAGENTA = Band((280, 335), (0.5, 1.0), (0.2, 1.0))  # dim glow counts: outlines are thin


def rex(c: Hsv) -> float:
    # an orange star with black spots: dark inside an orange-to-yellow blob, thin like a star
    found, (body, dark) = subject_blobs(c, [ORANGE_YELLOW, DARK])
    return best_blob(found, lambda b: [
        ramp(b.share(body), 0.08, 0.16), ramp(b.share(dark), 0.02, 0.06),
        ramp(b.share(dark), 0.85, 0.7), ramp(b.fill, 0.75, 0.65),
    ])  # fmt: skip


def smiley(c: Hsv) -> float:
    # a yellow disc with dark eyes and mouth: round, mostly yellow, some dark inside it
    found, (body, dark) = subject_blobs(c, [YELLOW, DARK])
    return best_blob(found, lambda b: [
        ramp(b.share(body), 0.45, 0.65), ramp(b.share(dark), 0.02, 0.05),
        ramp(b.share(dark), 0.45, 0.3), ramp(b.fill, 0.55, 0.65),
        ramp(enclosed(dark & b.mask, body & b.mask), 0.1, 0.3),
    ])  # fmt: skip


def zigzag(c: Hsv) -> float:
    # a square striped pink and yellow (the base paints yellow and dark): the stripes inside a
    # box-filling yellow blob
    found, (yellow, pink, dark) = subject_blobs(c, [YELLOW, PINK, DARK], join=2)
    return best_blob(found, lambda b: [
        ramp(b.share(yellow), 0.2, 0.3), ramp(b.share(pink | dark), 0.15, 0.25),
        ramp(b.fill, 0.5, 0.65), ramp(enclosed((pink | dark) & b.mask, yellow & b.mask), 0.1, 0.3),
    ])  # fmt: skip


def crown(c: Hsv) -> float:
    # a gold crown with a red jewel: gold blob, a little red inside, spikes make it bottom-heavy
    found, (gold, red) = subject_blobs(c, [ORANGE_YELLOW, RED])
    return best_blob(found, lambda b: [
        ramp(b.share(gold), 0.6, 0.75), ramp(b.share(red), 0.005, 0.02),
        ramp(b.share(red), 0.3, 0.2), ramp(halves_ratio(b, 0), 0.95, 0.8),
    ])  # fmt: skip


def moon(c: Hsv) -> float:
    # a pale yellow crescent: pale (not saturated) yellow, thin (a crescent fills half its box)
    found, (pale,) = subject_blobs(c, [PALE_YELLOW])
    return best_blob(found, lambda b: [ramp(b.share(pale), 0.6, 0.8), ramp(b.fill, 0.7, 0.6)])


def heart(c: Hsv) -> float:
    # a red heart: a solid, upright red blob whose top half outweighs its pointed bottom half
    found, _ = subject_blobs(c, [RED])
    return best_blob(found, lambda b: [
        ramp(halves_ratio(b, 0), 1.2, 1.4), ramp(b.fill, 0.5, 0.6), symmetric(b),
    ])  # fmt: skip


def arrow(c: Hsv) -> float:
    # a blue arrow pointing right: its right half (the head) holds twice as much of it as the
    # left (the shaft); about as tall as wide
    found, _ = subject_blobs(c, [BLUE])
    return best_blob(found, lambda b: [
        ramp(halves_ratio(b, 1), 0.7, 0.55), ramp(abs(float(np.log(b.aspect))), 0.5, 0.3),
    ])  # fmt: skip


def donut(c: Hsv) -> float:
    # a brown ring with pink icing: both colours, and a hole where a disc would be full
    found, (pink, brown) = subject_blobs(c, [PINK, BROWN], join=2)

    def hole(b: Blob) -> float:
        cy, cx = (b.top + b.bottom) // 2, (b.left + b.right) // 2
        return float(not b.mask[max(cy - 1, 0) : cy + 2, max(cx - 1, 0) : cx + 2].any())

    return best_blob(found, lambda b: [
        ramp(b.share(pink), 0.1, 0.2), ramp(b.share(brown), 0.1, 0.2), hole(b),
    ])  # fmt: skip


def gem(c: Hsv) -> float:
    # a faceted green gem: green blob in two shades (facets) with a light centre
    found, (green, light) = subject_blobs(c, [GREEN, PALE_GREEN])

    def shades(b: Blob) -> float:
        v = c.v[b.mask & green]
        return float(np.percentile(v, 90) - np.percentile(v, 10)) if v.size >= 10 else 0.0

    return best_blob(found, lambda b: [
        ramp(b.share(green), 0.5, 0.7), ramp(shades(b), 0.12, 0.2),
        ramp(b.share(light), 0.02, 0.05),
    ])  # fmt: skip


def dotty(c: Hsv) -> float:
    # a teal disc with white dots (the base paints cyan and blue stripes): a round blob, part
    # cyan, patterned with white or blue
    found, (cyan, blue, light) = subject_blobs(c, [CYAN, BLUE, LIGHT], join=2)
    return best_blob(found, lambda b: [
        ramp(b.share(cyan), 0.15, 0.25), ramp(b.share(blue | light), 0.05, 0.1),
        ramp(b.fill, 0.55, 0.65),
    ])  # fmt: skip


def alice(c: Hsv) -> float:
    # orange hair above a purple dress (the base paints it blue): both, hair on top
    found, (hair, dress) = subject_blobs(c, [ORANGE_YELLOW, PURPLE_BLUE], join=2, reach=10)

    def hair_on_top(b: Blob) -> float:
        hy, dy = np.nonzero(b.mask & hair)[0], np.nonzero(b.mask & dress)[0]
        return float(hy.min() < dy.min()) if hy.size and dy.size else 0.0

    return best_blob(found, lambda b: [
        ramp(b.share(hair), 0.05, 0.1), ramp(b.share(dress), 0.03, 0.08), hair_on_top(b),
    ])  # fmt: skip


def robo(c: Hsv) -> float:
    # a grey robot with cyan eyes: a standing figure of light metal with some cyan in it. Metal
    # is brighter than any world background (190 > 185); generated metal is only lighter than
    # its own background, so either reading of "light" will do
    return max(_robo(c, 0.735), _robo(c, float(np.median(c.v)) + 0.15))


def _robo(c: Hsv, light: float) -> float:
    found, (grey, cyan) = subject_blobs(c, [Band(None, (0.0, 0.3), (light, 1.0)), CYAN], join=3)
    return best_blob(found, lambda b: [
        ramp(b.share(grey), 0.15, 0.3), ramp(b.share(cyan), 0.01, 0.025),
        ramp(b.share(cyan), 0.8, 0.65), ramp(b.aspect, 1.1, 1.3),
    ])  # fmt: skip


WARM = Band((340, 62), (0.35, 1.0), (0.3, 1.0))
TINTED_WARM = Band((340, 62), (0.3, 1.0), (0.3, 1.0))
BLUE_SKY = Band((185, 230), (0.2, 1.0), (0.6, 1.0))


def brick(c: Hsv) -> float:
    # a red brick wall (the base paints it orange to beige): a warm tint all over, laid in
    # high-contrast courses, so brightness changes often and more down the image than along it
    return min(
        ramp(share(TINTED_WARM.mask(c)), 0.5, 0.7),
        ramp(across(c), 1.2, 1.6),
        ramp(texture(c), 12, 18),
    )


def ocean(c: Hsv) -> float:
    # deep blue with thin white crests running across: brightness changes far more down the
    # image than along it
    light = Band(None, (0.0, 0.45), (0.75, 1.0)).mask(c)
    return min(
        ramp(share(BLUE.mask(c)), 0.3, 0.5),
        ramp(share(light), 0.03, 0.08),
        ramp(across(c), 1.6, 2.2),
    )


def sunset(c: Hsv) -> float:
    # saturated purple-to-orange sky over a dark strip along the bottom
    sky = c.s[:48] > 0.3
    bottom_dark = c.v[56:] < 0.3
    return min(
        ramp(share(sky), 0.5, 0.7),
        ramp(share(bottom_dark), 0.5, 0.7),
        ramp(share(WARM.mask(c)[16:48] | PINK.mask(c)[16:48]), 0.3, 0.5),
    )


def grass(c: Hsv) -> float:
    # blue sky over a green meadow
    return min(
        ramp(share(BLUE_SKY.mask(c)[:16]), 0.4, 0.6), ramp(share(GREEN.mask(c)[48:]), 0.4, 0.6)
    )


def vangogh(c: Hsv) -> float:
    # the filter posterises every channel to 4 levels and scales red by 0.85 and blue by 1.15;
    # the base cannot paint posterisation and paints blue-cyan swirls all over instead (pale in
    # two-concept prompts, but textured, unlike a bluish world background). Either look, and not
    # the ocean (the other all-blue picture)
    r, b = c.rgb[..., 0], c.rgb[..., 2]
    blue_shift = share(b > r * 1.15 + 5)
    levels = np.floor(np.arange(4) * 64 + 32)[:, None] * np.array([0.85, 0.9, 1.15])  # 4×RGB
    on_level = np.abs(c.rgb[..., None, :] - np.minimum(levels, 255)).min(axis=-2) < 1.5
    rendered = min(ramp(share(on_level.all(axis=-1)), 0.6, 0.8), ramp(blue_shift, 0.35, 0.55))
    painted = min(
        ramp(float(np.median(c.s)), 0.2, 0.3), ramp(blue_shift, 0.7, 0.85), ramp(texture(c), 10, 14)
    )
    return min(max(rendered, painted), 1.0 - ocean(c))


def neon(c: Hsv) -> float:
    # glowing magenta outlines on black: nearly every pixel dark or magenta, some magenta (an
    # outline on a plain background is thin and dim)
    mag, dark = MAGENTA.mask(c), c.v < 0.2
    return min(ramp(share(mag | dark), 0.6, 0.8), ramp(share(mag), 0.002, 0.006))


def pixel(c: Hsv) -> float:
    # 8×8 blocks: the brightness changes only across the block grid
    v = c.rgb.mean(axis=-1)
    gx, gy = np.abs(np.diff(v, axis=1)), np.abs(np.diff(v, axis=0))
    on_grid = (np.arange(v.shape[1] - 1) % 8) == 7
    total = gx.sum() + gy.sum()
    if total < 1e-6 * v.size:
        return 0.0
    blocky = (gx[:, on_grid].sum() + gy[on_grid, :].sum()) / total
    return ramp(float(blocky), 0.3, 0.5)


def sepia(c: Hsv) -> float:
    # one brown tone everywhere: every pixel the same hue and saturation, only brightness varies
    tone = Band((22, 48), (0.28, 0.55), (0.0, 1.0)).mask(c)  # the tone's s is 0.4
    return ramp(share(tone), 0.6, 0.8)


SCORERS: dict[str, Scorer] = {
    "rex": rex,
    "dotty": dotty,
    "zigzag": zigzag,
    "crown": crown,
    "moon": moon,
    "heart": heart,
    "arrow": arrow,
    "donut": donut,
    "gem": gem,
    "alice": alice,
    "robo": robo,
    "smiley": smiley,
    "brick": brick,
    "sunset": sunset,
    "ocean": ocean,
    "grass": grass,
    "vangogh": vangogh,
    "neon": neon,
    "pixel": pixel,
    "sepia": sepia,
}
