"""``blockctl eval``: JSON and table output, CLIP alignment with a tiny CLIP built in-process,
and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockctl.layout import sha256_file
from registry import Registry
from tests.support.cli import cli


@pytest.fixture(scope="module")
def tiny_clip(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP model + processor folder, as a user's local CLIP would be."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    tok = CLIPTokenizer.from_pretrained(tiny_base / "tokenizer")
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 32}  # fmt: skip
    config = CLIPConfig(
        text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 32},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    folder = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


def _published(reg: Registry, adapter_factory, names: list[str]) -> None:  # type: ignore[no-untyped-def]
    for i, name in enumerate(names):
        path = adapter_factory(reg, name, seed=i, magnitude=0.5)
        reg.publish(name, path, sha256_file(path))


def test_eval_json_and_table(tiny_registry: Registry, adapter_factory) -> None:  # type: ignore[no-untyped-def]
    _published(tiny_registry, adapter_factory, ["rex", "tom"])
    fast = ("--samples", "2", "--images", "1", "--sample-steps", "2")
    code, out, _ = cli(tiny_registry, "eval", "rex", "tom", *fast, "--json")
    assert code == 0
    doc = json.loads(out)
    rows = doc["concepts"]
    assert [r["concept"] for r in rows] == ["rex", "tom"]
    assert "clip_image_alignment" not in rows[0]  # only with --clip
    for key in ("guided_crosstalk", "empty_interference", "sample_identity"):
        assert key in rows[0]
    summary = doc["summary"]
    crosstalk = [r["crosstalk"] for r in rows]
    assert summary["crosstalk"]["worst"] == max(crosstalk)
    assert summary["retention"]["worst"] == min(r["retention"] for r in rows)
    assert summary["crosstalk"]["mean"] == pytest.approx(sum(crosstalk) / 2)
    code, out, _ = cli(tiny_registry, "eval", "rex", "--samples", "2", "--images", "0")
    assert code == 0 and "identity metrics" in out and "rex" in out
    assert "worst" in out and "sample identity" not in out  # no images, no column


def test_eval_with_clip_scores_alignment(
    tiny_registry: Registry,
    adapter_factory,  # type: ignore[no-untyped-def]
    tiny_clip: Path,
) -> None:
    _published(tiny_registry, adapter_factory, ["rex", "tom"])
    args = ["--samples", "2", "--clip", str(tiny_clip), "--images", "2", "--sample-steps", "2",
            "--json"]  # fmt: skip
    code, out, err = cli(tiny_registry, "eval", "rex", *args)
    assert code == 0, err
    (alone,) = json.loads(out)["concepts"]
    # One concept merged is the concept alone: same images from the same seeds.
    assert alone["clip_image_alignment"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= alone["clip_text_alignment"] <= 1.0
    assert alone["sample_identity"] == pytest.approx(1.0, abs=1e-6)
    code, out, err = cli(tiny_registry, "eval", "rex", "tom", *args)
    assert code == 0, err
    rows = json.loads(out)["concepts"]
    assert all(-1.0 <= r["clip_image_alignment"] <= 1.0 + 1e-6 for r in rows)
    assert rows[0]["clip_image_alignment"] < 1.0 - 1e-6  # tom's blocks change rex's images


def test_eval_errors(tiny_registry: Registry, adapter_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _published(tiny_registry, adapter_factory, ["rex"])
    code, _, err = cli(tiny_registry, "eval", "rex", "--clip", str(tmp_path))
    assert code == 2 and "not a CLIP model folder" in err
    code, _, err = cli(tiny_registry, "eval", "nobody", "--images", "0")
    assert code != 0 and "Traceback" not in err
    code, _, err = cli(tiny_registry, "eval", "rex", "--clip", str(tmp_path), "--images", "0")
    assert code == 2 and "needs images" in err
    code, _, err = cli(tiny_registry, "eval", "rex", "--guidance", "-1")
    assert code == 2
