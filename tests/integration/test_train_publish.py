"""End to end on the tiny base: reserve → train → publish → ``blockctl verify`` passes."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from blockctl.layout import sha256_file
from registry import open_registry
from tests.support.cli import cli
from tests.support.photos import write_photos


def test_train_publish_verify(tiny_base: Path, tmp_path: Path) -> None:
    reg = tmp_path / "reg"

    code, _, err = cli(reg, "init", "--base", str(tiny_base), "--slots", "4", "--rank", "2")
    assert code == 0, err
    for concept, word in (("rex", "dog"), ("tom", "cat")):
        code, _, err = cli(reg, "reserve-slot", concept, "--class-word", word, "--owner", "alice")
        assert code == 0, err
    photos = write_photos(tmp_path / "photos", n=3)
    (photos / "0.txt").write_text("<rex> dog sitting")
    out = tmp_path / "run"
    code, stdout, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--steps",
        "3",
        "--owner",
        "alice",
        "--out",
        str(out),
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["published"] is True
    registry = open_registry(str(reg))
    [record] = registry.adapters()
    assert record.concept == "rex" and record.slot == 0
    assert record.sha256 == summary["sha256"] == sha256_file(out / "rex.safetensors")
    grid = Image.open(summary["grid"])
    assert grid.size[0] == 8 * 32  # base ×4 | trained ×4, tiny base renders 32 px

    code, stdout, err = cli(reg, "verify", "--json")
    assert code == 0, err + stdout
    assert json.loads(stdout)["ok"] is True
