"""Commands against a misbehaving test Hub: killed in the middle of a commit, slow, stalled.
Every command ends (exit 0, or 5 with one clear line) within a bound, and the repo holds the
state before or after a change, never half of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from blockctl.cli import app
from blockctl.layout import sha256_file
from registry import open_registry
from tests.conftest import write_random_adapter
from tests.support.hub_fixtures import REPO, REPO_ROOT, URL, HubServer, tiny_layout

runner = CliRunner()
COMMIT = r"^POST /api/models/acme/blocks/commit/main"


def cli(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["--registry", URL, *args])
    return result.exit_code, result.stdout, result.stderr


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("Error:") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def rex(hub: HubServer, tmp_path: Path) -> Path:
    """A registry with rex reserved in slot 0, and rex's adapter file, not yet published."""
    open_registry(URL).create(*tiny_layout(tmp_path))
    assert cli("reserve-slot", "rex", "--class-word", "dog")[0] == 0
    return write_random_adapter(open_registry(URL), "rex", tmp_path / "rex.safetensors")


@pytest.mark.parametrize("at", ["before-ref", "after-ref"])
def test_server_killed_during_a_commit(hub: HubServer, rex: Path, at: str) -> None:
    """SIGKILL after the commit is written but before the branch moves, or after it moved but
    before the answer: the command exits 5, the repo is old or new, whole."""
    before = hub.tree(*REPO)
    hub.kill_during_commit(at)
    code, _, err = cli("publish", str(rex))
    assert code == 5
    assert error_line(err) == (
        "Error: the Hub stopped answering during the commit to hf://acme/blocks (connection "
        "lost); the change was made in full or not at all, and which is unknown"
    )
    assert "hint: check with: blockctl --registry hf://acme/blocks slots" in err
    assert hub.wait_dead() != 0
    hub.start()  # the same port and data: what the Hub kept
    after = hub.tree(*REPO)
    slot = json.loads(after["slots/000.json"])
    if at == "before-ref":
        assert after == before and slot["status"] == "reserved"
    else:
        assert after["adapters/rex.safetensors"] == rex.read_bytes()
        assert slot["status"] == "published" and slot["adapter"]["sha256"] == sha256_file(rex)
        assert set(after) == {*before, "adapters/rex.safetensors"}
    # and the registry works on: publishing again lands (or replaces) in full
    code, out, err = cli("publish", str(rex))
    assert code == 0 and "Published rex in slot 0" in out, err


def test_a_slow_server_is_waited_for(
    hub: HubServer, rex: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKCTL_HUB_TIMEOUT", "3")
    hub.delay(0.3)  # every request, well within the timeout
    started = time.monotonic()
    code, out, err = cli("publish", str(rex))
    assert code == 0 and "Published rex in slot 0" in out, err
    assert time.monotonic() - started >= 0.3 * 4  # it really was slow


@pytest.mark.parametrize(
    ("match", "what"),
    [
        ("/revision/main", "the Hub did not answer within 1 s for hf://acme/blocks"),
        ("/preupload/", "the Hub did not answer within 1 s for hf://acme/blocks"),
        (COMMIT, "the Hub stopped answering during the commit to hf://acme/blocks (no answer"),
    ],
)
def test_a_stalled_server_ends_in_exit_5(
    hub: HubServer, rex: Path, monkeypatch: pytest.MonkeyPatch, match: str, what: str
) -> None:
    """A request that gets no answer: the reading one, the preupload (which huggingface_hub
    retries by itself), the commit. Each ends the command within a few seconds."""
    monkeypatch.setenv("BLOCKCTL_HUB_TIMEOUT", "1")
    before = hub.head(*REPO)
    hub.delay(4, match=match, times=1)
    started = time.monotonic()
    code, _, err = cli("publish", str(rex))
    took = time.monotonic() - started
    assert code == 5 and what in error_line(err)
    assert took < 3.5, took  # bounded: about one timeout per retry round, not the 4 s stall
    if match == COMMIT:  # the stalled commit lands after all, whole
        deadline = time.monotonic() + 10
        while hub.head(*REPO) == before:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert json.loads(hub.tree(*REPO)["slots/000.json"])["status"] == "published"
    else:
        assert hub.head(*REPO) == before
        commits = [r for r in hub.requests() if r.startswith("POST /api/models/acme/blocks/commit")]
        assert len(commits) == 2  # create and reserve: the stalled publish never committed


def test_a_real_process_reaches_the_hub_through_hf_endpoint(hub: HubServer, rex: Path) -> None:
    """``blockctl`` as its own process: only the environment points it at the test Hub."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BLOCKCTL_HUB_TIMEOUT": "1"}
    assert env["HF_ENDPOINT"] == hub.url
    command = [sys.executable, "-m", "blockctl", "--registry", URL, "slots", "--json"]
    seen = len(hub.requests())
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [r["concept"] for r in json.loads(done.stdout)] == ["rex"]
    assert "GET /api/models/acme/blocks/revision/main" in hub.requests()[seen:]

    hub.delay(30)  # a server that accepts connections and never answers
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 5 and time.monotonic() - started < 20
    assert "the Hub did not answer within 1 s for hf://acme/blocks" in error_line(done.stderr)
