"""Identity metrics (docs/design.md §10): how much of each concept survives a merge, and what the
other concepts add, measured on the UNet's noise predictions and on sampled images.

For concept s, on seeded latents, noises and timesteps, ε_b is the base, ε_s base + s alone and
ε_m the merged model; δ_s = ε_s − ε_b and δ_m = ε_m − ε_b on s's own prompts. Each model reads
its prompts with its own tokenizer: the base splits ``<rex>`` into pieces, as a base would.

Users sample with classifier-free guidance, so the same figures are also taken on the guided
prediction ε_u + g(ε_c − ε_u) (ε_u: the empty prompt's prediction, g: the sampler's default
guidance), the empty prompt's own change is reported (guidance subtracts it from every prompt
and multiplies it by g − 1), and a sample-level identity compares the merged model's images
with the concept-alone model's from the same seeds (sample_identity.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from blockctl.apply import Modules, applied
from blockctl.base_model import resolve_base
from blockctl.clip_score import Clip, ClipConfig
from blockctl.conditioning import default_time_ids, denoise, encode, tokenize
from blockctl.errors import InvalidInput
from blockctl.layout import layout_of
from blockctl.merge import plan_merge
from blockctl.prompts import own_prompts, prior_prompts
from blockctl.sample_identity import identity
from registry.base import Registry

EMPTY_PROMPT = ""
PREDICT_CHUNK = 64  # UNet batch: prompts × latents are evaluated this many at a time


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 16  # noised latents per prompt
    seed: int = 0
    t_min: int = 100  # timesteps drawn from [t_min, t_max): skip the extremes, where every
    t_max: int = 900  # prediction is dominated by the input (t≈0) or by the prompt-free prior
    guidance: float = 4.0  # classifier-free guidance of the guided figures and the samples
    images: int = 4  # seeds per concept for sample identity (and CLIP); 0: no images
    sample_steps: int = 20

    def __post_init__(self) -> None:
        if self.samples < 1 or self.images < 0 or self.sample_steps < 1:
            raise InvalidInput("--samples and --sample-steps must be positive, --images ≥ 0")
        if not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise InvalidInput(f"--guidance must be a non-negative number, got {self.guidance}")


@dataclass(frozen=True)
class ConceptMetrics:
    concept: str
    slot: int
    retention: float
    crosstalk: float
    fidelity: float
    prior_interference: float
    prior_drift: float
    delta_sq: float
    # The same on the guided prediction ε_u + g(ε_c − ε_u), divided by the guided ‖δ_s‖².
    guided_retention: float = math.nan
    guided_crosstalk: float = math.nan
    guided_prior_interference: float = math.nan
    # ‖ε_m(∅) − ε_b(∅)‖² / ‖δ_s‖²: what the merge does to the empty prompt; drift: s alone.
    empty_interference: float = math.nan
    empty_drift: float = math.nan
    sample_identity: float | None = None  # only with images (sample_identity.py)
    clip_image_alignment: float | None = None  # only with a CLIP model (clip_score.py)
    clip_text_alignment: float | None = None

    def to_dict(self) -> dict[str, float | str | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# Which way is good, for summaries: "min" means the smallest value is the worst case.
WORST: dict[str, str] = {
    "retention": "min", "crosstalk": "max", "fidelity": "min", "prior_interference": "max",
    "prior_drift": "max", "delta_sq": "min", "guided_retention": "min",
    "guided_crosstalk": "max", "guided_prior_interference": "max", "empty_interference": "max",
    "empty_drift": "max", "sample_identity": "min", "clip_image_alignment": "min",
    "clip_text_alignment": "min",
}  # fmt: skip


def summarize(metrics: Sequence[ConceptMetrics]) -> dict[str, dict[str, float]]:
    """Mean and worst case of every figure over the concepts that have it."""
    out: dict[str, dict[str, float]] = {}
    for f in fields(ConceptMetrics):
        if f.name not in WORST:
            continue
        values = [v for m in metrics if (v := getattr(m, f.name)) is not None and not math.isnan(v)]
        if values:
            worst = min(values) if WORST[f.name] == "min" else max(values)
            out[f.name] = {"mean": sum(values) / len(values), "worst": worst}
    return out


def ratio(num: float, den: float) -> float:
    """``num/den``, with 0/0 = 0 (nothing changed, nothing to compare) and x/0 = inf."""
    if den > 0:
        return num / den
    return 0.0 if num == 0 else math.inf


class Probe:
    """Fixed noised latents and timesteps, shared by every model compared."""

    def __init__(self, modules: Modules, scheduler_dir: Path, config: EvalConfig) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_pretrained(scheduler_dir)
        unet_cfg: Any = modules.unet.config
        size = int(unet_cfg.sample_size)
        gen = torch.Generator().manual_seed(config.seed)
        shape = (config.samples, int(unet_cfg.in_channels), size, size)
        latents = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        self.t = torch.randint(config.t_min, config.t_max, (config.samples,), generator=gen)
        self.x_t = self.scheduler.add_noise(latents, noise, self.t)
        self.samples = config.samples
        self.image_size = size * modules.vae_factor  # what SDXL's add_time_ids state

    @torch.no_grad()
    def predict(self, modules: Modules, prompts: Sequence[str]) -> torch.Tensor:
        """Predictions (P, S, C, H, W) of every prompt on every probe latent."""
        ids = tokenize(modules.tokenizers(), prompts)
        cond = encode(modules.text_encoders(), ids).repeat_interleave(self.samples)
        x_t = self.x_t.repeat(len(prompts), 1, 1, 1)
        t = self.t.repeat(len(prompts))
        time_ids = default_time_ids(self.image_size, x_t.shape[0])  # used by SDXL only
        outs = [
            denoise(modules.unet, x_t[i : i + PREDICT_CHUNK], t[i : i + PREDICT_CHUNK],
                    cond.rows(i, i + PREDICT_CHUNK), time_ids[i : i + PREDICT_CHUNK])
            for i in range(0, x_t.shape[0], PREDICT_CHUNK)
        ]  # fmt: skip
        return torch.cat(outs).float().view(len(prompts), self.samples, *self.x_t.shape[1:])


class Predictions:
    """One model's predictions, each prompt computed once (prior prompts are shared by every
    concept of a class; the empty prompt by all)."""

    def __init__(self, probe: Probe, modules: Modules) -> None:
        self.probe, self.modules = probe, modules
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.probe.predict(self.modules, missing), strict=True))
        return torch.stack([self.cache[p] for p in prompts])


def _mean_sq(x: torch.Tensor) -> float:
    return float((x.double() ** 2).mean())


def concept_metrics(
    concept: str, slot: int, e_b: torch.Tensor, e_s: torch.Tensor, e_m: torch.Tensor,
    p_b: torch.Tensor, p_s: torch.Tensor, p_m: torch.Tensor,
) -> ConceptMetrics:  # fmt: skip
    """The section-10 metrics from predictions on own prompts (e_*) and prior prompts (p_*)."""
    d_s, d_m = (e_s - e_b).double(), (e_m - e_b).double()
    dsq = _mean_sq(d_s)
    retention = ratio(float((d_m * d_s).mean()), dsq) if dsq > 0 else 1.0
    return ConceptMetrics(
        concept=concept,
        slot=slot,
        retention=retention,
        crosstalk=ratio(_mean_sq(d_m - retention * d_s), dsq),
        fidelity=1.0 - ratio(_mean_sq(e_m - e_s), dsq),
        prior_interference=ratio(_mean_sq(p_m - p_b), dsq),
        prior_drift=ratio(_mean_sq(p_s - p_b), dsq),
        delta_sq=dsq,
    )


def guided(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """ε_u + g(ε_c − ε_u): what a classifier-free-guided sampler steps along."""
    return uncond + guidance * (cond - uncond)


def full_metrics(
    concept: str, slot: int, own: Sequence[torch.Tensor], prior: Sequence[torch.Tensor],
    empty: Sequence[torch.Tensor], guidance: float,
) -> ConceptMetrics:  # fmt: skip
    """Single-step, guided and empty-prompt figures; each argument is (base, alone, merged)."""
    single = concept_metrics(concept, slot, *own, *prior)
    g_own = [guided(c, u, guidance) for c, u in zip(own, empty, strict=True)]
    g_prior = [guided(c, u, guidance) for c, u in zip(prior, empty, strict=True)]
    steered = concept_metrics(concept, slot, *g_own, *g_prior)
    u_b, u_s, u_m = empty
    return replace(
        single,
        guided_retention=steered.retention,
        guided_crosstalk=steered.crosstalk,
        guided_prior_interference=steered.prior_interference,
        empty_interference=ratio(_mean_sq(u_m - u_b), single.delta_sq),
        empty_drift=ratio(_mean_sq(u_s - u_b), single.delta_sq),
    )


@dataclass(frozen=True)
class Subject:
    """A concept as the metrics see it: its prompts come from its token and class word."""

    name: str
    slot: int
    token: str
    class_word: str

    def own(self) -> list[str]:
        return own_prompts(self.token, self.class_word)

    def prior(self) -> list[str]:
        return prior_prompts(self.class_word)


Images = list[Image.Image]
Render = Callable[[Modules, str], Images]


@dataclass(frozen=True)
class ConceptImages:
    merged: Images
    alone: Images
    base: Images


def renderer(base_dir: Path, config: EvalConfig) -> Render:
    """Images of a prompt from any ``Modules`` with the base's VAE and sampler: ``images`` seeds
    (``seed``, ``seed + 1``, …), ``sample_steps`` steps, guidance ``guidance``."""
    from blockctl.sample import generate, load_pipeline

    pipe = load_pipeline(base_dir)

    def render(modules: Modules, prompt: str) -> Images:
        parts = {**pipe.components, "unet": modules.unet, "text_encoder": modules.text_encoder,
                 "tokenizer": modules.tokenizer}  # fmt: skip
        if modules.text_encoder_2 is not None:
            parts |= {"text_encoder_2": modules.text_encoder_2, "tokenizer_2": modules.tokenizer_2}
        view = type(pipe)(**parts)
        view.set_progress_bar_config(disable=True)
        return generate(
            view, [prompt], config.seed, config.sample_steps, config.guidance, config.images
        )[0]

    return render


def measure(
    probe: Probe,
    base: Modules,
    merged: AbstractContextManager[Modules],
    alone: Callable[[Subject], AbstractContextManager[Modules]],
    subjects: Sequence[Subject],
    guidance: float,
    render: Render | None = None,
) -> tuple[list[ConceptMetrics], dict[str, ConceptImages]]:
    """The section-10 metrics of each subject, whatever made the merged and the alone models:
    ``merged`` yields the merged model, ``alone(s)`` the base with s alone. With ``render``,
    also each subject's images (own prompt, same seeds) and its sample identity."""
    base_preds = Predictions(probe, base)
    images: dict[str, ConceptImages] = {}
    with merged as mod:
        m_preds = Predictions(probe, mod)
        m_out = {s.name: (m_preds(s.own()), m_preds(s.prior())) for s in subjects}
        u_m = m_preds([EMPTY_PROMPT])
        shown = {s.name: render(mod, s.own()[0]) for s in subjects} if render else {}
    results = []
    for s in subjects:
        with alone(s) as mod:
            s_preds = Predictions(probe, mod)
            e_s, p_s, u_s = s_preds(s.own()), s_preds(s.prior()), s_preds([EMPTY_PROMPT])
            alone_images = render(mod, s.own()[0]) if render is not None else []
        e_m, p_m = m_out[s.name]
        metrics = full_metrics(
            s.name, s.slot,
            (base_preds(s.own()), e_s, e_m), (base_preds(s.prior()), p_s, p_m),
            (base_preds([EMPTY_PROMPT]), u_s, u_m), guidance,
        )  # fmt: skip
        if render is not None:
            shot = ConceptImages(shown[s.name], alone_images, render(base, s.own()[0]))
            images[s.name] = shot
            metrics = replace(metrics, sample_identity=identity(shot.merged, shot.alone, shot.base))
        results.append(metrics)
    return results, images


def evaluate(
    registry: Registry,
    concepts: Sequence[str],
    merged: Path | None,
    config: EvalConfig,
    clip: ClipConfig | None = None,
) -> list[ConceptMetrics]:
    """Metrics for each of ``concepts`` in the merged model at ``merged`` (a diffusers folder),
    or, without one, in an in-memory merge of exactly ``concepts``; with ``clip``, the CLIP
    alignment scores too (on the sample-identity images)."""
    if not concepts:
        raise InvalidInput("name at least one concept to evaluate")
    if clip is not None and config.images == 0:
        raise InvalidInput("CLIP alignment needs images: pass --images 1 or more")
    clip_model = Clip(clip.model) if clip is not None else None  # a bad path fails first
    layout = layout_of(registry)
    base_dir = resolve_base(layout.base)
    base = Modules.load(base_dir)
    probe = Probe(base, base_dir / "scheduler", config)
    full_plan = plan_merge(registry, concepts, {})
    records = {r.concept: r for r in registry.slots()}
    subjects = [
        Subject(c, records[c].slot, records[c].token, records[c].class_word) for c in concepts
    ]
    in_merged = nullcontext(Modules.load(merged)) if merged else applied(full_plan, base)
    render = renderer(base_dir, config) if config.images else None
    results, images = measure(
        probe, base, in_merged, lambda s: applied(full_plan.only(s.name), base), subjects,
        config.guidance, render,
    )  # fmt: skip
    if clip_model is None:
        return results
    from blockctl.clip_score import image_alignment, text_alignment

    return [
        replace(
            m,
            clip_image_alignment=image_alignment(
                clip_model, images[m.concept].merged, images[m.concept].alone
            ),
            clip_text_alignment=text_alignment(clip_model, images[m.concept].merged, s.prior()[0]),
        )
        for m, s in zip(results, subjects, strict=True)
    ]
