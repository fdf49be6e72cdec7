"""The CLIP text encoder's module names, with and without ``text_model.``: the one place that
knows about the prefix.

transformers 4 nests ``CLIPTextModel``'s layers under ``text_model`` and saves them as
``text_model.encoder.layers.0.self_attn.q_proj.weight``; so do most text encoders on the Hub,
the original SD single-file layout, kohya's sd-scripts, ComfyUI and AUTOMATIC1111.
transformers 5 flattened the model: the same layer is ``encoder.layers.0.self_attn.q_proj``,
and a base it saves has no prefix. blockctl names its targets the transformers 5 way
(``canonical_module``) and writes the prefix back where a file format expects it
(``prefixed_module``).
"""

from __future__ import annotations

TEXT_MODEL_PREFIX = "text_model."


def canonical_module(name: str) -> str:
    """``text_model.encoder.layers.0…`` → ``encoder.layers.0…``; other names unchanged."""
    return name.removeprefix(TEXT_MODEL_PREFIX)


def prefixed_module(name: str) -> str:
    """``encoder.layers.0…`` → ``text_model.encoder.layers.0…``, whichever spelling is given."""
    return TEXT_MODEL_PREFIX + canonical_module(name)


def spellings(name: str) -> tuple[str, str]:
    """Both ways a text encoder tensor may be stored, the given one first."""
    other = canonical_module(name) if name.startswith(TEXT_MODEL_PREFIX) else prefixed_module(name)
    return name, other
