"""Options with a fixed set of values list them in --help and are refused by the parser
(exit 2) before anything runs; the values come from the library's own constants."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockctl.layout import PRESETS
from blockctl.merge import FORMATS, LORA_KEYS
from blockctl.train.config import MIXED_PRECISION, ROE_LATENTS, SCHEDULES
from tests.support.cli import cli

CHOICES = [
    ("merge", ["rex", "-o", "out"], "--format", FORMATS),
    ("merge", ["rex", "-o", "out"], "--lora-keys", LORA_KEYS),
    ("init", [], "--targets", tuple(PRESETS)),
    ("train", ["photos", "--concept", "rex"], "--schedule", SCHEDULES),
    ("train", ["photos", "--concept", "rex"], "--roe-latents", ROE_LATENTS),
    ("train", ["photos", "--concept", "rex"], "--mixed-precision", MIXED_PRECISION),
]


@pytest.mark.parametrize(("command", "args", "option", "values"), CHOICES)
def test_help_lists_the_values(
    command: str, args: list[str], option: str, values: tuple[str, ...]
) -> None:
    result = cli(None, command, "--help", width=200)
    assert result.code == 0
    line = next(line for line in result.stdout.splitlines() if option in line)
    assert "|".join(values) in line, line


@pytest.mark.parametrize(("command", "args", "option", "values"), CHOICES)
def test_parser_refuses_other_values(
    command: str, args: list[str], option: str, values: tuple[str, ...], tmp_path: Path
) -> None:
    result = cli(tmp_path / "reg", command, *args, option, "nonsense")
    assert result.code == 2, result.output
    assert "'nonsense' is not one of" in " ".join(result.stderr.split())
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_the_presets_the_cli_offers_are_the_ones_layouts_know() -> None:
    from typing import get_args

    from blockctl.layout import Preset

    assert get_args(Preset) == tuple(PRESETS)
