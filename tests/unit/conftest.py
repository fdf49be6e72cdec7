"""Fixtures shared by the Hub registry tests: a layout, the in-process Hub stand-in, and a
registry created on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry.hub import HubRegistry
from tests.hub_standin import FakeHub, hub_registry, tiny_layout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    return tiny_layout(tmp_path_factory.mktemp("layout"))


@pytest.fixture
def hub(tmp_path: Path) -> FakeHub:
    return FakeHub(tmp_path / "hf-cache")


@pytest.fixture
def reg(hub: FakeHub, tmp_path: Path, layout: tuple[dict[str, Any], Path]) -> HubRegistry:
    r = hub_registry(hub, tmp_path / "state")
    r.create(*layout)
    return r
