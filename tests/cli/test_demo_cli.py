"""``blockctl demo``: refusals are instant; the full run (few steps) is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blockctl.cli import app

runner = CliRunner()


def test_refuses_non_empty_out(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not empty" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_unknown_concept_lists_known_ones(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--concept", "nope"])
    assert result.exit_code == 2 and "rex" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_full_demo_with_few_steps(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "5", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [m["concept"] for m in summary["metrics"]] == ["rex", "brick", "vangogh"]
    assert (out / "samples.png").is_file() and (out / "merged" / "model_index.json").is_file()
