"""An in-process stand-in for the Hugging Face Hub, serving exactly the ``HfApi`` calls that
``registry.hub`` makes, so the Hub backend is tested without a network.

``FakeHub`` is the server: repos with git-like state (commits with parent links, a head per
branch, a full file tree per commit, 40-hex commit shas, git blob ids). ``StandInApi`` is one
client (one token) talking to it. What it reproduces from the real Hub:

- ``create_commit(..., parent_commit=sha)`` fails with HTTP 412 when the branch head moved;
- commits are atomic: every operation lands in one new commit, or none does;
- missing repos are 404 ``RepositoryNotFoundError``, missing revisions 404
  ``RevisionNotFoundError``, missing files 404 ``RemoteEntryNotFoundError``; a private repo
  without a token is 401, writing with a read-only token 403;
- new repos start with one commit holding ``.gitattributes``;
- ``hf_hub_download`` writes the real cache layout (``{models|datasets}--org--name/blobs``,
  ``snapshots/{commit}/{path}``, ``refs/{branch}``), and ``local_files_only=True`` (or
  ``HF_HUB_OFFLINE=1``) is served by the real ``huggingface_hub.hf_hub_download``, which checks
  that layout.

Errors are raised by huggingface_hub's own ``hf_raise_for_status`` on real ``httpx2``
responses, so their types, status codes and messages are the library's. Fault injection:
``fail_next`` (an exception or HTTP status for the next call), ``before_next_commit`` (run a
callable, e.g. a competing commit, inside the next ``create_commit``), ``storm`` (each of
the next n commits is beaten by a foreign commit).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import CommitInfo, DatasetInfo, ModelInfo, RepoFile, RepoFolder, RepoUrl
from huggingface_hub.utils import hf_raise_for_status

ENDPOINT = "https://huggingface.co"
WRITE = "write"
READ = "read"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    tree: dict[str, bytes]
    message: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)


def _api_url(repo_type: str, repo_id: str, tail: str) -> str:
    return f"{ENDPOINT}/api/{repo_type}s/{repo_id}/{tail}"


def _raise(
    status: int,
    url: str,
    method: str = "GET",
    *,
    code: str | None = None,
    message: str | None = None,
) -> None:
    """Raise what huggingface_hub raises for this HTTP answer."""
    headers = {"X-Request-Id": "standin"}
    if code:
        headers["X-Error-Code"] = code
    if message:
        headers["X-Error-Message"] = message
    body = {"error": message or httpx2.codes.get_reason_phrase(status)}
    response = httpx2.Response(
        status, headers=headers, json=body, request=httpx2.Request(method, url)
    )
    hf_raise_for_status(response)
    raise AssertionError(f"hf_raise_for_status accepted HTTP {status}")  # pragma: no cover


class FakeHub:
    """The server: every ``StandInApi`` made by ``api()`` shares this state (under one lock)."""

    def __init__(self, cache_dir: Path, tokens: dict[str, str] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.tokens = {"hf_writer": WRITE, "hf_reader": READ} if tokens is None else tokens
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.calls: list[str] = []
        self._counter = itertools.count()
        self._fail: list[BaseException | int] = []
        self._before_commit: list[Callable[[], None]] = []
        self.commit_attempts = 0
        self.latency_s = 0.0  # per call, outside the lock: lets concurrent clients interleave

    def api(self, token: str | None = "hf_writer") -> StandInApi:
        return StandInApi(self, token)

    # -- fault injection --------------------------------------------------------------------
    def fail_next(self, *failures: BaseException | int) -> None:
        """The next calls raise these (an exception, or an HTTP status answered by the Hub)."""
        with self.lock:
            self._fail.extend(failures)

    def before_next_commit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (outside the lock) at the start of the next ``create_commit``, before its
        parent check: a competing client committing in between."""
        with self.lock:
            self._before_commit.append(fn)

    def storm(self, n: int, repo_type: str, repo_id: str, branch: str = "main") -> None:
        """Each of the next ``n`` commits is preceded by a foreign commit (so it gets 412)."""

        def foreign(i: int) -> Callable[[], None]:
            def commit() -> None:
                self.commit_files(repo_type, repo_id, {f"noise/{i}.txt": b"x"}, branch=branch)

            return commit

        for i in range(n):
            self.before_next_commit(foreign(i))

    # -- server-side helpers (tests may use them directly) ------------------------------------
    def new_sha(self, *parts: str) -> str:
        seed = "\0".join([*parts, str(next(self._counter))])
        return hashlib.sha1(seed.encode()).hexdigest()

    def add_repo(self, repo_type: str, repo_id: str, *, private: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_type, repo_id, private)
            sha = self.new_sha(repo_id, "initial")
            tree = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            repo.commits[sha] = Commit(sha, None, tree, "initial commit")
            repo.branches["main"] = sha
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def commit_files(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes | None],
        *,
        branch: str = "main",
        message: str = "edit",
    ) -> str:
        """Commit directly on the server (``None`` deletes a path): a foreign client."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            parent = repo.branches[branch]
            tree = dict(repo.commits[parent].tree)
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                else:
                    tree[path] = data
            sha = self.new_sha(repo_id, parent, message)
            repo.commits[sha] = Commit(sha, parent, tree, message)
            repo.branches[branch] = sha
            return sha

    def head(self, repo_type: str, repo_id: str, branch: str = "main") -> str:
        with self.lock:
            return self.repos[(repo_type, repo_id)].branches[branch]

    def tree(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            return dict(repo.commits[repo.branches.get(revision, revision)].tree)

    def history(self, repo_type: str, repo_id: str, branch: str = "main") -> list[Commit]:
        """Commits from the head back to the first, following parent links."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            out, sha = [], repo.branches[branch]
            while sha is not None:
                out.append(repo.commits[sha])
                sha = repo.commits[sha].parent  # type: ignore[assignment]
            return out

    def _pop_failure(self, call: str, url: str) -> None:
        if self.latency_s:
            time.sleep(self.latency_s * random.uniform(0.5, 1.5))
        with self.lock:
            self.calls.append(call)
            failure = self._fail.pop(0) if self._fail else None
        if isinstance(failure, BaseException):
            raise failure
        if failure is not None:
            _raise(failure, url)


class StandInApi:
    """One client of a ``FakeHub``: the subset of ``HfApi`` that ``registry.hub`` uses."""

    def __init__(self, hub: FakeHub, token: str | None) -> None:
        self.hub = hub
        self.token = token

    # -- access control -----------------------------------------------------------------------
    def _repo(
        self,
        repo_id: str,
        repo_type: str | None,
        url_tail: str,
        *,
        write: bool = False,
        method: str = "GET",
    ) -> Repo:
        repo_type = repo_type or "model"
        url = _api_url(repo_type, repo_id, url_tail)
        perm = self.hub.tokens.get(self.token) if self.token else None
        if self.token and perm is None:
            _raise(401, url, method, message="Invalid credentials in Authorization header")
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and perm is None):
            # the Hub answers 401 to anonymous callers, whether the repo is private or missing
            _raise(404 if perm else 401, url, method, code="RepoNotFound")
        assert repo is not None
        if write and perm is None:
            _raise(401, url, method, message="Invalid credentials in Authorization header")
        if write and perm != WRITE:
            _raise(403, url, method, message="You don't have the rights to write to this repo")
        return repo

    def _commit(self, repo: Repo, revision: str | None, url: str) -> Commit:
        rev = revision or "main"
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            _raise(404, url, code="RevisionNotFound", message=f"Invalid rev id: {rev}")
        return repo.commits[sha]

    # -- HfApi methods ----------------------------------------------------------------------
    def create_repo(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        repo_type: str | None = None,
        exist_ok: bool = False,
        **_: Any,
    ) -> RepoUrl:
        repo_type = repo_type or "model"
        url = f"{ENDPOINT}/api/repos/create"
        self.hub._pop_failure("POST create", url)
        perm = self.hub.tokens.get(self.token) if self.token else None
        if perm != WRITE:
            _raise(
                401 if perm is None else 403,
                url,
                "POST",
                message="You don't have the rights to create a repo",
            )
        with self.hub.lock:
            if (repo_type, repo_id) in self.hub.repos:
                if not exist_ok:
                    _raise(409, url, "POST", message="You already created this repo")
            else:
                self.hub.add_repo(repo_type, repo_id, private=bool(private))
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return RepoUrl(f"{ENDPOINT}/{prefix}{repo_id}")

    def repo_info(
        self, repo_id: str, *, revision: str | None = None, repo_type: str | None = None, **_: Any
    ) -> ModelInfo | DatasetInfo:
        tail = f"revision/{revision}" if revision else ""
        self.hub._pop_failure(f"GET {tail}", _api_url(repo_type or "model", repo_id, tail))
        with self.hub.lock:
            repo = self._repo(repo_id, repo_type, tail)
            commit = self._commit(repo, revision, _api_url(repo.repo_type, repo_id, tail))
            cls = DatasetInfo if repo.repo_type == "dataset" else ModelInfo
            return cls(id=repo_id, sha=commit.sha, private=repo.private)

    def list_repo_tree(
        self,
        repo_id: str,
        path_in_repo: str | None = None,
        *,
        recursive: bool = False,
        revision: str | None = None,
        repo_type: str | None = None,
        **_: Any,
    ) -> Iterable[RepoFile | RepoFolder]:
        tail = f"tree/{revision or 'main'}"
        self.hub._pop_failure(f"GET {tail}", _api_url(repo_type or "model", repo_id, tail))
        with self.hub.lock:
            repo = self._repo(repo_id, repo_type, tail)
            tree = self._commit(repo, revision, _api_url(repo.repo_type, repo_id, tail)).tree
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        out: list[RepoFile | RepoFolder] = []
        folders: set[str] = set()
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            data = tree[path]
            out.append(RepoFile(path=path, size=len(data), oid=git_blob_id(data)))
        out += [RepoFolder(path=f, oid=self.hub.new_sha(f)) for f in sorted(folders)]
        return iter(out)

    def list_repo_files(
        self, repo_id: str, *, revision: str | None = None, repo_type: str | None = None, **_: Any
    ) -> list[str]:
        items = self.list_repo_tree(repo_id, recursive=True, revision=revision, repo_type=repo_type)
        return [f.path for f in items if isinstance(f, RepoFile)]

    def create_commit(
        self,
        repo_id: str,
        operations: Iterable[Any],
        *,
        commit_message: str,
        repo_type: str | None = None,
        revision: str | None = None,
        parent_commit: str | None = None,
        **_: Any,
    ) -> CommitInfo:
        ops = list(operations)  # read the payloads before anything else, as uploads do
        payload = [
            (op.path_in_repo, _read(op) if isinstance(op, CommitOperationAdd) else None)
            for op in ops
        ]
        with self.hub.lock:
            hooks, self.hub._before_commit = (
                self.hub._before_commit[:1],
                self.hub._before_commit[1:],
            )
        for hook in hooks:
            hook()
        branch = revision or "main"
        tail = f"commit/{branch}"
        self.hub._pop_failure(f"POST {tail}", _api_url(repo_type or "model", repo_id, tail))
        with self.hub.lock:
            self.hub.commit_attempts += 1
            repo = self._repo(repo_id, repo_type, tail, write=True, method="POST")
            url = _api_url(repo.repo_type, repo_id, tail)
            head = repo.branches.get(branch)
            if head is None:
                _raise(
                    404, url, "POST", code="RevisionNotFound", message=f"Invalid rev id: {branch}"
                )
            if parent_commit is not None and parent_commit != head:
                _raise(
                    412,
                    url,
                    "POST",
                    message="A commit has happened since. Please refresh and try again.",
                )
            tree = dict(repo.commits[head].tree)  # type: ignore[index]
            for path, data in payload:
                if data is not None:
                    tree[path] = data
                elif path in tree:
                    del tree[path]
                elif any(p.startswith(path.rstrip("/") + "/") for p in tree):
                    for p in [p for p in tree if p.startswith(path.rstrip("/") + "/")]:
                        del tree[p]
                else:
                    _raise(404, url, "POST", code="EntryNotFound", message=f"{path} does not exist")
            sha = self.hub.new_sha(repo_id, str(head), commit_message)
            repo.commits[sha] = Commit(sha, head, tree, commit_message)
            repo.branches[branch] = sha
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return CommitInfo(
            commit_url=f"{ENDPOINT}/{prefix}{repo_id}/commit/{sha}",
            commit_message=commit_message,
            commit_description="",
            oid=sha,
        )

    def hf_hub_download(
        self,
        repo_id: str,
        filename: str,
        *,
        repo_type: str | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        **_: Any,
    ) -> str:
        repo_type = repo_type or "model"
        cache = Path(cache_dir) if cache_dir is not None else self.hub.cache_dir
        if local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE or _env_offline():
            # the library's own cache lookup: proves the layout we write is the real one
            return huggingface_hub.hf_hub_download(
                repo_id,
                filename,
                repo_type=repo_type,
                revision=revision,
                cache_dir=cache,
                local_files_only=True,
            )
        tail = f"resolve/{revision or 'main'}/{filename}"
        self.hub._pop_failure(f"HEAD {tail}", _api_url(repo_type, repo_id, tail))
        with self.hub.lock:
            repo = self._repo(repo_id, repo_type, tail, method="HEAD")
            url = f"{ENDPOINT}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}/{tail}"
            commit = self._commit(repo, revision, url)
            if filename not in commit.tree:
                _raise(404, url, "HEAD", code="EntryNotFound", message="Entry not found")
            data = commit.tree[filename]
        storage = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
        blob = storage / "blobs" / git_blob_id(data)
        pointer = storage / "snapshots" / commit.sha / filename
        for path in (blob, pointer):
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
        if revision and revision != commit.sha:
            ref = storage / "refs" / revision
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit.sha)
        return str(pointer)


def _read(op: CommitOperationAdd) -> bytes:
    src = op.path_or_fileobj
    if isinstance(src, bytes):
        return src
    if isinstance(src, (str, Path)):
        return Path(src).read_bytes()
    assert isinstance(src, io.IOBase)
    src.seek(0)
    data = src.read()
    assert isinstance(data, bytes)
    return data


def _env_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


__all__ = ["CommitOperationAdd", "CommitOperationDelete", "FakeHub", "StandInApi", "git_blob_id"]


# -- helpers for the tests of the Hub backend ----------------------------------------------


def hub_registry(
    hub: FakeHub,
    state_dir: Path,
    url: str = "hf://acme/blocks",
    *,
    token: str | None = "hf_writer",
    **options: Any,
) -> Any:
    """A ``HubRegistry`` on ``hub`` with fast retries (tests need no real backoff)."""
    from registry.hub import HubOptions, HubRegistry

    opts = HubOptions(**{"backoff_s": 0.001, "backoff_cap_s": 0.01, **options})
    return HubRegistry(url, api=hub.api(token), state_dir=state_dir, options=opts)


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
