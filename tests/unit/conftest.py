"""Fixtures shared by the registry tests: a layout, a registry created on the test Hub
(``tests.support.hub_server``, reached over HTTP), an adapter file to publish."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from registry.hub import HubRegistry
from tests.support.hub_fixtures import HubServer, hub_registry, tiny_layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return tiny_layout(tmp_path_factory.mktemp("layout"))


@pytest.fixture
def reg(hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]) -> HubRegistry:
    """``hf://acme/blocks``, just created."""
    r: HubRegistry = hub_registry(tmp_path / "state")
    r.create(*layout)
    return r


@pytest.fixture
def adapter(tmp_path: Path) -> tuple[Path, str]:
    """Bytes to publish (the registries never parse them) and their sha256."""
    path = tmp_path / "adapter.safetensors"
    data = b"adapter bytes " * 100
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()
