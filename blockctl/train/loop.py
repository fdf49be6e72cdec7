"""The training loop: per-step randomness from ``(seed, step)``, accelerate for devices and
gradient accumulation, checkpoints, and a clean stop on Ctrl-C or a non-finite loss.

Every random draw of a step (photos, flips, VAE posterior noise, diffusion noise, timesteps,
the erasure decision and prompts) comes from generators seeded by ``(seed, step, micro-batch)``,
and the learning rate is a pure function of the step. Resuming from a checkpoint therefore
continues exactly where an uninterrupted run would be.

With several processes (``accelerate launch``), every process draws the same whole batch and
trains on its equal share of it (``share``); DDP averages the processes' gradients, so a step
is the one-process step on the whole batch, up to float summation order.
"""

from __future__ import annotations

import hashlib
import math
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from blockctl.conditioning import stack_ids
from blockctl.conditioning import tokenize as tokenize_prompts
from blockctl.errors import BlockctlError
from blockctl.train import checkpoint, roe
from blockctl.train.components import Components, StepModel
from blockctl.train.config import TrainConfig, lr_factor
from blockctl.train.data import LatentBank
from blockctl.train.slot_adapter import ConceptAdapter
from blockctl.train.strength import StrengthProbe, delta_sq, reached

STRENGTH_EVERY = 50  # steps between learning-strength samples


class TrainingInterrupted(BlockctlError):
    """Ctrl-C: a checkpoint was saved; the run can be resumed."""

    exit_code = 130


class TrainingDiverged(BlockctlError):
    exit_code = 1


@dataclass
class StopFlag:
    requested: bool = False


@dataclass
class LoopState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    roe_steps: int = 0
    strength: list[tuple[int, float]] = field(default_factory=list)  # (step, probe ‖δ‖²)
    strong_enough: bool = False  # the strength target was reached: training is done


@dataclass(frozen=True)
class LoopInputs:
    config: TrainConfig
    components: Components
    adapter: ConceptAdapter
    bank: LatentBank
    caption_ids: torch.Tensor  # (N, L) token ids of each photo's caption
    pool: roe.ErasurePool
    probe: StrengthProbe  # for the learning-strength curve (strength.py)
    out_dir: Path
    run_meta: dict[str, Any]  # identity of the run, stored in every checkpoint
    resume_hint: str


def step_seed(seed: int, step: int, micro: int, stream: str) -> int:
    # The 0 is where a process index used to be: one-process runs keep drawing what they did.
    digest = hashlib.sha256(f"{seed}:{step}:{micro}:0:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tokenize(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    return tokenize_prompts([tokenizer], prompts)


def tokenize_for(components: Components, prompts: list[str]) -> torch.Tensor:
    """Token ids for every text encoder of the base: (n, L), or (n, 2, L) on SDXL."""
    return tokenize_prompts(list(components.tokenizers().values()), prompts)


def build_optimizer(config: TrainConfig, adapter: ConceptAdapter) -> torch.optim.AdamW:
    groups = [
        {"params": adapter.slot_parameters(), "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": adapter.embedding_parameters(), "lr": config.embedding_lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


@contextmanager
def ctrl_c_stops(flag: StopFlag) -> Iterator[None]:
    """First Ctrl-C asks the loop to stop after the current step (and checkpoint); a second
    one aborts at once. Only the main thread may install signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class MicroBatch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    ids: torch.Tensor  # caption token ids
    target: torch.Tensor  # diffusion target
    erasure: roe.ErasureBatch | None
    time_ids: torch.Tensor | None = None  # SDXL: each item's add_time_ids (b, 6)


def micro_batch(
    inputs: LoopInputs, step: int, micro: int, rank: int = 0, world: int = 1
) -> MicroBatch:
    """Process ``rank``'s share (of ``world`` processes) of one micro-step's concept batch and,
    when drawn, its erasure batch; the whole batch is drawn alike on every process."""
    cfg, comps = inputs.config, inputs.components
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, micro, "data"))
    n, b = inputs.caption_ids.shape[0], cfg.batch_size
    index = torch.randint(n, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5 if cfg.flip else torch.zeros(b, dtype=torch.bool)
    latents = inputs.bank.sample(
        index, flip, torch.randn(b, *inputs.bank.mean.shape[2:], generator=gen)
    )
    noise = torch.randn(latents.shape, generator=gen)
    sched = comps.noise_scheduler
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=gen)
    noisy = sched.add_noise(latents, noise, timesteps)
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    time_ids = inputs.bank.time_ids_for(index, flip)
    erasure = None
    if cfg.roe_active:
        rng = random.Random(step_seed(cfg.seed, step, micro, "roe"))
        if roe.draw(rng, cfg.roe_prob):
            mix = roe.ErasureMix(standin=cfg.roe_standin, empty=cfg.roe_empty)
            prompts = inputs.pool.sample(rng, cfg.erasure_batch, mix)
            embeddings = inputs.adapter.embeddings
            tokenizers = comps.tokenizers()
            # Each encoder's tokenizer places the stand-ins at its own scratch ids (SDXL).
            per_encoder = {
                encoder: roe.tokenize_with_standins(tokenizers[encoder], prompts, e.scratch_start)
                for encoder, e in embeddings.items()
            }
            ids = stack_ids([found for found, _ in per_encoder.values()])
            used = per_encoder["text_encoder"][1]
            latent_gen = torch.Generator().manual_seed(
                step_seed(cfg.seed, step, micro, "roe-latents")
            )
            erasure = roe.erasure_batch(ids, noisy, timesteps, sched, cfg.roe_latents, latent_gen)
            # The erasure prompts are asked on the first k items' latents (or on Gaussian ones
            # in their place): those items' add_time_ids go with them.
            k = ids.shape[0]
            erasure = replace(erasure, time_ids=None if time_ids is None else time_ids[:k])
            if used:
                rows: dict[str, torch.Tensor] = {}
                for encoder, e in embeddings.items():
                    # The same seed for every encoder: the same anchor ids, each from its own
                    # encoder's table, each with its own random offset.
                    standin_gen = torch.Generator().manual_seed(
                        step_seed(cfg.seed, step, micro, "roe-standins")
                    )
                    rows[encoder] = roe.standin_rows(
                        e.base.weight, inputs.pool.anchors, used,
                        cfg.roe_standin_offset, e.max_norm, standin_gen,
                    )  # fmt: skip
                erasure = replace(
                    erasure, standins=rows["text_encoder"], standins_2=rows.get("text_encoder_2")
                )
    whole = MicroBatch(noisy, timesteps, inputs.caption_ids[index], target, erasure, time_ids)
    return share(whole, rank, world)


def share(batch: MicroBatch, rank: int, world: int) -> MicroBatch:
    """Process ``rank``'s contiguous, equal part of a batch every process drew whole.

    Each process's loss is a mean over its part and DDP averages gradients over processes, so
    equal parts give the whole batch's gradient. The erasure batch is split the same way when
    it divides evenly; otherwise (one erasure prompt over two processes) every process takes
    all of it, and the average of identical terms is that term: exact either way. Every
    tensor field is cut along the batch, so fields added later are split too; the stand-in
    rows (of either text encoder) are not per item (erasure ids refer to them by number) and
    stay whole.
    """
    if world == 1:
        return batch
    erasure = batch.erasure
    if erasure is not None and erasure.ids.shape[0] % world == 0:
        erasure = _cut(erasure, rank, world, keep=("standins", "standins_2"))
    return replace(_cut(batch, rank, world, keep=("erasure",)), erasure=erasure)


Batch = TypeVar("Batch", MicroBatch, roe.ErasureBatch)


def _cut(batch: Batch, rank: int, world: int, keep: tuple[str, ...]) -> Batch:
    parts: dict[str, Any] = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name in keep or not isinstance(value, torch.Tensor):
            continue
        size = value.shape[0] // world
        if size * world != value.shape[0]:
            raise ValueError(f"{f.name}: {value.shape[0]} items do not split over {world}")
        parts[f.name] = value[rank * size : (rank + 1) * size]
    return replace(batch, **parts)


def run(
    inputs: LoopInputs,
    accelerator: Any,
    model: StepModel,
    optimizer: Any,
    state: LoopState,
    progress: Callable[[int, float], None] | None = None,
    on_step: Callable[[int, StopFlag], None] | None = None,
) -> LoopState:
    """Train from ``state.step`` to ``config.steps``; raises TrainingInterrupted on Ctrl-C."""
    cfg = inputs.config
    base_lrs = [cfg.lr, cfg.embedding_lr]
    flag = StopFlag()
    saved_at = state.step
    with ctrl_c_stops(flag):
        state.strong_enough = strong_enough(cfg, state)  # a resumed run may already be done
        while state.step < cfg.steps and not state.strong_enough:
            factor = lr_factor(cfg, state.step)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            total, erased = train_step(inputs, accelerator, model, optimizer, state.step)
            state.step += 1
            state.losses.append(total)
            state.roe_steps += int(erased)
            if state.step % STRENGTH_EVERY == 0 or state.step == cfg.steps:
                state.strength.append((state.step, measure_strength(inputs)))
                state.strong_enough = _agree(accelerator, strong_enough(cfg, state))
            if progress is not None:
                progress(state.step, total)
            if on_step is not None:
                on_step(state.step, flag)
            stop = _agree(accelerator, flag.requested)
            more = state.step < cfg.steps and not state.strong_enough
            if stop or (state.step % cfg.checkpoint_every == 0 and more):
                save_checkpoint(inputs, accelerator, optimizer, state)
                saved_at = state.step
            if stop:
                where = checkpoint.checkpoint_dir(inputs.out_dir)
                raise TrainingInterrupted(
                    f"interrupted at step {saved_at}/{cfg.steps}; checkpoint saved in {where}",
                    hint=f"resume with: {inputs.resume_hint}",
                )
    return state


def train_step(
    inputs: LoopInputs, accelerator: Any, model: StepModel, optimizer: Any, step: int
) -> tuple[float, bool]:
    """One optimizer step (all its micro-batches): the mean loss, and whether it erased."""
    cfg = inputs.config
    params = inputs.adapter.slot_parameters() + inputs.adapter.embedding_parameters()
    rank, world = accelerator.process_index, accelerator.num_processes
    total, erased = 0.0, False
    for micro in range(cfg.grad_accum):
        batch = micro_batch(inputs, step, micro, rank, world)
        with accelerator.accumulate(model):
            loss, erasing = step_loss(cfg, model, batch, accelerator.device)
            erased = erased or erasing
            # The whole batch's loss (the mean over equal shares): every process gets the same
            # number, so a non-finite loss anywhere stops all of them before DDP's all-reduce.
            value = _process_mean(accelerator, float(loss.detach()))
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"loss became {value} at step {step + 1}; training stopped",
                    hint="lower --lr / --embedding-lr, or resume from the last checkpoint",
                )
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            inputs.adapter.project_()
        total += value / cfg.grad_accum
    return total, erased


def step_loss(
    cfg: TrainConfig, model: StepModel, batch: MicroBatch, device: Any
) -> tuple[torch.Tensor, bool]:
    """A (share of a) micro-batch's loss: the diffusion loss, plus λ_roe times the erasure
    loss when the batch erases, plus the token-isolation penalty when on; and whether it
    erased."""
    out = model(
        batch.noisy.to(device),
        batch.timesteps.to(device),
        batch.ids.to(device),
        None if batch.erasure is None else batch.erasure.to(device),
        None if batch.time_ids is None else batch.time_ids.to(device),
    )
    loss = F.mse_loss(out.pred.float(), batch.target.to(device).float())
    erased = False
    if out.student is not None and out.teacher is not None:
        loss = loss + cfg.roe_weight * roe.erasure_loss(out.student, out.teacher)
        erased = True
    if out.isolation is not None:
        loss = loss + cfg.token_isolation * out.isolation
    return loss, erased


def strong_enough(config: TrainConfig, state: LoopState) -> bool:
    """Whether a run with a strength target may stop at ``state.step``."""
    if config.strength_target <= 0 or state.step < config.min_steps:
        return False
    return reached(state.strength, config.strength_target)


def measure_strength(inputs: LoopInputs) -> float:
    comps = inputs.components
    return delta_sq(inputs.probe, comps.unet, comps.text_encoders(), inputs.adapter)


def _agree(accelerator: Any, requested: bool) -> bool:
    """All processes stop at the same step, or DDP would wait forever on the others: any
    process's request stops them all."""
    return _process_mean(accelerator, 1.0 if requested else 0.0) > 0


def _process_mean(accelerator: Any, value: float) -> float:
    """The mean of ``value`` over all processes (itself with one)."""
    if accelerator.num_processes == 1:
        return value
    mean = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(mean, reduction="mean").item())


def save_checkpoint(
    inputs: LoopInputs, accelerator: Any, optimizer: Any, state: LoopState
) -> Path | None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    meta = {
        **inputs.run_meta,
        "config": inputs.config.to_dict(),
        "losses": state.losses,
        "roe_steps": state.roe_steps,
        "strength": state.strength,
    }
    return checkpoint.save(
        inputs.out_dir, state.step, inputs.adapter.state_tensors(), optimizer.state_dict(), meta
    )


def restore(ckpt: checkpoint.Checkpoint, adapter: ConceptAdapter, optimizer: Any) -> LoopState:
    adapter.load_state_tensors(ckpt.adapter_tensors())
    if ckpt.optimizer_state()["state"]:
        optimizer.load_state_dict(ckpt.optimizer_state())
    return LoopState(
        step=ckpt.step,
        losses=[float(x) for x in ckpt.meta.get("losses", [])],
        roe_steps=int(ckpt.meta.get("roe_steps", 0)),
        strength=[(int(s), float(v)) for s, v in ckpt.meta.get("strength", [])],
    )
