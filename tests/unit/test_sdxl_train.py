"""The trainer on SDXL (tests/support/tiny_sdxl.py) and on an SD 2.x-style v-prediction base,
piece by piece: the family chosen at init, a token row per text encoder, each photo's crop in
add_time_ids, stand-in tokens in both encoders, gradient checkpointing, --resolution, the
VAE's precision and the velocity target."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blockctl.adapter import AdapterMeta, load_adapter, token_key, up_key, write_adapter
from blockctl.conditioning import denoise, encode
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import SCHEMA_VERSION, Layout
from blockctl.train import loop, roe
from blockctl.train.data import encode_dtype
from blockctl.train.run import Session, TrainRequest, prepare
from blockctl.train.slot_adapter import vocabulary_norms
from registry import Registry
from tests.conftest import create_registry
from tests.support.cli import cli

ENCODERS = ("text_encoder", "text_encoder_2")


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Random photos of the given (height, width)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _session(
    reg: Registry,
    tmp_path: Path,
    sizes: list[tuple[int, int]] | None = None,
    base: Path | None = None,
    **overrides: object,
) -> Session:
    photos = _photos(tmp_path / "photos", sizes or [(36, 44), (50, 40)])
    if not any(r.concept == "rex" for r in reg.slots()):
        reg.reserve("rex", "<rex>", "dog", "alice")
    request = TrainRequest(
        photos=photos, concept="rex", out_dir=tmp_path / "o", overrides=overrides,
        base=None if base is None else str(base),
    )  # fmt: skip
    return prepare(reg, request, say=lambda m: None)


@pytest.fixture
def sdxl_registry(tiny_sdxl_base: Path, tmp_path: Path) -> Registry:
    return create_registry(tmp_path / "reg", tiny_sdxl_base, text_encoder=True)


def test_init_refuses_a_pipeline_it_cannot_train_and_writes_nothing(
    tiny_base: Path, tmp_path: Path
) -> None:
    other = tmp_path / "img2img"
    shutil.copytree(tiny_base, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLImg2ImgPipeline"})
    )
    code, _, err = cli(tmp_path / "reg", "init", "--base", other)
    assert code == 2
    assert "StableDiffusionXLImg2ImgPipeline" in err
    assert "StableDiffusionPipeline" in err and "StableDiffusionXLPipeline" in err
    assert "Traceback" not in err and not (tmp_path / "reg").exists()


def test_a_schema_1_layout_reads_as_sd_and_keeps_its_hash(tiny_registry: Registry) -> None:
    """Registries made before families keep their layout hash (adapters carry it)."""
    import hashlib

    old = tiny_registry.layout()
    for key in ("family", "token_dim_2", "layout_hash"):
        old.pop(key)
    old["schema_version"] = 1
    hashed = {k: v for k, v in old.items() if k != "base"}
    stored = hashlib.sha256(
        json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()  # the hash as schema 1 defined it
    layout = Layout.from_dict({**old, "layout_hash": stored})
    assert layout.family == "sd" and layout.layout_hash == stored
    assert layout.token_dims == {"text_encoder": layout.token_dim}
    assert SCHEMA_VERSION == 2 and Layout.from_dict(tiny_registry.layout()).schema_version == 2
    with pytest.raises(InvalidInput, match="model family"):
        Layout.from_dict({**tiny_registry.layout(), "family": "flux", "layout_hash": None})


def test_the_token_starts_from_the_class_word_in_each_encoder_under_its_own_bound(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    s = _session(sdxl_registry, tmp_path, token_norm_bound=1.0)
    adapter, comps = s.inputs.adapter, s.inputs.components
    assert list(adapter.embeddings) == list(ENCODERS)
    for encoder, tokenizer in comps.tokenizers().items():
        emb = adapter.embeddings[encoder]
        class_ids = tokenizer("dog", add_special_tokens=False).input_ids
        torch.testing.assert_close(emb.row[0], emb.base.weight[class_ids].mean(0))
        assert emb.max_norm == pytest.approx(vocabulary_norms(emb.base.weight).largest)
        assert tokenizer.convert_tokens_to_ids("<rex>") == emb.token_id
    widths = [adapter.embeddings[e].row.shape[1] for e in ENCODERS]
    assert widths == [32, 48]
    trainable = [p for m in comps.modules().values() for p in m.parameters() if p.requires_grad]
    assert len(trainable) == len(s.layout.targets) + 2  # B blocks + one row per encoder
    tensors = adapter.state_tensors()
    assert {token_key("<rex>", e) for e in ENCODERS} <= tensors.keys()


def test_each_photo_keeps_its_crop_for_add_time_ids(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    s = _session(sdxl_registry, tmp_path, batch_size=4, roe_batch_size=2)
    framing = s.photos.framing
    # 36×44 → 32×39, centre square from column 3; 50×40 → 40×32, from row 4
    assert [f.time_ids() for f in framing] == [(36, 44, 0, 3, 32, 32), (50, 40, 4, 0, 32, 32)]
    assert [f.mirrored().crop for f in framing] == [(0, 4), (4, 0)]  # the mirror's own left edge
    bank = s.inputs.bank
    assert bank.time_ids is not None and bank.time_ids.shape == (2, 2, 6)
    for step in range(4):
        b = loop.micro_batch(s.inputs, step, 0, 0)
        assert b.time_ids is not None and b.time_ids.shape == (4, 6)
        allowed = {tuple(int(v) for v in row) for row in bank.time_ids.reshape(-1, 6)}
        assert {tuple(int(v) for v in row) for row in b.time_ids} <= allowed
        assert b.erasure is not None and b.erasure.time_ids is not None
        assert torch.equal(b.erasure.time_ids, b.time_ids[:2])
        assert b.ids.shape == (4, 2, 32)  # one row of ids per tokenizer


def test_sd_bases_have_no_time_ids(tiny_registry: Registry, tmp_path: Path) -> None:
    s = _session(tiny_registry, tmp_path)
    b = loop.micro_batch(s.inputs, 0, 0, 0)
    assert s.inputs.bank.time_ids is None and b.time_ids is None and b.ids.ndim == 2


def test_standins_sit_in_both_encoders_from_the_same_anchor_ids(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    s = _session(
        sdxl_registry, tmp_path, roe_standin=1.0, roe_standin_offset=0.0, batch_size=2,
        roe_batch_size=2,
    )  # fmt: skip
    adapter, comps = s.inputs.adapter, s.inputs.components
    with torch.no_grad():  # a trained-looking adapter, so "off" and "on" differ
        for p in adapter.slot_parameters():
            p.normal_(0, 0.5)
    b = next(
        m for step in range(10) if (m := loop.micro_batch(s.inputs, step, 0, 0)).erasure
        and m.erasure.standins is not None
    )  # fmt: skip
    e = b.erasure
    assert e is not None and e.standins is not None and e.standins_2 is not None
    table_1 = adapter.embeddings["text_encoder"].base.weight
    table_2 = adapter.embeddings["text_encoder_2"].base.weight
    for row_1, row_2 in zip(e.standins, e.standins_2, strict=True):
        (anchor,) = [i for i in range(table_1.shape[0]) if torch.equal(table_1[i], row_1)]
        assert torch.equal(table_2[anchor], row_2)  # with no offset, the anchors' own rows
    for i, encoder in enumerate(ENCODERS):
        first = adapter.embeddings[encoder].scratch_start
        assert int((e.ids[:, i] >= first).sum()) == e.standins.shape[0]
    _, student, target, _ = s.model(b.noisy, b.timesteps, b.ids, e, b.time_ids)
    assert student is not None and target is not None
    with torch.no_grad():
        adapter.set_scratch(e.standin_rows())
        with adapter.disabled():
            cond = encode(comps.text_encoders(), e.ids)
            base = denoise(comps.unet, e.noisy, e.timesteps, cond, e.time_ids)
        adapter.set_scratch({})
    torch.testing.assert_close(target, base, rtol=1e-4, atol=1e-5)
    assert float((student - target).detach().abs().max()) > 1e-4


def _one_step_grads(s: Session) -> list[torch.Tensor]:
    b = loop.micro_batch(s.inputs, 0, 0, 0)
    out = s.model(b.noisy, b.timesteps, b.ids, b.erasure, b.time_ids)
    loss = torch.nn.functional.mse_loss(out.pred, b.target)
    assert out.student is not None and out.teacher is not None
    (loss + roe.erasure_loss(out.student, out.teacher)).backward()
    params = s.inputs.adapter.slot_parameters() + s.inputs.adapter.embedding_parameters()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_gradient_checkpointing_changes_memory_not_gradients(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    plain = _one_step_grads(_session(sdxl_registry, tmp_path / "a"))
    s = _session(sdxl_registry, tmp_path / "b", gradient_checkpointing=True)
    comps = s.inputs.components
    assert comps.unet.is_gradient_checkpointing
    assert all(  # both carry slots
        any(getattr(m, "gradient_checkpointing", False) for m in e.modules())
        for e in comps.text_encoders()
    )
    checkpointed = _one_step_grads(s)
    assert any(float(g.abs().max()) > 0 for g in plain)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_resolution_defaults_to_the_base_and_must_fit_the_vae(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    assert _session(sdxl_registry, tmp_path / "a").photos.resolution == 32  # the base's own
    s = _session(sdxl_registry, tmp_path / "b", resolution=16)
    assert s.photos.pixels.shape[-2:] == (16, 16)
    assert s.inputs.bank.mean.shape[-2:] == (8, 8)
    assert s.photos.framing[0].time_ids()[-2:] == (16, 16)
    with pytest.raises(InvalidInput, match="multiple of 2"):
        _session(sdxl_registry, tmp_path / "c", resolution=33)
    with pytest.raises(InvalidInput, match="resolution"):
        _session(sdxl_registry, tmp_path / "d", resolution=-8)


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate keeps one process-wide state, fixed by the first Accelerator: a test that
    asks for another mixed precision starts from a clean one and leaves a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_vae_encodes_in_float32_unless_it_is_safe_in_half_precision(
    sdxl_registry: Registry, tiny_sdxl_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockctl.train import run

    assert encode_dtype("no", upcast=False) == torch.float32
    assert encode_dtype("bf16", upcast=True) == torch.float32  # SDXL's VAE: force_upcast
    assert encode_dtype("bf16", upcast=False) == torch.bfloat16
    assert encode_dtype("fp16", upcast=False) == torch.float16
    seen: list[torch.dtype] = []
    original = run.encode_photos

    def spy(vae: torch.nn.Module, *args: object) -> object:
        seen.append(next(vae.parameters()).dtype)
        return original(vae, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(run, "encode_photos", spy)
    safe = tmp_path / "fp16-safe-vae"
    shutil.copytree(tiny_sdxl_base, safe)
    config = json.loads((safe / "vae" / "config.json").read_text())
    (safe / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    for base in (None, safe):  # accelerate runs bf16 autocast on the CPU too
        s = _session(sdxl_registry, tmp_path / str(len(seen)), base=base, mixed_precision="bf16",
                     steps=1)  # fmt: skip
        state = loop.run(s.inputs, s.accelerator, s.model, s.optimizer, s.state)
        assert state.step == 1 and all(np.isfinite(state.losses))
    assert seen == [torch.float32, torch.bfloat16]


def test_v_prediction_bases_train_against_the_velocity(tmp_path: Path) -> None:
    """An SD 2.x-style base (``prediction_type="v_prediction"``): the target is
    v = √ᾱ·ε − √(1−ᾱ)·x₀, here recomputed from an ε-prediction batch drawn with the same seeds."""
    from diffusers import DDPMScheduler

    from blockctl.toy.model import TINY, build_pipeline, save_pipeline

    pipe = build_pipeline(TINY, seed=0)
    pipe.scheduler = type(pipe.scheduler).from_config(
        {**pipe.scheduler.config, "prediction_type": "v_prediction"}
    )
    base = save_pipeline(pipe, tmp_path / "sd2v")
    reg = create_registry(tmp_path / "reg", base)
    s = _session(reg, tmp_path, steps=2)
    sched = s.inputs.components.noise_scheduler
    assert sched.config.prediction_type == "v_prediction"
    v = loop.micro_batch(s.inputs, 3, 0, 0)
    s.inputs.components.noise_scheduler = DDPMScheduler.from_config(
        {**sched.config, "prediction_type": "epsilon"}
    )
    eps = loop.micro_batch(s.inputs, 3, 0, 0)
    assert torch.equal(v.noisy, eps.noisy) and torch.equal(v.timesteps, eps.timesteps)
    abar = sched.alphas_cumprod[v.timesteps].view(-1, 1, 1, 1)
    x0 = (eps.noisy - (1 - abar).sqrt() * eps.target) / abar.sqrt()
    velocity = abar.sqrt() * eps.target - (1 - abar).sqrt() * x0
    torch.testing.assert_close(v.target, velocity, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(v.target, eps.target)
    s.inputs.components.noise_scheduler = sched
    state = loop.run(s.inputs, s.accelerator, s.model, s.optimizer, s.state)
    assert state.step == 2 and all(np.isfinite(state.losses))


def test_the_adapter_says_which_encoder_each_token_row_belongs_to(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    from blockctl.layout import layout_of
    from blockctl.verify import adapter_problems

    layout = layout_of(sdxl_registry)
    meta = AdapterMeta("rex", 0, ("<rex>",), "dog", layout.rank, layout.scale,
                       layout.layout_hash, layout.base_fingerprint)  # fmt: skip
    tensors = {up_key(t.name): torch.zeros(t.out_features, layout.rank) for t in layout.targets}
    tensors[token_key("<rex>")] = torch.zeros(1, 32)
    path = tmp_path / "sd-style.safetensors"
    write_adapter(path, tensors, meta)  # an SD-style file: one encoder's row only
    adapter = load_adapter(path)
    assert adapter.meta.text_encoders == ("text_encoder",)
    sdxl_registry.reserve("rex", "<rex>", "dog", "alice")
    problems = adapter_problems(adapter, layout, sdxl_registry.slot_for("rex"))
    assert any("token rows for text_encoder but" in p for p in problems)
    assert any("token_embedding_2.<rex>" in p for p in problems)
    header = meta.to_header("x")
    header["token_embeddings"] = json.dumps({"token_embedding_2": "text_encoder"})
    with pytest.raises(ValidationFailed, match="token_embeddings"):
        AdapterMeta.from_header(header)


def test_the_sample_grid_renders_on_sdxl(sdxl_registry: Registry, tmp_path: Path) -> None:
    from blockctl.train.preview import sample_grid

    s = _session(sdxl_registry, tmp_path)
    comps = s.inputs.components
    comps.unet.eval()
    path = sample_grid(comps, s.inputs.adapter, ("a photo of <rex> dog", "a photo of a dog"),
                       tmp_path / "grid.png", per_cell=1, steps=2)  # fmt: skip
    grid = Image.open(path)
    assert grid.size[0] == 2 * 32  # base | trained, one 32-px image each
    assert s.inputs.adapter.embedding.enabled  # left switched on


def test_processes_share_an_sdxl_batch_with_its_time_ids_and_both_encoders_standins(
    sdxl_registry: Registry, tmp_path: Path
) -> None:
    """Two processes: the add_time_ids are cut with their items, the stand-in rows of both
    encoders (looked up by number) go whole to each, and the mean of the shares' gradients is
    the whole batch's."""
    s = _session(
        sdxl_registry, tmp_path, batch_size=4, roe_batch_size=2, roe_standin=1.0,
        token_norm_bound=1.0,
    )  # fmt: skip
    with torch.no_grad():
        for p in s.inputs.adapter.slot_parameters():
            p.normal_(0, 0.5)
    step = next(
        i for i in range(10) if (e := loop.micro_batch(s.inputs, i, 0).erasure) is not None
        and e.standins is not None
    )  # fmt: skip
    whole = loop.micro_batch(s.inputs, step, 0)
    parts = [loop.micro_batch(s.inputs, step, 0, rank, 2) for rank in range(2)]
    assert whole.erasure is not None and whole.erasure.standins_2 is not None
    time_ids = [p.time_ids for p in parts]
    assert all(t is not None and t.shape[0] == 2 for t in time_ids)
    assert torch.equal(torch.cat([t for t in time_ids if t is not None]), whole.time_ids)
    for part in parts:
        e = part.erasure
        assert e is not None and e.time_ids is not None and e.time_ids.shape[0] == 1
        assert e.standins is not None and e.standins_2 is not None
        assert torch.equal(e.standins_2, whole.erasure.standins_2)

    def grads(batches: list[loop.MicroBatch]) -> list[torch.Tensor]:
        params = s.inputs.adapter.slot_parameters() + s.inputs.adapter.embedding_parameters()
        for p in params:
            p.grad = None
        for batch in batches:
            loss, _ = loop.step_loss(s.inputs.config, s.model, batch, "cpu")
            (loss / len(batches)).backward()
        return [p.grad.clone() for p in params if p.grad is not None]

    for w, g in zip(grads([whole]), grads(parts), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
