"""HF_HUB_OFFLINE=1: reads answered from the local cache (huggingface_hub's and ours) without
one request reaching the test Hub, writes refused with exit 5, and a clear message for what
was never cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from blockctl.errors import RegistryUnavailable
from blockctl.layout import sha256_file
from registry.hub import HubRegistry
from tests.conftest import AdapterFactory
from tests.support.hub_fixtures import REPO, HubServer, hub_registry


@pytest.fixture
def reg(
    hub: HubServer,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    adapter_factory: AdapterFactory,
) -> HubRegistry:
    r: HubRegistry = hub_registry(tmp_path / "state")
    r.create(*layout)
    path = adapter_factory(r, "rex")
    r.publish("rex", path, sha256_file(path))
    r.reserve("tabby", "<tabby>", "cat", "me")
    return r


def refused(fn: Any, *args: Any) -> str:
    with pytest.raises(RegistryUnavailable) as info:
        fn(*args)
    assert info.value.exit_code == 5
    return info.value.message


def test_offline_reads_come_from_the_cache(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    online = (reg.layout(), reg.slots(), reg.adapters())
    adapter = reg.adapter_file("rex").read_bytes()
    basis = reg.basis_path().read_bytes()
    head = hub.head(*REPO)
    hub.commit_files(*REPO, {"README.md": b"moved on"})  # the Hub changes after we went offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests())
    off = hub_registry(tmp_path / "state")  # a new process: only the caches on disk
    assert (off.layout(), off.slots(), off.adapters()) == online
    assert off.adapter_file("rex").read_bytes() == adapter
    assert off.basis_path().read_bytes() == basis
    assert hub.requests()[seen:] == []  # not one request
    # the records came through huggingface_hub's real cache, pinned to the head seen
    cached = huggingface_hub.try_to_load_from_cache("acme/blocks", "slots/001.json", revision=head)
    assert isinstance(cached, str) and Path(cached).is_file()


def test_offline_writes_are_refused(
    reg: HubRegistry,
    hub: HubServer,
    tmp_path: Path,
    layout: tuple[dict[str, Any], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reg.slots()
    path = reg.adapter_file("rex")
    before = hub.head(*REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests())
    off = hub_registry(tmp_path / "state")
    expected = "offline (HF_HUB_OFFLINE=1): cannot write to hf://acme/blocks"
    assert refused(off.reserve, "bolt", "<bolt>", "dog", "me") == expected
    assert refused(off.release, "tabby") == expected
    assert refused(off.publish, "rex", path, sha256_file(path)) == expected
    new = hub_registry(tmp_path / "s2", "hf://acme/new")
    assert refused(new.create, *layout) == expected.replace("blocks", "new")
    assert hub.head(*REPO) == before and hub.requests()[seen:] == []


def test_offline_without_a_cached_copy(
    reg: HubRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg.slots()  # records cached, but the adapter file was never downloaded
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    never = hub_registry(tmp_path / "elsewhere")
    msg = refused(never.slots)
    assert "not in the local cache" in msg and "HF_HUB_OFFLINE=1" in msg
    off = hub_registry(tmp_path / "state")
    assert [r.concept for r in off.slots()] == ["rex", "tabby"]
    assert "not fully in the local cache" in refused(off.adapter_file, "rex")
