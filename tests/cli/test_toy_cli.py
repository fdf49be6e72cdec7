"""``blockctl toy-photos`` and ``blockctl sample``: outputs and exit codes for bad input."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.cli import cli


def test_toy_photos_writes_pngs_and_json(tmp_path: Path) -> None:
    out = tmp_path / "rex"
    r = cli(None, "toy-photos", str(out), "--concept", "rex", "--n", "3", "--json")
    assert r.code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["class_word"] == "star" and len(doc["images"]) == 3
    assert sorted(p.name for p in out.iterdir()) == [f"rex_00{i}.png" for i in range(3)]
    assert all("rex" in im["caption"] for im in doc["images"])


def test_toy_photos_same_seed_same_bytes(tmp_path: Path) -> None:
    for d in ("a", "b"):
        r = cli(None, "toy-photos", str(tmp_path / d), "-c", "sunset", "--n", "2")
        assert r.code == 0, r.output
    assert (tmp_path / "a/sunset_001.png").read_bytes() == (
        tmp_path / "b/sunset_001.png"
    ).read_bytes()


def test_unknown_concept_exits_2_and_lists_known(tmp_path: Path) -> None:
    r = cli(None, "toy-photos", str(tmp_path / "x"), "--concept", "nope")
    assert r.code == 2
    assert "nope" in r.output and "rex" in r.output and "vangogh" in r.output
    assert not (tmp_path / "x").exists()


def test_non_positive_n_exits_2(tmp_path: Path) -> None:
    for n in ("0", "-3"):
        r = cli(None, "toy-photos", str(tmp_path / "x"), "-c", "rex", "--n", n)
        assert r.code == 2, r.output


def test_non_empty_out_refused_unless_force(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    r = cli(None, "toy-photos", str(tmp_path), "-c", "rex", "--n", "1")
    assert r.code == 2 and "--force" in r.output
    r = cli(None, "toy-photos", str(tmp_path), "-c", "rex", "--n", "1", "--force")
    assert r.code == 0, r.output
    assert (tmp_path / "rex_000.png").is_file() and (tmp_path / "keep.txt").is_file()


def test_out_that_is_a_file_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "f.png"
    f.write_bytes(b"x")
    r = cli(None, "toy-photos", str(f), "-c", "rex", "--force")
    assert r.code == 2


def test_missing_concept_option_is_usage_error(tmp_path: Path) -> None:
    assert cli(None, "toy-photos", str(tmp_path / "x")).code == 2


def test_sample_bad_input_exits_2(tmp_path: Path) -> None:
    png = str(tmp_path / "o.png")
    assert cli(None, "sample", "a red circle", "-o", png, "--n", "0").code == 2
    assert cli(None, "sample", "a red circle", "-o", png, "--steps", "0").code == 2
    r = cli(None, "sample", "a red circle", "-o", str(tmp_path / "o.jpg"))
    assert r.code == 2
    r = cli(None, "sample", "a red circle", "-o", png, "--model", str(tmp_path))
    assert r.code == 2 and "model_index.json" in r.output
    assert cli(None, "sample", "-o", png).code == 2  # no prompt
