"""``train``: everything from a reserved slot and a folder of photos to a published adapter."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blockctl import __version__
from blockctl.adapter import AdapterMeta, write_adapter
from blockctl.base_model import BaseFolder, resolve_base
from blockctl.blocks import foreign_down
from blockctl.conditioning import tokenize as tokenize_prompts
from blockctl.errors import InvalidInput, SlotConflict, ValidationFailed
from blockctl.layout import Layout, fingerprint, layout_of, load_basis, sha256_file
from blockctl.train import checkpoint, loop, roe
from blockctl.train.components import StepModel, load_components
from blockctl.train.config import RESUMABLE_OVERRIDES, TrainConfig
from blockctl.train.data import (
    ConceptPhotos,
    default_caption,
    encode_dtype,
    encode_photos,
    load_photos,
)
from blockctl.train.slot_adapter import ConceptAdapter, attach, freeze, vocabulary_norms
from blockctl.train.strength import make_probe
from blockctl.verify import check_for_publish
from registry.base import PUBLISHED, RESERVED, Registry, SlotRecord

Say = Callable[[str], None]
FINAL_LOSS_WINDOW = 20


@dataclass(frozen=True)
class TrainRequest:
    photos: Path
    concept: str
    out_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # settings given explicitly
    resume: bool = False
    publish: bool = True
    owner: str | None = None
    base: str | None = None
    sample: bool = True
    resume_hint: str = ""


@dataclass(frozen=True)
class TrainResult:
    adapter: Path
    sha256: str
    steps: int
    seconds: float
    final_loss: float
    published: bool
    resumed_from: int | None
    grid: Path | None
    photos: int
    skipped: tuple[str, ...]
    config: TrainConfig
    # False in the other processes of a multi-process run: they train but write nothing and
    # have nothing to report (no adapter sha256, nothing published).
    main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": str(self.adapter),
            "sha256": self.sha256,
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "final_loss": self.final_loss,
            "published": self.published,
            "resumed_from": self.resumed_from,
            "grid": None if self.grid is None else str(self.grid),
            "photos": self.photos,
            "skipped": list(self.skipped),
            "settings": self.config.to_dict(),
        }


def check_slot(registry: Registry, concept: str, owner: str | None) -> SlotRecord:
    record = registry.slot_for(concept)
    if record.status not in (RESERVED, PUBLISHED):
        raise SlotConflict(
            f"concept {concept!r} was released (slot {record.slot} is no longer usable)",
            hint=f"blockctl reserve-slot {concept} --class-word {record.class_word}",
        )
    if owner is not None and record.owner != owner:
        raise SlotConflict(
            f"slot {record.slot} of {concept!r} is reserved by {record.owner!r}, not {owner!r}"
        )
    return record


def check_base(layout: Layout, spec: str | None) -> Path:
    base_dir = resolve_base(spec or layout.base)
    if fingerprint(BaseFolder(base_dir), layout.targets) != layout.base_fingerprint:
        raise ValidationFailed(
            f"base {spec or layout.base!r} is not the model this registry was made for "
            "(fingerprint differs)",
            hint="pass the registry's base with --base",
        )
    return base_dir


def resolve_config(
    request: TrainRequest, ckpt: checkpoint.Checkpoint | None, say: Say
) -> TrainConfig:
    if ckpt is None:
        return TrainConfig().with_overrides(request.overrides)
    stored = TrainConfig.from_dict(ckpt.meta["config"])
    changed = sorted(
        k
        for k, v in request.overrides.items()
        if k not in RESUMABLE_OVERRIDES and getattr(stored, k) != v
    )
    if changed:
        say(
            f"warning: {', '.join(changed)} differ from the checkpoint's settings; the resumed "
            "run will not match an uninterrupted one"
        )
    return stored.with_overrides(request.overrides)


@dataclass
class Session:
    """Everything a run needs, loaded and checked; ``train`` runs it, benchmarks time it."""

    inputs: loop.LoopInputs
    accelerator: Any
    model: StepModel
    optimizer: Any
    state: loop.LoopState
    record: SlotRecord
    layout: Layout
    photos: ConceptPhotos
    resumed_from: int | None


def prepare(registry: Registry, request: TrainRequest, say: Say = print) -> Session:
    from accelerate import Accelerator, PartialState

    # This process and, under ``accelerate launch``, its peers. Made first and with the
    # Accelerator's own ``cpu`` flag: a state made without it on a machine without GPUs is
    # never distributed, and every later one shares it (each process would train alone).
    cpu = not torch.cuda.is_available()
    processes = PartialState(cpu=cpu)
    if not processes.is_main_process:
        say = _silent  # every process would say the same: the main one speaks for all
    note = launch_note(os.environ, processes.num_processes)
    if note:
        say(note)
    TrainConfig().with_overrides(request.overrides)  # bad numbers fail before any loading
    layout = layout_of(registry)
    record = check_slot(registry, request.concept, request.owner)
    base_dir = check_base(layout, request.base)
    ckpt = _checkpoint_for(request, record, layout, say, processes.is_main_process)
    config = resolve_config(request, ckpt, say)
    config.check_processes(processes.num_processes)

    family = layout.model_family
    comps = load_components(base_dir, family)
    resolution = training_resolution(config.resolution, comps.resolution, comps.vae_factor)
    photos = load_photos(request.photos, resolution, record.token, record.class_word, warn=say)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu,
    )
    device = accelerator.device
    freeze(*comps.modules().values())
    comps.vae.to(device, dtype=encode_dtype(config.mixed_precision, comps.vae_upcast))
    time_ids = photos.time_ids() if family.dual_text else None
    bank = encode_photos(comps.vae, photos.pixels, comps.scaling_factor, time_ids)
    comps.vae.to(dtype=torch.float32)  # the sample grid decodes in full precision
    bases = load_basis(registry.basis_path(), layout)
    # before the concept's token is added to them
    base_tokenizers = [copy.deepcopy(t) for t in comps.tokenizers().values()]
    adapter = attach(
        comps.modules(),
        layout,
        bases,
        record.slot,
        comps.tokenizers(),
        record.token,
        record.class_word,
        config.token_norm_bound,
    )
    for name, module in comps.modules().items():
        if name != "vae":
            module.to(device)
            module.train()
    if config.gradient_checkpointing:
        _checkpoint_activations(comps, layout)
    others = [
        x for r in registry.slots() if r.concept != record.concept for x in (r.token, r.concept)
    ]
    pool = roe.build_pool(comps.tokenizer, record.token, record.class_word, record.concept, others)
    caption_ids = loop.tokenize_for(comps, [p.caption for p in photos.photos])

    foreign = _foreign(config, layout, bases, record.slot, comps.unet, say)
    model = StepModel(comps.unet, comps.text_encoder, adapter, foreign, comps.text_encoder_2)
    optimizer = loop.build_optimizer(config, adapter)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = loop.LoopState()
    if ckpt is not None:
        state = loop.restore(ckpt, adapter, optimizer)
        say(f"resuming from step {state.step} ({ckpt.path})")
    inputs = loop.LoopInputs(
        config=config,
        components=comps,
        adapter=adapter,
        bank=bank,
        caption_ids=caption_ids,
        pool=pool,
        probe=_probe(
            comps, base_tokenizers, record, tuple(bank.mean.shape[2:]), config.seed, resolution
        ),
        out_dir=request.out_dir,
        run_meta=_run_meta(record, layout),
        resume_hint=request.resume_hint,
    )
    return Session(
        inputs=inputs,
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        state=state,
        record=record,
        layout=layout,
        photos=photos,
        resumed_from=state.step if ckpt is not None else None,
    )


def training_resolution(asked: int, native: int, vae_factor: int) -> int:
    """The side of the training square: ``asked`` (0: the base's own), a multiple of the VAE's
    downsampling so that it maps onto whole latent cells."""
    resolution = asked or native
    if resolution % vae_factor:
        raise InvalidInput(
            f"--resolution {resolution} is not a multiple of {vae_factor}, the base's VAE "
            "downsampling factor",
            hint=f"the base's own resolution is {native}",
        )
    return resolution


def _checkpoint_activations(comps: Any, layout: Layout) -> None:
    """Gradient checkpointing on the UNet, and on each text encoder that carries slots (one
    that carries only the token row has nothing worth recomputing)."""
    comps.unet.enable_gradient_checkpointing()
    for encoder in layout.model_family.text_encoders:
        if any(t.component == encoder for t in layout.targets):
            model = comps.modules()[encoder]
            # transformers 5 renamed it (the old name warns); 4.x has only the old one
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})


def launch_note(env: Mapping[str, str], processes: int) -> str | None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process (several CPU processes
    need mpirun): it then leaves a rendezvous port set for a run of one. Say so, rather than
    let a user believe the run was shared."""
    launched_on_cpu = env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")
    if processes > 1 or not launched_on_cpu or not env.get("MASTER_PORT"):
        return None
    return (
        "note: training in ONE process: `accelerate launch --cpu` starts only one; on a "
        "machine without GPUs start several with `accelerate launch --multi_gpu "
        "--num_processes N` (docs/multi-gpu.md)"
    )


def _silent(message: str) -> None:
    pass


def _probe(
    comps: Any,
    base_tokenizers: list[Any],
    record: SlotRecord,
    latent_shape: tuple[int, ...],
    seed: int,
    resolution: int,
) -> Any:
    """The learning-strength probe of the concept's own prompts (strength.py): read with the
    concept's token by the trained model, and as the base reads them (token in pieces); on
    SDXL with the add_time_ids of an uncropped image at the training resolution."""
    return make_probe(
        lambda prompts: loop.tokenize_for(comps, prompts),
        lambda prompts: tokenize_prompts(base_tokenizers, prompts),
        record.token,
        record.class_word,
        latent_shape,
        comps.noise_scheduler,
        seed,
        resolution if comps.family.dual_text else None,
    )


def _foreign(
    config: TrainConfig,
    layout: Layout,
    bases: Mapping[int, torch.Tensor],
    slot: int,
    unet: Any,
    say: Say,
) -> torch.Tensor | None:
    """Other slots' down-projections at the width of the prompt encoding the UNet reads (the
    text encoder's, or on SDXL both side by side), for token isolation."""
    if config.token_isolation <= 0:
        return None
    width = int(unet.config.cross_attention_dim)
    if width not in bases:
        say(
            "note: token isolation is off: no target of this layout reads the "
            f"{width}-wide prompt encoding"
        )
        return None
    return foreign_down(bases[width], slot, layout.rank, layout.slots)


def train(
    registry: Registry,
    request: TrainRequest,
    *,
    say: Say = print,
    progress: Callable[[int, int, float], None] | None = None,
    on_step: Callable[[int, loop.StopFlag], None] | None = None,
) -> TrainResult:
    started = time.monotonic()
    session = prepare(registry, request, say)
    inputs, accelerator, state = session.inputs, session.accelerator, session.state
    config, comps, adapter = inputs.config, inputs.components, inputs.adapter
    record, layout, photos = session.record, session.layout, session.photos
    report = None
    if progress is not None and accelerator.is_main_process:
        report = lambda s, loss: progress(s, config.steps, loss)  # noqa: E731
    loop.run(inputs, accelerator, session.model, session.optimizer, state, report, on_step)
    accelerator.wait_for_everyone()

    window = state.losses[-FINAL_LOSS_WINDOW:]
    final_loss = sum(window) / len(window) if window else float("nan")
    adapter_path = request.out_dir / f"{record.concept}.safetensors"
    published, grid, sha = False, None, ""
    if accelerator.is_main_process:
        meta = AdapterMeta(
            concept=record.concept,
            slot=record.slot,
            tokens=(record.token,),
            class_word=record.class_word,
            rank=layout.rank,
            scale=layout.scale,
            layout_hash=layout.layout_hash,
            base_fingerprint=layout.base_fingerprint,
            training=_training_meta(
                config,
                photos.resolution,
                len(photos),
                state,
                final_loss,
                adapter,
                accelerator.num_processes,
            ),
            text_encoders=tuple(layout.token_dims),
        )
        write_adapter(adapter_path, adapter.state_tensors(), meta)
        check_for_publish(adapter_path, layout, registry)
        sha = sha256_file(adapter_path)
        if request.publish:
            registry.publish(record.concept, adapter_path, sha)
            published = True
        if request.sample:
            grid = _grid(comps, adapter, record, adapter_path, config.seed, say)
    return TrainResult(
        adapter=adapter_path,
        sha256=sha,
        steps=state.step,
        seconds=time.monotonic() - started,
        final_loss=final_loss,
        published=published,
        resumed_from=session.resumed_from,
        grid=grid,
        photos=len(photos),
        skipped=tuple(name for name, _ in photos.skipped),
        config=config,
        main_process=accelerator.is_main_process,
    )


def _checkpoint_for(
    request: TrainRequest, record: SlotRecord, layout: Layout, say: Say, main: bool
) -> checkpoint.Checkpoint | None:
    if not request.resume:
        # One process looks and deletes; the others never read what it may be deleting.
        if main and checkpoint.latest(request.out_dir) is not None:
            say(
                f"note: starting afresh; existing checkpoints in {request.out_dir} are replaced "
                "(pass --resume to continue them)"
            )
            checkpoint.clear(request.out_dir)
        return None
    found = checkpoint.latest(request.out_dir)
    if found is None:
        say(f"note: no checkpoint in {request.out_dir}; starting from step 0")
        return None
    expected = _run_meta(record, layout)
    for key, value in expected.items():
        if found.meta.get(key) != value:
            raise InvalidInput(
                f"the checkpoint in {request.out_dir} belongs to another run ({key} differs)",
                hint="use another --out folder, or train without --resume",
            )
    return found


def _run_meta(record: SlotRecord, layout: Layout) -> dict[str, Any]:
    return {
        "concept": record.concept,
        "slot": record.slot,
        "token": record.token,
        "layout_hash": layout.layout_hash,
        "base_fingerprint": layout.base_fingerprint,
    }


def _training_meta(
    config: TrainConfig,
    resolution: int,
    photos: int,
    state: loop.LoopState,
    final_loss: float,
    adapter: ConceptAdapter,
    processes: int,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "trainer": f"blockctl {__version__}",
        **config.to_dict(),
        "resolution": resolution,
        "processes": processes,  # sharing each batch (loop.share); the result is the same
        "photos": photos,
        "steps_taken": state.step,
        "roe_steps": state.roe_steps,
        "final_loss": final_loss,
        "strength": [[s, round(v, 8)] for s, v in state.strength],
    }
    # Where each learnt token row ended, against the vocabulary it must stay among; the first
    # encoder's under the names SD adapters always had.
    for encoder, embedding in adapter.embeddings.items():
        suffix = encoder.removeprefix("text_encoder")
        meta[f"token_norm{suffix}"] = round(float(embedding.row.detach().norm()), 4)
        meta[f"token_init_norm{suffix}"] = round(float(embedding.initial.norm()), 4)
        meta[f"vocabulary_norms{suffix}"] = vocabulary_norms(embedding.base.weight).to_dict()
    return meta


def _grid(
    comps: Any, adapter: Any, record: SlotRecord, adapter_path: Path, seed: int, say: Say
) -> Path | None:
    from blockctl.train.preview import sample_grid

    prompts = (
        default_caption(record.token, record.class_word),
        f"a photo of a {record.class_word}",
    )
    path = adapter_path.with_name(f"{record.concept}-samples.png")
    comps.unet.eval()
    try:
        return sample_grid(comps, adapter, prompts, path, seed=seed)
    except Exception as exc:  # a preview must never cost the user a finished adapter
        say(f"warning: could not render the sample grid: {type(exc).__name__}: {exc}")
        return None
