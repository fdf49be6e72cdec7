"""Registries: where the layout, the slots and the published adapters live.

``open_registry(location)`` picks the backend from the location string: ``hf://...`` for a
Hugging Face Hub registry (``registry.hub``), anything else a local folder. Opening creates
nothing; use ``Registry.create`` for that.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blockctl.errors import InvalidInput
from registry.base import AdapterRecord, Registry, SlotRecord

if TYPE_CHECKING:
    from registry.local import LocalRegistry

__all__ = ["AdapterRecord", "LocalRegistry", "Registry", "SlotRecord", "open_registry"]

HUB_PREFIX = "hf://"


def open_registry(location: str) -> Registry:
    """The registry at ``location``: ``hf://[datasets/]org/name[@rev]`` (Hub) or a folder."""
    location = str(location)
    if location.startswith(HUB_PREFIX):
        from registry.hub import HubRegistry  # huggingface_hub is only imported when needed

        return HubRegistry(location)
    if not location.strip():
        raise InvalidInput("the registry location is empty")
    from registry.local import LocalRegistry  # sqlite-utils: only once a registry is opened

    return LocalRegistry(Path(location))


def __getattr__(name: str) -> Any:
    # ``blockctl --help`` imports this package (through registry.base) and never opens a
    # registry: the SQLite backend loads on first use.
    if name == "LocalRegistry":
        return importlib.import_module("registry.local").LocalRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
