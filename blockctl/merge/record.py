"""The merge record: what went into a merged output, stored with it, so ``verify --merged``
can recompute the expected weights and ``merge --force`` knows an output it may replace.

A diffusers folder holds it as ``blockctl_merge.json``; a single file, a LoRA and a token
sidecar hold it in their safetensors metadata under ``blockctl.merge``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blockctl.errors import BlockctlError, InvalidInput, ValidationFailed
from blockctl.safetensors_io import read_header

MERGE_FORMAT = "blockctl.merge/1"
META_KEY = "blockctl.merge"  # safetensors metadata key holding the record (JSON)
RECORD_NAME = "blockctl_merge.json"  # the record's file in a merged diffusers folder


def read_record(path: Path) -> dict[str, Any]:
    """The merge record a merged output carries (folder: a JSON file; file: metadata)."""
    try:
        if path.is_dir():
            return dict(json.loads((path / RECORD_NAME).read_text()))
        meta = read_header(path).get("__metadata__") or {}  # refuses non-safetensors files
        return dict(json.loads(meta[META_KEY]))
    except FileNotFoundError:
        raise InvalidInput(f"{path} is not a blockctl merge output (no merge record)") from None
    except KeyError:
        raise InvalidInput(f"{path} is not a blockctl merge output (no merge record)") from None
    except (OSError, ValueError) as exc:
        raise ValidationFailed(f"{path}: unreadable merge record: {exc}") from exc


def is_merge_output(path: Path) -> bool:
    """Whether ``path`` carries a merge record: only then may ``merge --force`` replace it."""
    try:
        read_record(path)
    except BlockctlError:
        return False
    return True
