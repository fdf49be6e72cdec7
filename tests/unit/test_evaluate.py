"""Identity metrics on the tiny base: exact cases that must hold to rounding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from blockctl.errors import InvalidInput
from blockctl.evaluate import (
    EvalConfig,
    concept_metrics,
    evaluate,
    full_metrics,
    ratio,
    summarize,
)
from blockctl.layout import sha256_file
from registry import Registry

CONFIG = EvalConfig(samples=2, seed=0, images=0)


def publish(reg: Registry, path: Path, concept: str) -> None:
    reg.publish(concept, path, sha256_file(path))


def test_single_concept_merge_keeps_all_of_it(tiny_registry: Registry, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    publish(tiny_registry, adapter_factory(tiny_registry, "rex", magnitude=0.5), "rex")
    (m,) = evaluate(tiny_registry, ["rex"], None, CONFIG)
    assert m.delta_sq > 0
    assert m.retention == pytest.approx(1.0, abs=1e-5)
    assert m.crosstalk == pytest.approx(0.0, abs=1e-6)
    assert m.fidelity == pytest.approx(1.0, abs=1e-5)
    assert m.prior_interference == pytest.approx(m.prior_drift, rel=1e-5)
    # The guided and empty-prompt figures of one concept are its own too.
    assert m.guided_retention == pytest.approx(1.0, abs=1e-5)
    assert m.guided_crosstalk == pytest.approx(0.0, abs=1e-6)
    assert m.empty_interference == pytest.approx(m.empty_drift, rel=1e-5)
    assert m.sample_identity is None  # no images asked for


def test_single_concept_images_match_exactly(tiny_registry: Registry, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    publish(tiny_registry, adapter_factory(tiny_registry, "rex", magnitude=0.5), "rex")
    config = EvalConfig(samples=2, images=2, sample_steps=2)
    (m,) = evaluate(tiny_registry, ["rex"], None, config)
    assert m.sample_identity == pytest.approx(1.0, abs=1e-9)


def test_adapter_that_changes_no_weight_leaves_the_prior_alone(
    tiny_registry: Registry, adapter_factory
) -> None:  # type: ignore[no-untyped-def]
    publish(tiny_registry, adapter_factory(tiny_registry, "idle", magnitude=0.0), "idle")
    (m,) = evaluate(tiny_registry, ["idle"], None, CONFIG)
    assert m.prior_interference == 0.0 and m.prior_drift == 0.0
    assert m.delta_sq > 0  # its token still means something


def test_several_concepts_give_finite_metrics(tiny_registry: Registry, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    for i, name in enumerate(["a1", "b2", "c3"]):
        publish(tiny_registry, adapter_factory(tiny_registry, name, seed=i, magnitude=0.5), name)
    rows = evaluate(tiny_registry, ["a1", "b2", "c3"], None, CONFIG)
    assert [r.concept for r in rows] == ["a1", "b2", "c3"]
    for r in rows:
        figures = (r.retention, r.crosstalk, r.fidelity, r.guided_crosstalk, r.empty_interference)
        assert all(math.isfinite(v) for v in figures)
        assert r.crosstalk >= 0 and r.prior_interference >= 0 and r.empty_interference >= 0
    summary = summarize(rows)
    assert summary["crosstalk"]["worst"] == max(r.crosstalk for r in rows)
    assert "sample_identity" not in summary


def test_metric_definitions_on_known_vectors() -> None:
    e_b = torch.zeros(4)
    e_s = torch.tensor([1.0, 0.0, 0.0, 0.0])
    e_m = torch.tensor([0.5, 1.0, 0.0, 0.0])  # half the concept, plus an orthogonal push
    p = torch.zeros(4)
    m = concept_metrics("x", 0, e_b, e_s, e_m, p, p, p + 0.5)
    assert m.retention == pytest.approx(0.5)
    assert m.crosstalk == pytest.approx(1.0)
    assert m.fidelity == pytest.approx(1 - 1.25)
    assert m.prior_interference == pytest.approx(1.0)
    assert m.prior_drift == 0.0
    assert ratio(0.0, 0.0) == 0.0 and ratio(1.0, 0.0) == math.inf


def test_guided_figures_follow_the_guided_prediction() -> None:
    """With ε_u unchanged, guidance g scales every δ by g: ratios stay; a merged model that
    moves only the empty prompt shows up in the empty figure and in the guided ones."""
    zero, one = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    push = torch.tensor([0.0, 0.5, 0.0, 0.0])
    m = full_metrics(
        "x", 0, own=(zero, one, one), prior=(zero, zero, zero), empty=(zero, zero, push),
        guidance=4.0,
    )  # fmt: skip
    assert m.crosstalk == pytest.approx(0.0) and m.retention == pytest.approx(1.0)
    # ‖δ_s‖² = mean(one²) = 0.25, ‖push‖² = 0.0625
    assert m.empty_interference == pytest.approx(0.25) and m.empty_drift == 0.0
    # guided: δ_s = 4·one (‖·‖² = 4), δ_m = push + 4(one − push) = 4·one − 3·push
    assert m.guided_retention == pytest.approx(1.0)
    assert m.guided_crosstalk == pytest.approx(9 * 0.0625 / 4)
    assert m.guided_prior_interference == pytest.approx(9 * 0.0625 / 4)  # −3·push on the prior


def test_plan_restricted_to_one_concept_equals_planning_it_alone(
    tiny_registry: Registry,
    adapter_factory,  # type: ignore[no-untyped-def]
) -> None:
    from blockctl.merge import plan_merge

    for i, name in enumerate(["a1", "b2"]):
        publish(tiny_registry, adapter_factory(tiny_registry, name, seed=i), name)
    full = plan_merge(tiny_registry, ["a1", "b2"], {})
    alone = plan_merge(tiny_registry, ["b2"], {})
    only = full.only("b2")
    assert only.selected == alone.selected
    assert [t for t, _ in only.token_rows] == [t for t, _ in alone.token_rows]
    for target in alone.layout.targets:
        assert torch.equal(only.delta(target), alone.delta(target))
    with pytest.raises(InvalidInput):
        full.only("zz")
