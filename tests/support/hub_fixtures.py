"""The test Hub (``tests.support.hub_server``) as pytest fixtures, and helpers on it.

``hub_server`` (session) starts the server in its own process on a free port and stops it at
the end; ``hub`` (per test) resets it, starts it again if a test killed it, and points the
unmodified huggingface_hub client at it: ``HF_ENDPOINT`` for subprocesses, and
``huggingface_hub.constants.ENDPOINT`` (read once at import) in this process; the token is
``hf_writer`` through ``HF_TOKEN``. Registries opened through ``open_registry`` retry fast.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER, READER = "hf_writer", "hf_reader"
URL = "hf://acme/blocks"
REPO = ("model", "acme/blocks")
FAST = {"backoff_s": 0.001, "backoff_cap_s": 0.01}  # retries without real waiting


@dataclass(frozen=True)
class Commit:
    sha: str
    parent: str | None
    title: str


class HubServer:
    """The server process and its control endpoints (``/_test/...``, see its docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._http = httpx2.Client(timeout=30, trust_env=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- the process --------------------------------------------------------------------------
    def start(self) -> None:
        port_file = self.root / "port"
        port_file.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.hub_server", "--root", str(self.root / "data"),
             "--port", str(self.port), "--port-file", str(port_file)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test Hub did not start (exit {self.proc.poll()})")
            time.sleep(0.02)
        self.port = int(port_file.read_text())  # the same port again on a restart

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self._http.close()

    def wait_dead(self, timeout: float = 10) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    # -- control ------------------------------------------------------------------------------
    def control(self, method: str, path: str, **json: Any) -> Any:
        kwargs: dict[str, Any] = {"json": json} if json else {}
        r = self._http.request(method, f"{self.url}/_test/{path}", **kwargs)
        r.raise_for_status()
        return r.json()

    def reset(self) -> None:
        self.control("POST", "reset")

    def requests(self) -> list[str]:
        """Every request received since the last reset, as ``"METHOD /path?query"``."""
        got: list[str] = self.control("GET", "requests")["requests"]
        return got

    def delay(self, seconds: float, match: str = "", times: int | None = None) -> None:
        self.control("POST", "faults", delay={"match": match, "seconds": seconds, "times": times})

    def fail(self, code: int, match: str = "", times: int = 1) -> None:
        self.control("POST", "faults", status={"match": match, "code": code, "times": times})

    def kill_during_commit(self, at: str) -> None:
        self.control("POST", "faults", kill={"at": at})

    def storm(self, times: int, repo: tuple[str, str] = REPO) -> None:
        self.control("POST", "faults", storm={"repo": "/".join(repo), "times": times})

    def clear_faults(self) -> None:
        self.control("DELETE", "faults")

    def tree_page_size(self, n: int) -> None:
        self.control("POST", "config", tree_page_size=n)

    def add_repo(self, kind: str, repo_id: str, *, private: bool = False) -> None:
        self.control("POST", "repos", type=kind, id=repo_id, private=private)

    def commit_files(
        self,
        kind: str,
        repo_id: str,
        files: dict[str, bytes | None],
        *,
        branch: str = "main",
        message: str = "edit",
    ) -> str:
        """A commit by someone else, straight on the server (``None`` deletes a path)."""
        enc = {p: None if d is None else base64.b64encode(d).decode() for p, d in files.items()}
        doc = self.control(
            "POST", "commit", type=kind, id=repo_id, branch=branch, message=message, files=enc
        )
        sha: str = doc["sha"]
        return sha

    def _repo(self, kind: str, repo_id: str, revision: str) -> dict[str, Any]:
        r = self._http.get(
            f"{self.url}/_test/repo", params={"type": kind, "id": repo_id, "revision": revision}
        )
        r.raise_for_status()
        doc: dict[str, Any] = r.json()
        return doc

    def tree(self, kind: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        doc = self._repo(kind, repo_id, revision)
        return {p: base64.b64decode(v) for p, v in doc["tree"].items()}

    def head(self, kind: str, repo_id: str, branch: str = "main") -> str:
        head: str = self._repo(kind, repo_id, branch)["head"]
        return head

    def branches(self, kind: str, repo_id: str) -> dict[str, str]:
        """Branch name -> head commit."""
        got: dict[str, str] = self._repo(kind, repo_id, "main")["branches"]
        return got

    def history(self, kind: str, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits from the head back to the first."""
        doc = self._repo(kind, repo_id, branch)
        return [Commit(c["sha"], c["parent"], c["title"]) for c in doc["history"]]


def hub_registry(
    state_dir: Path, url: str = URL, *, token: str | None = WRITER, **options: Any
) -> Any:
    """A ``HubRegistry`` talking to the test Hub over HTTP with ``token`` (None: anonymous),
    its own state dir, and fast retries."""
    from huggingface_hub import HfApi

    from registry import hub_http
    from registry.hub import HubOptions, HubRegistry

    hub_http.install()
    api = HfApi(token=token if token is not None else False)
    opts = HubOptions(**{**FAST, **options})
    return HubRegistry(url, api=api, state_dir=state_dir, options=opts)


def tiny_layout(where: Path, *, slots: int = 4, rank: int = 2) -> tuple[dict[str, Any], Path]:
    """A layout dict and its basis file for ``Registry.create``, made without a base model
    (the backends never look at the base): two cross-attention targets of width 8 and 16."""
    from blockctl import blocks
    from blockctl.layout import Layout, Target, write_basis

    targets = (
        Target("unet.down.attn2.to_k", 8, 16),
        Target("unet.down.attn2.to_v", 16, 16),
    )
    basis = where / "basis.safetensors"
    sha = write_basis(blocks.make_bases([t.in_features for t in targets], 0), basis)
    layout = Layout(
        base="fake-base",
        base_fingerprint="f" * 64,
        preset="cross-kv",
        text_encoder=False,
        targets=targets,
        rank=rank,
        slots=slots,
        scale=1.0,
        token_dim=8,
        basis_seed=0,
        basis_sha256=sha,
    )
    return layout.to_dict(), basis


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    server = HubServer(tmp_path_factory.mktemp("hub-server"))
    server.start()
    yield server
    server.stop()
    server.close()


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The test Hub, empty, with this process and its children pointed at it."""
    from huggingface_hub import constants

    import registry.hub
    from registry.hub import HubOptions

    if not hub_server.alive():  # a test killed it: the same port, the same (reset) data
        hub_server.start()
    hub_server.reset()
    url = hub_server.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_TOKEN", WRITER)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(registry.hub, "DEFAULT_OPTIONS", HubOptions(**FAST))
    return hub_server
