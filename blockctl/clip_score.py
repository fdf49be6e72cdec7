"""Optional CLIP alignment for ``blockctl eval --clip PATH`` (the paper's metric; docs/design.md
§10 calls it an extra): images are generated with seeded noise, embedded with a local CLIP model.

- **image alignment**: cosine similarity between the merged model's image of a concept and the
  concept-alone model's image from the same seed (1 = the merge left the concept's look intact);
- **text alignment**: cosine similarity between the merged model's image and the prompt with
  the token replaced by its class word, as in the paper's text-alignment score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blockctl.errors import InvalidInput


@dataclass(frozen=True)
class ClipConfig:
    model: Path  # the images are eval's sample-identity images (EvalConfig: seeds, steps, guidance)


class Clip:
    """A local CLIP model (transformers ``CLIPModel`` + ``CLIPProcessor`` folder; no download)."""

    def __init__(self, folder: Path) -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not (folder / "config.json").is_file():
            raise InvalidInput(f"{folder} is not a CLIP model folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"cannot load a CLIP model from {folder}: {exc}") from exc

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return _unit(_pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        out = self.model.get_text_features(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
        return _unit(_pooled(out))


def _pooled(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)


def image_alignment(
    clip: Clip, merged: Sequence[Image.Image], alone: Sequence[Image.Image]
) -> float:
    """Mean cosine of same-seed image pairs."""
    return float((clip.images(merged) * clip.images(alone)).sum(dim=-1).mean())


def text_alignment(clip: Clip, images: Sequence[Image.Image], text: str) -> float:
    """Mean cosine of each image with ``text``."""
    return float((clip.images(images) @ clip.texts([text]).T).mean())
