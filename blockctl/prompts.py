"""The prompts a concept is measured on: its own (with its token) and its prior class's.

Four phrasings each, so no single template's quirks decide a concept's figures. Shared by the
identity metrics (evaluate.py) and the trainer's learning-strength probe (train/strength.py).
"""

from __future__ import annotations

OWN_TEMPLATES = (
    "a photo of {token} {cls}",
    "{token} {cls}",
    "a picture of {token} {cls}",
    "a {token} {cls}",
)
PRIOR_TEMPLATES = ("a photo of a {cls}", "a {cls}", "a picture of a {cls}", "{cls}")


def own_prompts(token: str, class_word: str) -> list[str]:
    return [t.format(token=token, cls=class_word) for t in OWN_TEMPLATES]


def prior_prompts(class_word: str) -> list[str]:
    return [t.format(cls=class_word) for t in PRIOR_TEMPLATES]
