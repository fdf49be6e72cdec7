"""init, reserve-slot, slots, release-slot, publish, verify through the CLI: output, JSON,
exit codes, and a registry left unchanged by every bad input."""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blockctl.adapter import load_adapter, write_adapter
from blockctl.layout import sha256_file
from registry import open_registry
from tests.support.cli import cli


@pytest.fixture
def reg(tiny_base: Path, tmp_path: Path) -> Path:
    path = tmp_path / "reg"
    code, _, err = cli(path, "init", "--base", str(tiny_base), "--slots", "4", "--rank", "2")
    assert code == 0, err
    return path


def snapshot(path: Path) -> tuple[list[dict], list[dict]]:
    r = open_registry(str(path))
    return [s.to_dict() for s in r.slots()], [a.to_dict() for a in r.adapters()]


def test_init_reports_layout_as_json(tiny_base: Path, tmp_path: Path) -> None:
    code, out, _ = cli(
        tmp_path / "r", "init", "--base", str(tiny_base), "--slots", "8", "--rank", "4",
        "--targets", "attn", "--text-encoder", "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["layout"]["slots"] == 8 and data["layout"]["preset"] == "attn"
    assert any(t["name"].startswith("text_encoder.") for t in data["layout"]["targets"])
    assert (tmp_path / "r" / "basis.safetensors").is_file()


def test_init_refuses_existing_registry_and_bad_layouts(
    reg: Path, tiny_base: Path, tmp_path: Path
) -> None:
    code, _, err = cli(reg, "init", "--base", str(tiny_base))
    assert code == 2 and "already exists" in err
    code, _, err = cli(
        tmp_path / "x", "init", "--base", str(tiny_base), "--slots", "17", "--rank", "2"
    )
    assert code == 2 and "narrowest target" in err and not (tmp_path / "x").exists()
    code, _, err = cli(tmp_path / "y", "init", "--base", str(tmp_path / "nope"))
    assert code == 2 and not (tmp_path / "y").exists()


def test_reserve_list_release_cycle(reg: Path) -> None:
    code, out, _ = cli(reg, "reserve-slot", "rex", "--token", "<rex>", "--class-word", "dog",
                       "--owner", "studio-a", "--json")  # fmt: skip
    assert code == 0 and json.loads(out)["slot"] == 0
    code, out, _ = cli(reg, "reserve-slot", "tabby", "--class-word", "cat", "--slot", "2")
    assert code == 0 and "slot 2" in out
    code, out, _ = cli(reg, "slots", "--json")
    rows = json.loads(out)
    first = rows[0]
    assert (first["slot"], first["concept"], first["token"], first["owner"], first["status"]) == (
        0, "rex", "<rex>", "studio-a", "reserved"
    )  # fmt: skip
    assert rows[1]["token"] == "<tabby>"
    code, out, _ = cli(reg, "slots")
    assert code == 0 and "rex" in out and "tabby" in out
    code, out, _ = cli(reg, "release-slot", "rex")
    assert code == 0 and "free again" in out
    code, out, _ = cli(reg, "reserve-slot", "bolt", "--class-word", "dog", "--json")
    assert json.loads(out)["slot"] == 0  # the released, never-published slot came back


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["rex", "--class-word", "dog"], 3, "rex"),  # concept taken
        (["other", "--token", "<rex>", "--class-word", "dog"], 3, "<rex>"),  # token taken
        (["other", "--class-word", "dog", "--slot", "0"], 3, "slot 0"),  # slot taken
        (["other", "--class-word", "dog", "--slot", "9"], 2, "9"),  # no such slot
        (["", "--class-word", "dog"], 2, "empty"),
        (["x" * 65, "--class-word", "dog"], 2, "longer than 64"),
        (["a/b", "--class-word", "dog"], 2, "/"),
        (["a\\b", "--class-word", "dog"], 2, "\\"),
        (["a..b", "--class-word", "dog"], 2, ".."),
        (["a b", "--class-word", "dog"], 2, "whitespace"),
        (["a\x07b", "--class-word", "dog"], 2, "control"),
        (["ok", "--token", "<a b>", "--class-word", "dog"], 2, "whitespace"),
        (["ok", "--token", "", "--class-word", "dog"], 2, "empty"),
        (["ok", "--class-word", "two words"], 2, "whitespace"),
    ],
)
def test_bad_reservations_change_nothing(
    reg: Path, args: list[str], code: int, needle: str
) -> None:
    assert cli(reg, "reserve-slot", "rex", "--token", "<rex>", "--class-word", "dog")[0] == 0
    before = snapshot(reg)
    got, _, err = cli(reg, "reserve-slot", *args)
    assert got == code, err
    assert needle in err and "Traceback" not in err
    assert snapshot(reg) == before


def test_exhausted_pool(reg: Path) -> None:
    for name in "abcd":
        assert cli(reg, "reserve-slot", name, "--class-word", "dog")[0] == 0
    before = snapshot(reg)
    code, _, err = cli(reg, "reserve-slot", "e", "--class-word", "dog")
    assert code == 3 and "all 4 slots" in err
    assert snapshot(reg) == before


def test_release_by_other_owner_or_unknown(reg: Path) -> None:
    cli(reg, "reserve-slot", "rex", "--class-word", "dog", "--owner", "studio-a")
    before = snapshot(reg)
    code, _, err = cli(reg, "release-slot", "rex", "--owner", "studio-b")
    assert code == 3 and "studio-a" in err
    assert cli(reg, "release-slot", "ghost")[0] == 3
    assert snapshot(reg) == before


@pytest.mark.parametrize("state", ["missing", "not-a-registry", "corrupt"])
def test_unusable_registry_exits_5(tmp_path: Path, state: str) -> None:
    path = tmp_path / "reg"
    if state != "missing":
        path.mkdir()
    if state == "corrupt":
        (path / "registry.db").write_bytes(b"this is not sqlite" * 100)
        (path / "basis.safetensors").write_bytes(b"")
    for args in (["slots"], ["reserve-slot", "rex", "--class-word", "dog"], ["verify"]):
        code, _, err = cli(path, *args)
        assert code == 5, (args, err)
        assert "Traceback" not in err


# --- publish and verify --------------------------------------------------------------

Mutation = Callable[[Path, Path], None]


def _rewrite(src: Path, dst: Path, *, tensors=None, **meta) -> None:  # type: ignore[no-untyped-def]
    adapter = load_adapter(src)
    t = dict(adapter.tensors)
    if tensors is not None:
        tensors(t)
    write_adapter(dst, t, dataclasses.replace(adapter.meta, **meta))


def _raw(src: Path, dst: Path, data: bytes) -> None:
    dst.write_bytes(data)


def _flip_payload_byte(src: Path, dst: Path) -> None:
    raw = bytearray(src.read_bytes())
    raw[-3] ^= 0xFF
    dst.write_bytes(bytes(raw))


def _huge_header(src: Path, dst: Path) -> None:
    dst.write_bytes(struct.pack("<Q", 1 << 40) + src.read_bytes()[8:])


def _lying_header(src: Path, dst: Path) -> None:
    raw = src.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 2 for s in header[key]["shape"]]
    blob = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def _first_up(t: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(t) if k.endswith("lora_B.weight"))


BAD_ADAPTERS: dict[str, tuple[Mutation, str]] = {
    "not safetensors": (lambda s, d: _raw(s, d, b"PK\x03\x04 a zip file"), "not a safetensors"),
    "truncated": (lambda s, d: _raw(s, d, s.read_bytes()[:-50]), "truncated"),
    "header lies": (_lying_header, "lies about"),
    "huge header": (_huge_header, "header claims"),
    "wrong layout": (lambda s, d: _rewrite(s, d, layout_hash="0" * 64), "another layout"),
    "other base": (lambda s, d: _rewrite(s, d, base_fingerprint="0" * 64), "another base"),
    "slot not reserved": (lambda s, d: _rewrite(s, d, slot=2), "holds slot 0"),
    "concept not reserved": (lambda s, d: _rewrite(s, d, concept="ghost"), "no slot is reserved"),
    "missing key": (lambda s, d: _rewrite(s, d, tensors=lambda t: t.pop(_first_up(t))), "missing"),
    "extra key": (
        lambda s, d: _rewrite(s, d, tensors=lambda t: t.update(extra=torch.zeros(1))),
        "unexpected",
    ),
    "wrong shape": (
        lambda s, d: _rewrite(s, d, tensors=lambda t: t.update({_first_up(t): torch.zeros(3, 3)})),
        "shape",
    ),
    "nan": (
        lambda s, d: _rewrite(
            s, d, tensors=lambda t: t[_first_up(t)].__setitem__((0, 0), float("nan"))
        ),
        "NaN",
    ),
    "inf": (
        lambda s, d: _rewrite(
            s, d, tensors=lambda t: t[_first_up(t)].__setitem__((0, 0), float("inf"))
        ),
        "inf",
    ),
    "sha mismatch": (_flip_payload_byte, "sha256"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_publish_refuses_bad_adapters(
    reg: Path, adapter_factory, tmp_path: Path, case: str
) -> None:  # type: ignore[no-untyped-def]
    registry = open_registry(str(reg))
    good = adapter_factory(registry, "rex")
    bad = tmp_path / "bad.safetensors"
    mutate, reason = BAD_ADAPTERS[case]
    mutate(good, bad)
    before = snapshot(reg)
    code, _, err = cli(reg, "publish", str(bad))
    assert code == 4, err
    assert reason in err and "Traceback" not in err
    assert snapshot(reg) == before


def test_publish_then_verify(reg: Path, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    registry = open_registry(str(reg))
    for i, name in enumerate(["rex", "tabby", "vangogh"]):
        path = adapter_factory(registry, name, seed=i)
        code, out, err = cli(reg, "publish", str(path), "--json")
        assert code == 0, err
        rec = json.loads(out)
        assert rec["concept"] == name and rec["sha256"] == sha256_file(path)
    code, out, _ = cli(reg, "slots", "--json")
    assert [r["status"] for r in json.loads(out)] == ["published"] * 3
    code, out, _ = cli(reg, "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and len(report["adapters"]) == 3
    assert report["max_cross_product"] <= 1e-5
    code, out, _ = cli(reg, "verify")
    assert code == 0 and "intact and disjoint" in out

    # releasing a published concept keeps its slot burnt
    code, out, _ = cli(reg, "release-slot", "tabby", "--json")
    assert code == 0 and json.loads(out)["status"] == "released"
    code, out, _ = cli(reg, "reserve-slot", "new", "--class-word", "dog", "--json")
    assert json.loads(out)["slot"] == 3


def test_verify_detects_a_damaged_stored_adapter(reg: Path, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    registry = open_registry(str(reg))
    path = adapter_factory(registry, "rex")
    assert cli(reg, "publish", str(path))[0] == 0
    stored = registry.adapter_file("rex")
    stored.chmod(0o644)
    raw = bytearray(stored.read_bytes())
    raw[-1] ^= 0x01
    stored.write_bytes(bytes(raw))
    code, out, _ = cli(reg, "verify", "--json")
    assert code == 4
    report = json.loads(out)
    assert not report["ok"] and "sha256" in " ".join(report["adapters"][0]["problems"])


def test_help_explains_commands() -> None:
    result = cli(None, "--help")
    assert result.code == 0
    for cmd in ("init", "reserve-slot", "release-slot", "slots", "publish", "verify"):
        assert cmd in result.stdout
