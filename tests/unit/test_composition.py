"""The composition benchmark's pairs and prompts (benchmarks/composition.py), no model needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import composition

from blockctl.toy.concepts import CONCEPTS


def concepts(names: str) -> list[composition.Concept]:
    return [
        composition.Concept(n, f"<{n}>", CONCEPTS[n].class_word, CONCEPTS[n].kind)
        for n in names.split(",")
    ]


def by_name(names: str) -> dict[str, composition.Concept]:
    return {c.name: c for c in concepts(names)}


def test_prompts_name_the_subject_first() -> None:
    c = by_name("rex,brick,vangogh,alice")
    assert composition.make_pair(c["brick"], c["rex"]).prompt() == (
        "a photo of <rex> star on a <brick> background"
    )
    assert composition.make_pair(c["vangogh"], c["rex"]).prompt() == (
        "a photo of <rex> star in <vangogh> style"
    )
    assert composition.make_pair(c["rex"], c["alice"]).prompt() == (
        "a photo of <alice> person and <rex> star"
    )


@pytest.mark.parametrize("pair", ["brick+ocean", "vangogh+neon", "rex+rex"])
def test_pairs_one_prompt_cannot_hold(pair: str) -> None:
    with pytest.raises(ValueError):
        composition.parse_pairs(pair, by_name("rex,brick,ocean,vangogh,neon"))


def test_pairs_of_unmerged_concepts_are_refused() -> None:
    with pytest.raises(ValueError, match="not among the merged concepts: heart"):
        composition.parse_pairs("rex+heart", by_name("rex,brick"))


def test_default_pairs_cover_the_issues_kinds() -> None:
    pairs = composition.default_pairs(concepts("rex,brick,vangogh,alice,heart,robo"))
    kinds = [p.kinds for p in pairs]
    assert set(kinds) == {"subject+scene", "subject+style", "person+subject", "subject+subject"}
    assert all(kinds.count(k) <= composition.PAIRS_PER_CATEGORY for k in kinds)
    assert len({p.names for p in pairs}) == len(pairs)
    assert {n for p in pairs for n in p.names} == {
        "rex",
        "brick",
        "vangogh",
        "alice",
        "heart",
        "robo",
    }


def test_default_style_keeps_the_subjects_colours() -> None:
    pairs = composition.default_pairs(concepts("rex,neon,vangogh"), per_category=1)
    assert [p.names for p in pairs] == [("rex", "vangogh")]


def test_summary_pools_samples_and_checks_the_targets() -> None:
    def row(method: str, pair: list[str], both: float) -> dict[str, object]:
        return {"method": method, "pair": pair, "both_recognised": both, "images": 4,
                "function_space_distance": 0.0 if method == composition.PAIR else 1.0}  # fmt: skip

    rows = [
        row(composition.PAIR, ["rex", "brick"], 0.5), row(composition.ALL, ["rex", "brick"], 0.5),
        row(composition.PAIR, ["heart", "rex"], 1.0), row(composition.ALL, ["heart", "rex"], 0.75),
        row(composition.LORA, ["rex", "brick"], 0.25),
        {"method": composition.LORA, "pair": ["heart", "rex"], "skipped": "no LoRA of heart"},
    ]  # fmt: skip
    s = composition.summarise(rows)
    assert (s[composition.PAIR]["both"], s[composition.PAIR]["samples"]) == (6, 8)
    assert s[composition.ALL]["both_recognised"] == 5 / 8
    assert s[composition.LORA]["pairs"] == 1
    assert s["targets"]["merge_vs_pair_only"] == pytest.approx(5 / 6)
    assert not s["targets"]["at_least_0.9_of_pair_only"]
    assert s["targets"]["merge_on_lora_pairs"] == 0.5  # rex+brick only: heart has no LoRA
    assert s["targets"]["above_lora_sum"]
