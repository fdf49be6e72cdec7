"""The words of the toy world, shared by the image generator and the tokenizer.

Kept free of torch/PIL imports so the tokenizer and the world can both depend on it cheaply.
"""

from __future__ import annotations

# Each color is (word, RGB); the benchmark classifies generated shapes by these exact values.
COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)),
    ("green", (30, 180, 40)),
    ("blue", (30, 60, 220)),
    ("yellow", (240, 220, 30)),
    ("orange", (245, 140, 20)),
    ("purple", (140, 40, 190)),
    ("white", (245, 245, 245)),
    ("black", (15, 15, 15)),
    ("pink", (250, 130, 190)),
    ("cyan", (40, 210, 220)),
)

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "star",
    "hexagon",
    "person",  # a stick figure, so "a photo of a person" means something for person concepts
)

BACKGROUNDS: tuple[str, ...] = ("plain", "striped", "checkered", "gradient", "noisy", "dotted")

# Words used by prompt templates (trainer priors, concept captions, styles, scenes).
FILLER: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "photo",
    "picture",
    "of",
    "on",
    "in",
    "with",
    "and",
    "background",
    "scene",
    "style",
    "painting",
    "person",
    "figure",
    "small",
    "large",
    "gray",
)


def world_words() -> tuple[str, ...]:
    """Every word that gets a whole-word token, in a fixed order (token ids must not drift)."""
    words = [c for c, _ in COLORS] + list(SHAPES) + list(BACKGROUNDS) + list(FILLER)
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return tuple(seen)
