"""Training settings: one frozen dataclass, validated once, stored in checkpoints and adapters."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal, get_args

from blockctl.errors import InvalidInput

MixedPrecision = Literal["no", "bf16", "fp16"]
Schedule = Literal["constant", "cosine", "linear"]
RoeLatents = Literal["concept", "mixed", "random"]  # where erasure prompts are asked: see roe.py
MIXED_PRECISION: tuple[str, ...] = get_args(MixedPrecision)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
ROE_LATENTS: tuple[str, ...] = get_args(RoeLatents)
# Settings that change what a step computes: a resumed run must use the checkpoint's values to
# reproduce an uninterrupted one. ``steps`` and ``checkpoint_every`` may change on resume.
RESUMABLE_OVERRIDES = (
    "steps", "checkpoint_every", "mixed_precision", "strength_target", "gradient_checkpointing",
)  # fmt: skip


@dataclass(frozen=True)
class TrainConfig:
    # Defaults measured on the toy base. Steps and learning rates: a patterned concept ("rex",
    # an orange star with black spots) needed lr 3e-3 / 1e-2 and 600 steps
    # (benchmarks/results/train_speed.json, "defaults_tuning"). ROE: the identity sweep
    # (benchmarks/results/identity_sweep.json): erasing every step (p=1) with λ=10 cut the
    # crosstalk of 4 merged concepts from 0.18 to 0.09 and their prior interference from 0.25
    # to 0.04 against p=0.5, λ=3; Gaussian latents, λ=30 and token isolation did not do
    # better. It costs ~1.7× a plain LoRA step.
    steps: int = 600
    lr: float = 3e-3
    embedding_lr: float = 1e-2
    batch_size: int = 2
    grad_accum: int = 1
    warmup_steps: int = 20
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    roe: bool = True
    roe_prob: float = 1.0
    roe_weight: float = 10.0
    # Erasure prompts per step; None: half the concept batch (at least 1), which keeps ROE's
    # extra cost (a grad pass plus a no-grad target pass) near a third of a plain step.
    roe_batch_size: int | None = None
    roe_latents: str = "concept"  # see roe.py: concept | mixed | random
    # Weight of the penalty on the share of the learnt token's effect on the prompt encoding
    # that falls inside OTHER slots' subspaces, where their updates would act on it.
    token_isolation: float = 0.0
    # Bound on the learnt token row's norm, as a multiple of the vocabulary's largest row norm
    # (0: unbounded). Unbounded rows ended 7–8× the vocabulary's largest (docs/design.md §5).
    token_norm_bound: float = 0.0
    # Shares of erasure prompts holding stand-in tokens, and empty (roe.py).
    roe_standin: float = 0.0
    roe_standin_offset: float = 1.0  # a stand-in's random offset, × its anchor row's norm
    roe_empty: float = 0.0
    # Equal learning strength: stop once the concept's strength (strength.py: probe ‖δ‖²,
    # averaged over the last samples) reaches this, after at least ``min_steps``; ``steps`` is
    # then the most a slow learner may take. 0: train exactly ``steps``.
    strength_target: float = 0.0
    min_steps: int = 100
    seed: int = 0
    checkpoint_every: int = 100
    mixed_precision: str = "no"
    flip: bool = True
    # Side of the training square in pixels; 0: the base's own (UNet sample size × the VAE's
    # downsampling: 1024 on SDXL, 512 on SD 1.x, 768 on SD 2.x-v, 64 on the toy base).
    resolution: int = 0
    # Recompute UNet activations (and the text encoders', when they carry slots) in the
    # backward pass: less memory, about a third more time. Same gradients.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive_ints = ("steps", "batch_size", "grad_accum", "checkpoint_every", "min_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"--{_flag(name)} must be a positive integer, got {value}")
        if self.roe_batch_size is not None and (
            not isinstance(self.roe_batch_size, int) or self.roe_batch_size < 1
        ):
            raise InvalidInput(
                f"--roe-batch-size must be a positive integer, got {self.roe_batch_size}"
            )
        if self.roe_batch_size is not None and self.roe_batch_size > self.batch_size:
            raise InvalidInput(
                f"--roe-batch-size ({self.roe_batch_size}) cannot exceed --batch-size "
                f"({self.batch_size}): erasure reuses the concept batch's noised latents"
            )
        if not isinstance(self.resolution, int) or self.resolution < 0:
            raise InvalidInput(
                f"--resolution must be a positive number of pixels, got {self.resolution}"
            )
        if self.warmup_steps < 0:
            raise InvalidInput(f"--warmup-steps must not be negative, got {self.warmup_steps}")
        if self.seed < 0:
            raise InvalidInput(f"--seed must not be negative, got {self.seed}")
        for name in ("lr", "embedding_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"--{_flag(name)} must be a non-negative number, got {value}")
        non_negative = (
            "weight_decay", "max_grad_norm", "roe_weight", "token_isolation", "token_norm_bound",
            "roe_standin_offset", "strength_target",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"--{_flag(name)} must be a non-negative number, got {value}")
        for name in ("roe_prob", "roe_standin", "roe_empty"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"--{_flag(name)} must be between 0 and 1, got {value}")
        if self.roe_standin + self.roe_empty > 1.0:
            raise InvalidInput(
                f"--roe-standin ({self.roe_standin}) and --roe-empty ({self.roe_empty}) are "
                "shares of the same erasure prompts: together at most 1"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidInput(
                f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, "
                f"got {self.mixed_precision!r}"
            )
        if self.roe_latents not in ROE_LATENTS:
            raise InvalidInput(
                f"--roe-latents must be one of {', '.join(ROE_LATENTS)}, got {self.roe_latents!r}"
            )
        if self.schedule not in SCHEDULES:
            raise InvalidInput(
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )

    @property
    def roe_active(self) -> bool:
        return self.roe and self.roe_prob > 0 and self.roe_weight > 0

    @property
    def erasure_batch(self) -> int:
        return self.roe_batch_size or max(1, self.batch_size // 2)

    def check_processes(self, processes: int) -> None:
        """Refuse a batch that ``processes`` training processes cannot share equally: unequal
        shares would weigh items unequally once DDP averages the processes' gradients."""
        if self.batch_size % processes:
            fits = -(-self.batch_size // processes) * processes
            raise InvalidInput(
                f"--batch-size {self.batch_size} does not split evenly over {processes} "
                "processes: each process trains on an equal share of every batch",
                hint=f"pass a multiple of {processes}, e.g. --batch-size {fits}",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        return replace(self, **overrides)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def lr_factor(config: TrainConfig, step: int) -> float:
    """Multiplier of the base learning rates at optimizer step ``step`` (0-based).

    A pure function of the step, so a resumed run needs no scheduler state to match an
    uninterrupted one.
    """
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
