"""The Hub registry over HTTP against the test Hub (``tests.support.hub_server``): URLs,
create/open, the repo's file format, branches, and every failure mapped to one-line errors
with the right exit code. (The slot life cycle itself is in test_registry_contract.py.)"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi, constants

import registry.hub
from blockctl.errors import InvalidInput, RegistryUnavailable
from blockctl.layout import sha256_file
from registry import open_registry
from registry.hub import SCHEMA_VERSION, HubRegistry
from registry.hub_url import HubUrl, parse_hub_url
from tests.conftest import AdapterFactory
from tests.support.hub_fixtures import READER, REPO, URL, HubServer, hub_registry


def commits(hub: HubServer, repo: tuple[str, str] = REPO) -> int:
    return len(hub.history(*repo))


def unavailable(fn: Any, *args: Any) -> str:
    with pytest.raises(RegistryUnavailable) as info:
        fn(*args)
    assert info.value.exit_code == 5 and "\n" not in info.value.message
    return info.value.message + " | " + str(info.value.hint)


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


# -- the wire: requests really reach the server ----------------------------------------------------


def test_the_unmodified_client_talks_to_the_test_hub(
    hub: HubServer, layout: tuple[dict[str, Any], Path]
) -> None:
    assert HfApi().endpoint == hub.url == os.environ["HF_ENDPOINT"] == constants.ENDPOINT
    reg = open_registry(URL)  # the product's own path: make_api(), token from HF_TOKEN
    reg.create(*layout)
    assert reg.slots() == []
    got = hub.requests()
    head = hub.head(*REPO)
    for request in [
        "GET /api/models/acme/blocks/revision/main",
        "POST /api/repos/create",
        "POST /api/models/acme/blocks/preupload/main",
        "POST /api/models/acme/blocks/commit/main",
        f"GET /api/models/acme/blocks/tree/{head}?recursive=true&expand=false",
        f"HEAD /acme/blocks/resolve/{head}/layout.json",
        f"GET /acme/blocks/resolve/{head}/layout.json",
    ]:
        assert request in got
    assert [c.title for c in hub.history(*REPO)] == ["blockctl: create registry", "initial commit"]


def test_tree_listing_follows_pages(reg: HubRegistry, hub: HubServer, tmp_path: Path) -> None:
    for i in range(4):
        reg.reserve(f"c{i}", f"<c{i}>", "dog", "me")
    hub.tree_page_size(2)  # 8 entries (files and folders): 4 pages
    seen = len(hub.requests())
    fresh = hub_registry(tmp_path / "fresh")
    assert [r.concept for r in fresh.slots()] == ["c0", "c1", "c2", "c3"]
    pages = [r for r in hub.requests()[seen:] if "/tree/" in r]
    assert len(pages) == 4 and sum("cursor=" in r for r in pages) == 3


# -- create and open ------------------------------------------------------------------------------


def test_pinned_commit_is_read_only(reg: HubRegistry, hub: HubServer, tmp_path: Path) -> None:
    pinned = hub_registry(tmp_path / "s2", f"hf://acme/blocks@{hub.head(*REPO)}")
    assert pinned.layout() == reg.layout()
    with pytest.raises(InvalidInput, match="read-only"):
        pinned.reserve("rex", "<rex>", "dog", "me")


def test_create_writes_the_documented_files(
    hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    reg = hub_registry(tmp_path / "state", "hf://datasets/acme/blocks")
    assert not reg.exists()
    reg.create(*layout)
    assert reg.exists() and reg.layout() == layout[0]
    tree = hub.tree("dataset", "acme/blocks")
    assert sorted(tree) == [".gitattributes", "basis.safetensors", "layout.json"]
    doc = json.loads(tree["layout.json"])
    assert doc["format"] == "blockctl-registry" and doc["registry_schema_version"] == SCHEMA_VERSION
    assert doc["layout"] == layout[0]
    assert sha256_file(reg.basis_path()) == layout[0]["basis_sha256"]
    assert tree["basis.safetensors"] == layout[1].read_bytes()


def test_create_refuses_existing_and_non_empty_repos(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    with pytest.raises(InvalidInput, match="already exists"):
        hub_registry(tmp_path / "s2").create(*layout)
    hub.add_repo("model", "acme/other")
    hub.commit_files("model", "acme/other", {"slots/000.json": b"{}"})
    before = commits(hub, ("model", "acme/other"))
    with pytest.raises(InvalidInput, match="not empty"):
        hub_registry(tmp_path / "s3", "hf://acme/other").create(*layout)
    assert commits(hub, ("model", "acme/other")) == before


def test_create_in_an_existing_private_repo(
    hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    hub.add_repo("model", "acme/blocks", private=True)
    hub.commit_files(*REPO, {"README.md": b"# our registry\n"})
    reg = hub_registry(tmp_path / "state")
    reg.create(*layout)
    assert reg.exists() and "README.md" in hub.tree(*REPO)


def test_create_makes_a_missing_branch(
    hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    hub.add_repo("model", "acme/blocks")
    main = hub.head(*REPO)
    dev = hub_registry(tmp_path / "s1", "hf://acme/blocks@dev")
    msg = unavailable(dev.slots)
    assert "branch or revision 'dev' does not exist" in msg and "init" in msg
    dev.create(*layout)
    assert dev.layout() == layout[0] and hub.head(*REPO) == main  # main untouched
    assert sorted(hub.branches(*REPO)) == ["dev", "main"]
    assert hub.history(*REPO, branch="dev")[1].sha == main  # dev starts at main's head
    assert dev.reserve("rex", "<rex>", "dog", "me").slot == 0
    # a new repo and a new branch at once
    fresh = hub_registry(tmp_path / "s2", "hf://datasets/acme/new@team-a")
    fresh.create(*layout)
    assert "layout.json" in hub.tree("dataset", "acme/new", "team-a")
    assert "layout.json" not in hub.tree("dataset", "acme/new", "main")


def test_no_branch_that_would_copy_a_registry(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    other = hub_registry(tmp_path / "s1", "hf://acme/blocks@team-b")
    with pytest.raises(InvalidInput, match="would start as a copy of the default branch") as info:
        other.create(*layout)
    assert "layout.json" in info.value.message
    assert not [r for r in hub.requests() if "/branch/" in r]  # refused before making it
    assert list(hub.branches(*REPO)) == ["main"]


# -- the repo format ------------------------------------------------------------------------------


def test_slot_files_and_commit_messages(reg: HubRegistry, hub: HubServer) -> None:
    a = reg.reserve("rex", "<rex>", "dog", "studio-a")
    b = reg.reserve("tabby", "<tabby>", "cat", "studio-b", slot=2)
    c = reg.reserve("bolt", "<bolt>", "dog", "studio-a")
    assert reg.slots() == [a, c, b]
    doc = json.loads(hub.tree(*REPO)["slots/002.json"])
    assert doc == {**b.to_dict(), "adapter": None}
    assert hub.history(*REPO)[0].title == "blockctl: reserve slot 1 for bolt"
    reg.release("bolt")
    assert "slots/001.json" not in hub.tree(*REPO)  # never published: the file goes


def test_publish_is_one_commit_with_file_and_status(
    reg: HubRegistry, hub: HubServer, adapter_factory: AdapterFactory
) -> None:
    path = adapter_factory(reg, "rex")
    before = hub.head(*REPO)
    rec = reg.publish("rex", path, sha256_file(path))
    history = hub.history(*REPO)
    assert history[1].sha == before and history[0].title == "blockctl: publish rex in slot 0"
    tree = hub.tree(*REPO)
    assert tree["adapters/rex.safetensors"] == path.read_bytes()  # both changes in one commit
    slot = json.loads(tree["slots/000.json"])
    assert slot["status"] == "published" and slot["adapter"]["sha256"] == rec.sha256
    reg.release("rex")
    assert "adapters/rex.safetensors" in hub.tree(*REPO)  # the withdrawn adapter stays


# -- failures -----------------------------------------------------------------------------------


def test_missing_repo_not_a_registry_and_newer_schema(
    reg: HubRegistry, hub: HubServer, tmp_path: Path
) -> None:
    missing = hub_registry(tmp_path / "s1", "hf://acme/nothing")
    assert "no registry at hf://acme/nothing" in unavailable(missing.slots)
    assert "init" in unavailable(missing.slots) and not missing.exists()

    hub.add_repo("dataset", "acme/plain")
    plain = hub_registry(tmp_path / "s2", "hf://datasets/acme/plain")
    assert "not a blockctl registry" in unavailable(plain.layout)

    doc = json.loads(hub.tree(*REPO)["layout.json"])
    doc["registry_schema_version"] = 99
    hub.commit_files(*REPO, {"layout.json": json.dumps(doc).encode()})
    fresh = hub_registry(tmp_path / "s3")
    msg = unavailable(fresh.slots)
    assert "newer blockctl" in msg and "upgrade" in msg
    with pytest.raises(RegistryUnavailable, match="newer blockctl"):
        fresh.reserve("rex", "<rex>", "dog", "me")


def test_damaged_records_are_reported(reg: HubRegistry, hub: HubServer, tmp_path: Path) -> None:
    hub.commit_files(*REPO, {"slots/001.json": b"{not json"})
    assert "damaged" in unavailable(hub_registry(tmp_path / "s1").slots)
    hub.commit_files(*REPO, {"slots/001.json": json.dumps({"slot": 3}).encode()})
    assert "damaged" in unavailable(hub_registry(tmp_path / "s2").slots)
    hub.commit_files(*REPO, {"slots/001.json": None, "basis.safetensors": None})
    assert "basis.safetensors is missing" in unavailable(hub_registry(tmp_path / "s3").slots)


def test_auth_failures_say_to_log_in(
    hub: HubServer, tmp_path: Path, layout: tuple[dict[str, Any], Path]
) -> None:
    hub.add_repo("model", "acme/private", private=True)
    hub_registry(tmp_path / "s0", "hf://acme/private").create(*layout)
    anonymous = hub_registry(tmp_path / "s1", "hf://acme/private", token=None)
    msg = unavailable(anonymous.slots)
    assert "401" in msg and "hf auth login" in msg and "HF_TOKEN" in msg
    reader = hub_registry(tmp_path / "s2", "hf://acme/private", token=READER)
    assert reader.slots() == []
    before = hub.head("model", "acme/private")
    msg = unavailable(reader.reserve, "rex", "<rex>", "dog", "me")
    assert "403" in msg and "token" in msg
    assert hub.head("model", "acme/private") == before
    bad = hub_registry(tmp_path / "s3", "hf://acme/private", token="hf_typo")
    assert "401" in unavailable(bad.slots)
    nobody = hub_registry(tmp_path / "s4", "hf://acme/x", token=None)
    assert "401" in unavailable(nobody.create, *layout)


@pytest.mark.parametrize(("code", "text"), [(503, "HTTP 503"), (500, "try again later")])
def test_server_errors_are_one_line(
    reg: HubRegistry, hub: HubServer, tmp_path: Path, code: int, text: str
) -> None:
    fresh = hub_registry(tmp_path / "s1")
    hub.fail(code, match="/revision/main")  # repo_info: not retried by huggingface_hub
    assert text in unavailable(fresh.slots)
    before = hub.head(*REPO)
    hub.fail(code, match="/revision/main")
    assert text in unavailable(fresh.reserve, "rex", "<rex>", "dog", "me")
    assert hub.head(*REPO) == before


def test_nothing_listening(tmp_path: Path) -> None:
    # a port nobody listens on (the test Hub is not needed)
    reg = HubRegistry(URL, api=HfApi(endpoint="http://127.0.0.1:9", token=False),
                      state_dir=tmp_path / "s")  # fmt: skip
    msg = unavailable(reg.slots)
    assert "cannot reach the Hub for hf://acme/blocks: ConnectError" in msg
    assert "network" in msg


def test_reads_are_cached_by_blob(reg: HubRegistry, hub: HubServer, tmp_path: Path) -> None:
    for i in range(3):
        reg.reserve(f"c{i}", f"<c{i}>", "dog", "me")
    assert len(reg.slots()) == 3  # reads (and remembers) every record
    fresh = hub_registry(tmp_path / "state", max_age_s=0.0)  # same state dir as ``reg``
    seen = len(hub.requests())
    assert len(fresh.slots()) == 3
    assert not [r for r in hub.requests()[seen:] if "/resolve/" in r]  # nothing downloaded
    reg.reserve("c3", "<c3>", "dog", "me")
    seen = len(hub.requests())
    assert len(fresh.slots()) == 4
    head = hub.head(*REPO)
    assert [r for r in hub.requests()[seen:] if "/resolve/" in r] == [
        f"HEAD /acme/blocks/resolve/{head}/slots/003.json",
        f"GET /acme/blocks/resolve/{head}/slots/003.json",
    ]


def test_a_failed_state_save_leaves_no_temporary_file(
    reg: HubRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(obj: Any, fh: Any) -> None:
        fh.write('{"version": 1, "he')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry.hub.json, "dump", disk_full)
    fresh = hub_registry(tmp_path / "s2")
    assert fresh.slots() == []  # the cache is best effort: reading still works
    folder = fresh._state_file.parent
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_the_callers_environment_is_ignored() -> None:
    # the autouse fixture of tests/conftest.py: the suite passes with these exported
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HF_ENDPOINT", "BLOCKCTL_REGISTRY"):
        assert name not in os.environ
    assert not constants.HF_HUB_OFFLINE and constants.ENDPOINT == "https://huggingface.co"
    assert not registry.hub.offline()
