"""sqlite-utils' ``Database``, imported without its optional numpy and pandas.

sqlite-utils imports numpy (and pandas, when installed) only to map their scalar types to column
types; the registry stores Python values only. Importing numpy costs more than everything else
``blockctl slots`` does (0.2 s CPU of its 0.47 s on the development machine), so sqlite-utils is
imported with both blocked — unless the process already imported them, then it sees them as
usual. Either way the registry behaves the same.
"""

from __future__ import annotations

import importlib
import sys

_OPTIONAL = ("numpy", "pandas")


def _import_without_optional() -> None:
    if "sqlite_utils" in sys.modules:
        return
    blocked = [name for name in _OPTIONAL if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` fail
    try:
        importlib.import_module("sqlite_utils")
    finally:
        for name in blocked:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


_import_without_optional()

from sqlite_utils import Database  # noqa: E402  (already imported above, numpy-free)

__all__ = ["Database"]
