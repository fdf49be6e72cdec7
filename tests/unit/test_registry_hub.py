"""The Hub registry against the in-process stand-in: URLs, create/open, the slot life cycle,
the repo's file format, and every failure mapped to one-line errors with the right exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2
import pytest

from blockctl.errors import InvalidInput, RegistryUnavailable, SlotConflict, ValidationFailed
from blockctl.layout import sha256_file
from registry import open_registry
from registry.hub import SCHEMA_VERSION, HubRegistry
from registry.hub_url import HubUrl, parse_hub_url
from tests.conftest import AdapterFactory
from tests.hub_standin import FakeHub, hub_registry

REPO = ("model", "acme/blocks")


def commits(hub: FakeHub, repo: tuple[str, str] = REPO) -> int:
    return len(hub.history(*repo))


# -- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("hf://acme/blocks", HubUrl("model", "acme/blocks")),
        ("hf://models/acme/blocks", HubUrl("model", "acme/blocks")),
        ("hf://datasets/acme/blocks", HubUrl("dataset", "acme/blocks")),
        ("hf://datasets/acme/blocks@dev", HubUrl("dataset", "acme/blocks", "dev")),
        ("hf://acme/my.blocks-2@refs/pr/3", HubUrl("model", "acme/my.blocks-2", "refs/pr/3")),
    ],
)
def test_parse_good_urls(url: str, expected: HubUrl) -> None:
    got = parse_hub_url(url)
    assert got == expected
    assert parse_hub_url(str(got)) == got  # str() is canonical and round-trips


@pytest.mark.parametrize(
    "url",
    [
        "hf://",
        "hf://acme",
        "hf://datasets/acme",
        "hf://acme/blocks@",
        "hf://a/b c",
        "hf://spaces/acme/blocks",
        "hf://buckets/acme/blocks",
        "hf://acme/blocks/sub/dir",
        "hf://model/acme/blocks",
        "hf://acme/bl@cks/x",
        "acme/blocks",
    ],
)
def test_malformed_urls_say_the_expected_form(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_hub_url(url)
    assert info.value.exit_code == 2 and "hf://datasets/org/name" in str(info.value.hint)
    assert "\n" not in info.value.message


def test_open_registry_dispatches_hf_urls() -> None:
    reg = open_registry("hf://datasets/acme/blocks@main")
    assert isinstance(reg, HubRegistry) and reg.location == "hf://datasets/acme/blocks@main"
    with pytest.raises(InvalidInput):
        open_registry("hf://acme")


def test_pinned_commit_is_read_only(reg: HubRegistry, hub: FakeHub, tmp_path: Path) -> None:
    head = hub.head(*REPO)
    pinned = hub_registry(hub, tmp_path / "s2", f"hf://acme/blocks@{head}")
    assert pinned.layout() == reg.layout()
    with pytest.raises(InvalidInput, match="read-only"):
        pinned.reserve("rex", "<rex>", "dog", "me")


# -- create and open ------------------------------------------------------------------------------


def test_create_writes_the_documented_files(
    hub: FakeHub, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    reg = hub_registry(hub, tmp_path / "state", "hf://datasets/acme/blocks")
    assert not reg.exists()
    reg.create(*layout)
    assert reg.exists() and reg.layout() == layout[0]
    tree = hub.tree("dataset", "acme/blocks")
    assert sorted(tree) == [".gitattributes", "basis.safetensors", "layout.json"]
    doc = json.loads(tree["layout.json"])
    assert doc["format"] == "blockctl-registry" and doc["registry_schema_version"] == SCHEMA_VERSION
    assert doc["layout"] == layout[0]
    assert sha256_file(reg.basis_path()) == layout[0]["basis_sha256"]
    assert hub.history("dataset", "acme/blocks")[0].message == "blockctl: create registry"


def test_create_refuses_existing_and_non_empty_repos(
    reg: HubRegistry, hub: FakeHub, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    with pytest.raises(InvalidInput, match="already exists"):
        hub_registry(hub, tmp_path / "s2").create(*layout)
    hub.add_repo("model", "acme/other")
    hub.commit_files("model", "acme/other", {"slots/000.json": b"{}"})
    before = commits(hub, ("model", "acme/other"))
    with pytest.raises(InvalidInput, match="not empty"):
        hub_registry(hub, tmp_path / "s3", "hf://acme/other").create(*layout)
    assert commits(hub, ("model", "acme/other")) == before


def test_create_in_an_existing_plain_repo(
    hub: FakeHub, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    hub.add_repo("model", "acme/blocks", private=True)
    hub.commit_files(*REPO, {"README.md": b"# our registry\n"})
    reg = hub_registry(hub, tmp_path / "state")
    reg.create(*layout)
    assert reg.exists() and "README.md" in hub.tree(*REPO)


# -- slots --------------------------------------------------------------------------------------


def test_reserve_lowest_free_and_requested_slots(reg: HubRegistry, hub: FakeHub) -> None:
    a = reg.reserve("rex", "<rex>", "dog", "studio-a")
    b = reg.reserve("tabby", "<tabby>", "cat", "studio-b", slot=2)
    c = reg.reserve("bolt", "<bolt>", "dog", "studio-a")
    assert (a.slot, b.slot, c.slot) == (0, 2, 1)
    assert reg.slots() == [a, c, b]
    assert reg.slot_for("tabby") == b
    tree = hub.tree(*REPO)
    doc = json.loads(tree["slots/002.json"])
    assert doc == {**b.to_dict(), "adapter": None}
    assert hub.history(*REPO)[0].message == "blockctl: reserve slot 1 for bolt"


@pytest.mark.parametrize(
    ("args", "error", "text"),
    [
        (("rex", "<other>", "dog", "x"), SlotConflict, "already holds slot 0"),
        (("REX", "<other>", "dog", "x"), SlotConflict, "ignoring case"),
        (("other", "<REX>", "dog", "x"), SlotConflict, "already used as '<rex>'"),
        (("other", "<o>", "dog", "x", 0), SlotConflict, "slot 0 is taken"),
        (("other", "<o>", "dog", "x", 9), InvalidInput, "out of range"),
        (("bad/name", "<o>", "dog", "x"), InvalidInput, "must not contain"),
    ],
)
def test_reserve_conflicts_change_nothing(
    reg: HubRegistry, hub: FakeHub, args: tuple[Any, ...], error: type[Exception], text: str
) -> None:
    reg.reserve("rex", "<rex>", "dog", "me")
    before = hub.head(*REPO)
    with pytest.raises(error, match=text):
        reg.reserve(*args)
    assert hub.head(*REPO) == before


def test_pool_exhausted(reg: HubRegistry) -> None:
    for i in range(4):
        reg.reserve(f"c{i}", f"<c{i}>", "dog", "me")
    with pytest.raises(SlotConflict, match="all 4 slots are taken"):
        reg.reserve("c4", "<c4>", "dog", "me")


def test_release_unpublished_frees_the_slot(reg: HubRegistry, hub: FakeHub) -> None:
    reg.reserve("rex", "<rex>", "dog", "me")
    with pytest.raises(SlotConflict, match="held by owner me"):
        reg.release("rex", owner="you")
    done = reg.release("rex", owner="me")
    assert done.status == "released" and done.published_at is None
    assert "slots/000.json" not in hub.tree(*REPO) and reg.slots() == []
    assert reg.reserve("bolt", "<rex>", "dog", "me").slot == 0  # slot and token came back
    with pytest.raises(SlotConflict, match="no reserved slot"):
        reg.release("rex")


# -- adapters -----------------------------------------------------------------------------------


def test_publish_is_one_commit_with_file_and_status(
    reg: HubRegistry, hub: FakeHub, adapter_factory: AdapterFactory
) -> None:
    path = adapter_factory(reg, "rex")
    before = hub.head(*REPO)
    rec = reg.publish("rex", path, sha256_file(path))
    history = hub.history(*REPO)
    assert history[1].sha == before  # exactly one new commit ...
    tree = history[0].tree
    assert tree["adapters/rex.safetensors"] == path.read_bytes()  # ... holding both changes
    slot = json.loads(tree["slots/000.json"])
    assert slot["status"] == "published" and slot["adapter"]["sha256"] == rec.sha256
    assert reg.adapters() == [rec] and rec.size == path.stat().st_size
    assert reg.adapter_file("rex").read_bytes() == path.read_bytes()
    assert reg.slot_for("rex").status == "published"


def test_republish_replaces_and_release_burns_the_slot(
    reg: HubRegistry, hub: FakeHub, adapter_factory: AdapterFactory
) -> None:
    first = adapter_factory(reg, "rex", seed=1)
    reg.publish("rex", first, sha256_file(first))
    second = adapter_factory(reg, "rex", seed=2)
    rec = reg.publish("rex", second, sha256_file(second))
    assert reg.adapters() == [rec] and reg.adapter_file("rex").read_bytes() == second.read_bytes()
    done = reg.release("rex")
    assert done.status == "released" and done.published_at is not None
    assert reg.adapters() == [] and "adapters/rex.safetensors" in hub.tree(*REPO)
    with pytest.raises(SlotConflict, match="withdrawn"):
        reg.adapter_file("rex")
    with pytest.raises(SlotConflict, match="cannot be published again"):
        reg.publish("rex", second, sha256_file(second))
    with pytest.raises(SlotConflict, match="already released"):
        reg.release("rex")
    with pytest.raises(SlotConflict, match="cannot be reused"):
        reg.reserve("rex", "<rex2>", "dog", "me")
    assert reg.reserve("bolt", "<bolt>", "dog", "me").slot == 1  # slot 0 stays burnt
    got = reg.released_adapter_file("rex")
    assert got is not None and got[1].read_bytes() == second.read_bytes()


def test_publish_refusals_change_nothing(
    reg: HubRegistry, hub: FakeHub, adapter_factory: AdapterFactory, tmp_path: Path
) -> None:
    path = adapter_factory(reg, "rex")
    before = hub.head(*REPO)
    with pytest.raises(ValidationFailed, match="it was validated with"):
        reg.publish("rex", path, "0" * 64)
    with pytest.raises(SlotConflict, match="no reserved slot"):
        reg.publish("nobody", path, sha256_file(path))
    with pytest.raises(InvalidInput, match="64 hex"):
        reg.publish("rex", path, "abc")
    with pytest.raises(InvalidInput, match="does not exist"):
        reg.publish("rex", tmp_path / "missing.safetensors", "0" * 64)
    with pytest.raises(SlotConflict, match="no published adapter"):
        reg.adapter_file("rex")
    assert hub.head(*REPO) == before


# -- failures -----------------------------------------------------------------------------------


def unavailable(fn: Any, *args: Any) -> str:
    with pytest.raises(RegistryUnavailable) as info:
        fn(*args)
    assert info.value.exit_code == 5 and "\n" not in info.value.message
    return info.value.message + " | " + str(info.value.hint)


def test_missing_repo_not_a_registry_and_newer_schema(
    reg: HubRegistry, hub: FakeHub, tmp_path: Path
) -> None:
    missing = hub_registry(hub, tmp_path / "s1", "hf://acme/nothing")
    assert "no registry at hf://acme/nothing" in unavailable(missing.slots)
    assert "init" in unavailable(missing.slots) and not missing.exists()

    hub.add_repo("dataset", "acme/plain")
    plain = hub_registry(hub, tmp_path / "s2", "hf://datasets/acme/plain")
    assert "not a blockctl registry" in unavailable(plain.layout)

    doc = json.loads(hub.tree(*REPO)["layout.json"])
    hub.commit_files(
        *REPO, {"layout.json": json.dumps({**doc, "registry_schema_version": 99}).encode()}
    )
    fresh = hub_registry(hub, tmp_path / "s3")
    msg = unavailable(fresh.slots)
    assert "newer blockctl" in msg and "upgrade" in msg
    with pytest.raises(RegistryUnavailable, match="newer blockctl"):
        fresh.reserve("rex", "<rex>", "dog", "me")


def test_damaged_records_are_reported(reg: HubRegistry, hub: FakeHub, tmp_path: Path) -> None:
    hub.commit_files(*REPO, {"slots/001.json": b"{not json"})
    assert "damaged" in unavailable(hub_registry(hub, tmp_path / "s1").slots)
    hub.commit_files(*REPO, {"slots/001.json": json.dumps({"slot": 3}).encode()})
    assert "damaged" in unavailable(hub_registry(hub, tmp_path / "s2").slots)
    hub.commit_files(*REPO, {"slots/001.json": None, "basis.safetensors": None})
    assert "basis.safetensors is missing" in unavailable(hub_registry(hub, tmp_path / "s3").slots)


def test_auth_failures_say_to_log_in(
    hub: FakeHub, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    hub.add_repo("model", "acme/private", private=True)
    writer = hub_registry(hub, tmp_path / "s0", "hf://acme/private")
    writer.create(*layout)
    anonymous = hub_registry(hub, tmp_path / "s1", "hf://acme/private", token=None)
    msg = unavailable(anonymous.slots)
    assert "401" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    reader = hub_registry(hub, tmp_path / "s2", "hf://acme/private", token="hf_reader")
    assert reader.slots() == []
    msg = unavailable(reader.reserve, "rex", "<rex>", "dog", "me")
    assert "403" in msg and "token" in msg
    bad = hub_registry(hub, tmp_path / "s3", "hf://acme/private", token="hf_typo")
    assert "401" in unavailable(bad.slots)


@pytest.mark.parametrize(
    ("failure", "text"),
    [
        (httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), "cannot reach"),
        (httpx2.ReadTimeout("timed out"), "cannot reach the Hub"),
        (503, "HTTP 503"),
        (500, "try again later"),
    ],
)
def test_network_errors_are_one_line(
    reg: HubRegistry, hub: FakeHub, tmp_path: Path, failure: Any, text: str
) -> None:
    fresh = hub_registry(hub, tmp_path / "s1")
    hub.fail_next(failure)
    assert text in unavailable(fresh.slots)
    hub.fail_next(failure)
    before = hub.head(*REPO)
    assert text in unavailable(fresh.reserve, "rex", "<rex>", "dog", "me")
    assert hub.head(*REPO) == before


def test_missing_branch(reg: HubRegistry, hub: FakeHub, tmp_path: Path) -> None:
    other = hub_registry(hub, tmp_path / "s1", "hf://acme/blocks@nope")
    assert "'nope' does not exist" in unavailable(other.slots)


def test_reads_are_cached_by_blob(reg: HubRegistry, hub: FakeHub, tmp_path: Path) -> None:
    for i in range(3):
        reg.reserve(f"c{i}", f"<c{i}>", "dog", "me")
    assert len(reg.slots()) == 3  # reads (and remembers) every record
    fresh = hub_registry(hub, tmp_path / "state", max_age_s=0.0)  # same state dir as ``reg``
    hub.calls.clear()
    assert len(fresh.slots()) == 3
    assert not [c for c in hub.calls if c.startswith("HEAD")]  # nothing re-downloaded
    reg.reserve("c3", "<c3>", "dog", "me")
    hub.calls.clear()
    assert len(fresh.slots()) == 4
    assert [c for c in hub.calls if c.startswith("HEAD")] == [
        "HEAD resolve/" + hub.head(*REPO) + "/slots/003.json"
    ]
