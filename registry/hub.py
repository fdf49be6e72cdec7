"""The Hub registry: a Hugging Face Hub repo holding the registry's records as files.

Repo layout (one branch, ``main`` unless the location names another)::

    layout.json               {"format": "blockctl-registry", "registry_schema_version": 1,
                               "created_at": ..., "layout": <the layout dict>}
    basis.safetensors         the layout's orthonormal bases
    slots/NNN.json            one slot record per taken slot (zero-padded slot number), with
                              its published adapter's record under "adapter" (or null)
    adapters/{concept}.safetensors   the published adapter files

Every change is ONE commit made with ``parent_commit=<head just read>``: the Hub refuses it
(HTTP 412) if anyone committed in between, and the change is then re-planned on fresh state
(lowest free slot, name uniqueness, status checks) after a short jittered backoff, a bounded
number of times. A commit lands whole or not at all, so nothing is ever half-written.

Reads go through huggingface_hub's cache (``hf_hub_download`` pinned to the head commit).
The last head, file listing and small records seen are also kept in a JSON file under
``$BLOCKCTL_CACHE_DIR`` (default ``~/.cache/blockctl``)``/hub/``, so that with
``HF_HUB_OFFLINE=1`` reads are answered from the cache and writes are refused.

Every call to the Hub is bounded (``registry.hub_http``): a request waits at most
``HubOptions.timeout_s`` (``$BLOCKCTL_HUB_TIMEOUT``, default 30 s) for the server, so a dead or
stalled server ends the command with exit 5 instead of a hang.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from blockctl.errors import BlockctlError, InvalidInput, RegistryUnavailable, SlotConflict
from registry import hub_http
from registry.base import (
    PUBLISHED,
    RELEASED,
    RESERVED,
    SLOT_FIELDS,
    AdapterRecord,
    Registry,
    SlotRecord,
    check_new_registry,
    check_publish_input,
    check_publishable,
    check_release,
    check_release_input,
    check_reservation,
    choose_slot,
    published_adapter,
    sha_mismatch,
    valid_slot_count,
)
from registry.hub_url import DEFAULT_BRANCH, HubUrl, parse_hub_url
from registry.migrations import utc_now

FORMAT = "blockctl-registry"
SCHEMA_VERSION = 1  # of the repo format above; bump when it changes incompatibly
LAYOUT_FILE = "layout.json"
BASIS_FILE = "basis.safetensors"
SLOTS_DIR = "slots"
ADAPTERS_DIR = "adapters"
CACHE_ENV = "BLOCKCTL_CACHE_DIR"
TIMEOUT_ENV = "BLOCKCTL_HUB_TIMEOUT"
STATE_VERSION = 1

_SLOT_FILE = re.compile(rf"^{SLOTS_DIR}/(\d+)\.json$")
_CHUNK = 1 << 20

CommitOp = CommitOperationAdd | CommitOperationDelete


def make_api() -> HfApi:
    """The client every ``HubRegistry`` uses unless given one: huggingface_hub's own, on
    ``HF_ENDPOINT``, token from the usual login or ``HF_TOKEN``, its requests bounded."""
    hub_http.install()
    return HfApi()


@dataclass(frozen=True)
class HubOptions:
    max_tries: int = 12  # commits per change before "busy" (8 racing writers needed up to 6)
    backoff_s: float = 0.1  # first retry delay; doubles per try, jittered, capped
    backoff_cap_s: float = 2.0
    max_age_s: float = 5.0  # reads reuse the state seen this recently (writes never do)
    private: bool | None = None  # visibility of a repo that ``create`` makes (None: Hub default)
    timeout_s: float = 30.0  # the longest wait for the server, per request (``hub_http``)


DEFAULT_OPTIONS = HubOptions()  # what ``open_registry`` gets (tests patch in fast retries)


def default_options() -> HubOptions:
    """``DEFAULT_OPTIONS``, with the timeout from ``$BLOCKCTL_HUB_TIMEOUT`` (seconds) if set."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_OPTIONS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise InvalidInput(f"{TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return replace(DEFAULT_OPTIONS, timeout_s=seconds)


def offline() -> bool:
    """huggingface_hub reads ``HF_HUB_OFFLINE`` once at import; honour a later change too."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def cache_root() -> Path:
    """``$BLOCKCTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/blockctl`` (``~/.cache/blockctl``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockctl"


@dataclass(frozen=True)
class _Entry:
    path: str  # slots/NNN.json
    record: SlotRecord
    adapter: AdapterRecord | None


@dataclass(frozen=True)
class _Snapshot:
    head: str
    files: Mapping[str, str]  # path -> git blob id
    layout: dict[str, Any]
    entries: tuple[_Entry, ...]  # by slot
    taken_at: float

    @property
    def n_slots(self) -> int:
        return int(self.layout["slots"])

    def by_concept(self, concept: str) -> _Entry | None:
        return next((e for e in self.entries if e.record.concept == concept), None)


class HubRegistry(Registry):
    """A registry in a Hub repo. Opening is lazy: nothing is read until the first call."""

    def __init__(
        self,
        location: str | HubUrl,
        *,
        api: HfApi | None = None,
        state_dir: Path | None = None,
        options: HubOptions | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.url = location if isinstance(location, HubUrl) else parse_hub_url(location)
        self.location = str(self.url)
        self.options = options or default_options()
        self._api = api
        self._sleep = sleep or time.sleep
        self._state_file = (state_dir or cache_root() / "hub") / self._state_name()
        self._state: dict[str, Any] | None = None
        self._snap: _Snapshot | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"HubRegistry({self.location!r})"

    def _state_name(self) -> str:
        u = self.url
        return f"{u.repo_type}s/{u.repo_id}/{quote(u.branch, safe='')}.json"

    @property
    def api(self) -> HfApi:
        if self._api is None:
            self._api = make_api()
        return self._api

    def _kw(self) -> dict[str, Any]:
        return {"repo_type": self.url.repo_type}

    # -- errors ------------------------------------------------------------------------------
    def _init_hint(self) -> str:
        return f"blockctl --registry {self.location} init --base ..."

    def _offline_error(self, what: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"offline (HF_HUB_OFFLINE=1): cannot {what} {self.location}",
            hint="unset HF_HUB_OFFLINE to reach the Hub",
        )

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        """Bound the Hub calls inside (``hub_http``), and turn huggingface_hub and network
        failures into one-line RegistryUnavailable."""
        loc = self.location
        try:
            with hub_http.bounded(self.options.timeout_s):
                yield
        except BlockctlError:
            raise
        except RepositoryNotFoundError as exc:
            if _status(exc) in (401, 403):
                raise self._auth_error(exc) from None
            raise RegistryUnavailable(f"no registry at {loc}", hint=self._init_hint()) from None
        except RevisionNotFoundError:
            raise RegistryUnavailable(
                f"{loc}: branch or revision {self.url.branch!r} does not exist",
                hint=f"{self._init_hint()} creates a registry on a new branch; or leave out "
                "@revision",
            ) from None
        except RemoteEntryNotFoundError as exc:
            raise RegistryUnavailable(
                f"the registry at {loc} changed while being read ({_first_line(exc)})",
                hint="try again",
            ) from None
        except LocalEntryNotFoundError as exc:
            if not offline():  # huggingface_hub says this when a download look-up failed
                raise self._unreachable(exc.__cause__ or exc) from None
            raise RegistryUnavailable(
                f"offline (HF_HUB_OFFLINE=1) and {loc} is not fully in the local cache",
                hint="run the command once while online so the files get cached",
            ) from None
        except OfflineModeIsEnabled:
            raise self._offline_error("reach") from None
        except HfHubHTTPError as exc:
            status = _status(exc)
            if status in (401, 403):
                raise self._auth_error(exc) from None
            why = exc.server_message or _first_line(exc)
            raise RegistryUnavailable(
                f"the Hub answered HTTP {status} for {loc}: {why}",
                hint="try again later" if status == 429 or status >= 500 else None,
            ) from None
        except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: BaseException) -> RegistryUnavailable:
        loc = self.location
        if isinstance(exc, (httpx2.TimeoutException, hub_http.DeadlineExceeded, TimeoutError)):
            return RegistryUnavailable(
                f"the Hub did not answer within {self.options.timeout_s:g} s for {loc}",
                hint=f"try again later, or allow more time with {TIMEOUT_ENV}=SECONDS",
            )
        return RegistryUnavailable(
            f"cannot reach the Hub for {loc}: {type(exc).__name__}: {exc}".rstrip(": "),
            hint="check your network connection (HF_HUB_OFFLINE=1 reads from the cache)",
        )

    def _auth_error(self, exc: HfHubHTTPError) -> RegistryUnavailable:
        status = _status(exc)
        what = "not authorised" if status == 401 else "permission denied"
        return RegistryUnavailable(
            f"{what} (HTTP {status}) for {self.location}: the repo is private or missing, or "
            "your token lacks access",
            hint="log in with `hf auth login` or set HF_TOKEN to a token with write access",
        )

    # -- the cached state (head, listing, small records) ----------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if self._state is None:
            try:
                state = json.loads(self._state_file.read_text())
                ok = isinstance(state, dict) and state.get("version") == STATE_VERSION
            except (OSError, ValueError):
                ok = False
            self._state = state if ok else {"version": STATE_VERSION, "docs": {}, "local": {}}
        return self._state

    def _save_state(self) -> None:
        """Best effort: it is a cache, a failure to write it costs only offline reads. Written
        to a temporary sibling and renamed, which is removed again if anything fails."""
        state = self._load_state()
        with contextlib.suppress(OSError):
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state.", dir=self._state_file.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(state, fh)
                os.replace(tmp, self._state_file)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise

    # -- reading -------------------------------------------------------------------------------
    def _head(self) -> str:
        with self._calls():
            info = self.api.repo_info(self.url.repo_id, revision=self.url.branch, **self._kw())
        return str(info.sha)

    def _tree(self, head: str) -> dict[str, str]:
        with self._calls():
            items = self.api.list_repo_tree(
                self.url.repo_id, recursive=True, revision=head, **self._kw()
            )
            return {f.path: f.blob_id for f in items if isinstance(f, RepoFile)}

    def _download(self, path: str, head: str) -> Path:
        with self._calls():
            local = self.api.hf_hub_download(
                self.url.repo_id, path, revision=head, local_files_only=offline(), **self._kw()
            )
        return Path(str(local))

    def _doc(self, path: str, blob_id: str, head: str) -> Any:
        """A small JSON file, remembered by blob id so unchanged records are never fetched
        twice (and stay readable offline)."""
        docs = self._load_state()["docs"]
        hit = docs.get(path)
        if isinstance(hit, dict) and hit.get("blob_id") == blob_id:
            return copy.deepcopy(hit["data"])
        if offline():
            raise self._offline_error("read")
        try:
            data = json.loads(self._download(path, head).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise self._corrupt(f"{path} is not valid JSON ({exc})") from exc
        docs[path] = {"blob_id": blob_id, "data": data}
        return copy.deepcopy(data)

    def _corrupt(self, why: str) -> RegistryUnavailable:
        return RegistryUnavailable(
            f"the registry at {self.location} is damaged: {why}",
            hint="fix or revert the offending commit on the Hub",
        )

    def _listing(self, fresh: bool) -> tuple[str, dict[str, str]]:
        """(head, files): from the Hub, or offline from the last state seen."""
        state = self._load_state()
        if offline():
            if fresh:
                raise self._offline_error("write to")
            if "head" not in state:
                raise RegistryUnavailable(
                    f"offline (HF_HUB_OFFLINE=1) and {self.location} is not in the local cache",
                    hint="run any blockctl command on it once while online",
                )
            return str(state["head"]), dict(state["files"])
        head = self._head()
        files = dict(state["files"]) if state.get("head") == head else self._tree(head)
        return head, files

    def _snapshot(self, *, fresh: bool = False) -> _Snapshot:
        """The registry as of one head commit; every check runs on one consistent state."""
        with self._lock:
            snap = self._snap
            if not fresh and snap and time.monotonic() - snap.taken_at < self.options.max_age_s:
                return snap
            head, files = self._listing(fresh)
            snap = self._parse(head, files)
            state = self._load_state()
            stale = state.get("head") != head
            state["head"], state["files"] = head, files
            live = set(files)
            state["docs"] = {p: d for p, d in state["docs"].items() if p in live}
            if stale or not offline():
                self._save_state()
            self._snap = snap
            return snap

    def _parse(self, head: str, files: dict[str, str]) -> _Snapshot:
        if LAYOUT_FILE not in files:
            raise RegistryUnavailable(
                f"{self.location} is not a blockctl registry (no {LAYOUT_FILE})",
                hint=f"create one in a new repo: {self._init_hint()}",
            )
        doc = self._doc(LAYOUT_FILE, files[LAYOUT_FILE], head)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RegistryUnavailable(
                f"{self.location} is not a blockctl registry ({LAYOUT_FILE} is not ours)"
            )
        version = doc.get("registry_schema_version")
        if not isinstance(version, int) or version < 1:
            raise self._corrupt(f"{LAYOUT_FILE} has no valid registry_schema_version")
        if version > SCHEMA_VERSION:
            raise RegistryUnavailable(
                f"the registry at {self.location} was made by a newer blockctl (registry "
                f"schema {version}, this blockctl knows up to {SCHEMA_VERSION}); upgrade",
                hint="upgrade blockctl (pip install -U blockctl)",
            )
        layout = doc.get("layout")
        if not isinstance(layout, dict) or not valid_slot_count(layout.get("slots")):
            raise self._corrupt(f"{LAYOUT_FILE} has no valid layout with a 'slots' count")
        if BASIS_FILE not in files:
            raise RegistryUnavailable(
                f"the registry at {self.location} is incomplete: {BASIS_FILE} is missing",
                hint="fix or revert the offending commit on the Hub",
            )
        entries = []
        for path in sorted(files):
            m = _SLOT_FILE.match(path)
            if m:
                entries.append(self._entry(path, int(m.group(1)), files[path], head))
        entries.sort(key=lambda e: e.record.slot)
        return _Snapshot(head, files, layout, tuple(entries), time.monotonic())

    def _entry(self, path: str, slot: int, blob_id: str, head: str) -> _Entry:
        doc = self._doc(path, blob_id, head)
        try:
            record = SlotRecord(**{k: doc.get(k) for k in SLOT_FIELDS})
            adapter = doc.get("adapter")
            ok = (
                record.slot == slot
                and record.status in (RESERVED, PUBLISHED, RELEASED)
                and all(isinstance(getattr(record, k), str) for k in SLOT_FIELDS[1:7])
                and (adapter is None or isinstance(adapter, dict))
            )
            ad = AdapterRecord(concept=record.concept, slot=slot, **adapter) if adapter else None
        except (AttributeError, TypeError) as exc:
            raise self._corrupt(f"{path} is not a slot record ({exc})") from exc
        if not ok:
            raise self._corrupt(f"{path} is not a valid record for slot {slot}")
        return _Entry(path, record, ad)

    def _fetch(self, path: str, snap: _Snapshot) -> Path:
        """A large file (basis, adapter) as a local path in the huggingface_hub cache."""
        blob_id = snap.files.get(path)
        if blob_id is None:
            raise RegistryUnavailable(
                f"the registry at {self.location} is incomplete: {path} is missing",
                hint="fix or revert the offending commit on the Hub",
            )
        local = self._load_state()["local"]
        hit = local.get(path)
        # the same blob fetched at an older head is still the right file (and offline, the
        # only copy: the cache is keyed by the commit it was fetched at)
        if isinstance(hit, dict) and hit.get("blob_id") == blob_id and Path(hit["path"]).is_file():
            return Path(hit["path"])
        got = self._download(path, snap.head)
        with self._lock:
            local[path] = {"blob_id": blob_id, "path": str(got)}
            self._save_state()
        return got

    # -- writing ---------------------------------------------------------------------------------
    def _change(
        self,
        plan: Callable[[_Snapshot], tuple[list[CommitOp], str, Any]],
        *,
        raw: bool = False,
    ) -> Any:
        """Plan on fresh state, commit with ``parent_commit`` = the head planned on; on 412
        (someone committed in between) back off and plan again, up to ``max_tries`` times.
        ``raw``: plan on the bare file listing (for ``create``, before there is a registry)."""
        self._writable()
        with self._lock:
            tries = self.options.max_tries
            for attempt in range(tries):
                if raw:
                    head, files = self._listing(fresh=True)
                    snap = _Snapshot(head, files, {}, (), time.monotonic())
                else:
                    snap = self._snapshot(fresh=True)
                ops, message, result = plan(snap)
                if self._commit(ops, message, snap.head):
                    self._snap = None  # the next read sees our commit
                    return result
                if attempt + 1 < tries:
                    self._sleep(self._backoff(attempt))
            raise RegistryUnavailable(
                f"registry busy: gave up after {tries} conflicting commits to {self.location}",
                hint="others are writing to it right now; try again in a moment",
            )

    def _writable(self) -> None:
        if offline():
            raise self._offline_error("write to")
        if self.url.pinned:
            raise InvalidInput(
                f"{self.location} is pinned to a commit and read-only",
                hint="use a branch name after @, or none for main",
            )

    def _commit(self, ops: list[CommitOp], message: str, parent: str) -> bool:
        """True if the commit landed; False on 412 (the branch moved since ``parent``)."""
        with self._calls():
            try:
                self.api.create_commit(
                    self.url.repo_id,
                    ops,
                    commit_message=message,
                    revision=self.url.branch,
                    parent_commit=parent,
                    **self._kw(),
                )
            except HfHubHTTPError as exc:
                if _status(exc) == 412:
                    return False
                raise
            except httpx2.TransportError as exc:
                if _sent_commit(exc):
                    raise self._commit_unknown(exc) from None
                raise
        return True

    def _commit_unknown(self, exc: httpx2.TransportError) -> RegistryUnavailable:
        """The commit request went out and no answer came back: the Hub may have applied it
        (whole: commits are atomic) or not."""
        why = "no answer in time" if isinstance(exc, httpx2.TimeoutException) else "connection lost"
        return RegistryUnavailable(
            f"the Hub stopped answering during the commit to {self.location} ({why}); the "
            "change was made in full or not at all, and which is unknown",
            hint=f"check with: blockctl --registry {self.location} slots",
        )

    def _backoff(self, attempt: int) -> float:
        o = self.options
        return min(o.backoff_cap_s, o.backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    # -- creation and layout -------------------------------------------------------------------
    def create(self, layout: dict[str, Any], basis_file: Path) -> None:
        basis_file = check_new_registry(layout, basis_file)
        doc = {
            "format": FORMAT,
            "registry_schema_version": SCHEMA_VERSION,
            "created_at": utc_now(),
            "layout": layout,
        }
        layout_bytes = _json_bytes(doc)
        self._writable()
        self._ensure_repo()

        def plan(snap: _Snapshot) -> tuple[list[CommitOp], str, None]:
            files = _registry_files(snap.files)
            if LAYOUT_FILE in files:
                raise InvalidInput(f"a registry already exists at {self.location}")
            if files:
                raise InvalidInput(
                    f"{self.location} is not empty (it has {files[0]})",
                    hint="create the registry in a new repo",
                )
            ops: list[CommitOp] = [
                CommitOperationAdd(LAYOUT_FILE, layout_bytes),
                CommitOperationAdd(BASIS_FILE, str(basis_file)),
            ]
            return ops, "blockctl: create registry", None

        self._change(plan, raw=True)

    def _ensure_repo(self) -> None:
        """Make the repo, and the branch, if they do not exist yet. A new branch starts at
        the head of the repo's default branch, so it is refused (before anything is made) when
        that holds registry files: the branch would start as a copy of that registry."""
        u = self.url
        with self._calls():
            try:
                self.api.repo_info(u.repo_id, revision=u.branch, **self._kw())
                return
            except RevisionNotFoundError:
                pass  # the repo is there, the branch is not
            except RepositoryNotFoundError as exc:
                if _status(exc) in (401, 403):
                    raise
                self.api.create_repo(
                    u.repo_id, private=self.options.private, exist_ok=True, **self._kw()
                )
                if u.branch == DEFAULT_BRANCH:
                    return
            start = str(self.api.repo_info(u.repo_id, **self._kw()).sha)
            tree = self.api.list_repo_tree(u.repo_id, recursive=True, revision=start, **self._kw())
            inherited = _registry_files([f.path for f in tree if isinstance(f, RepoFile)])
            if inherited:
                raise InvalidInput(
                    f"cannot create branch {u.branch!r} of {u.repo_id} for a new registry: it "
                    f"would start as a copy of the default branch, which holds {inherited[0]}",
                    hint="create the registry in another repo, or make the branch yourself "
                    "from a commit without registry files",
                )
            self.api.create_branch(
                u.repo_id, branch=u.branch, revision=start, exist_ok=True, **self._kw()
            )

    def layout(self) -> dict[str, Any]:
        return copy.deepcopy(self._snapshot().layout)

    def basis_path(self) -> Path:
        return self._fetch(BASIS_FILE, self._snapshot())

    # -- slots -----------------------------------------------------------------------------------
    def reserve(
        self,
        concept: str,
        token: str,
        class_word: str,
        owner: str,
        slot: int | None = None,
    ) -> SlotRecord:
        check_reservation(concept, token, class_word, owner, slot)

        def plan(snap: _Snapshot) -> tuple[list[CommitOp], str, SlotRecord]:
            n = snap.n_slots
            chosen = choose_slot([e.record for e in snap.entries], n, concept, token, slot)
            path = _slot_path(chosen, n)
            if path in snap.files:  # never overwrite a slot file, whatever it holds
                raise SlotConflict(f"slot {chosen} is taken ({path} exists)")
            rec = SlotRecord(
                slot=chosen,
                concept=concept,
                token=token,
                class_word=class_word,
                owner=owner,
                status=RESERVED,
                reserved_at=utc_now(),
            )
            ops: list[CommitOp] = [CommitOperationAdd(path, _slot_bytes(rec, None))]
            return ops, f"blockctl: reserve slot {chosen} for {concept}", rec

        result: SlotRecord = self._change(plan)
        return result

    def release(self, concept: str, owner: str | None = None) -> SlotRecord:
        """See ``Registry.release``: a never-published slot file is deleted, a published one
        is kept, marked released (the slot stays burnt)."""
        check_release_input(concept, owner)

        def plan(snap: _Snapshot) -> tuple[list[CommitOp], str, SlotRecord]:
            entry = snap.by_concept(concept)
            held = check_release(entry.record if entry else None, concept, owner)
            assert entry is not None
            done = replace(held, status=RELEASED, released_at=utc_now())
            op: CommitOp
            if held.status == RESERVED:
                op = CommitOperationDelete(entry.path)
            else:
                op = CommitOperationAdd(entry.path, _slot_bytes(done, entry.adapter))
            return [op], f"blockctl: release slot {held.slot} ({concept})", done

        result: SlotRecord = self._change(plan)
        return result

    def slots(self) -> list[SlotRecord]:
        return [e.record for e in self._snapshot().entries]

    # -- adapters ----------------------------------------------------------------------------
    def publish(self, concept: str, file: Path, sha256: str) -> AdapterRecord:
        file, sha = check_publish_input(concept, file, sha256)
        self._writable()
        _publishable(self._snapshot(fresh=True), concept)  # fail fast, before copying
        with tempfile.TemporaryDirectory(prefix="blockctl-publish-") as tmp:
            # upload a private copy, so the bytes sent are the bytes hashed
            copy_path = Path(tmp) / f"{concept}.safetensors"
            size, got = _copy_hashing(file, copy_path)
            if got != sha:
                raise sha_mismatch(file, got, sha)
            path = f"{ADAPTERS_DIR}/{concept}.safetensors"

            def plan(snap: _Snapshot) -> tuple[list[CommitOp], str, AdapterRecord]:
                entry = _publishable(snap, concept)
                now = utc_now()
                rec = AdapterRecord(
                    concept=concept,
                    slot=entry.record.slot,
                    sha256=sha,
                    size=size,
                    path=path,
                    published_at=now,
                )
                held = replace(entry.record, status=PUBLISHED, published_at=now)
                ops: list[CommitOp] = [
                    CommitOperationAdd(path, str(copy_path)),
                    CommitOperationAdd(entry.path, _slot_bytes(held, rec)),
                ]
                return ops, f"blockctl: publish {concept} in slot {held.slot}", rec

            result: AdapterRecord = self._change(plan)
        return result

    def adapters(self) -> list[AdapterRecord]:
        """Adapters of published concepts, by slot (released ones stay in the repo)."""
        return [
            e.adapter
            for e in self._snapshot().entries
            if e.adapter is not None and e.record.status == PUBLISHED
        ]

    def adapter_file(self, concept: str) -> Path:
        snap = self._snapshot()
        entry = snap.by_concept(concept)
        held, adapter = (entry.record, entry.adapter) if entry else (None, None)
        return self._fetch(published_adapter(held, adapter, concept).path, snap)

    def released_adapter_file(self, concept: str) -> tuple[AdapterRecord, Path] | None:
        """The withdrawn adapter of a released concept: it stays in the repo."""
        snap = self._snapshot()
        entry = snap.by_concept(concept)
        if entry is None or entry.adapter is None or entry.record.status != RELEASED:
            return None
        return entry.adapter, self._fetch(entry.adapter.path, snap)


# -- record helpers: the same rules and messages as the local backend -------------------------


def _status(exc: HfHubHTTPError) -> int:
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _first_line(exc: BaseException) -> str:
    return next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )


def _slot_path(slot: int, n_slots: int) -> str:
    width = max(3, len(str(n_slots - 1)))
    return f"{SLOTS_DIR}/{slot:0{width}d}.json"


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def _slot_bytes(record: SlotRecord, adapter: AdapterRecord | None) -> bytes:
    doc: dict[str, Any] = record.to_dict()
    if adapter is not None:
        ad = adapter.to_dict()
        del ad["concept"], ad["slot"]  # already the record's
        doc["adapter"] = ad
    else:
        doc["adapter"] = None
    return _json_bytes(doc)


def _publishable(snap: _Snapshot, concept: str) -> _Entry:
    entry = snap.by_concept(concept)
    check_publishable(entry.record if entry else None, concept)
    assert entry is not None
    return entry


def _registry_files(paths: Iterable[str]) -> list[str]:
    """The paths among ``paths`` that a registry writes (layout first, if there)."""
    folders = (f"{SLOTS_DIR}/", f"{ADAPTERS_DIR}/")
    ours = [p for p in paths if p in (LAYOUT_FILE, BASIS_FILE) or p.startswith(folders)]
    return sorted(ours, key=lambda p: (p != LAYOUT_FILE, p))


def _sent_commit(exc: httpx2.TransportError) -> bool:
    """Whether the failed request was the commit itself, sent (not the preupload before it,
    and not one that never reached the server)."""
    if isinstance(exc, (httpx2.ConnectError, httpx2.ConnectTimeout, hub_http.DeadlineExceeded)):
        return False
    try:
        return "/commit/" in exc.request.url.path
    except RuntimeError:  # no request attached: assume the worst
        return True


def _copy_hashing(src: Path, dst: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as inp, open(dst, "wb") as out:
        while chunk := inp.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


__all__ = ["SCHEMA_VERSION", "HubOptions", "HubRegistry", "default_options", "make_api", "offline"]
