"""Reading a folder of photos: modes, orientation, crop, captions, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from blockctl.errors import InvalidInput
from blockctl.train.data import default_caption, encode_photos, load_photos


def _save(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 24), **kw: object) -> Path:
    color: object = {"L": 128, "RGBA": (255, 0, 0, 0), "CMYK": (0, 255, 0, 0), "P": 3}.get(
        mode, (10, 200, 30)
    )
    Image.new(mode, size, color).save(path, **kw)  # type: ignore[arg-type]
    return path


def test_every_mode_becomes_rgb_at_the_resolution(tmp_path: Path) -> None:
    _save(tmp_path / "a.png", "RGBA")
    _save(tmp_path / "b.png", "L")
    _save(tmp_path / "c.jpg", "CMYK")
    _save(tmp_path / "d.png", "P")
    _save(tmp_path / "e.webp", "RGB", size=(10, 50))
    (tmp_path / "notes.md").write_text("ignored")
    data = load_photos(tmp_path, 16, "<rex>", "dog")
    assert len(data) == 5 and data.pixels.shape == (5, 3, 16, 16)
    assert float(data.pixels.min()) >= -1 and float(data.pixels.max()) <= 1
    # Fully transparent red composites on white, not on black.
    torch.testing.assert_close(data.pixels[0], torch.ones(3, 16, 16))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: white ends up on top
    image.save(tmp_path / "r.jpg", exif=exif, quality=100)
    data = load_photos(tmp_path, 8, "<rex>", "dog")
    top, bottom = data.pixels[0, :, :2].mean(), data.pixels[0, :, -2:].mean()
    assert top > 0.5 and bottom < -0.5


def test_captions_come_from_sidecars_else_the_default(tmp_path: Path) -> None:
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    _save(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("<rex> dog  on a\nbeach")
    (tmp_path / "b.txt").write_text("a dog on grass")
    messages: list[str] = []
    data = load_photos(tmp_path, 8, "<rex>", "dog", warn=messages.append)
    captions = [p.caption for p in data.photos]
    assert captions[0] == "<rex> dog on a beach"
    assert captions[1] == "a photo of <rex> dog, a dog on grass" and "b.txt" in messages[0]
    assert captions[2] == default_caption("<rex>", "dog") == "a photo of <rex> dog"


def test_corrupt_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    _save(tmp_path / "good.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    truncated = _save(tmp_path / "trunc.png", size=(64, 64)).read_bytes()
    (tmp_path / "trunc.png").write_bytes(truncated[: len(truncated) // 2])
    messages: list[str] = []
    data = load_photos(tmp_path, 8, "<rex>", "dog", warn=messages.append)
    assert [p.path.name for p in data.photos] == ["good.png"]
    assert {name for name, _ in data.skipped} == {"bad.jpg", "trunc.png"}
    assert len(messages) == 2


@pytest.mark.parametrize("case", ["empty", "only-text", "all-corrupt", "missing", "a-file"])
def test_no_usable_photo_is_invalid_input(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "photos"
    if case != "missing":
        folder.mkdir()
    if case == "only-text":
        (folder / "a.txt").write_text("caption")
    if case == "all-corrupt":
        (folder / "a.png").write_bytes(b"garbage")
    if case == "a-file":
        folder.rmdir()
        folder.write_text("x")
    with pytest.raises(InvalidInput):
        load_photos(folder, 8, "<rex>", "dog", warn=lambda m: None)


def test_encoded_latents_are_scaled_and_cover_flips() -> None:
    class FakeVAE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def encode(self, x: torch.Tensor) -> object:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            params = torch.cat([x[:, :1, ::2, ::2], torch.zeros_like(x[:, :1, ::2, ::2])], 1)
            return type("Out", (), {"latent_dist": DiagonalGaussianDistribution(params)})()

    pixels = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    bank = encode_photos(FakeVAE(), pixels, scaling=0.5)
    assert bank.mean.shape == (2, 2, 1, 2, 2)
    torch.testing.assert_close(bank.mean[0, 1, 0], 0.5 * pixels[1, 0, ::2, ::2])
    torch.testing.assert_close(bank.mean[1, 1, 0], 0.5 * pixels[1, 0].flip(1)[::2, ::2])
    torch.testing.assert_close(bank.std, torch.full_like(bank.std, 0.5))
