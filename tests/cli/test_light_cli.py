"""The everyday commands stay fast: ``--help``, ``slots``, ``reserve-slot`` and
``release-slot`` never import torch, diffusers or transformers (seconds of start-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from registry import Registry

HEAVY = ("torch", "diffusers", "transformers")
WATCHED = (*HEAVY, "sqlite_utils", "numpy")  # the registry's backend: --help does not need it;
# numpy: sqlite-utils would import it for nothing the registry uses (registry/sqlite_db.py)
# Runs the CLI in a fresh interpreter, then reports its exit code and which heavy modules
# (of WATCHED) got imported, into the file named by the first argument.
PROBE = f"""
import json, sys
report, args = sys.argv[1], sys.argv[2:]
sys.argv = ["blockctl", *args]
from blockctl.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code
imported = [m for m in {WATCHED!r} if m in sys.modules]
with open(report, "w") as fh:
    json.dump({{"code": code, "imported": imported}}, fh)
"""


def probe(tmp_path: Path, *args: str) -> dict[str, object]:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(report), *args], capture_output=True, text=True
    )
    assert report.is_file(), done.stderr
    return dict(json.loads(report.read_text()))


@pytest.mark.parametrize("args", [["--help"], ["slots", "--help"], ["merge", "--help"]])
def test_help_imports_nothing_heavy(tmp_path: Path, args: list[str]) -> None:
    assert probe(tmp_path, *args) == {"code": 0, "imported": []}  # not even sqlite_utils


def test_registry_commands_import_nothing_heavy(tiny_registry: Registry, tmp_path: Path) -> None:
    reg = ["--registry", tiny_registry.location]
    for args in (
        ["reserve-slot", "rex", "--class-word", "dog", "--owner", "me"],
        ["slots"],
        ["slots", "--json"],
        ["release-slot", "rex"],
    ):
        assert probe(tmp_path, *reg, *args) == {"code": 0, "imported": ["sqlite_utils"]}, args
    assert tiny_registry.slots() == []  # reserved, then released: the slot is free again
