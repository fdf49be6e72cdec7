"""The streaming safetensors writer, the original-SD key mapping, and atomic staging."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from blockctl.errors import InvalidInput
from blockctl.merge.single_file import unet_key, vae_key
from blockctl.merge.staging import staged
from blockctl.safetensors_io import Entry, StreamWriter, read_entries, read_header

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]


@settings(max_examples=25, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 4), max_size=3)),
        min_size=1,
        max_size=5,
    )
)
def test_stream_writer_round_trips(specs: list[tuple[torch.dtype, list[int]]]) -> None:
    import tempfile

    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        t = torch.randn(*shape) * 10 if shape else torch.tensor(3.5)
        tensors[f"t{i}"] = t.to(dtype)
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        with StreamWriter(path, entries, {"format": "pt", "k": "v"}) as writer:
            for key, value in tensors.items():
                writer.write(key, value)
        header = read_header(path)  # gap/overlap/size checks of the project's own reader
        assert header["__metadata__"] == {"format": "pt", "k": "v"}
        back = load_file(str(path))
        assert back.keys() == tensors.keys()
        for key, value in tensors.items():
            assert back[key].dtype == value.dtype and torch.equal(back[key], value)
        assert [e.key for e in read_entries(path)] == sorted(tensors)


def test_stream_writer_refuses_wrong_order_shape_and_missing(tmp_path: Path) -> None:
    entries = [Entry("a", torch.float32, (2,)), Entry("b", torch.float32, (3,))]
    with (
        pytest.raises(ValueError, match="out of order"),
        StreamWriter(tmp_path / "1", entries) as w,
    ):
        w.write("b", torch.zeros(3))
    with pytest.raises(ValueError, match="announced"), StreamWriter(tmp_path / "2", entries) as w:
        w.write("a", torch.zeros(3))
    with (
        pytest.raises(ValueError, match="never written"),
        StreamWriter(tmp_path / "3", entries) as w,
    ):
        w.write("a", torch.zeros(2))


SD15_UNET = {
    "layers_per_block": 2,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}


@pytest.mark.parametrize(
    ("key", "ldm"),
    [
        ("conv_in.weight", "input_blocks.0.0.weight"),
        ("time_embedding.linear_2.bias", "time_embed.2.bias"),
        ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
        ("down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight"),
        ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
        ("down_blocks.1.resnets.0.conv_shortcut.bias", "input_blocks.4.0.skip_connection.bias"),
        ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
        ("mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight"),
        (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        ("up_blocks.0.resnets.2.conv1.weight", "output_blocks.2.0.in_layers.2.weight"),
        ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
        ("up_blocks.1.attentions.2.proj_out.bias", "output_blocks.5.1.proj_out.bias"),
        ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
        ("up_blocks.3.resnets.2.norm2.weight", "output_blocks.11.0.out_layers.0.weight"),
        ("conv_norm_out.weight", "out.0.weight"),
    ],
)
def test_unet_keys_follow_the_sd15_layout(key: str, ldm: str) -> None:
    assert unet_key(key, SD15_UNET) == ldm


def test_unet_key_refuses_unknown_tensors() -> None:
    with pytest.raises(InvalidInput):
        unet_key("add_embedding.linear_1.weight", SD15_UNET)


@pytest.mark.parametrize(
    ("key", "ldm"),
    [
        (
            "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
        ),
        ("encoder.down_blocks.2.downsamplers.0.conv.bias", "encoder.down.2.downsample.conv.bias"),
        ("decoder.up_blocks.0.resnets.2.conv1.weight", "decoder.up.3.block.2.conv1.weight"),
        ("decoder.up_blocks.1.upsamplers.0.conv.weight", "decoder.up.2.upsample.conv.weight"),
        ("decoder.mid_block.resnets.1.norm2.bias", "decoder.mid.block_2.norm2.bias"),
        ("encoder.mid_block.attentions.0.to_out.0.weight", "encoder.mid.attn_1.proj_out.weight"),
        ("encoder.mid_block.attentions.0.group_norm.bias", "encoder.mid.attn_1.norm.bias"),
        ("decoder.conv_norm_out.weight", "decoder.norm_out.weight"),
        ("post_quant_conv.bias", "post_quant_conv.bias"),
    ],
)
def test_vae_keys_follow_the_sd_layout(key: str, ldm: str) -> None:
    assert vae_key(key, {"up_block_types": ["UpDecoderBlock2D"] * 4}) == ldm


def _merge_output(folder: Path, text: str) -> None:
    folder.mkdir()
    (folder / "blockctl_merge.json").write_text(json.dumps({"note": text}))


def test_staged_moves_into_place_and_refuses_existing(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with staged([out], force=False) as (tmp,):
        assert tmp.parent == tmp_path and tmp.name.startswith(".o.tmp-")
        _merge_output(tmp, "one")
    assert "one" in (out / "blockctl_merge.json").read_text()
    with pytest.raises(InvalidInput, match="already exists"), staged([out], force=False):
        pass
    with staged([out], force=True) as (tmp,):
        _merge_output(tmp, "two")
    assert "two" in (out / "blockctl_merge.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    mine = tmp_path / "mine.txt"
    mine.write_text("not a merge output")
    with (
        pytest.raises(InvalidInput, match="not a blockctl merge output"),
        staged([mine], force=True) as (tmp,),
    ):
        tmp.write_text("never")
    assert mine.read_text() == "not a merge output"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt", "o"]


def test_staged_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "folder"
    with pytest.raises(RuntimeError), staged([out], force=False) as (tmp,):
        tmp.mkdir()
        (tmp / "x").write_text("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_a_clear_error(tmp_path: Path) -> None:
    with (
        pytest.raises(InvalidInput, match="does not exist"),
        staged([tmp_path / "no" / "o"], force=False),
    ):
        pass
    (tmp_path / "file").write_text("x")
    with (
        pytest.raises(InvalidInput, match="not a folder"),
        staged([tmp_path / "file" / "o"], force=False),
    ):
        pass


def test_copy_moves_bytes_unchanged_and_checks_sizes(tmp_path: Path) -> None:
    from blockctl.safetensors_io import TensorReader

    src = tmp_path / "src.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float16).reshape(2, 3), "b": torch.ones(4)}
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamWriter(src, entries) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    dst = tmp_path / "dst.safetensors"
    out = [Entry("b", torch.float32, (4,)), Entry("a2", torch.float16, (6, 1))]
    with TensorReader(src) as reader, StreamWriter(dst, out) as writer:
        assert reader.keys_in_file_order() == ["a", "b"]
        writer.copy("b", reader)
        writer.copy("a2", reader, "a")  # same bytes under a new name and shape
    back = load_file(str(dst))
    assert torch.equal(back["a2"].reshape(2, 3), tensors["a"]) and torch.equal(
        back["b"], tensors["b"]
    )
    bad = [Entry("a", torch.float32, (6,))]
    with (
        pytest.raises(ValueError, match="does not match"),
        TensorReader(src) as reader,
        StreamWriter(tmp_path / "bad.safetensors", bad) as writer,
    ):
        writer.copy("a", reader)


@pytest.mark.parametrize(
    "missing",
    [("copy_file_range",), ("preadv",), ("copy_file_range", "preadv", "pread")],
)
def test_reader_and_copy_work_without_linux_only_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: tuple[str, ...]
) -> None:
    """macOS and Windows lack ``os.copy_file_range`` (and Windows ``os.pread``/``preadv``)."""
    from blockctl.safetensors_io import TensorReader

    src = tmp_path / "src.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float16), "b": torch.ones(5), "c": torch.zeros(3)}
    entries = [Entry(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamWriter(src, entries) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    for name in missing:
        monkeypatch.delattr(os, name, raising=False)
    dst = tmp_path / "dst.safetensors"
    with TensorReader(src) as reader, StreamWriter(dst, entries) as writer:
        assert torch.equal(reader.get("b"), tensors["b"])
        writer.copy("a", reader)  # a run of two adjacent tensors ...
        writer.copy("b", reader)
        writer.write("c", reader.get("c"))  # ... flushed before a computed one
    assert dst.read_bytes() == src.read_bytes()
