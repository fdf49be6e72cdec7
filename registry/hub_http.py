"""Bounded network calls for the Hub registry.

huggingface_hub sends every request through one shared ``httpx2`` client that has no timeout
(``timeout=None``), and retries some calls on its own (preupload, tree pages and downloads:
up to 5 more tries, sleeping up to 8 s in between, a download look-up once more with a 60 s
timeout). A server that accepts connections but never answers would hang a command.

Inside ``bounded(seconds)`` every request this thread sends waits at most ``seconds`` for
the server (connect, each read, each write), and no new request starts once ``seconds``
have passed since the block began: it fails with ``DeadlineExceeded``, which huggingface_hub
does not retry. So one call that gets no answer ends within about twice ``seconds`` (plus
one of the library's sleeps). Outside such a block the client behaves exactly as before.

The limit is an extra request hook on the clients huggingface_hub's client factory makes
(``install`` wraps whatever factory is set, once per process), kept in a context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
import time
from collections.abc import Callable, Iterator

import httpx2
from huggingface_hub import set_client_factory
from huggingface_hub.utils import _http

_TIMEOUT_KEYS = ("connect", "read", "write", "pool")
_limit: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "blockctl_hub_limit", default=None
)
_installed = False
_install_lock = threading.Lock()


class DeadlineExceeded(httpx2.TransportError):
    """No answer within the time a registry call may take (not retried by huggingface_hub)."""


@contextlib.contextmanager
def bounded(seconds: float) -> Iterator[None]:
    """Requests sent inside wait at most ``seconds`` each, and none starts after ``seconds``."""
    token = _limit.set((seconds, time.monotonic() + seconds))
    try:
        yield
    finally:
        _limit.reset(token)


def _limit_request(request: httpx2.Request) -> None:
    limit = _limit.get()
    if limit is None:
        return
    seconds, deadline = limit
    if time.monotonic() >= deadline:
        raise DeadlineExceeded(f"no answer within {seconds:g} s", request=request)
    given = request.extensions.get("timeout") or {}
    timeout = {}
    for key in _TIMEOUT_KEYS:
        value = given.get(key)
        timeout[key] = min(seconds, math.inf if value is None else float(value))
    request.extensions = {**request.extensions, "timeout": timeout}


def _with_limit(factory: Callable[[], httpx2.Client]) -> Callable[[], httpx2.Client]:
    def make() -> httpx2.Client:
        client = factory()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _limit_request]}
        return client

    return make


def install() -> None:
    """Add the limit to huggingface_hub's clients (idempotent; the shared client is rebuilt)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        # the factory in use (the library's default unless the user set one) is not public
        current = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)
        set_client_factory(_with_limit(current))
        _installed = True


__all__ = ["DeadlineExceeded", "bounded", "install"]
