"""The CLI on a Hub registry (``--registry hf://...``) against the test Hub over HTTP: the whole
cycle incl. verify, offline mode, exit codes of every failure, and mirror."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import constants
from typer.testing import CliRunner

import registry.hub
from blockctl.cli import app
from registry import open_registry
from tests.conftest import write_random_adapter
from tests.support.hub_fixtures import REPO, URL, HubServer, tiny_layout

runner = CliRunner()


def cli(reg: str | Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--registry", str(reg), *args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def hub_reg(hub: HubServer, tmp_path: Path) -> str:
    """A Hub registry with rex published in slot 0 and tabby reserved in slot 1."""
    open_registry(URL).create(*tiny_layout(tmp_path))
    assert cli(URL, "reserve-slot", "rex", "--token", "<rex>", "--class-word", "dog")[0] == 0
    assert cli(URL, "reserve-slot", "tabby", "--class-word", "cat", "--owner", "b")[0] == 0
    path = write_random_adapter(open_registry(URL), "rex", tmp_path / "rex.safetensors")
    code, _, err = cli(URL, "publish", str(path))
    assert code == 0, err
    return URL


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error:") and "Traceback" not in err
    return lines[0]


def test_init_reserve_publish_verify_release(
    hub: HubServer, tiny_base: Path, tmp_path: Path
) -> None:
    code, out, err = cli(URL, "init", "--base", str(tiny_base), "--slots", "4", "--rank", "2")
    assert code == 0, err
    assert "Created registry hf://acme/blocks" in out
    code, _, err = cli(URL, "init", "--base", str(tiny_base))
    assert code == 2 and "already exists" in err

    code, out, _ = cli(
        URL, "reserve-slot", "rex", "--token", "<rex>", "--class-word", "dog",
        "--owner", "studio-a", "--json",
    )  # fmt: skip
    assert code == 0 and json.loads(out)["slot"] == 0
    code, out, _ = cli(URL, "reserve-slot", "tabby", "--class-word", "cat", "--slot", "2")
    assert code == 0 and "slot 2" in out
    code, _, err = cli(URL, "reserve-slot", "REX", "--class-word", "dog")
    assert code == 3 and "ignoring case" in err

    path = write_random_adapter(open_registry(URL), "rex", tmp_path / "rex.safetensors")
    code, out, err = cli(URL, "publish", str(path))
    assert code == 0 and "Published rex in slot 0" in out, err
    code, out, err = cli(URL, "verify", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert [(a["concept"], a["ok"]) for a in report["adapters"]] == [("rex", True)]

    code, out, _ = cli(URL, "slots", "--json")
    rows = json.loads(out)
    assert [(r["slot"], r["concept"], r["owner"], r["status"]) for r in rows] == [
        (0, "rex", "studio-a", "published"),
        (2, "tabby", rows[1]["owner"], "reserved"),
    ]
    code, out, _ = cli(URL, "release-slot", "tabby")
    assert code == 0 and "free again" in out
    code, out, _ = cli(URL, "release-slot", "rex")
    assert code == 0 and "stays burnt" in out
    assert sorted(hub.tree(*REPO)) == [
        ".gitattributes",
        "adapters/rex.safetensors",
        "basis.safetensors",
        "layout.json",
        "slots/000.json",
    ]


def test_offline_reads_and_refused_writes(
    hub_reg: str, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, online, _ = cli(hub_reg, "slots", "--json")
    assert cli(hub_reg, "verify")[0] == 0  # downloads the basis and rex's adapter
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = len(hub.requests())
    code, offline, err = cli(hub_reg, "slots", "--json")
    assert code == 0 and json.loads(offline) == json.loads(online), err
    code, out, err = cli(hub_reg, "verify", "--json")
    assert code == 0 and json.loads(out)["adapters"][0]["ok"], err
    assert hub.requests()[seen:] == []
    code, _, err = cli(hub_reg, "reserve-slot", "bolt", "--class-word", "dog")
    assert code == 5
    assert (
        one_line_error(err) == "Error: offline (HF_HUB_OFFLINE=1): cannot write to hf://acme/blocks"
    )


def test_failures_map_to_exit_codes(
    hub_reg: str, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = cli("hf://acme", "slots")
    assert code == 2 and "expected hf://org/name or hf://datasets/org/name" in err
    code, _, err = cli("hf://acme/nothing", "slots")
    assert code == 5 and "no registry at hf://acme/nothing" in one_line_error(err)
    hub.add_repo("dataset", "acme/plain")
    code, _, err = cli("hf://datasets/acme/plain", "slots")
    assert code == 5 and "not a blockctl registry" in one_line_error(err)
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    code, _, err = cli(hub_reg, "reserve-slot", "bolt", "--class-word", "dog")
    assert code == 5 and "permission denied (HTTP 403)" in one_line_error(err)
    monkeypatch.setenv("HF_TOKEN", "hf_writer")

    hub.fail(502, match="/revision/main")
    code, _, err = cli(hub_reg, "slots")
    assert code == 5 and "the Hub answered HTTP 502" in one_line_error(err)

    before = hub.tree(*REPO)
    tries = registry.hub.DEFAULT_OPTIONS.max_tries
    hub.storm(tries)
    code, _, err = cli(hub_reg, "reserve-slot", "bolt", "--class-word", "dog")
    assert code == 5
    assert f"registry busy: gave up after {tries} conflicting commits" in one_line_error(err)
    assert {p for p in hub.tree(*REPO) if not p.startswith("noise/")} == set(before)

    doc = json.loads(before["layout.json"])
    doc["registry_schema_version"] += 1
    hub.commit_files(*REPO, {"layout.json": json.dumps(doc).encode()})
    code, _, err = cli(hub_reg, "slots")
    assert code == 5 and "newer blockctl" in one_line_error(err) and "upgrade" in err

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    code, _, err = cli(hub_reg, "slots")
    assert code == 5 and "cannot reach the Hub for hf://acme/blocks" in one_line_error(err)


def untimed(out: str) -> list[dict[str, object]]:
    """Slot rows without their times (a mirror records when IT reserved/published)."""
    return [{k: v for k, v in r.items() if not k.endswith("_at")} for r in json.loads(out)]


def test_mirror_both_ways(hub_reg: str, hub: HubServer, tmp_path: Path) -> None:
    local = tmp_path / "reg"
    code, out, err = cli(local, "mirror", hub_reg)
    assert code == 0, err
    assert "Mirrored hf://acme/blocks into" in out and "1 adapter(s) copied" in out
    assert untimed(cli(local, "slots", "--json")[1]) == untimed(cli(hub_reg, "slots", "--json")[1])
    assert cli(local, "verify")[0] == 0
    assert cli(local, "release-slot", "rex")[0] == 0  # released locally: pushed as released

    code, out, err = cli(local, "mirror", "hf://datasets/acme/copy", "--push", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["created"] and report["copied"] == ["rex"] and report["released"] == ["rex"]
    assert report["reserved"] == ["rex", "tabby"] and report["notes"] == []
    copy = "hf://datasets/acme/copy"
    assert untimed(cli(copy, "slots", "--json")[1]) == untimed(cli(local, "slots", "--json")[1])
    assert cli(copy, "verify")[0] == 0

    hub.commit_files(*REPO, {"adapters/rex.safetensors": b"tampered"})
    code, _, err = cli(tmp_path / "reg2", "mirror", hub_reg)
    assert code == 4 and "sha256" in one_line_error(err)
