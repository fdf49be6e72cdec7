"""``blockctl train`` through the CLI: bad input and exit codes, Ctrl-C, exact resume."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from blockctl.adapter import load_adapter
from blockctl.train import loop
from registry import Registry, open_registry
from tests.conftest import create_registry
from tests.support.cli import cli
from tests.support.photos import write_photos

QUICK = ("--no-sample", "--no-publish", "--batch-size", "1", "--warmup-steps", "1")


@pytest.fixture
def reg(tiny_base: Path, tmp_path: Path) -> Path:
    path = tmp_path / "reg"
    registry = create_registry(path, tiny_base)
    registry.reserve("rex", "<rex>", "dog", "alice")
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photos(tmp_path / "photos")


def test_train_writes_a_valid_adapter_and_reports_json(
    reg: Path, photos: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, stdout, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--steps",
        "2",
        "--out",
        str(out),
        "--json",
        *QUICK,
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 2 and summary["published"] is False
    assert summary["adapter"] == str(out / "rex.safetensors") and len(summary["sha256"]) == 64
    assert np.isfinite(summary["final_loss"]) and summary["seconds"] > 0
    adapter = load_adapter(out / "rex.safetensors")
    assert adapter.meta.slot == 0 and adapter.meta.tokens == ("<rex>",)
    assert adapter.meta.training["steps"] == 2 and adapter.meta.training["roe"] is True
    assert open_registry(str(reg)).adapters() == []


def test_empty_folder_is_exit_2(reg: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = cli(reg, "train", str(tmp_path / "empty"), "--concept", "rex", *QUICK)
    assert code == 2 and "no photos" in err and "Traceback" not in err


def test_no_readable_image_is_exit_2(reg: Path, tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"not an image")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, _, err = cli(reg, "train", str(folder), "--concept", "rex", *QUICK)
    assert code == 2 and "could be read" in err


def test_missing_folder_is_exit_2(reg: Path, tmp_path: Path) -> None:
    code, _, err = cli(reg, "train", str(tmp_path / "nope"), "--concept", "rex", *QUICK)
    assert code == 2 and "does not exist" in err


def test_corrupt_files_are_skipped_with_a_warning(reg: Path, photos: Path, tmp_path: Path) -> None:
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    code, stdout, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--steps",
        "1",
        "--out",
        str(tmp_path / "o"),
        "--json",
        *QUICK,
    )
    assert code == 0, err
    assert "skipping broken.jpg" in err
    assert json.loads(stdout)["skipped"] == ["broken.jpg"] and json.loads(stdout)["photos"] == 2


def test_concept_without_a_slot_is_exit_3_with_a_hint(reg: Path, photos: Path) -> None:
    code, _, err = cli(reg, "train", str(photos), "--concept", "nobody", *QUICK)
    assert code == 3 and "no reserved slot" in err and "reserve-slot" in err


def test_slot_of_another_owner_is_exit_3(reg: Path, photos: Path) -> None:
    code, _, err = cli(reg, "train", str(photos), "--concept", "rex", "--owner", "bob", *QUICK)
    assert code == 3 and "alice" in err


def test_other_base_is_exit_4(reg: Path, photos: Path, tmp_path: Path) -> None:
    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    other = save_pipeline(build_pipeline(TINY, seed=1), tmp_path / "other")
    code, _, err = cli(reg, "train", str(photos), "--concept", "rex", "--base", str(other), *QUICK)
    assert code == 4 and "fingerprint" in err


@pytest.mark.parametrize(
    "bad",
    [
        ("--steps", "0"),
        ("--steps", "-5"),
        ("--batch-size", "0"),
        ("--lr", "-1"),
        ("--roe-prob", "1.5"),
        ("--roe-weight", "-2"),
        ("--checkpoint-every", "-1"),
        ("--seed", "-1"),
        ("--grad-accum", "0"),
    ],
)
def test_bad_numbers_are_exit_2(reg: Path, photos: Path, bad: tuple[str, str]) -> None:
    code, _, err = cli(reg, "train", str(photos), "--concept", "rex", *QUICK, *bad)
    assert code == 2, err
    assert bad[0] in err


def test_non_finite_loss_stops_with_a_clear_error(
    reg: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop.roe, "erasure_loss", lambda s, t: torch.tensor(float("nan")))
    code, _, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--roe-prob",
        "1",
        "--out",
        str(tmp_path / "o"),
        *QUICK,
    )
    assert code == 1 and "loss became nan" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "rex.safetensors").exists()


def _interrupt_at(step: int) -> Callable[..., object]:
    """Wrap ``micro_batch`` so a real SIGINT arrives in the middle of ``step``."""
    original = loop.micro_batch

    def wrapped(inputs: loop.LoopInputs, s: int, micro: int, *share: int) -> object:
        if s == step - 1 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return original(inputs, s, micro, *share)

    return wrapped


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_adapter(path).tensors)


def test_ctrl_c_checkpoints_and_resume_matches_an_uninterrupted_run(
    reg: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = (
        "--steps",
        "4",
        "--seed",
        "7",
        "--roe-prob",
        "0.5",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "100",
        "--no-sample",
        "--no-publish",
    )
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    code, _, err = cli(
        reg, "train", str(photos), "--concept", "rex", *common, "--out", str(straight)
    )
    assert code == 0, err

    with monkeypatch.context() as m:
        m.setattr(loop, "micro_batch", _interrupt_at(2))
        code, _, err = cli(
            reg, "train", str(photos), "--concept", "rex", *common, "--out", str(broken)
        )
    assert code == 130, err
    assert "interrupted at step 2/4" in err and "--resume" in err and "Traceback" not in err
    assert (broken / "checkpoints" / "step-000002" / "state.safetensors").is_file()
    assert not (broken / "rex.safetensors").exists()

    # Settings come back from the checkpoint: the resume command needs none of them.
    code, stdout, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--resume",
        "--out",
        str(broken),
        "--no-sample",
        "--no-publish",
        "--json",
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert (
        summary["resumed_from"] == 2 and summary["steps"] == 4 and summary["settings"]["seed"] == 7
    )
    a, b = _tensors(straight / "rex.safetensors"), _tensors(broken / "rex.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)


def test_resume_refuses_a_checkpoint_of_another_concept(
    reg: Path, photos: Path, tmp_path: Path, tiny_base: Path
) -> None:
    registry: Registry = open_registry(str(reg))
    registry.reserve("tom", "<tom>", "cat", "alice")
    out = tmp_path / "shared"
    code, _, err = cli(
        reg,
        "train",
        str(photos),
        "--concept",
        "rex",
        "--steps",
        "2",
        "--checkpoint-every",
        "1",
        "--out",
        str(out),
        *QUICK,
    )
    assert code == 0, err
    code, _, err = cli(
        reg, "train", str(photos), "--concept", "tom", "--resume", "--out", str(out), *QUICK
    )
    assert code == 2 and "another run" in err
