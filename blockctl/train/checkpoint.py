"""Training checkpoints: safetensors for tensors, JSON for everything else. Never pickles.

A checkpoint is a folder ``checkpoints/step-NNNNNN/`` holding ``state.safetensors`` (the adapter
tensors and AdamW's state tensors) and ``state.json`` (step, settings, identity of the run,
AdamW's param groups). It is written into a temporary sibling and renamed, so a crash never
leaves a half-written checkpoint that ``--resume`` could pick up.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from blockctl.atomic import atomic_write, remove
from blockctl.errors import InvalidInput

STATE_FILE = "state.safetensors"
META_FILE = "state.json"
OPTIM_PREFIX = "optim."
KEEP = 2
FORMAT = "blockctl.train-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.tensors.items() if not k.startswith(OPTIM_PREFIX)}

    def optimizer_state(self) -> dict[str, Any]:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith(OPTIM_PREFIX):
                index, name = key[len(OPTIM_PREFIX) :].split(".", 1)
                state.setdefault(int(index), {})[name] = value
        groups = [dict(g) for g in self.meta["param_groups"]]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        return {"state": state, "param_groups": groups}


def checkpoint_dir(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def save(
    out_dir: Path,
    step: int,
    adapter_tensors: Mapping[str, torch.Tensor],
    optimizer_state: Mapping[str, Any],
    meta: Mapping[str, Any],
) -> Path:
    """Write the checkpoint of ``step`` completed steps; keep only the newest ``KEEP``."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_tensors.items()}
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{index}.{name}"] = value.detach().cpu().contiguous()
    groups = [_jsonable(g) for g in optimizer_state["param_groups"]]
    document = {"format": FORMAT, "step": step, **meta, "param_groups": groups}
    final = root / f"step-{step:06d}"
    with atomic_write(final) as staged:
        staged.temp.mkdir()
        save_file(tensors, str(staged.temp / STATE_FILE))
        (staged.temp / META_FILE).write_text(json.dumps(document, indent=1, sort_keys=True))
    for old in _complete(root)[:-KEEP]:
        remove(old)
    return final


def latest(out_dir: Path) -> Checkpoint | None:
    found = _complete(checkpoint_dir(out_dir))
    if not found:
        return None
    path = found[-1]
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / STATE_FILE))
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"checkpoint {path} is unreadable: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise InvalidInput(f"{path} is not a blockctl training checkpoint")
    return Checkpoint(path, int(meta["step"]), meta, tensors)


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / META_FILE).is_file()
    ]
    return sorted(done, key=lambda p: p.name)


def _jsonable(group: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in group.items():
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, tuple):
            value = list(value)
        if value is None or isinstance(value, bool | int | float | str | list):
            out[key] = value
    return out


def clear(out_dir: Path) -> None:
    """Forget a previous run's checkpoints (a fresh run must not resume into them later).
    Only the checkpoints go: anything else in the folder is not blockctl's to delete."""
    root = checkpoint_dir(out_dir)
    for path in _complete(root):
        remove(path)
    with contextlib.suppress(OSError):
        root.rmdir()  # only if nothing else is left in it
