"""The whole story on the tiny base: reserve → train → publish → verify → merge → load the
merged folder in diffusers → identity metrics on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.support.cli import cli


def photos(folder: Path, color: tuple[int, int, int], n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (40, 40), (20 * i, 20 * i, 20 * i))
        image.paste(color, (8 + i, 8, 24 + i, 24))
        image.save(folder / f"p{i}.png")
    return folder


@pytest.mark.timeout(600)
def test_train_publish_verify_merge_load_eval(tiny_base: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    assert cli(reg, "init", "--base", str(tiny_base), "--slots", "4", "--rank", "2")[0] == 0
    concepts = {"rex": ("dog", (200, 30, 30)), "tabby": ("cat", (30, 30, 200))}
    for name, (word, color) in concepts.items():
        assert cli(reg, "reserve-slot", name, "--class-word", word)[0] == 0
        code, out, err = cli(
            reg, "train", str(photos(tmp_path / f"photos-{name}", color)), "--concept", name,
            "--steps", "4", "--checkpoint-every", "2", "--out", str(tmp_path / f"run-{name}"),
            "--no-sample", "--json",
        )  # fmt: skip
        assert code == 0, err
        result = json.loads(out)
        assert result["published"] and result["steps"] == 4

    code, out, _ = cli(reg, "verify", "--json")
    assert code == 0 and json.loads(out)["ok"]

    merged = tmp_path / "merged"
    code, _, err = cli(reg, "merge", "rex", "tabby", "-o", str(merged))
    assert code == 0, err
    code, _, err = cli(reg, "verify", "--merged", str(merged))
    assert code == 0, err

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(merged, safety_checker=None)
    ids = pipe.tokenizer(["a photo of <rex> dog and <tabby> cat"]).input_ids[0]
    added = pipe.tokenizer.convert_tokens_to_ids(["<rex>", "<tabby>"])
    assert all(i in ids for i in added)
    image = pipe(
        "a photo of <rex> dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]  # fmt: skip
    assert image.shape[-1] == 3 and torch.isfinite(torch.from_numpy(image)).all()

    code, out, err = cli(
        reg, "eval", "rex", "tabby", "--merged", str(merged), "--images", "1", "--sample-steps",
        "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = {r["concept"]: r for r in json.loads(out)["concepts"]}
    for r in rows.values():
        assert r["delta_sq"] > 0
        assert 0.5 < r["retention"] < 1.5
