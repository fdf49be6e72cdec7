"""Several processes share one batch: every process draws the whole step alike, takes its equal
part, and the mean of the parts' gradients is the whole batch's gradient. One process draws and
trains exactly as before multi-process training existed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from blockctl.errors import InvalidInput
from blockctl.train import loop
from blockctl.train.config import TrainConfig
from blockctl.train.run import Session, TrainRequest, launch_note, prepare
from tests.conftest import create_registry
from tests.support.photos import write_photos

# Exercises every draw of a step: photos, flips, noise, timesteps, ROE prompts with stand-ins
# and empty prompts, Gaussian erasure latents.
SETTINGS = dict(
    batch_size=4, roe_batch_size=2, roe_standin=0.5, roe_empty=0.2, roe_latents="mixed",
    token_norm_bound=1.0,
)  # fmt: skip


def _session(tiny_base: Path, tmp_path: Path, **overrides: object) -> Session:
    reg = create_registry(tmp_path / "reg", tiny_base)
    reg.reserve("rex", "<rex>", "dog", "alice")
    request = TrainRequest(
        photos=write_photos(tmp_path / "photos", n=3),
        concept="rex",
        out_dir=tmp_path / "run",
        overrides={**SETTINGS, **overrides},
    )
    return prepare(reg, request, say=lambda _m: None)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(str(t.tolist()).encode()).hexdigest()[:12]


def _sums(t: torch.Tensor, places: int) -> list[float]:
    return [round(float(x), places) for x in t.flatten(1).sum(1)]


def _fingerprint(b: loop.MicroBatch) -> dict[str, Any]:
    e = b.erasure
    assert e is not None and e.standins is not None
    return {
        "t": b.timesteps.tolist(),
        "target": _sums(b.target, 4),
        "noisy": _sums(b.noisy, 3),
        "ids": _digest(b.ids),
        "e_ids": _digest(e.ids),
        "e_t": e.timesteps.tolist(),
        "e_noisy": _sums(e.noisy, 3),
        "standins": round(float(e.standins.sum()), 4),
    }


# Computed with the code before multi-process sharing (commit 52dd7a3), where each process
# drew its own batch with its index in the seed: one process must still draw exactly this.
BEFORE = [
    {"t": [430, 381, 137, 594], "target": [-6.4422, -2.3097, 22.5262, -6.7532],
     "noisy": [-28.798, -22.742, -27.888, -23.722], "ids": "d505ab05f8b5",
     "e_ids": "354542faaa04", "e_t": [430, 381], "e_noisy": [84.402, -22.742],
     "standins": 0.1222},
    {"t": [48, 662, 65, 868], "target": [0.9284, 19.2434, -7.7959, -44.7343],
     "noisy": [-38.432, 4.134, -43.343, -51.197], "ids": "d505ab05f8b5",
     "e_ids": "06c59e1e8b7c", "e_t": [48, 662], "e_noisy": [-38.432, 4.134],
     "standins": -0.0573},
    {"t": [770, 427, 666, 929], "target": [-0.2416, 14.3385, -10.4502, 3.3676],
     "noisy": [-10.389, -17.424, -29.337, -0.915], "ids": "d505ab05f8b5",
     "e_ids": "4db68f39b0ff", "e_t": [770, 427], "e_noisy": [-11.266, -17.424],
     "standins": -0.0733},
    {"t": [576, 903, 493, 587], "target": [11.0912, -55.5596, 0.4281, -45.3349],
     "noisy": [-5.607, -59.776, -17.842, -61.627], "ids": "d505ab05f8b5",
     "e_ids": "c2b63e2302f0", "e_t": [576, 903], "e_noisy": [-5.607, -59.776],
     "standins": 0.1203},
]  # fmt: skip
BEFORE_LOSSES = [1.10144, 1.12673, 1.12663]  # 3 steps
BEFORE_TOKEN_ABS_SUM = 0.30806  # Σ|row| of the learnt token after them
BEFORE_FIRST_B_ABS_SUM = 0.03575  # Σ|B| of the first target after them


def test_one_process_draws_and_trains_as_before(tiny_base: Path, tmp_path: Path) -> None:
    s = _session(tiny_base, tmp_path, steps=3)
    assert [_fingerprint(loop.micro_batch(s.inputs, step, 0)) for step in range(4)] == BEFORE
    state = loop.run(s.inputs, s.accelerator, s.model, s.optimizer, s.state)
    assert [round(x, 5) for x in state.losses] == BEFORE_LOSSES
    tensors = s.inputs.adapter.state_tensors()
    assert round(float(tensors["token_embedding.<rex>"].abs().sum()), 5) == BEFORE_TOKEN_ABS_SUM
    first = min(k for k in tensors if k.startswith("unet."))
    assert round(float(tensors[first].abs().sum()), 5) == BEFORE_FIRST_B_ABS_SUM


@pytest.mark.parametrize("world", [2, 4])
def test_the_shares_put_back_together_are_the_whole_batch(
    tiny_base: Path, tmp_path: Path, world: int
) -> None:
    """Concept items are split; the 2 erasure prompts are split over 2 processes and go whole
    to each of 4; the stand-in rows (looked up by number) always go whole."""
    s = _session(tiny_base, tmp_path)
    whole = loop.micro_batch(s.inputs, 0, 0)
    parts = [loop.micro_batch(s.inputs, 0, 0, rank, world) for rank in range(world)]
    for name in ("noisy", "timesteps", "ids", "target"):
        assert all(getattr(p, name).shape[0] == 4 // world for p in parts)
        assert torch.equal(torch.cat([getattr(p, name) for p in parts]), getattr(whole, name))
    e = whole.erasure
    assert e is not None and e.standins is not None
    es = [p.erasure for p in parts]
    for x in es:
        assert x is not None and x.standins is not None and torch.equal(x.standins, e.standins)
    for name in ("ids", "noisy", "timesteps"):
        got = [getattr(x, name) for x in es]
        if world == 2:
            assert torch.equal(torch.cat(got), getattr(e, name))
        else:
            assert all(torch.equal(g, getattr(e, name)) for g in got)


def _grads(s: Session, batches: list[loop.MicroBatch]) -> list[torch.Tensor]:
    """The mean over ``batches`` of each one's loss gradient: what DDP's all-reduce gives."""
    params = s.inputs.adapter.slot_parameters() + s.inputs.adapter.embedding_parameters()
    for p in params:
        p.grad = None
    for batch in batches:
        loss, erased = loop.step_loss(s.inputs.config, s.model, batch, "cpu")
        assert erased
        (loss / len(batches)).backward()
    return [p.grad.clone() for p in params if p.grad is not None]


@pytest.mark.parametrize("world", [2, 4])
def test_the_mean_of_the_shares_gradients_is_the_whole_batch_gradient(
    tiny_base: Path, tmp_path: Path, world: int
) -> None:
    s = _session(tiny_base, tmp_path)
    with torch.no_grad():  # a trained-looking adapter, so the erasure loss has a gradient
        for p in s.inputs.adapter.slot_parameters():
            p.normal_(0, 0.5)
    whole = _grads(s, [loop.micro_batch(s.inputs, 1, 0)])
    shared = _grads(s, [loop.micro_batch(s.inputs, 1, 0, r, world) for r in range(world)])
    assert len(whole) == len(shared) == len(s.inputs.adapter.slot_parameters()) + 1
    for w, g in zip(whole, shared, strict=True):
        assert float(w.abs().max()) > 0
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_a_batch_the_processes_cannot_share_equally_is_refused() -> None:
    TrainConfig(batch_size=4).check_processes(2)
    TrainConfig(batch_size=3).check_processes(1)
    with pytest.raises(InvalidInput, match="--batch-size 3 does not split evenly over 2") as err:
        TrainConfig(batch_size=3).check_processes(2)
    assert err.value.exit_code == 2 and err.value.hint is not None and "4" in err.value.hint


def test_a_cpu_launch_that_started_one_process_is_pointed_out() -> None:
    """``accelerate launch --cpu --num_processes 2`` starts ONE process, with a port set."""
    launched = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    note = launch_note(launched, 1)
    assert note is not None and "ONE process" in note and "--multi_gpu" in note
    assert launch_note(launched, 2) is None  # really several (mpirun)
    assert launch_note({"ACCELERATE_USE_CPU": "True"}, 1) is None  # asked for one
    assert launch_note({}, 1) is None  # plain ``blockctl train``
