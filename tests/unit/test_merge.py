"""Merge: the math, the diffusers folder output, determinism, dtype, tokens, verify --merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockctl.adapter import load_adapter, token_key, up_key
from blockctl.base_model import BaseFolder
from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import layout_of, sha256_file
from blockctl.merge import MergeOptions, merge, parse_dtype, parse_scales, plan_merge
from blockctl.merged_check import check_merged
from registry import Registry
from tests.support.files import digest_tree
from tests.support.registries import make_published


@pytest.fixture(scope="module")
def reg(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return make_published(tmp_path_factory.mktemp("merge-reg"), tiny_base)


def expected_weight(
    reg: Registry, component: str, module: str, scales: dict[str, float]
) -> torch.Tensor:
    """base + Σ scale·B A computed here in float64, slot by slot."""
    layout = layout_of(reg)
    base = BaseFolder(Path(layout.base))
    weight = base.read(component, f"{module}.weight").double()
    basis = load_file(str(reg.basis_path()))
    for concept, factor in scales.items():
        adapter = load_adapter(reg.adapter_file(concept))
        slot, r = adapter.meta.slot, layout.rank
        up = adapter.tensors[up_key(f"{component}.{module}")].double()
        down = basis[f"basis.{weight.shape[1]}"].double()[:, slot * r : (slot + 1) * r].T
        weight = weight + layout.scale * factor * (up @ down)
    return weight


def test_folder_weights_are_base_plus_sum_of_updates(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    result = merge(reg, ["tabby", "rex"], MergeOptions(out=out, scales={"rex": 0.8}))
    assert result.files == (out,) and [s.slot for s in result.selected] == [0, 1]
    merged = BaseFolder(out)
    for t in layout_of(reg).targets:
        got = merged.read(t.component, f"{t.module}.weight").double()
        want = expected_weight(reg, t.component, t.module, {"rex": 0.8, "tabby": 1.0})
        assert torch.allclose(got, want, atol=1e-6), t.name
    base = BaseFolder(Path(layout_of(reg).base))
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert torch.equal(merged.read("unet", untouched), base.read("unet", untouched))


def test_unchanged_files_are_copied_byte_for_byte(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    merge(reg, ["rex"], MergeOptions(out=out))
    base = Path(layout_of(reg).base)
    for rel in (
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "model_index.json",
        "unet/config.json",
    ):
        assert (out / rel).read_bytes() == (base / rel).read_bytes(), rel
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]


def test_tokens_appended_to_tokenizer_and_embedding(reg: Registry, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "merged"
    merge(reg, ["vangogh", "rex"], MergeOptions(out=out))
    base = BaseFolder(Path(layout_of(reg).base))
    old = base.info("text_encoder", "embeddings.token_embedding.weight").shape[0]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.convert_tokens_to_ids(["<rex>", "<vangogh>"]) == [old, old + 1]  # slot order
    assert json.loads((out / "text_encoder/config.json").read_text())["vocab_size"] == old + 2
    emb = BaseFolder(out).read("text_encoder", "embeddings.token_embedding.weight")
    assert emb.shape[0] == old + 2
    for i, concept in enumerate(["rex", "vangogh"]):
        row = load_adapter(reg.adapter_file(concept)).tensors[token_key(f"<{concept}>")]
        assert torch.equal(emb[old + i], row[0])
    assert torch.equal(emb[:old], base.read("text_encoder", "embeddings.token_embedding.weight"))


def test_same_inputs_same_bytes_in_any_order(reg: Registry, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    merge(reg, ["rex", "tabby"], MergeOptions(out=a))
    merge(reg, ["tabby", "rex"], MergeOptions(out=b))
    assert digest_tree(a) == digest_tree(b)
    for fmt in ("single-file", "lora"):
        x, y = tmp_path / f"x-{fmt}.safetensors", tmp_path / f"y-{fmt}.safetensors"
        merge(reg, ["rex", "tabby"], MergeOptions(out=x, format=fmt))
        merge(reg, ["tabby", "rex"], MergeOptions(out=y, format=fmt))
        assert sha256_file(x) == sha256_file(y), fmt


def test_dtype_float16_casts_every_float_tensor(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "half"
    merge(reg, ["rex"], MergeOptions(out=out, dtype="float16"))
    for comp in ("unet", "vae", "text_encoder"):
        for info in BaseFolder(out).tensors(comp).values():
            assert info.dtype == "F16"
    assert check_merged(reg, out).ok
    assert check_merged(reg, out).tolerance == pytest.approx(1e-3)


def test_verify_merged_accepts_every_format_and_catches_tampering(
    reg: Registry, tmp_path: Path
) -> None:
    outs = {
        "diffusers": tmp_path / "m",
        "single-file": tmp_path / "m.safetensors",
        "lora": tmp_path / "l.safetensors",
    }
    for fmt, out in outs.items():
        merge(reg, ["rex", "vangogh"], MergeOptions(out=out, format=fmt, scales={"rex": 0.5}))
        report = check_merged(reg, out)
        assert report.ok, (fmt, report.to_dict())
        assert set(report.errors) >= {"unet", "text_encoder"}
        assert max(report.errors.values()) < 1e-5
    kohya = tmp_path / "k.safetensors"
    merge(reg, ["rex"], MergeOptions(out=kohya, format="lora", lora_keys="kohya"))
    assert check_merged(reg, kohya).ok
    # Tamper with one target of the folder: verify must notice.
    target = next(t for t in layout_of(reg).targets if t.component == "unet")
    path = outs["diffusers"] / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{target.module}.weight"] += 1e-2
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as h:
        meta = h.metadata()
    save_file(tensors, str(path), metadata=meta)
    bad = check_merged(reg, outs["diffusers"])
    assert not bad.ok and bad.errors["unet"] > 1e-4


def test_lora_factors_multiply_to_the_delta(reg: Registry) -> None:
    plan = plan_merge(reg, ["rex", "tabby"], {"tabby": 2.0})
    for t in plan.layout.targets:
        down, up = plan.lora_factors(t)
        assert down.shape == (2 * plan.layout.rank, t.in_features)
        assert torch.allclose(up @ down, plan.delta(t), atol=1e-6)


def test_lora_file_metadata_and_default_key_style(reg: Registry, tmp_path: Path) -> None:
    """Key names are checked in test_lora_keys.py; here: metadata, embeddings, the default."""
    out = tmp_path / "l.safetensors"
    result = merge(reg, ["rex", "tabby"], MergeOptions(out=out, format="lora"))
    folder = tmp_path / "l.embeddings"
    assert result.files == (out, folder) and result.notes
    layout = layout_of(reg)
    with safe_open(str(out), framework="pt") as h:
        keys, meta = set(h.keys()), h.metadata()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)  # kohya by default
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == str(2 * layout.rank)
    record = json.loads(meta["blockctl.merge"])
    assert [c["concept"] for c in record["concepts"]] == ["rex", "tabby"]
    assert record["layout_hash"] == layout.layout_hash and all(
        c["sha256"] for c in record["concepts"]
    )
    assert record["embeddings"] == {"rex": "rex.safetensors", "tabby": "tabby.safetensors"}
    assert set(load_file(str(folder / "rex.safetensors"))) == {"emb_params"}
    peft = tmp_path / "p.safetensors"
    merge(reg, ["rex"], MergeOptions(out=peft, format="lora", lora_keys="peft"))
    with safe_open(str(peft), framework="pt") as h:
        config = json.loads(h.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == config["unet.lora_alpha"] == layout.rank


def test_request_errors(reg: Registry, tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(InvalidInput):
        merge(reg, [], MergeOptions(out=out))
    with pytest.raises(InvalidInput, match="more than once"):
        merge(reg, ["rex", "rex"], MergeOptions(out=out))
    with pytest.raises(SlotConflict, match="published: rex, tabby, vangogh"):
        merge(reg, ["rex", "nobody"], MergeOptions(out=out))
    with pytest.raises(InvalidInput, match="not being merged"):
        merge(reg, ["rex"], MergeOptions(out=out, scales={"tabby": 1.0}))
    with pytest.raises(InvalidInput):
        merge(reg, ["rex"], MergeOptions(out=out, format="ckpt"))
    with pytest.raises(InvalidInput):
        parse_dtype("int8")
    with pytest.raises(InvalidInput):
        parse_scales(["rex=abc"])
    with pytest.raises(InvalidInput):
        parse_scales(["rex"])
    assert parse_scales(["rex=0.5", "tabby=-1"]) == {"rex": 0.5, "tabby": -1.0}
    assert not out.exists()


def test_tampered_adapter_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    reg = make_published(tmp_path / "r", tiny_base, ("rex",), text_encoder=False)
    path = reg.adapter_file("rex")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ValidationFailed, match="sha256"):
        merge(reg, ["rex"], MergeOptions(out=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_attn_preset_without_text_encoder(tiny_base: Path, tmp_path: Path) -> None:
    reg = make_published(
        tmp_path / "r", tiny_base, ("rex", "tabby"), text_encoder=False, preset="attn"
    )
    out = tmp_path / "m"
    merge(reg, ["rex", "tabby"], MergeOptions(out=out))
    assert check_merged(reg, out).ok
    base = Path(layout_of(reg).base)
    te = "text_encoder/model.safetensors"
    # Only the token embedding changes: the other text encoder tensors keep their bytes' values.
    got, want = load_file(str(out / te)), load_file(str(base / te))
    assert all(torch.equal(got[k], v) for k, v in want.items() if "token_embedding" not in k)


def test_tokenizer_without_tokenizer_json(tiny_base: Path, tmp_path: Path) -> None:
    """Bases published with only vocab.json/merges.txt (like SD 1.5) go through transformers."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "tokenizer" / "tokenizer.json").unlink()
    reg = make_published(tmp_path / "r", base, ("rex", "tabby"), text_encoder=False)
    out = tmp_path / "m"
    merge(reg, ["tabby", "rex"], MergeOptions(out=out))
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    rows = BaseFolder(base).info("text_encoder", "embeddings.token_embedding.weight").shape[0]
    assert tok.convert_tokens_to_ids(["<rex>", "<tabby>"]) == [rows, rows + 1]
    assert len(tok("a <rex> b").input_ids) == len(tok("a x b").input_ids)


def test_a_changed_base_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    reg = make_published(tmp_path / "r", base, ("rex",), text_encoder=False)
    path = base / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    key = f"{layout_of(reg).targets[0].module}.weight"
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValidationFailed, match="not the one this registry was made for"):
        merge(reg, ["rex"], MergeOptions(out=tmp_path / "o"))


def test_merge_without_linux_only_calls_gives_the_same_bytes(
    reg: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = tmp_path / "linux"
    merge(reg, ["rex", "tabby"], MergeOptions(out=want))
    import os

    for name in ("copy_file_range", "preadv"):
        monkeypatch.delattr(os, name, raising=False)
    for fmt, out in (("diffusers", tmp_path / "portable"), ("single-file", tmp_path / "p.st")):
        merge(reg, ["rex", "tabby"], MergeOptions(out=out, format=fmt))
    assert digest_tree(tmp_path / "portable") == digest_tree(want)
    assert check_merged(reg, tmp_path / "p.st").ok
