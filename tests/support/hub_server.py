"""A Hugging Face Hub–compatible HTTP server for the tests, standard library only.

Run as ``python -m tests.support.hub_server --root DIR [--port N] [--port-file FILE]``: it
listens on 127.0.0.1 (port 0: a free one, written to FILE) and keeps its repos under DIR, so a
server killed and started again on the same DIR finds them as they were. The unmodified
``huggingface_hub`` client talks to it through ``HF_ENDPOINT=http://127.0.0.1:PORT``.

What it serves, as huggingface_hub 2.4 sends and expects it (URLs, headers, JSON shapes, error
headers ``X-Error-Code``/``X-Error-Message``), for model and dataset repos:

- ``GET /api/whoami-v2``; ``POST /api/repos/create`` (409 with the repo's ``url`` if it exists);
- ``GET /api/{models|datasets}/{org}/{name}[/revision/{rev}]``: repo info, ``sha`` = the
  revision's commit, ``siblings``;
- ``GET .../tree/{rev}[/{path}]?recursive=&expand=``: files (``oid`` = git blob id, ``size``)
  and directories, paginated 1000 entries a page with a ``Link: <...>; rel="next"`` header;
- ``POST .../paths-info/{rev}`` (form ``paths=...``): the entries that exist;
- ``POST .../preupload/{rev}``: every file ``"uploadMode": "regular"``, with the ``oid`` of the
  file already at that path (so the client drops unchanged files);
- ``POST .../commit/{rev}``: an NDJSON body (``header`` with ``summary`` and optional
  ``parentCommit``, then ``file`` (base64), ``deletedFile``, ``deletedFolder`` lines). Atomic:
  the new commit is written in full, then the branch is moved in one rename. A stale
  ``parentCommit`` (full or 7+ character prefix) is 412; a missing branch 404
  ``RevisionNotFound``; deleting a missing path 404 ``EntryNotFound``;
- ``GET``/``HEAD /[datasets/]{org}/{name}/resolve/{rev}/{path}``: the bytes, with ``ETag`` (the
  git blob id, quoted), ``X-Repo-Commit``, ``Content-Length``, ``Range`` requests (206);
- ``POST``/``DELETE .../branch/{name}`` (``startingPoint``; 409 if it exists, 400 for a
  ``refs/...`` name), ``GET .../refs``, ``GET .../commits/{rev}`` (newest first).

Access as the Hub answers it: tokens ``hf_writer`` (write) and ``hf_reader`` (read); any other
token is 401 ``Invalid credentials in Authorization header``; a missing repo, or a private one
without a token, is 401 to anonymous callers and 404 ``RepoNotFound`` to others; writing with
the read token is 403. New repos start with one commit holding a ``.gitattributes``.

Not served (blockctl does not use it): LFS/Xet transfers (uploads are always "regular", so
every file is a plain git blob), pull requests, tags, ``expand=true`` details, gitignore.

Control endpoints for the tests, under ``/_test/`` (never logged, never faulted):

- ``POST /_test/reset``: forget every repo, fault, setting and logged request;
- ``GET /_test/requests`` → ``{"requests": ["GET /api/...", ...]}``, in arrival order;
- ``POST /_test/faults`` with one of
  ``{"delay": {"match": REGEX, "seconds": S, "times": N|null}}`` (sleep before answering
  requests whose ``"METHOD /path?query"`` matches), ``{"status": {"match": REGEX, "code": C,
  "times": N}}`` (answer an error instead), ``{"kill": {"at": "before-ref"|"after-ref"}}``
  (SIGKILL this server during the next commit: after the commit is written but before the
  branch moves, or after it moves but before the answer), ``{"storm": {"repo":
  "model/org/name", "times": N}}`` (a foreign commit lands between each of the next N commits'
  read and their parent check, so they get 412); ``DELETE /_test/faults`` clears them;
- ``POST /_test/repos`` ``{"type", "id", "private"}``: create a repo as someone else would;
- ``POST /_test/commit`` ``{"type", "id", "branch", "message", "files": {path: base64|null}}``:
  a foreign commit (null deletes), answers ``{"sha"}``;
- ``GET /_test/repo?type=&id=&revision=`` → ``{"head", "branches", "private", "tree": {path:
  base64}, "history": [{"sha", "parent", "title"}]}``;
- ``POST /_test/config`` ``{"tree_page_size": N}``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

TOKENS = {"hf_writer": ("writer", "write"), "hf_reader": ("reader", "read")}
INVALID_TOKEN = "Invalid credentials in Authorization header"
PLURAL = {"model": "models", "dataset": "datasets"}
SINGULAR = {v: k for k, v in PLURAL.items()}
DEFAULT_BRANCH = "main"
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_SEG = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = rf"(?P<org>{_SEG})/(?P<name>{_SEG})"
_API = rf"^/api/(?P<kind>models|datasets)/{_REPO}"
_RESOLVE = rf"^/(?:(?P<kind>datasets)/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class HubError(Exception):
    """An error answer, with the Hub's error headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}
        self.body = body


# -- storage: one folder per repo, immutable commits, branches moved by one rename -------------


@dataclass
class Repo:
    kind: str  # "model" | "dataset"
    repo_id: str
    root: Path
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.repo_id}"

    def url_prefix(self) -> str:
        return "" if self.kind == "model" else f"{PLURAL[self.kind]}/"


class Store:
    """Repos on disk under ``root``. One lock serialises changes (one server process)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.RLock()
        self._commits: dict[tuple[str, str, str], dict[str, Any]] = {}  # commits never change
        self._counter = itertools.count()

    def _folder(self, kind: str, repo_id: str) -> Path:
        return self.root / "repos" / PLURAL[kind] / repo_id

    def get(self, kind: str, repo_id: str) -> Repo | None:
        folder = self._folder(kind, repo_id)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            refs = json.loads((folder / "refs.json").read_text())
        except FileNotFoundError:
            return None
        return Repo(kind, repo_id, folder, meta["private"], meta["created_at"], refs)

    def create(self, kind: str, repo_id: str, private: bool) -> Repo:
        with self.lock:
            folder = self._folder(kind, repo_id)
            tmp = folder.with_name(f".{folder.name}.{secrets.token_hex(4)}")
            (tmp / "commits").mkdir(parents=True)
            (tmp / "objects").mkdir()
            meta = {"private": private, "created_at": now_iso()}
            (tmp / "meta.json").write_text(json.dumps(meta))
            repo = Repo(kind, repo_id, tmp, private, meta["created_at"])
            sha = self.write_commit(
                repo, None, {".gitattributes": GITATTRIBUTES}, {}, "initial commit"
            )
            _write_json(tmp / "refs.json", {DEFAULT_BRANCH: sha})
            os.rename(tmp, folder)  # the repo appears complete or not at all
            repo.root, repo.branches = folder, {DEFAULT_BRANCH: sha}
            return repo

    def commit(self, repo: Repo, sha: str) -> dict[str, Any]:
        key = (repo.kind, repo.repo_id, sha)
        hit = self._commits.get(key)
        if hit is None:
            hit = json.loads((repo.root / "commits" / f"{sha}.json").read_text())
            self._commits[key] = hit
        return hit

    def resolve(self, repo: Repo, revision: str) -> str | None:
        """A branch name, a full commit sha or one's 7+ character prefix → commit sha."""
        if revision in repo.branches:
            return repo.branches[revision]
        if revision.startswith("refs/heads/") and revision[11:] in repo.branches:
            return repo.branches[revision[11:]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            hits = [p.stem for p in (repo.root / "commits").glob(f"{revision}*.json")]
            if len(hits) == 1:
                return hits[0]
        return None

    def tree(self, repo: Repo, sha: str) -> dict[str, list[Any]]:
        """path -> [blob id, size]."""
        return dict(self.commit(repo, sha)["tree"])

    def read(self, repo: Repo, oid: str) -> bytes:
        return (repo.root / "objects" / oid[:2] / oid).read_bytes()

    def write_commit(
        self,
        repo: Repo,
        parent: str | None,
        adds: dict[str, bytes],
        base: dict[str, list[Any]],
        title: str,
        deletes: tuple[str, ...] = (),
        author: str = "writer",
    ) -> str:
        tree = dict(base)
        for path in deletes:
            tree.pop(path, None)
        for path, data in adds.items():
            oid = git_blob_id(data)
            obj = repo.root / "objects" / oid[:2] / oid
            if not obj.exists():
                _write_bytes(obj, data)
            tree[path] = [oid, len(data)]
        doc = {
            "parent": parent,
            "tree": dict(sorted(tree.items())),
            "title": title,
            "author": author,
            "date": now_iso(),
            "n": next(self._counter),
        }
        sha = hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        _write_json(repo.root / "commits" / f"{sha}.json", doc)
        return sha

    def move_branch(self, repo: Repo, branch: str, sha: str | None) -> None:
        branches = dict(repo.branches)
        if sha is None:
            branches.pop(branch, None)
        else:
            branches[branch] = sha
        _write_json(repo.root / "refs.json", branches)  # one rename: the commit lands whole
        repo.branches = branches

    def history(self, repo: Repo, sha: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        current: str | None = sha
        while current is not None:
            doc = self.commit(repo, current)
            out.append((current, doc))
            current = doc["parent"]
        return out

    def reset(self) -> None:
        with self.lock:
            shutil.rmtree(self.root / "repos", ignore_errors=True)
            self._commits.clear()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_json(path: Path, doc: Any) -> None:
    _write_bytes(path, json.dumps(doc).encode())


# -- faults and settings -------------------------------------------------------------------------


@dataclass
class Rule:
    pattern: re.Pattern[str]
    times: int | None  # None: forever
    value: Any

    def take(self, what: str) -> bool:
        if self.times == 0 or not self.pattern.search(what):
            return False
        if self.times is not None:
            self.times -= 1
        return True


@dataclass
class Faults:
    delays: list[Rule] = field(default_factory=list)
    statuses: list[Rule] = field(default_factory=list)
    kill_at: str | None = None
    storms: dict[str, int] = field(default_factory=dict)


# -- the HTTP side ------------------------------------------------------------------------------


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], root: Path) -> None:
        super().__init__(address, Handler)
        self.store = Store(root)
        self.faults = Faults()
        self.requests: list[str] = []
        self.tree_page_size = 1000
        self.state_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub; every answer has a Content-Length
    disable_nagle_algorithm = True  # headers and body go out as they are written, no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    # -- plumbing ---------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self.method = method
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query)
        self.body = self._read_body()
        try:
            if self.raw_path.startswith("/_test/"):
                self._control()
                return
            what = f"{method} {self.path}"
            srv = self.server
            with srv.state_lock:
                srv.requests.append(what)
                delay = next((r.value for r in srv.faults.delays if r.take(what)), 0.0)
                status = next((r.value for r in srv.faults.statuses if r.take(what)), None)
            if delay:
                time.sleep(delay)
            if status is not None:
                raise HubError(status, f"injected HTTP {status}")
            self._route()
        except HubError as exc:
            self._error(exc)
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away (e.g. it timed out)
        except Exception as exc:  # a bug here: answer as the Hub would, visibly
            self._error(HubError(500, f"Internal Error - {type(exc).__name__}: {exc}"))

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.send_header("X-Request-Id", f"Root={secrets.token_hex(8)}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.method != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _error(self, exc: HubError) -> None:
        headers = {"X-Error-Message": exc.message, **exc.headers}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        body = exc.body if exc.body is not None else {"error": exc.message}
        self._json(exc.status, body, headers)

    @property
    def endpoint(self) -> str:
        return f"http://{self.headers.get('Host') or f'127.0.0.1:{self.server.server_port}'}"

    # -- access -------------------------------------------------------------------------------
    def _user(self) -> tuple[str, str] | None:
        """(name, role) of the caller's token, None when anonymous; 401 for a bad token."""
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in TOKENS:
            raise HubError(401, INVALID_TOKEN)
        return TOKENS[token]

    def _repo(self, kind: str, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.server.store.get(kind, repo_id)
        if repo is None or (repo.private and user is None):
            # anonymous callers cannot tell a private repo from a missing one: 401 for both
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to this repo")
        if write and user[1] != "write":
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        sha = self.server.store.resolve(repo, revision)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # -- routes -------------------------------------------------------------------------------
    def _route(self) -> None:
        path, method = self.raw_path, self.method
        routes: list[tuple[str, str, Any]] = [
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("GET", rf"{_API}$", self._info),
            ("GET", rf"{_API}/revision/(?P<rev>[^/]+)$", self._info),
            ("GET", rf"{_API}/tree/(?P<rev>[^/]+)(?:/(?P<sub>[^/]+))?$", self._tree),
            ("POST", rf"{_API}/paths-info/(?P<rev>[^/]+)$", self._paths_info),
            ("POST", rf"{_API}/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", rf"{_API}/commit/(?P<rev>[^/]+)$", self._commit),
            ("POST", rf"{_API}/branch/(?P<rev>[^/]+)$", self._create_branch),
            ("DELETE", rf"{_API}/branch/(?P<rev>[^/]+)$", self._delete_branch),
            ("GET", rf"{_API}/refs$", self._refs),
            ("GET", rf"{_API}/commits/(?P<rev>[^/]+)$", self._commits),
            ("GET", _RESOLVE, self._resolve),
            ("HEAD", _RESOLVE, self._resolve),
        ]
        for verb, pattern, handler in routes:
            m = re.match(pattern, path)
            if m and verb == method:
                args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                kind = SINGULAR.get(args.pop("kind", "models"), "model")
                if "org" in args:
                    handler(kind, f"{args.pop('org')}/{args.pop('name')}", **args)
                else:
                    handler()
                return
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, INVALID_TOKEN)
        name, role = user
        self._json(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": name.title(),
                "orgs": [{"type": "org", "name": "acme", "roleInOrg": role}],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": name, "role": role},
                },
            },
        )

    def _create_repo(self) -> None:
        payload = json.loads(self.body or b"{}")
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if user[1] != "write":
            raise HubError(403, "You don't have the rights to create a repo")
        kind = payload.get("type") or "model"
        if kind not in PLURAL:
            raise HubError(400, f"Invalid repo type {kind!r}")
        repo_id = f"{payload.get('organization') or user[0]}/{payload['name']}"
        if not re.fullmatch(f"{_SEG}/{_SEG}", repo_id):
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        prefix = "" if kind == "model" else f"{PLURAL[kind]}/"
        url = f"{self.endpoint}/{prefix}{repo_id}"
        private = payload.get("visibility") == "private" or payload.get("private") is True
        store = self.server.store
        with store.lock:
            if store.get(kind, repo_id) is not None:
                msg = f"You already created this {kind} repo"
                raise HubError(409, msg, body={"error": msg, "url": url})
            store.create(kind, repo_id, private)
        self._json(200, {"url": url, "name": repo_id})

    def _info(self, kind: str, repo_id: str, rev: str = DEFAULT_BRANCH) -> None:
        repo = self._repo(kind, repo_id)
        sha = self._commit_of(repo, rev)
        doc = self.server.store.commit(repo, sha)
        self._json(
            200,
            {
                "_id": hashlib.sha1(repo.key.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": sha,
                "lastModified": doc["date"],
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": [{"rfilename": p} for p in doc["tree"]],
            },
        )

    def _entries(
        self, tree: dict[str, list[Any]], base: str, recursive: bool
    ) -> list[dict[str, Any]]:
        """Tree entries below ``base`` ('' for the root), folders with a tree id."""
        prefix = f"{base}/" if base else ""
        files: list[dict[str, Any]] = []
        folders: dict[str, list[str]] = {}
        for path, (oid, size) in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                folders.setdefault(folder, []).append(f"{path}:{oid}")
                if not recursive:
                    break
            if len(parts) == 1 or recursive:
                files.append({"type": "file", "oid": oid, "size": size, "path": path})
        dirs = [
            {"type": "directory", "oid": _tree_id(v), "size": 0, "path": k}
            for k, v in sorted(folders.items())
        ]
        return dirs + files

    def _tree(self, kind: str, repo_id: str, rev: str, sub: str = "") -> None:
        repo = self._repo(kind, repo_id)
        sha = self._commit_of(repo, rev)
        tree = self.server.store.tree(repo, sha)
        sub = sub.strip("/")
        if sub and not any(p.startswith(f"{sub}/") for p in tree):
            raise HubError(404, f"{sub} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries = self._entries(tree, sub, recursive)
        start = int(self.query.get("cursor", ["0"])[0] or 0)
        size = self.server.tree_page_size
        page = entries[start : start + size]
        headers = {}
        if start + size < len(entries):
            params = "&".join(f"{k}={quote(v[0])}" for k, v in self.query.items() if k != "cursor")
            nxt = f"{self.endpoint}{self.raw_path}?{params}&cursor={start + size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._json(200, page, headers)

    def _paths_info(self, kind: str, repo_id: str, rev: str) -> None:
        repo = self._repo(kind, repo_id)
        tree = self.server.store.tree(repo, self._commit_of(repo, rev))
        wanted = parse_qs(self.body.decode()).get("paths", [])
        entries = self._entries(tree, "", recursive=True)
        self._json(200, [e for e in entries if e["path"] in wanted])

    def _preupload(self, kind: str, repo_id: str, rev: str) -> None:
        repo = self._repo(kind, repo_id, write=True)
        tree = self.server.store.tree(repo, self._commit_of(repo, rev))
        files = json.loads(self.body)["files"]
        answer = []
        for f in files:
            entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
            if f["path"] in tree:
                entry["oid"] = tree[f["path"]][0]
            answer.append(entry)
        self._json(200, {"files": answer, "commitOid": self._commit_of(repo, rev)})

    def _commit(self, kind: str, repo_id: str, rev: str) -> None:
        header, adds, deletes, folders = _parse_ndjson(self.body)
        srv = self.server
        store = srv.store
        with store.lock:
            repo = self._repo(kind, repo_id, write=True)
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            with srv.state_lock:
                storm = srv.faults.storms.get(repo.key, 0)
                if storm:
                    srv.faults.storms[repo.key] = storm - 1
            if storm:  # someone else's commit lands between the client's read and this one
                noise = {f"noise/{secrets.token_hex(4)}.txt": b"x"}
                head = repo.branches[rev]
                sha = store.write_commit(repo, head, noise, store.tree(repo, head), "foreign")
                store.move_branch(repo, rev, sha)
            head = repo.branches[rev]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            base = store.tree(repo, head)
            gone = list(deletes)
            for path in deletes:
                if path not in base:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {path}", "EntryNotFound"
                    )
            for folder in folders:
                inside = [p for p in base if p.startswith(folder.rstrip("/") + "/")]
                if not inside:
                    raise HubError(
                        404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound"
                    )
                gone += inside
            user = self._user()
            sha = store.write_commit(
                repo, head, adds, base, header["summary"], tuple(gone), user[0] if user else "?"
            )
            self._maybe_die("before-ref")
            store.move_branch(repo, rev, sha)
            self._maybe_die("after-ref")
        self._json(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.endpoint}/{repo.url_prefix()}{repo_id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    def _maybe_die(self, point: str) -> None:
        with self.server.state_lock:
            if self.server.faults.kill_at != point:
                return
        os.kill(os.getpid(), signal.SIGKILL)

    def _create_branch(self, kind: str, repo_id: str, rev: str) -> None:
        store = self.server.store
        with store.lock:
            repo = self._repo(kind, repo_id, write=True)
            if rev.startswith("refs/") or ".." in rev or not re.fullmatch(r"[\w./-]+", rev):
                raise HubError(400, f"Invalid reference for a branch: {rev}")
            if rev in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{rev}")
            start = json.loads(self.body or b"{}").get("startingPoint") or DEFAULT_BRANCH
            store.move_branch(repo, rev, self._commit_of(repo, start))
        self._json(200, {})

    def _delete_branch(self, kind: str, repo_id: str, rev: str) -> None:
        store = self.server.store
        with store.lock:
            repo = self._repo(kind, repo_id, write=True)
            if rev not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            store.move_branch(repo, rev, None)
        self._json(200, {})

    def _refs(self, kind: str, repo_id: str) -> None:
        repo = self._repo(kind, repo_id)
        branches = [
            {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
            for b, sha in sorted(repo.branches.items())
        ]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def _commits(self, kind: str, repo_id: str, rev: str) -> None:
        repo = self._repo(kind, repo_id)
        history = self.server.store.history(repo, self._commit_of(repo, rev))
        self._json(
            200,
            [
                {
                    "id": sha,
                    "title": doc["title"],
                    "message": "",
                    "authors": [{"user": doc["author"]}],
                    "date": doc["date"],
                }
                for sha, doc in history
            ],
        )

    def _resolve(self, kind: str, repo_id: str, rev: str, file: str) -> None:
        repo = self._repo(kind, repo_id)
        sha = self._commit_of(repo, rev)
        tree = self.server.store.tree(repo, sha)
        if file not in tree:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        oid, size = tree[file]
        data = self.server.store.read(repo, oid)
        headers = {
            "ETag": f'"{oid}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(file.rsplit('/', 1)[-1])}",
        }
        status = 200
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m:
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else size - 1
            if first >= size:
                raise HubError(
                    416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            data = data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{first + len(data) - 1}/{size}"
            status = 206
        self._send(status, data, "application/octet-stream", headers)

    # -- control ------------------------------------------------------------------------------
    def _control(self) -> None:
        srv, store = self.server, self.server.store
        path, method = self.raw_path, self.method
        doc = json.loads(self.body) if self.body else {}
        if (method, path) == ("POST", "/_test/reset"):
            with store.lock, srv.state_lock:
                store.reset()
                srv.faults, srv.requests, srv.tree_page_size = Faults(), [], 1000
            self._json(200, {})
        elif (method, path) == ("GET", "/_test/requests"):
            with srv.state_lock:
                self._json(200, {"requests": list(srv.requests)})
        elif path == "/_test/faults":
            with srv.state_lock:
                if method == "DELETE":
                    srv.faults = Faults()
                else:
                    _add_fault(srv.faults, doc)
            self._json(200, {})
        elif (method, path) == ("POST", "/_test/config"):
            srv.tree_page_size = int(doc.get("tree_page_size", srv.tree_page_size))
            self._json(200, {})
        elif (method, path) == ("POST", "/_test/repos"):
            store.create(doc.get("type", "model"), doc["id"], bool(doc.get("private")))
            self._json(200, {})
        elif (method, path) == ("POST", "/_test/commit"):
            self._json(200, {"sha": _foreign_commit(store, doc)})
        elif (method, path) == ("GET", "/_test/repo"):
            kind, rid = self.query["type"][0], self.query["id"][0]
            repo = store.get(kind, rid)
            if repo is None:
                raise HubError(404, "no such repo")
            rev = self.query.get("revision", [DEFAULT_BRANCH])[0]
            sha = store.resolve(repo, rev)
            if sha is None:
                raise HubError(404, "no such revision")
            tree = {
                p: base64.b64encode(store.read(repo, oid)).decode()
                for p, (oid, _) in store.tree(repo, sha).items()
            }
            history = [
                {"sha": s, "parent": d["parent"], "title": d["title"]}
                for s, d in store.history(repo, sha)
            ]
            state = {"head": sha, "branches": repo.branches, "private": repo.private}
            self._json(200, {**state, "tree": tree, "history": history})
        else:
            raise HubError(404, f"no control endpoint {method} {path}")


def _tree_id(entries: list[str]) -> str:
    return hashlib.sha1("\n".join(entries).encode()).hexdigest()


def _parse_ndjson(body: bytes) -> tuple[dict[str, Any], dict[str, bytes], list[str], list[str]]:
    """(header, additions, deleted files, deleted folders) of a commit payload; 400 if bad."""
    header: dict[str, Any] | None = None
    adds: dict[str, bytes] = {}
    deletes: list[str] = []
    folders: list[str] = []
    for n, line in enumerate(body.splitlines()):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError) as exc:
            raise HubError(400, f"Invalid commit payload at line {n + 1}: {exc}") from None
        if n == 0:
            if key != "header" or not value.get("summary"):
                raise HubError(400, "The first line of a commit must be its header with a summary")
            header = value
            continue
        path = value.get("path", "")
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise HubError(400, f"Invalid path {path!r}")
        if key == "file":
            if value.get("encoding") != "base64":
                raise HubError(400, f"Unsupported encoding for {path}")
            adds[path] = base64.b64decode(value["content"])
        elif key == "deletedFile":
            deletes.append(path)
        elif key == "deletedFolder":
            folders.append(path)
        elif key == "lfsFile":
            raise HubError(400, f"LFS object for {path} was never uploaded (this Hub stores none)")
        else:
            raise HubError(400, f"Unknown commit operation {key!r}")
    if header is None:
        raise HubError(400, "Empty commit payload")
    return header, adds, deletes, folders


def _add_fault(faults: Faults, doc: dict[str, Any]) -> None:
    if "delay" in doc:
        d = doc["delay"]
        faults.delays.append(
            Rule(re.compile(d.get("match", "")), d.get("times"), float(d["seconds"]))
        )
    if "status" in doc:
        d = doc["status"]
        faults.statuses.append(
            Rule(re.compile(d.get("match", "")), d.get("times", 1), int(d["code"]))
        )
    if "kill" in doc:
        faults.kill_at = doc["kill"]["at"]
    if "storm" in doc:
        faults.storms[doc["storm"]["repo"]] = int(doc["storm"]["times"])


def _foreign_commit(store: Store, doc: dict[str, Any]) -> str:
    with store.lock:
        repo = store.get(doc.get("type", "model"), doc["id"])
        assert repo is not None, doc["id"]
        branch = doc.get("branch", DEFAULT_BRANCH)
        head = repo.branches[branch]
        files = doc["files"]
        adds = {p: base64.b64decode(v) for p, v in files.items() if v is not None}
        gone = tuple(p for p, v in files.items() if v is None)
        base = store.tree(repo, head)
        sha = store.write_commit(
            repo, head, adds, base, doc.get("message", "edit"), gone, "someone"
        )
        store.move_branch(repo, branch, sha)
        return sha


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A local Hub-compatible server for tests.")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path)
    args = parser.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    server = HubServer(("127.0.0.1", args.port), args.root)
    if args.port_file:
        _write_bytes(args.port_file, str(server.server_port).encode())
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
