"""Training settings and checkpoints (safetensors + JSON, no pickles)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from blockctl.errors import InvalidInput
from blockctl.train import checkpoint
from blockctl.train.config import TrainConfig, lr_factor


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"steps": -3},
        {"batch_size": 0},
        {"grad_accum": -1},
        {"checkpoint_every": 0},
        {"lr": -1e-3},
        {"lr": float("nan")},
        {"embedding_lr": -1.0},
        {"roe_prob": 1.5},
        {"roe_prob": -0.1},
        {"roe_weight": -1.0},
        {"warmup_steps": -1},
        {"seed": -1},
        {"roe_batch_size": 0},
        {"roe_batch_size": 3, "batch_size": 2},
        {"mixed_precision": "fp8"},
        {"schedule": "wiggly"},
        {"roe_latents": "noise"},
    ],
)
def test_bad_settings_are_invalid_input(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        TrainConfig(**bad)  # type: ignore[arg-type]


def test_config_is_frozen_and_round_trips() -> None:
    config = TrainConfig(steps=7, roe=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3  # type: ignore[misc]
    assert TrainConfig.from_dict({**config.to_dict(), "unknown": 1}) == config
    assert not config.roe_active and TrainConfig().roe_active
    assert not TrainConfig(roe_prob=0.0).roe_active
    assert TrainConfig(batch_size=4).erasure_batch == 2
    assert TrainConfig(batch_size=1).erasure_batch == 1
    assert TrainConfig(batch_size=4, roe_batch_size=4).erasure_batch == 4


def test_lr_schedule_warms_up_then_follows_the_schedule() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, schedule="cosine")
    assert lr_factor(config, 0) == pytest.approx(0.1)
    assert lr_factor(config, 9) == pytest.approx(1.0)
    assert lr_factor(config, 10) == pytest.approx(1.0)
    assert lr_factor(config, 99) < 0.01
    assert lr_factor(TrainConfig(warmup_steps=0), 50) == 1.0
    linear = TrainConfig(steps=20, warmup_steps=0, schedule="linear")
    assert lr_factor(linear, 10) == pytest.approx(0.5)


def _optimizer_state() -> tuple[torch.nn.Parameter, torch.optim.AdamW]:
    param = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    opt.step()
    return param, opt


def test_checkpoint_round_trip_keeps_the_newest_two(tmp_path: Path) -> None:
    param, opt = _optimizer_state()
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, {"w": param * step}, opt.state_dict(), {"concept": "x"})
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-000002", "step-000003"]
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and ckpt.step == 3 and ckpt.meta["concept"] == "x"
    torch.testing.assert_close(ckpt.adapter_tensors()["w"], (param * 3).detach())
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=0.1)
    fresh.load_state_dict(ckpt.optimizer_state())
    for key in ("exp_avg", "exp_avg_sq", "step"):
        torch.testing.assert_close(
            fresh.state_dict()["state"][0][key], opt.state_dict()["state"][0][key]
        )
    files = {p.name for p in ckpt.path.iterdir()}
    assert files == {"state.safetensors", "state.json"}  # nothing pickled
    json.loads((ckpt.path / "state.json").read_text())


def test_half_written_checkpoints_are_ignored(tmp_path: Path) -> None:
    param, opt = _optimizer_state()
    checkpoint.save(tmp_path, 5, {"w": param}, opt.state_dict(), {})
    (checkpoint.checkpoint_dir(tmp_path) / "step-000009").mkdir()  # no state.json: incomplete
    ckpt = checkpoint.latest(tmp_path)
    assert ckpt is not None and ckpt.step == 5
    checkpoint.clear(tmp_path)
    assert checkpoint.latest(tmp_path) is None
