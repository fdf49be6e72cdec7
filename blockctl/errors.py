"""Errors a user can cause, each with the exit code the CLI reports.

Exit codes: 0 ok, 1 unexpected, 2 invalid input/usage, 3 slot conflict, 4 adapter or
merged-output validation failure, 5 registry unreachable or corrupt.
"""

from __future__ import annotations


class BlockctlError(Exception):
    """Base for every error meant for the user: one line, no traceback."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInput(BlockctlError):
    exit_code = 2


class SlotConflict(BlockctlError):
    """A slot, concept or token is taken, the pool is exhausted, or nothing is reserved."""

    exit_code = 3


class ValidationFailed(BlockctlError):
    """An adapter file or merged output failed a check."""

    exit_code = 4


class RegistryUnavailable(BlockctlError):
    """The registry is missing, unreachable, not a registry, or corrupt."""

    exit_code = 5
