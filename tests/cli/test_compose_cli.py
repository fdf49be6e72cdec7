"""``blockctl sample --concepts`` (concepts composed in memory) against sampling the merged
folder, its bad input, and ``merge --copy``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blockctl.layout import layout_of
from blockctl.merge import MergeOptions, merge
from registry import Registry
from tests.support.cli import cli
from tests.support.registries import make_published

PROMPTS = ["a photo of <rex> thing on a <tabby> thing", "a photo of a thing"]
FAST = ["--n", "2", "--steps", "3", "--seed", "7"]


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return make_published(tmp_path_factory.mktemp("compose-cli"), tiny_base)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_sample_concepts_equals_sampling_the_merged_folder(reg: Registry, tmp_path: Path) -> None:
    """Exactly equal: the tiny base is stored in float32, so the merged folder holds W + ΔW
    rounded to float32 once, which is what compose writes into the float32 pipeline, and the
    same seeds then run the same arithmetic."""
    merged = tmp_path / "merged"
    merge(reg, ["rex", "tabby"], MergeOptions(out=merged, scales={"rex": 0.7}))
    from_folder, composed = tmp_path / "folder.png", tmp_path / "composed.png"
    code, _, _ = cli(reg, "sample", *PROMPTS, "-o", str(from_folder), "--model", str(merged), *FAST)
    assert code == 0
    code, out, _ = cli(
        reg, "sample", *PROMPTS, "-o", str(composed), "--concepts", "tabby, rex",
        "--scale", "rex=0.7", *FAST, "--json",
    )  # fmt: skip
    assert code == 0, out
    assert json.loads(out)["concepts"] == ["tabby", "rex"]
    assert np.array_equal(pixels(composed), pixels(from_folder))
    base_png = tmp_path / "base.png"
    code, _, _ = cli(
        reg, "sample", *PROMPTS, "-o", str(base_png), "--model", layout_of(reg).base, *FAST
    )
    assert code == 0 and not np.array_equal(pixels(base_png), pixels(composed))  # it did compose


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--concepts", "rex,ghost"], 3, "not published in this registry: ghost"),
        (["--concepts", "rex,,tabby"], 2, "names separated by commas"),
        (["--concepts", "rex,rex"], 2, "more than once"),
        (["--scale", "rex=2"], 2, "--scale needs --concepts"),
        (["--concepts", "rex", "--scale", "tabby=2"], 2, "not being merged"),
    ],
)
def test_sample_concepts_bad_input(
    reg: Registry, tmp_path: Path, args: list[str], code: int, needle: str
) -> None:
    out = tmp_path / "x.png"
    result = cli(reg, "sample", "p", "-o", str(out), *args, *FAST)
    assert result.code == code, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_sample_concepts_on_another_model_exits_4(reg: Registry, tmp_path: Path) -> None:
    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    other = save_pipeline(build_pipeline(TINY, seed=3), tmp_path / "other")
    result = cli(
        reg, "sample", "p", "-o", str(tmp_path / "x.png"), "--concepts", "rex", "--model",
        str(other), *FAST,
    )  # fmt: skip
    assert result.code == 4 and "not the registry's base" in result.output


def test_merge_copy_flag(reg: Registry, tmp_path: Path) -> None:
    base = Path(layout_of(reg).base)
    vae = "vae/diffusion_pytorch_model.safetensors"
    code, out, _ = cli(reg, "merge", "rex", "-o", str(tmp_path / "linked"), "--json")
    assert code == 0 and "linked to the base" in " ".join(json.loads(out)["notes"])
    assert os.path.samefile(tmp_path / "linked" / vae, base / vae)
    code, out, _ = cli(reg, "merge", "rex", "-o", str(tmp_path / "copied"), "--copy", "--json")
    assert code == 0 and json.loads(out)["notes"] == []
    assert not os.path.samefile(tmp_path / "copied" / vae, base / vae)
