"""Comparing folders of files, for the merge and linking tests."""

from __future__ import annotations

import hashlib
from pathlib import Path


def digest_tree(path: Path) -> str:
    """One sha256 over every file's relative name and bytes, in name order."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()
