"""The concept's photos: read once, normalised to the base's resolution, encoded once.

Each image is decoded, converted to RGB (transparency composited on white, EXIF orientation
applied), resized so its shorter side matches the resolution (aspect preserved) and
centre-cropped. Where the crop fell is kept per photo (``Framing``), for SDXL's ``add_time_ids``.
The VAE's posterior (mean, std) of every image and of its mirror image is cached, so a training
step only draws ``mean + std·z``: the same distribution as encoding the photo every step,
without paying for the VAE encoder each time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from blockctl.conditioning import micro_conditioning
from blockctl.errors import InvalidInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ENCODE_BATCH = 8


@dataclass(frozen=True)
class Photo:
    path: Path
    caption: str


@dataclass(frozen=True)
class Framing:
    """Where a photo's training square came from (pixels, (height, width) order)."""

    original: tuple[int, int]  # the photo as read, EXIF orientation applied
    resized: tuple[int, int]  # after its shorter side went to the resolution
    crop: tuple[int, int]  # (top, left) of the centre square in the resized photo
    size: int  # the square's side: the training resolution

    def mirrored(self) -> Framing:
        """The same square taken from the mirrored photo: its left edge moves across."""
        top, left = self.crop
        return Framing(self.original, self.resized, (top, self.resized[1] - left - self.size),
                       self.size)  # fmt: skip

    def time_ids(self) -> tuple[int, ...]:
        """SDXL's add_time_ids: original size, crop top-left, target size."""
        return micro_conditioning(self.original, self.crop, (self.size, self.size))


@dataclass(frozen=True)
class ConceptPhotos:
    photos: tuple[Photo, ...]
    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]
    skipped: tuple[tuple[str, str], ...]  # (file name, reason)
    framing: tuple[Framing, ...] = ()

    def __len__(self) -> int:
        return len(self.photos)

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[-1])

    def time_ids(self) -> torch.Tensor:
        """add_time_ids (2, N, 6) of each photo as is ``[0]`` and mirrored ``[1]``, the order
        ``LatentBank`` keeps its posteriors in."""
        rows = [[f.time_ids() for f in self.framing],
                [f.mirrored().time_ids() for f in self.framing]]  # fmt: skip
        return torch.tensor(rows, dtype=torch.float32)


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
    photos, tensors, skipped, framing = [], [], [], []
    for path in files:
        try:
            image = _read(path)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            skipped.append((path.name, reason))
            say(f"skipping {path.name}: not a readable image ({reason})")
            continue
        square, frame = _fit(image, resolution)
        tensors.append(_to_tensor(square))
        framing.append(frame)
        photos.append(Photo(path, _caption(path, token, class_word, say)))
    if not photos:
        raise InvalidInput(
            f"none of the {len(files)} image file(s) in {folder} could be read",
            hint="check that the files are valid jpg/png/webp images",
        )
    return ConceptPhotos(tuple(photos), torch.stack(tensors), tuple(skipped), tuple(framing))


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


def _fit(image: Image.Image, resolution: int) -> tuple[Image.Image, Framing]:
    """Shorter side to ``resolution``, then the centre square, and where it was cut."""
    w, h = image.size
    factor = resolution / min(w, h)
    size = (max(resolution, round(w * factor)), max(resolution, round(h * factor)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    frame = Framing((h, w), (size[1], size[0]), (top, left), resolution)
    return image.crop((left, top, left + resolution, top + resolution)), frame


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
    VAE's ``scaling_factor`` (unit-variance latents; without it the loss is trivially small);
    on SDXL also each image's add_time_ids, indexed the same way."""

    mean: torch.Tensor  # (2, N, C, h, w)
    std: torch.Tensor
    time_ids: torch.Tensor | None = None  # (2, N, 6)

    def sample(self, index: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        which = flip.long()
        return self.mean[which, index] + self.std[which, index] * noise

    def time_ids_for(self, index: torch.Tensor, flip: torch.Tensor) -> torch.Tensor | None:
        return None if self.time_ids is None else self.time_ids[flip.long(), index]


def encode_dtype(mixed_precision: str, upcast: bool) -> torch.dtype:
    """The VAE's dtype for encoding the photos: float32 unless mixed precision is on and the VAE
    is safe in half precision (SDXL's is not: its config says ``force_upcast``)."""
    if upcast or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


@torch.no_grad()
def encode_photos(
    vae: torch.nn.Module,
    pixels: torch.Tensor,
    scaling: float,
    time_ids: torch.Tensor | None = None,
) -> LatentBank:
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
    return LatentBank(torch.stack(means), torch.stack(stds), time_ids)
