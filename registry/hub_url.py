"""Hub registry locations: ``hf://[datasets/|models/]org/name[@revision]``.

The grammar is huggingface_hub's own ``hf://`` URI grammar (``parse_hf_uri``), narrowed to
what a registry can be: a model or dataset repo, the whole repo (no path inside it), and an
optional branch after ``@``. Without a type prefix the repo is a **model** repo, exactly as
every other ``hf://`` consumer (``HfFileSystem``, ``hf`` CLI) reads it; write
``hf://datasets/org/name`` for a dataset repo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from huggingface_hub.errors import HfUriError
from huggingface_hub.utils import parse_hf_uri

from blockctl.errors import InvalidInput

PREFIX = "hf://"
EXPECTED = "hf://[datasets/|models/]org/name[@revision]"
# the same, without square brackets (the CLI's rich console reads those as markup)
EXPECTED_WORDS = "hf://org/name or hf://datasets/org/name, optionally ending in @branch"
DEFAULT_BRANCH = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_PLURAL = {"model": "models", "dataset": "datasets"}


@dataclass(frozen=True)
class HubUrl:
    repo_type: str  # "model" | "dataset"
    repo_id: str  # "org/name"
    revision: str | None = None  # a branch (writable) or a commit sha (read-only)

    @property
    def branch(self) -> str:
        return self.revision or DEFAULT_BRANCH

    @property
    def pinned(self) -> bool:
        """Pinned to one commit: readable, never writable."""
        return bool(self.revision and _COMMIT.match(self.revision))

    def __str__(self) -> str:
        kind = "" if self.repo_type == "model" else f"{_PLURAL[self.repo_type]}/"
        rev = f"@{self.revision}" if self.revision else ""
        return f"{PREFIX}{kind}{self.repo_id}{rev}"


def parse_hub_url(location: str) -> HubUrl:
    """Parse a registry location; anything else is InvalidInput naming the expected form."""
    location = str(location).strip()

    def bad(why: str) -> InvalidInput:
        return InvalidInput(
            f"bad Hub registry location {location!r}: {why}", hint=f"expected {EXPECTED_WORDS}"
        )

    if not location.startswith(PREFIX):
        raise bad(f"it must start with {PREFIX}")
    try:
        uri = parse_hf_uri(location)
    except HfUriError as exc:
        raise bad(exc.msg.rstrip(". ")) from None
    if uri.type not in _PLURAL:
        raise bad(f"a registry is a model or dataset repo, not a {uri.type}")
    if uri.path_in_repo:
        raise bad(f"a registry is a whole repo, not a path inside one ({uri.path_in_repo!r})")
    return HubUrl(repo_type=uri.type, repo_id=uri.id, revision=uri.revision)
