"""One training step's pieces: ROE's target is the base model, its loss never moves the token."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockctl.train import loop, roe
from blockctl.train.run import Session, TrainRequest, prepare
from registry import Registry
from tests.conftest import create_registry


def _session(reg: Registry, tmp_path: Path, **overrides: object) -> Session:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    if not any(r.concept == "rex" for r in reg.slots()):
        reg.reserve("rex", "<rex>", "dog", "alice")
        reg.reserve("tom", "<tom>", "cat", "bob")
    request = TrainRequest(
        photos=photos, concept="rex", out_dir=tmp_path / "o", overrides=overrides
    )
    session = prepare(reg, request, say=lambda m: None)
    with torch.no_grad():  # a trained-looking adapter, so "off" and "on" differ
        for p in session.inputs.adapter.slot_parameters():
            p.normal_(0, 0.5)
    return session


@pytest.mark.parametrize(("text_encoder", "latents"), [(False, "concept"), (True, "mixed")])
def test_erasure_target_is_the_base_and_student_the_adapted_model(
    tiny_base: Path, tmp_path: Path, text_encoder: bool, latents: str
) -> None:
    reg = create_registry(tmp_path / "reg", tiny_base, text_encoder=text_encoder)
    s = _session(reg, tmp_path, roe_prob=1.0, batch_size=2, roe_latents=latents)
    b = loop.micro_batch(s.inputs, 0, 0, 0)
    e = b.erasure
    assert e is not None and e.ids.shape[0] == s.inputs.config.erasure_batch == 1
    pred, student, target, _ = s.model(b.noisy, b.timesteps, b.ids, e)
    assert student is not None and target is not None
    comps, adapter = s.inputs.components, s.inputs.adapter
    with torch.no_grad():
        with adapter.disabled():
            base = comps.unet(e.noisy, e.timesteps, comps.text_encoder(e.ids)[0]).sample
        adapted = comps.unet(e.noisy, e.timesteps, comps.text_encoder(e.ids)[0]).sample
        concept = comps.unet(b.noisy, b.timesteps, comps.text_encoder(b.ids)[0]).sample
    torch.testing.assert_close(target, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(student, adapted, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pred, concept, rtol=1e-4, atol=1e-5)
    assert float((student - target).detach().abs().max()) > 1e-4

    roe.erasure_loss(student, target).backward()
    row = adapter.embedding.row.grad
    assert row is None or float(row.abs().max()) == 0.0  # the token is never in an erasure prompt
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0
               for p in adapter.slot_parameters())  # fmt: skip


def test_erasure_prompts_hold_no_token_and_know_other_concepts(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    s = _session(tiny_registry, tmp_path, roe_prob=1.0)
    pool = s.inputs.pool
    assert "<tom>" in pool.others and "tom" in pool.others
    prompts = pool.sample(random.Random(3), 200)
    assert not any("<rex>" in p for p in prompts)
    token_id = s.inputs.adapter.embedding.token_id
    for step in range(20):
        b = loop.micro_batch(s.inputs, step, 0, 0)
        assert b.erasure is not None and token_id not in b.erasure.ids.tolist()[0]
        assert all(token_id in row for row in b.ids.tolist())


def test_no_roe_and_the_draws_are_a_function_of_seed_and_step(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    s = _session(tiny_registry, tmp_path, roe=False)
    a = loop.micro_batch(s.inputs, 5, 0, 0)
    b = loop.micro_batch(s.inputs, 5, 0, 0)
    c = loop.micro_batch(s.inputs, 6, 0, 0)
    assert a.erasure is None
    for x, y in ((a.noisy, b.noisy), (a.timesteps, b.timesteps), (a.ids, b.ids)):
        assert torch.equal(x, y)
    assert not torch.equal(a.noisy, c.noisy)


def test_erasure_latents_modes() -> None:
    """``concept`` reuses the concept batch, ``random`` never does, ``mixed`` does both; the
    timesteps are always the concept batch's, and the draw is a function of the generator."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    noisy, t = torch.randn(8, 4, 8, 8), torch.arange(8) * 100
    ids = torch.zeros(8, 5, dtype=torch.long)

    def batch(mode: str, seed: int = 0) -> roe.ErasureBatch:
        gen = torch.Generator().manual_seed(seed)
        return roe.erasure_batch(ids, noisy, t, sched, mode, gen)

    def reused(e: roe.ErasureBatch) -> list[bool]:
        return [torch.equal(e.noisy[i], noisy[i]) for i in range(8)]

    assert all(reused(batch("concept")))
    assert not any(reused(batch("random")))
    mixed = reused(batch("mixed"))
    assert any(mixed) and not all(mixed)
    assert torch.equal(batch("mixed").noisy, batch("mixed").noisy)
    assert all(torch.equal(batch(m).timesteps, t) for m in ("concept", "mixed", "random"))
    assert float(batch("random").noisy.std()) == pytest.approx(1.0, abs=0.15)


def test_token_isolation_penalises_only_what_other_slots_can_see(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    """The penalty is the share of the token's change to the encoding inside other slots'
    subspaces: it moves the token row, never the slot blocks, and is off by default."""
    off = _session(tiny_registry, tmp_path)
    assert off.model.foreign is None
    s = _session(tiny_registry, tmp_path, token_isolation=1.0, roe=False)
    foreign = s.model.foreign
    assert foreign is not None
    layout = s.layout
    assert foreign.shape[0] == (layout.slots - 1) * layout.rank
    with torch.no_grad():
        s.inputs.adapter.embedding.row.add_(torch.randn_like(s.inputs.adapter.embedding.row))
    b = loop.micro_batch(s.inputs, 0, 0, 0)
    out = s.model(b.noisy, b.timesteps, b.ids)
    assert out.isolation is not None and 0.0 < float(out.isolation.detach()) <= 1.0
    out.isolation.backward()
    row = s.inputs.adapter.embedding.row.grad
    assert row is not None and float(row.abs().max()) > 0
    assert all(p.grad is None for p in s.inputs.adapter.slot_parameters())


def test_standin_erasure_targets_the_base_on_the_same_standin_embeddings(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    """A stand-in prompt's target is the base model fed the SAME stand-in rows, its student the
    adapted model on them; the learnt token row is never moved by it."""
    s = _session(
        tiny_registry, tmp_path, roe_prob=1.0, roe_standin=1.0, token_norm_bound=1.0,
        batch_size=2, roe_batch_size=2,
    )  # fmt: skip
    adapter, comps = s.inputs.adapter, s.inputs.components
    b = next(
        m for step in range(10) if (m := loop.micro_batch(s.inputs, step, 0, 0)).erasure
        and m.erasure.standins is not None
    )  # fmt: skip
    e = b.erasure
    assert e is not None and e.standins is not None
    first = adapter.embedding.scratch_start
    assert int((e.ids >= first).sum()) == e.standins.shape[0] >= 2
    assert adapter.embedding.token_id not in e.ids.tolist()[0]
    max_norm = adapter.embedding.max_norm
    assert max_norm is not None and float(e.standins.norm(dim=1).max()) <= max_norm + 1e-6
    _, student, target, _ = s.model(b.noisy, b.timesteps, b.ids, e)
    assert student is not None and target is not None
    with torch.no_grad():
        adapter.embedding.set_scratch(e.standins)
        cond = comps.text_encoder(e.ids)[0]
        with adapter.disabled():
            base = comps.unet(e.noisy, e.timesteps, cond).sample
        adapter.embedding.set_scratch(None)
    torch.testing.assert_close(target, base, rtol=1e-4, atol=1e-5)
    assert adapter.embedding.scratch.shape[0] == 0  # cleared after the step's forward
    roe.erasure_loss(student, target).backward()
    row = adapter.embedding.row.grad
    assert row is None or float(row.abs().max()) == 0.0


def test_bound_holds_through_training_and_the_strength_curve_is_kept(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    s = _session(tiny_registry, tmp_path, token_norm_bound=1.0, steps=4, embedding_lr=1.0)
    state = loop.run(s.inputs, s.accelerator, s.model, s.optimizer, s.state)
    emb = s.inputs.adapter.embedding
    assert emb.max_norm is not None and float(emb.row.norm()) <= emb.max_norm + 1e-6
    assert [step for step, _ in state.strength] == [4]  # every 50 steps, and the last
    assert state.strength[0][1] > 0


def test_strength_target_stops_a_run_early_and_a_high_one_runs_to_the_end(
    tiny_registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockctl.train.strength import smoothed

    monkeypatch.setattr(loop, "STRENGTH_EVERY", 2)  # sample every 2 steps: a short test
    low = _session(tiny_registry, tmp_path, steps=40, strength_target=1e-12, min_steps=4)
    state = loop.run(low.inputs, low.accelerator, low.model, low.optimizer, low.state)
    assert state.step == 6 and state.strong_enough  # 3 samples (2, 4, 6) to smooth over
    assert [s for s, _ in state.strength] == [2, 4, 6]
    high = _session(tiny_registry, tmp_path, steps=4, strength_target=1e9, min_steps=1)
    state = loop.run(high.inputs, high.accelerator, high.model, high.optimizer, high.state)
    assert state.step == 4 and not state.strong_enough
    assert smoothed([(1, 1.0), (2, 2.0)]) is None and smoothed([(1, 1.0)] * 3) == 1.0
