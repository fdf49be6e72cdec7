"""Concept embeddings beside single-file and LoRA merges: the key layout per family, the files,
the merge record, ``verify --merged`` on them, and the earlier one-sidecar layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blockctl.adapter import load_adapter, token_key
from blockctl.errors import InvalidInput
from blockctl.merge import MergeOptions, merge
from blockctl.merge.embeddings import embedding_tensors, embeddings_dir
from blockctl.merge.record import META_KEY, RECORD_NAME
from blockctl.merged_check import check_merged
from registry import Registry
from tests.support.registries import make_published


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return make_published(tmp_path_factory.mktemp("emb-reg"), tiny_base)


def adapter_row(reg: Registry, concept: str) -> torch.Tensor:
    return load_adapter(reg.adapter_file(concept)).tensors[token_key(f"<{concept}>")]


def test_sd_layout_is_one_tensor_named_emb_params() -> None:
    rows = torch.randn(2, 768)
    got = embedding_tensors({"text_encoder": rows})
    assert list(got) == ["emb_params"] and got["emb_params"] is rows


def test_sdxl_layout_puts_each_encoder_under_its_key() -> None:
    clip_l, clip_g = torch.randn(1, 768), torch.randn(1, 1280)
    for family in (None, "sdxl"):
        got = embedding_tensors({"text_encoder_2": clip_g, "text_encoder": clip_l}, family)
        assert sorted(got) == ["clip_g", "clip_l"]
        assert got["clip_l"] is clip_l and got["clip_g"] is clip_g
    with pytest.raises(ValueError, match="need rows for"):
        embedding_tensors({"text_encoder": clip_l}, "sdxl")
    with pytest.raises(ValueError, match="no embedding layout for the family 'flux'"):
        embedding_tensors({"text_encoder": clip_l, "text_encoder_2": clip_g}, "flux")


@pytest.mark.parametrize(
    "rows",
    [
        {"text_encoder_2": torch.randn(1, 1280)},  # no family has only the second encoder
        {"text_encoder": torch.randn(1, 768), "text_encoder_3": torch.randn(1, 4096)},
        {"text_encoder": torch.randn(1, 768), "text_encoder_2": torch.randn(2, 1280)},
        {"text_encoder": torch.randn(768)},  # rows are n × width
    ],
)
def test_layouts_refuse_what_no_client_reads(rows: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError):
        embedding_tensors(rows)


def test_embeddings_dir_is_named_after_out() -> None:
    assert embeddings_dir(Path("a/merged.safetensors")) == Path("a/merged.embeddings")
    assert embeddings_dir(Path("a/rex_lora")) == Path("a/rex_lora.embeddings")


@pytest.mark.parametrize("fmt", ["single-file", "lora"])
def test_one_file_per_concept_with_the_adapters_rows(
    reg: Registry, tmp_path: Path, fmt: str
) -> None:
    out = tmp_path / "m.safetensors"
    result = merge(reg, ["tabby", "rex"], MergeOptions(out=out, format=fmt, dtype="float32"))
    folder = tmp_path / "m.embeddings"
    assert result.files == (out, folder)
    assert "m.embeddings/ (rex, tabby)" in result.notes[0]
    assert sorted(p.name for p in folder.iterdir()) == [
        RECORD_NAME,
        "rex.safetensors",
        "tabby.safetensors",
    ]
    for concept in ("rex", "tabby"):
        file = folder / f"{concept}.safetensors"
        tensors = load_file(str(file))
        assert list(tensors) == ["emb_params"]  # one tensor: what all three clients read
        assert torch.equal(tensors["emb_params"], adapter_row(reg, concept).float())
        with safe_open(str(file), framework="pt") as handle:
            meta = json.loads(handle.metadata()[META_KEY])
        assert [c["concept"] for c in meta["concepts"]] == [concept]  # where the rows came from
    with safe_open(str(out), framework="pt") as handle:
        record = json.loads(handle.metadata()[META_KEY])
    assert record["embeddings"] == {"rex": "rex.safetensors", "tabby": "tabby.safetensors"}
    assert json.loads((folder / RECORD_NAME).read_text())["output"] == f"{fmt}-embeddings"
    report = check_merged(reg, out)
    assert report.ok, report.problems
    assert report.errors["embeddings"] == 0.0


def test_rows_keep_the_base_dtype_unless_asked(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    merge(reg, ["rex"], MergeOptions(out=out, format="lora", dtype="bfloat16"))
    row = load_file(str(tmp_path / "m.embeddings" / "rex.safetensors"))["emb_params"]
    assert row.dtype == torch.bfloat16 and row.shape == adapter_row(reg, "rex").shape
    report = check_merged(reg, out)
    assert report.ok and 0 < report.errors["embeddings"] <= report.tolerance


def test_same_inputs_same_embedding_bytes(reg: Registry, tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    merge(reg, ["rex", "tabby"], MergeOptions(out=a, format="single-file"))
    merge(reg, ["tabby", "rex"], MergeOptions(out=b, format="single-file"))
    assert a.read_bytes() == b.read_bytes()  # the record names files, not its own folder
    for name in ("rex.safetensors", "tabby.safetensors", RECORD_NAME):
        assert (tmp_path / "a.embeddings" / name).read_bytes() == (
            tmp_path / "b.embeddings" / name
        ).read_bytes()


def _problems(reg: Registry, out: Path) -> str:
    report = check_merged(reg, out)
    assert not report.ok
    return " ".join(report.problems)


def test_verify_merged_catches_every_damage(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "l.safetensors"
    merge(reg, ["rex", "tabby"], MergeOptions(out=out, format="lora"))
    rex = tmp_path / "l.embeddings" / "rex.safetensors"
    original = rex.read_bytes()

    save_file({"emb_params": 2 * adapter_row(reg, "rex")}, str(rex))
    report = check_merged(reg, out)
    assert not report.ok and report.errors["embeddings"] > 0.5
    assert report.worst["embeddings"] == "l.embeddings/rex.safetensors emb_params"

    row = adapter_row(reg, "rex")
    save_file({"emb_params": row, "extra": row.clone()}, str(rex))
    assert "holds ['emb_params', 'extra']" in _problems(reg, out)

    rex.write_bytes(original[:-3])
    assert "rex.safetensors is unreadable" in _problems(reg, out)

    rex.unlink()
    assert "l.embeddings/rex.safetensors is missing" in _problems(reg, out)
    rex.write_bytes(original)
    assert check_merged(reg, out).ok


def test_verify_merged_on_the_folder_or_a_stray_file(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    merge(reg, ["rex"], MergeOptions(out=out, format="single-file"))
    for inside in (tmp_path / "s.embeddings", tmp_path / "s.embeddings" / "rex.safetensors"):
        with pytest.raises(InvalidInput, match="verify the merged file beside it"):
            check_merged(reg, inside)
    with pytest.raises(InvalidInput, match="not a blockctl merge output"):
        check_merged(reg, reg.basis_path())


def _rewrite_record(path: Path, edit: dict[str, object]) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    record = json.loads(meta[META_KEY])
    for key, value in edit.items():
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
    save_file(tensors, str(path), metadata=meta | {META_KEY: json.dumps(record)})


def test_a_record_naming_files_elsewhere_is_refused(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "s.safetensors"
    merge(reg, ["rex"], MergeOptions(out=out, format="single-file"))
    _rewrite_record(out, {"embeddings": {"rex": "../s.safetensors"}})
    assert "embeddings entry is damaged" in _problems(reg, out)
    _rewrite_record(out, {"embeddings": {"tabby": "rex.safetensors"}})
    assert "no embedding file recorded for rex" in _problems(reg, out)


def test_verify_merged_still_reads_the_earlier_token_sidecar(reg: Registry, tmp_path: Path) -> None:
    """Outputs merged before the embeddings folder: one ``<stem>.tokens.safetensors`` keyed by
    token, and no ``embeddings`` in the record."""
    out = tmp_path / "old.safetensors"
    merge(reg, ["rex", "tabby"], MergeOptions(out=out, format="single-file"))
    _rewrite_record(out, {"embeddings": None})
    sidecar = tmp_path / "old.tokens.safetensors"
    save_file({f"<{c}>": adapter_row(reg, c) for c in ("rex", "tabby")}, str(sidecar))
    report = check_merged(reg, out)
    assert report.ok and "embeddings" not in report.errors and report.errors["tokens"] == 0.0
    sidecar.unlink()
    assert "sidecar (.tokens.safetensors) is missing" in _problems(reg, out)
