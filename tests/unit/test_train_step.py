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


@pytest.mark.parametrize("text_encoder", [False, True])
def test_erasure_target_is_the_base_and_student_the_adapted_model(
    tiny_base: Path, tmp_path: Path, text_encoder: bool
) -> None:
    reg = create_registry(tmp_path / "reg", tiny_base, text_encoder=text_encoder)
    s = _session(reg, tmp_path, roe_prob=1.0, batch_size=2)
    noisy, t, ids, _, roe_ids = loop.micro_batch(s.inputs, 0, 0, 0)
    assert roe_ids is not None and roe_ids.shape[0] == s.inputs.config.erasure_batch == 1
    pred, student, target = s.model(noisy, t, ids, roe_ids)
    assert student is not None and target is not None
    comps, adapter = s.inputs.components, s.inputs.adapter
    with torch.no_grad():
        with adapter.disabled():
            base = comps.unet(noisy[:1], t[:1], comps.text_encoder(roe_ids)[0]).sample
        adapted = comps.unet(noisy[:1], t[:1], comps.text_encoder(roe_ids)[0]).sample
        concept = comps.unet(noisy, t, comps.text_encoder(ids)[0]).sample
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
        _, _, ids, _, roe_ids = loop.micro_batch(s.inputs, step, 0, 0)
        assert roe_ids is not None and token_id not in roe_ids.tolist()[0]
        assert all(token_id in row for row in ids.tolist())


def test_no_roe_and_the_draws_are_a_function_of_seed_and_step(
    tiny_registry: Registry, tmp_path: Path
) -> None:
    s = _session(tiny_registry, tmp_path, roe=False)
    a = loop.micro_batch(s.inputs, 5, 0, 0)
    b = loop.micro_batch(s.inputs, 5, 0, 0)
    c = loop.micro_batch(s.inputs, 6, 0, 0)
    assert a[4] is None
    assert all(torch.equal(x, y) for x, y in zip(a[:4], b[:4], strict=True))
    assert not torch.equal(a[0], c[0])
