"""The option tables of ``docs/cli.md``, generated from the Typer app itself so they cannot
drift from ``--help`` (a test compares them): ``python -m blockctl.cli.reference --write``.

Only the text between the ``BEGIN``/``END`` markers of each command's section is generated; the
prose and the recorded sessions around it are written by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import typer

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
BLOCK = re.compile(
    r"(<!-- BEGIN options: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END options -->)", re.S
)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _help(param: Any) -> str:
    # The registry's default path comes from the environment at import: say how instead.
    text = _cell(getattr(param, "help", None) or "")
    return re.sub(r"\S+/blockctl/registry\b", "`$XDG_DATA_HOME/blockctl/registry`", text)


def _value(param: Any) -> str:
    if getattr(param, "is_flag", False):
        return ""
    annotation = param.type_descriptor.annotation
    if get_origin(annotation) in (list, tuple):
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        return " \\| ".join(f"`{c}`" for c in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):  # Optional[X]
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    names = {Path: "PATH", int: "INT", float: "FLOAT", str: "TEXT"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def _default(param: Any, fallbacks: dict[str, Any]) -> str:
    default = param.default
    if default is None:  # "the library's default": show it
        default = fallbacks.get(param.name)
    if default is None or default is False or default == () or default == []:
        return ""
    if callable(default):
        return ""
    if isinstance(default, (list, tuple)):
        return ", ".join(f"`{d}`" for d in default)
    if getattr(param, "is_flag", False) and default is True:
        return "on"
    return f"`{default}`"


def options_table(command: Any, fallbacks: dict[str, Any] | None = None) -> str:
    """One markdown table of a click command's arguments and options; ``fallbacks`` gives the
    default of an option whose CLI default is None (the library decides)."""
    fallbacks = fallbacks or {}
    rows = ["| argument / option | value | default | meaning |", "|---|---|---|---|"]
    for param in command.params:
        if param.name == "help":
            continue
        if param.param_type_name == "argument":
            label = f"`{param.name.upper()}`" + (" …" if param.nargs == -1 else "")
            label += "" if param.required or param.nargs == -1 else " (optional)"
            rows.append(f"| {label} | {_value(param)} | | {_help(param)} |")
            continue
        names = [*param.opts, *param.secondary_opts]
        label = ", ".join(f"`{n}`" for n in names)
        envvar = f" (env `{param.envvar}`)" if param.envvar else ""
        rows.append(
            f"| {label} | {_value(param)} | {_default(param, fallbacks)} | {_help(param)}{envvar} |"
        )
    return "\n".join(rows) + "\n"


def commands() -> dict[str, Any]:
    from blockctl.cli import app

    group = typer.main.get_command(app)
    return {"blockctl": group, **group.commands}  # type: ignore[attr-defined]


def render(text: str) -> str:
    """``text`` with every marked block regenerated."""
    from blockctl.train.config import TrainConfig

    found = commands()

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in found:
            raise SystemExit(f"docs/cli.md names an unknown command: {name}")
        fallbacks = TrainConfig().to_dict() if name == "train" else {}
        return match[1] + options_table(found[name], fallbacks) + match[4]

    return BLOCK.sub(replace, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite docs/cli.md in place")
    args = parser.parse_args()
    text = DOC.read_text()
    new = render(text)
    if args.write:
        DOC.write_text(new)
    elif new != text:
        sys.exit("docs/cli.md is out of date: run python -m blockctl.cli.reference --write")


if __name__ == "__main__":
    main()
