"""Merged folders write only what changed: the files a merge leaves unchanged are linked to the
base's (``blockctl.linking``), or copied with ``--copy``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockctl import linking
from blockctl.layout import layout_of
from blockctl.merge import MergeOptions, merge
from blockctl.merged_check import check_merged
from registry import Registry
from tests.support.files import digest_tree
from tests.support.registries import make_published

UNCHANGED = (
    "vae/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "model_index.json",
)
CHANGED = ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return make_published(tmp_path_factory.mktemp("linking"), tiny_base, text_encoder=False)


def same_file(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b)


def refuse(*args: object, **kwargs: object) -> None:
    raise OSError("not on this filesystem")


def test_place_prefers_a_link_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    first = linking.place(src, tmp_path / "a")
    assert first in ("reflink", "hardlink")  # this filesystem has one or the other
    assert (tmp_path / "a").read_bytes() == b"weights"
    assert same_file(src, tmp_path / "a") == (first == "hardlink")
    monkeypatch.setattr(linking, "_reflink", refuse)
    monkeypatch.setattr(os, "link", refuse)  # as across filesystems
    # An ordinary file is copied, not symlinked: its bytes may be replaced later.
    assert linking.place(src, tmp_path / "b") == "copy"
    assert not (tmp_path / "b").is_symlink() and (tmp_path / "b").read_bytes() == b"weights"


def test_symbolic_links_only_into_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--org--base"
    blob = repo / "blobs" / "3f2a"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"vae")
    snapshot = repo / "snapshots" / "abc" / "vae.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(Path("../../blobs/3f2a"))
    monkeypatch.setattr(linking, "_reflink", refuse)
    monkeypatch.setattr(os, "link", refuse)
    assert linking.place(snapshot, tmp_path / "c") == "symlink"
    assert Path(os.readlink(tmp_path / "c")) == blob.resolve()
    monkeypatch.setattr(os, "symlink", refuse)
    assert linking.place(snapshot, tmp_path / "d") == "copy"
    assert (tmp_path / "d").read_bytes() == b"vae"


def test_copy_forces_an_independent_file(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    assert linking.place(src, tmp_path / "d", copy=True) == "copy"
    (tmp_path / "d").write_bytes(b"edited")
    assert src.read_bytes() == b"weights"


def test_a_failed_reflink_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    def refuse(*args: object) -> None:
        raise OSError("no clones on this filesystem")

    monkeypatch.setattr(fcntl, "ioctl", refuse)
    src = tmp_path / "src.bin"
    src.write_bytes(b"weights")
    with pytest.raises(OSError):
        linking._reflink(src, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_merged_folder_links_only_unchanged_files(reg: Registry, tmp_path: Path) -> None:
    base = Path(layout_of(reg).base)
    linked, copied = tmp_path / "linked", tmp_path / "copied"
    result = merge(reg, ["rex", "tabby"], MergeOptions(out=linked))
    merge(reg, ["rex", "tabby"], MergeOptions(out=copied, copy=True))
    assert digest_tree(linked) == digest_tree(copied)  # the same bytes either way
    for rel in UNCHANGED:
        assert same_file(linked / rel, base / rel), rel
        assert not same_file(copied / rel, base / rel), rel
    for rel in CHANGED:
        assert not same_file(linked / rel, base / rel), rel
    assert any("linked to the base" in note for note in result.notes)
    assert check_merged(reg, linked).ok


def test_replacing_or_deleting_a_linked_merge_leaves_the_base_alone(
    reg: Registry, tmp_path: Path
) -> None:
    import shutil

    base = Path(layout_of(reg).base)
    before = digest_tree(base)
    out = tmp_path / "m"
    merge(reg, ["rex"], MergeOptions(out=out))
    merge(reg, ["tabby"], MergeOptions(out=out, force=True))
    assert same_file(out / UNCHANGED[0], base / UNCHANGED[0])
    shutil.rmtree(out)
    assert digest_tree(base) == before


def test_dtype_recast_files_are_written_not_linked(reg: Registry, tmp_path: Path) -> None:
    base = Path(layout_of(reg).base)
    out = tmp_path / "half"
    merge(reg, ["rex"], MergeOptions(out=out, dtype="float16"))
    assert not same_file(out / UNCHANGED[0], base / UNCHANGED[0])  # recast: new bytes
    assert same_file(
        out / "scheduler/scheduler_config.json", base / "scheduler/scheduler_config.json"
    )
