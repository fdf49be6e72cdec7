"""Registries: where the layout, the slots and the published adapters live.

``open_registry(location)`` picks the backend from the location string: ``hf://...`` for a
Hugging Face Hub registry (``registry.hub``), anything else a local folder. Opening creates
nothing; use ``Registry.create`` for that.
"""

from __future__ import annotations

from pathlib import Path

from blockctl.errors import InvalidInput
from registry.base import AdapterRecord, Registry, SlotRecord
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
    return LocalRegistry(Path(location))
