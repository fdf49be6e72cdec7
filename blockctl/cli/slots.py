"""Registry commands: init, reserve-slot, release-slot, slots."""

from __future__ import annotations

import getpass
import os
from typing import Annotated

import typer
from rich.table import Table

from blockctl.base_model import TOY
from blockctl.cli.common import JSON_OPTION, console, emit_json, open_registry, settings
from blockctl.layout import DEFAULT_PRESET, Preset, layout_of
from blockctl.names import check_concept, check_token, check_word, default_token

OWNER_ENV = "BLOCKCTL_OWNER"


def default_owner() -> str:
    return os.environ.get(OWNER_ENV) or getpass.getuser()


def init(
    ctx: typer.Context,
    base: str = typer.Option(
        TOY, "--base", help="Base model: 'toy' (embedded), a diffusers folder, or a Hub id."
    ),
    slots: int = typer.Option(
        16, "--slots", "-n", help="Number of slots N (N·rank ≤ narrowest target)."
    ),
    rank: int = typer.Option(4, "--rank", help="Rank r of one slot."),
    targets: Annotated[
        Preset,
        typer.Option(
            "--targets",
            help="Target preset: cross-kv = the UNet's cross-attention to_k/to_v, attn = every "
            "UNet attention projection.",
        ),
    ] = DEFAULT_PRESET,
    text_encoder: bool = typer.Option(
        False, "--text-encoder", help="Also put slots on the CLIP text encoder's attention."
    ),
    scale: float = typer.Option(1.0, "--scale", help="Scale applied to every slot's B·A."),
    seed: int = typer.Option(0, "--seed", help="Seed of the orthonormal basis."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Create a registry bound to one base model and slot layout."""
    from blockctl.initialize import init_registry

    reg = open_registry(ctx)
    with console.status("Reading the base and drawing the basis…"):
        layout = init_registry(
            reg, base, preset=targets, text_encoder=text_encoder, slots=slots, rank=rank,
            scale=scale, seed=seed,
        )  # fmt: skip
    if json_out:
        emit_json({"registry": reg.location, "layout": layout.to_dict()})
        return
    console.print(
        f"Created registry [bold]{reg.location}[/]: {layout.slots} slots of rank {layout.rank} "
        f"on {len(layout.targets)} {layout.preset} targets of base {base!r}\n"
        f"layout {layout.layout_hash[:12]}  base fingerprint {layout.base_fingerprint[:12]}",
        highlight=False,
    )


def reserve_slot(
    ctx: typer.Context,
    concept: str = typer.Argument(..., help="Concept name (letters, digits, _ . -)."),
    token: str = typer.Option(None, "--token", help="Trigger token; default <CONCEPT>."),
    class_word: str = typer.Option(..., "--class-word", help="Prior class, e.g. dog."),
    owner: str = typer.Option(
        None, "--owner", help=f"Who holds the slot; default ${OWNER_ENV} or your user."
    ),
    slot: int = typer.Option(
        None, "--slot", help="Ask for this slot instead of the lowest free one."
    ),
    json_out: bool = JSON_OPTION,
) -> None:
    """Reserve a slot (and a unique trigger token) for a concept."""
    check_concept(concept)
    tok = check_token(token if token is not None else default_token(concept))
    check_word("class word", class_word)
    who = check_word("owner", owner or default_owner())
    record = open_registry(ctx).reserve(concept, tok, class_word, who, slot=slot)
    if json_out:
        emit_json(record.to_dict())
        return
    console.print(
        f"Reserved slot [bold]{record.slot}[/] for [bold]{record.concept}[/] "
        f"(token {record.token}, class {record.class_word}, owner {record.owner})",
        highlight=False,
    )


def release_slot(
    ctx: typer.Context,
    concept: str = typer.Argument(..., help="Concept whose slot to give up."),
    owner: str = typer.Option(None, "--owner", help="Only release if held by this owner."),
    json_out: bool = JSON_OPTION,
) -> None:
    """Release a concept's slot. Never published: the slot returns to the pool."""
    check_concept(concept)
    record = open_registry(ctx).release(concept, owner=owner)
    freed = record.published_at is None
    if json_out:
        emit_json({**record.to_dict(), "slot_freed": freed})
        return
    if not freed:
        console.print(
            f"Released [bold]{concept}[/]; slot {record.slot} stays burnt because its adapter "
            "was published.",
            highlight=False,
        )
    else:
        console.print(
            f"Released [bold]{concept}[/]; slot {record.slot} is free again.", highlight=False
        )


def list_slots(ctx: typer.Context, json_out: bool = JSON_OPTION) -> None:
    """List the registry's slots: who holds which, and their status."""
    reg = open_registry(ctx)
    layout = layout_of(reg)
    records = reg.slots()
    if json_out:
        emit_json([r.to_dict() for r in records])
        return
    table = Table(title=f"{settings(ctx).registry} — {len(records)} of {layout.slots} slots used")
    for col in ("slot", "concept", "token", "class", "owner", "status", "since"):
        table.add_column(col)
    for r in records:
        since = r.released_at or r.published_at or r.reserved_at
        table.add_row(str(r.slot), r.concept, r.token, r.class_word, r.owner, r.status, since[:19])
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
    app.command("reserve-slot")(reserve_slot)
    app.command("release-slot")(release_slot)
    app.command("slots")(list_slots)
