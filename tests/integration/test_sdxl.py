"""SDXL end to end on a tiny SDXL pipeline built in-process (tests/support/tiny_sdxl.py; no
download): init → reserve → train a few steps → publish → verify → merge to every format →
each output loaded by diffusers (``from_pretrained``, ``from_single_file`` with the base's
config, ``load_lora_weights`` + ``load_textual_inversion``) has the weights base + Σ ΔW, the
adapters' token rows in both text encoders, and generates.

The expected weights are computed here from the adapter files and the registry's basis, in
float64, not through blockctl's merge code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from blockctl.adapter import load_adapter, token_key, up_key
from blockctl.layout import Layout, layout_of, sha256_file
from blockctl.merge.embeddings import embeddings_dir
from registry import Registry, open_registry
from tests.conftest import write_random_adapter
from tests.support.cli import cli
from tests.support.photos import write_photos

pytest.importorskip("peft")
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)

CONCEPTS = ("rex", "tabby")
SCALES = {"rex": 0.8, "tabby": 1.0}
ENCODERS = ("text_encoder", "text_encoder_2")
REL = 1e-5


@dataclass(frozen=True)
class World:
    base: Path
    registry: Registry
    layout: Layout
    trained: dict[str, object]  # train --json
    outs: dict[str, Path]


@pytest.fixture(scope="module")
def world(tiny_sdxl_base: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("sdxl")
    reg = root / "reg"
    init = ("init", "--base", tiny_sdxl_base, "--slots", "4", "--rank", "2", "--text-encoder")
    for args in (init, ("reserve-slot", "rex", "--class-word", "dog")):
        code, _, err = cli(reg, *args)
        assert code == 0, err
    photos = write_photos(root / "photos", n=2)  # 36×44: cropped, so add_time_ids carry a crop
    code, out, err = cli(
        reg, "train", photos, "--concept", "rex", "--steps", "2", "--lr", "0.5",
        "--embedding-lr", "0.5", "--warmup-steps", "0", "--no-sample", "--out", root / "run",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    registry = open_registry(str(reg))
    registry.reserve("tabby", "<tabby>", "cat", "tester")
    path = write_random_adapter(registry, "tabby", root / "tabby.safetensors", seed=3)
    registry.publish("tabby", path, sha256_file(path))
    outs = {
        "folder": root / "merged",
        "single": root / "merged.safetensors",
        "peft": root / "peft.safetensors",
        "kohya": root / "kohya.safetensors",
    }
    formats = {
        "folder": (),
        "single": ("--format", "single-file"),
        "peft": ("--format", "lora", "--lora-keys", "peft"),
        "kohya": ("--format", "lora"),
    }
    for name, extra in formats.items():
        code, _, err = cli(reg, "merge", *CONCEPTS, "-o", outs[name], "--scale", "rex=0.8", *extra)
        assert code == 0, err
    return World(tiny_sdxl_base, registry, layout_of(registry), json.loads(out), outs)


def _pipe(path: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def folder_pipe(world: World) -> StableDiffusionXLPipeline:
    return _pipe(world.outs["folder"])


def _expected(world: World) -> tuple[dict[tuple[str, str], torch.Tensor], dict[str, torch.Tensor]]:
    """Σ scale·B_s A_s (float64) per (component, weight key), and the concept rows per encoder,
    straight from the adapter files and the stored basis."""
    layout = world.layout
    basis = load_file(str(world.registry.basis_path()))
    deltas: dict[tuple[str, str], torch.Tensor] = {}
    rows: dict[str, list[torch.Tensor]] = {e: [] for e in ENCODERS}
    r = layout.rank
    for concept in CONCEPTS:  # slot order: rex 0, tabby 1
        adapter = load_adapter(world.registry.adapter_file(concept))
        slot = adapter.meta.slot
        for t in layout.targets:
            down = basis[f"basis.{t.in_features}"].double()[:, slot * r : (slot + 1) * r].T
            up = adapter.tensors[up_key(t.name)].double()
            key = (t.component, f"{t.module}.weight")
            deltas[key] = deltas.get(key, 0) + SCALES[concept] * layout.scale * (up @ down)
        for encoder in ENCODERS:
            rows[encoder].append(adapter.tensors[token_key(f"<{concept}>", encoder)].double())
    return deltas, {e: torch.cat(v) for e, v in rows.items()}


def _canonical(key: str) -> str:
    return key.removeprefix("text_model.")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = float(want.abs().max())
    return float((got.double() - want).abs().max()) / (scale if scale > 0 else 1.0)


def test_init_reads_the_pipeline_class_and_targets_both_encoders(world: World) -> None:
    layout = world.layout
    assert layout.family == "sdxl" and layout.schema_version == 2
    assert layout.token_dims == {"text_encoder": 32, "text_encoder_2": 48}
    components = {t.component for t in layout.targets}
    assert components == {"unet", *ENCODERS}
    kv = [t for t in layout.targets if t.component == "unet"]
    assert kv and all(t.in_features == 32 + 48 for t in kv)  # both encoders side by side


def test_the_trained_adapter_has_a_row_in_each_encoder_and_verifies(world: World) -> None:
    adapter = load_adapter(world.registry.adapter_file("rex"))
    assert adapter.meta.text_encoders == ENCODERS
    with safe_open(str(world.registry.adapter_file("rex")), framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["token_embeddings"]) == {
        "token_embedding": "text_encoder", "token_embedding_2": "text_encoder_2"
    }  # fmt: skip
    assert adapter.tensors["token_embedding.<rex>"].shape == (1, 32)
    assert adapter.tensors["token_embedding_2.<rex>"].shape == (1, 48)
    assert json.loads(header["training"])["resolution"] == 32  # the base's own
    assert world.trained["published"] is True
    code, out, err = cli(world.registry, "verify", "--json")
    assert code == 0, err + out
    assert json.loads(out)["ok"] is True


def test_folder_weights_are_base_plus_deltas_and_it_generates(
    world: World, folder_pipe: StableDiffusionXLPipeline
) -> None:
    base = _pipe(world.base)
    deltas, rows = _expected(world)
    for component in ("unet", *ENCODERS):
        got, before = getattr(folder_pipe, component), getattr(base, component)
        merged, original = got.state_dict(), before.state_dict()
        assert merged.keys() == original.keys()
        for key, value in merged.items():
            delta = deltas.get((component, _canonical(key)))
            if key.endswith("token_embedding.weight"):
                n = original[key].shape[0]
                assert torch.equal(value[:n], original[key])
                assert _rel(value[n:], rows[component]) <= REL, component
            elif delta is not None:
                assert _rel(value, original[key].double() + delta) <= REL, (component, key)
                assert float(delta.abs().max()) > 1e-3  # the concept really moved it
            else:
                assert torch.equal(value, original[key]), (component, key)
    for tokenizer in (folder_pipe.tokenizer, folder_pipe.tokenizer_2):
        assert tokenizer.convert_tokens_to_ids(["<rex>", "<tabby>"]) == [514, 515]
    # both encoders pool at the real end token in the merged configs (see the pooled test)
    assert folder_pipe.text_encoder_2.config.eos_token_id == folder_pipe.tokenizer_2.eos_token_id
    image = folder_pipe(
        "a photo of <rex> dog", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_the_pooled_embedding_is_read_at_the_end_token(
    folder_pipe: StableDiffusionXLPipeline,
) -> None:
    """The concept token's id is larger than the end token's: pooling at the argmax of the ids
    (what SDXL's published configs make transformers do) would read the concept token."""
    _, _, pooled, _ = folder_pipe.encode_prompt("a <rex> dog", do_classifier_free_guidance=False)
    tok, encoder = folder_pipe.tokenizer_2, folder_pipe.text_encoder_2
    ids = tok("a <rex> dog", padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden = encoder(ids).last_hidden_state
        end = int((ids[0] == tok.eos_token_id).nonzero()[0])
        at_end = encoder.text_projection(hidden[0, end])
        at_token = encoder.text_projection(hidden[0, int(ids[0].argmax())])
    torch.testing.assert_close(pooled[0], at_end)
    assert not torch.allclose(at_end, at_token)


def _load_embeddings(pipe: StableDiffusionXLPipeline, out: Path) -> None:
    """The concept tokens of a single-file or LoRA output, loaded as docs/sdxl.md says: each
    concept's embedding file, ``clip_l`` into the first encoder and ``clip_g`` into the second;
    and the second encoder told its real end token (the base's config says 2)."""
    pipe.text_encoder_2.text_model.eos_token_id = pipe.tokenizer_2.eos_token_id
    folder = embeddings_dir(out)
    for concept in CONCEPTS:
        state = load_file(str(folder / f"{concept}.safetensors"))
        assert {k: v.shape[1] for k, v in state.items()} == {"clip_l": 32, "clip_g": 48}
        for key, encoder, tokenizer in (("clip_l", "text_encoder", "tokenizer"),
                                        ("clip_g", "text_encoder_2", "tokenizer_2")):  # fmt: skip
            pipe.load_textual_inversion(
                state[key], token=f"<{concept}>", text_encoder=getattr(pipe, encoder),
                tokenizer=getattr(pipe, tokenizer),
            )  # fmt: skip


def _same_prompt_encoding(a: StableDiffusionXLPipeline, b: StableDiffusionXLPipeline) -> None:
    """Same token rows in both encoders, same prompt embeddings and pooled embedding."""
    for encoder in ENCODERS:
        got = getattr(a, encoder).get_input_embeddings().weight
        torch.testing.assert_close(got, getattr(b, encoder).get_input_embeddings().weight)
    prompt = "a <rex> with <tabby>"
    embeds_a, _, pooled_a, _ = a.encode_prompt(prompt, do_classifier_free_guidance=False)
    embeds_b, _, pooled_b, _ = b.encode_prompt(prompt, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds_a, embeds_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled_a, pooled_b, rtol=1e-5, atol=1e-5)


def test_from_single_file_loads_every_weight_equal_to_the_folder(
    world: World, folder_pipe: StableDiffusionXLPipeline
) -> None:
    path = world.outs["single"]
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        fused = handle.get_slice("conditioner.embedders.1.model.transformer.resblocks.0.attn."
                                 "in_proj_weight").get_shape()  # fmt: skip
        projection = handle.get_slice("conditioner.embedders.1.model.text_projection").get_shape()
    assert fused == [3 * 48, 48] and projection == [48, 40]  # OpenCLIP's own layout
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert any(k.startswith("conditioner.embedders.0.transformer.text_model.") for k in keys)
    single = StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(world.base), local_files_only=True
    )
    for name in ("unet", "vae", *ENCODERS):
        mine, theirs = getattr(folder_pipe, name).state_dict(), getattr(single, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        for key, value in theirs.items():
            want = (
                mine[key][: value.shape[0]] if key.endswith("token_embedding.weight") else mine[key]
            )
            assert torch.equal(value, want), (name, key)
    _load_embeddings(single, path)
    _same_prompt_encoding(single, folder_pipe)


@pytest.mark.parametrize("kind", ["peft", "kohya"])
def test_lora_and_token_rows_on_the_base_equal_the_folder(
    world: World, folder_pipe: StableDiffusionXLPipeline, kind: str
) -> None:
    path = world.outs[kind]
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    if kind == "kohya":  # kohya's sd-scripts SDXL naming: sgm UNet blocks, te1/te2
        names = {k.split(".")[0] for k in keys}
        unet = [n for n in names if n.startswith("lora_unet_")]
        assert unet and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                          "lora_unet_output_blocks_")) for n in unet)  # fmt: skip
        assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
        assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
        assert len(names) == len(world.layout.targets)
    pipe = _pipe(world.base)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    for name in ("unet", *ENCODERS):
        want, got = getattr(folder_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        for key, value in got.items():
            if key.endswith("token_embedding.weight"):
                continue  # the folder also has the concept rows
            assert _rel(value, want[key].double()) <= REL, (name, key)
    _load_embeddings(pipe, path)
    _same_prompt_encoding(pipe, folder_pipe)


@pytest.mark.parametrize("output", ["folder", "single", "peft", "kohya"])
def test_verify_merged_passes_on_every_format(world: World, output: str) -> None:
    code, out, err = cli(world.registry, "verify", "--merged", world.outs[output], "--json")
    assert code == 0, err + out
    report = json.loads(out)
    assert report["ok"] and set(report["max_relative_error"]) >= {"unet", *ENCODERS}


def test_eval_and_sample_run_on_sdxl(world: World, tmp_path: Path) -> None:
    code, out, err = cli(
        world.registry, "eval", *CONCEPTS, "--merged", world.outs["folder"], "--samples", "2",
        "--images", "0", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out)["concepts"]
    assert [r["concept"] for r in rows] == list(CONCEPTS)
    assert all(r["delta_sq"] > 0 and 0.5 < r["retention"] < 1.5 for r in rows)
    for name, where in (("folder", ("--model", world.outs["folder"])),
                        ("composed", ("--concepts", "rex,tabby"))):  # fmt: skip
        grid = tmp_path / f"{name}.png"
        code, _, err = cli(
            world.registry, "sample", "a photo of <rex> dog", *where, "--n", "1", "--steps",
            "2", "-o", grid,
        )  # fmt: skip
        assert code == 0, err
        assert grid.stat().st_size > 0


def test_compose_on_an_sdxl_pipeline_equals_the_merged_folder(
    world: World, folder_pipe: StableDiffusionXLPipeline
) -> None:
    from blockctl.compose import compose

    pipe = _pipe(world.base)
    before = {name: getattr(pipe, name).state_dict() for name in ("unet", *ENCODERS)}
    before = {n: {k: v.clone() for k, v in sd.items()} for n, sd in before.items()}
    with compose(pipe, world.registry, list(CONCEPTS), scales={"rex": 0.8}):
        for name in ("unet", *ENCODERS):
            want = getattr(folder_pipe, name).state_dict()
            for key, value in getattr(pipe, name).state_dict().items():
                assert _rel(value, want[key].double()) <= REL, (name, key)
        _same_prompt_encoding(pipe, folder_pipe)
    for name, state in before.items():  # the base again, bit for bit
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(after[k], v) for k, v in state.items()), name
    assert "<rex>" not in pipe.tokenizer_2.get_vocab()
