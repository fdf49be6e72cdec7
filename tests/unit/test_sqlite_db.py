"""registry.sqlite_db imports sqlite-utils without numpy, and leaves numpy importable after."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from registry.sqlite_db import Database
assert "numpy" not in sys.modules and "sqlite_utils" in sys.modules
import numpy  # still importable: the block was lifted
assert numpy.zeros(1).shape == (1,)
db = Database(memory=True)
db["t"].insert({"a": 1, "b": "x", "c": 1.5})
assert list(db["t"].rows) == [{"a": 1, "b": "x", "c": 1.5}]
print("ok")
"""


def test_sqlite_utils_without_numpy() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_numpy_already_imported_is_left_alone() -> None:
    probe = (
        "import numpy\nfrom registry.sqlite_db import Database\n"
        "import sqlite_utils.db as d\nassert d.np is numpy\nprint('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
