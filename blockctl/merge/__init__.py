"""Instant merge of any subset of published concepts (docs/design.md §8), atomically.

The package: ``choices`` (formats and LoRA key styles), ``plan`` (the request checked and
loaded: ``MergeOptions``, ``plan_merge``, ``MergePlan``), ``staging`` (temporary siblings renamed
into place), ``writers`` and one module per output format (``diffusers_folder``,
``single_file``, ``lora``), and ``record`` (what a merged output says about itself).

Importing the package is cheap: the CLI imports it for its choices, so the planning half, which
needs torch, loads on first use of one of its names.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl.merge.choices import FORMATS, LORA_KEYS, LoraKeyStyle, MergeFormat

if TYPE_CHECKING:
    from blockctl.merge.plan import (
        MergeOptions,
        MergePlan,
        Selected,
        dtype_name,
        parse_dtype,
        parse_scales,
        plan_merge,
    )
    from registry.base import Registry

__all__ = [
    "FORMATS",
    "LORA_KEYS",
    "LoraKeyStyle",
    "MergeFormat",
    "MergeOptions",
    "MergePlan",
    "MergeResult",
    "Selected",
    "dtype_name",
    "merge",
    "parse_dtype",
    "parse_scales",
    "plan_merge",
]


def __getattr__(name: str) -> Any:
    # The planning names load with their module on first use (see the docstring).
    if not name.startswith("_"):
        plan = importlib.import_module("blockctl.merge.plan")
        if hasattr(plan, name):
            return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    format: str
    files: tuple[Path, ...]
    selected: tuple[Selected, ...]
    seconds: float
    bytes: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        return {
            "out": str(self.out),
            "format": self.format,
            "files": [str(f) for f in self.files],
            "concepts": [s.to_dict() for s in self.selected],
            "slots": [s.slot for s in self.selected],
            "seconds": round(self.seconds, 4),
            "bytes": self.bytes,
            "notes": list(self.notes),
        }


def merge(registry: Registry, concepts: Sequence[str], options: MergeOptions) -> MergeResult:
    """Merge ``concepts`` into ``options.out``, atomically."""
    from blockctl.merge.plan import plan_merge
    from blockctl.merge.staging import staged
    from blockctl.merge.writers import writer_for

    start = time.perf_counter()
    options.check()
    plan = plan_merge(registry, concepts, options.scales)
    writer = writer_for(options.format)
    outputs = writer.outputs(options.out, plan)
    with staged(outputs, force=options.force) as temps:
        notes = writer.write(plan, temps, options)
    size = sum(_size(p) for p in outputs)
    return MergeResult(
        out=options.out,
        format=options.format,
        files=tuple(outputs),
        selected=plan.selected,
        seconds=time.perf_counter() - start,
        bytes=size,
        notes=tuple(notes),
    )


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
