"""Writers built on the atomic helper: nothing half-written under a final name, and nothing
deleted that blockctl did not write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blockctl.train import checkpoint


def _state() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    param = torch.nn.Parameter(torch.ones(2, 2))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.sum().backward()
    opt.step()
    return {"w": param.detach()}, opt.state_dict()


def test_clearing_checkpoints_keeps_what_is_not_a_checkpoint(tmp_path: Path) -> None:
    tensors, optim = _state()
    checkpoint.save(tmp_path, 1, tensors, optim, {})
    mine = checkpoint.checkpoint_dir(tmp_path) / "my-notes.txt"
    mine.write_text("the user's own")
    checkpoint.clear(tmp_path)
    assert checkpoint.latest(tmp_path) is None
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["my-notes.txt"]
    checkpoint.save(tmp_path, 1, tensors, optim, {})
    mine.unlink()
    checkpoint.clear(tmp_path)
    assert not checkpoint.checkpoint_dir(tmp_path).exists()  # emptied: removed too


def test_a_failed_checkpoint_save_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors, optim = _state()
    checkpoint.save(tmp_path, 1, tensors, optim, {})

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 2, tensors, optim, {})
    names = [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()]
    assert names == ["step-000001"]


def test_toy_pipeline_is_saved_whole_and_never_over_a_folder(tmp_path: Path) -> None:
    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    pipe = build_pipeline(TINY, seed=0)
    out = save_pipeline(pipe, tmp_path / "pipe")
    assert (out / "model_index.json").is_file() and (out / "tokenizer" / "vocab.json").is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.ckpt").write_text("someone's pickled model")
    with pytest.raises(FileExistsError):
        save_pipeline(pipe, theirs)
    assert [p.name for p in theirs.iterdir()] == ["model.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "theirs"]
