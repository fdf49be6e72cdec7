"""The concept's photos: read once, normalised to the base's resolution, encoded once.

Each image is decoded, converted to RGB (transparency composited on white, EXIF orientation
applied), resized so its shorter side matches the resolution and centre-cropped. The VAE's
posterior (mean, std) of every image and of its mirror image is cached, so a training step only
draws ``mean + std·z``: the same distribution as encoding the photo every step, without paying
for the VAE encoder each time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blockctl.errors import InvalidInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ENCODE_BATCH = 8


@dataclass(frozen=True)
class Photo:
    path: Path
    caption: str


@dataclass(frozen=True)
class ConceptPhotos:
    photos: tuple[Photo, ...]
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    skipped: tuple[tuple[str, str], ...]  # (file name, reason)

    def __len__(self) -> int:
        return len(self.photos)


def default_caption(token: str, class_word: str) -> str:
    return f"a photo of {token} {class_word}"


def load_photos(
    folder: Path,
    resolution: int,
    token: str,
    class_word: str,
    warn: Callable[[str], None] | None = None,
) -> ConceptPhotos:
    """Every readable image of ``folder``; InvalidInput when there is none."""
    say = warn or (lambda msg: warnings.warn(msg, stacklevel=2))
    if not folder.exists():
        raise InvalidInput(f"photo folder {folder} does not exist")
    if not folder.is_dir():
        raise InvalidInput(f"{folder} is not a folder", hint="pass a folder of jpg/png/webp photos")
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not files:
        raise InvalidInput(
            f"no photos in {folder}", hint="put the concept's jpg/png/webp photos in the folder"
        )
    photos, tensors, skipped = [], [], []
    for path in files:
        try:
            image = _read(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            skipped.append((path.name, reason))
            say(f"skipping {path.name}: not a readable image ({reason})")
            continue
        tensors.append(_to_tensor(_fit(image, resolution)))
        photos.append(Photo(path, _caption(path, token, class_word, say)))
    if not photos:
        raise InvalidInput(
            f"none of the {len(files)} image file(s) in {folder} could be read",
            hint="check that the files are valid jpg/png/webp images",
        )
    return ConceptPhotos(tuple(photos), torch.stack(tensors), tuple(skipped))


def _read(path: Path) -> Image.Image:
    with Image.open(path) as raw:
        raw.load()  # decode now: truncated files fail here, not later
        image = ImageOps.exif_transpose(raw)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")


def _fit(image: Image.Image, resolution: int) -> Image.Image:
    """Shorter side to ``resolution``, then the centre square."""
    w, h = image.size
    factor = resolution / min(w, h)
    size = (max(resolution, round(w * factor)), max(resolution, round(h * factor)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    chw = data.view(image.size[1], image.size[0], 3).permute(2, 0, 1).float()
    return chw / 127.5 - 1.0


def _caption(path: Path, token: str, class_word: str, say: Callable[[str], None]) -> str:
    sidecar = path.with_suffix(".txt")
    if not sidecar.is_file():
        return default_caption(token, class_word)
    text = " ".join(sidecar.read_text(encoding="utf-8", errors="replace").split())
    if not text:
        return default_caption(token, class_word)
    if token not in text.split():
        # Without its token a caption would teach the adapter to act on ordinary prompts.
        say(f"{sidecar.name} does not mention {token}; prefixing the default caption")
        return f"{default_caption(token, class_word)}, {text}"
    return text


@dataclass(frozen=True)
class LatentBank:
    """Cached VAE posteriors: index ``[flip, image]`` gives mean and std, already scaled by the
    VAE's ``scaling_factor`` (unit-variance latents; without it the loss is trivially small)."""

    mean: torch.Tensor  # (2, N, C, h, w)
    std: torch.Tensor

    def sample(self, index: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        which = flip.long()
        return self.mean[which, index] + self.std[which, index] * noise


@torch.no_grad()
def encode_photos(vae: torch.nn.Module, pixels: torch.Tensor, scaling: float) -> LatentBank:
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    for variant in (pixels, torch.flip(pixels, dims=[3])):
        mu, sd = [], []
        for chunk in variant.split(ENCODE_BATCH):
            dist = vae.encode(chunk.to(device=device, dtype=dtype)).latent_dist  # type: ignore[operator]
            # the bank stays on the CPU: batches are drawn there from seeded CPU generators,
            # so a run draws the same batches on any device, then moves them over
            mu.append((dist.mean.float() * scaling).cpu())
            sd.append((dist.std.float() * scaling).cpu())
        means.append(torch.cat(mu))
        stds.append(torch.cat(sd))
    return LatentBank(torch.stack(means), torch.stack(stds))
