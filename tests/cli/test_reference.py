"""docs/cli.md's option tables are generated from the CLI; they must match it."""

from __future__ import annotations

from blockctl.cli.reference import BLOCK, DOC, commands, render


def test_docs_cli_tables_are_current() -> None:
    text = DOC.read_text()
    assert render(text) == text, "run: python -m blockctl.cli.reference --write"


def test_every_command_has_a_table() -> None:
    documented = {m["name"] for m in BLOCK.finditer(DOC.read_text())}
    assert documented == set(commands())


def test_train_table_shows_the_trainers_defaults() -> None:
    from blockctl.train.config import TrainConfig

    table = render("<!-- BEGIN options: train -->\n<!-- END options -->")
    assert f"| `--steps` | INT | `{TrainConfig().steps}` |" in table
    assert "`concept` \\| `mixed` \\| `random`" in table
