"""Identity metrics in function space (DESIGN section 10): how much of each concept survives a
merge, and what the other concepts add, measured on the UNet's noise predictions.

For concept s, on seeded latents, noises and timesteps, ε_b is the base, ε_s base + s alone and
ε_m the merged model; δ_s = ε_s − ε_b and δ_m = ε_m − ε_b on s's own prompts. Each model reads
its prompts with its own tokenizer: the base splits ``<rex>`` into characters, as a base would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from blockctl.apply import Modules, applied
from blockctl.base_model import resolve_base
from blockctl.clip_score import Clip, ClipConfig
from blockctl.errors import InvalidInput
from blockctl.layout import layout_of
from blockctl.merge import MergePlan, plan_merge
from registry.base import Registry

OWN_TEMPLATES = ("a photo of {token} {cls}", "{token} {cls}")
PRIOR_TEMPLATES = ("a photo of a {cls}", "a {cls}")


@dataclass(frozen=True)
class EvalConfig:
    samples: int = 4  # noised latents per prompt
    seed: int = 0
    t_min: int = 100  # timesteps drawn from [t_min, t_max): skip the extremes, where every
    t_max: int = 900  # prediction is dominated by the input (t≈0) or by the prompt-free prior


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
    clip_image_alignment: float | None = None  # only with a CLIP model (clip_score.py)
    clip_text_alignment: float | None = None

    def to_dict(self) -> dict[str, float | str | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


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

    @torch.no_grad()
    def predict(self, modules: Modules, prompts: Sequence[str]) -> torch.Tensor:
        tok = modules.tokenizer
        ids = tok(  # type: ignore[operator]
            list(prompts), padding="max_length", truncation=True,
            max_length=tok.model_max_length, return_tensors="pt",  # type: ignore[attr-defined]
        ).input_ids  # fmt: skip
        text = modules.text_encoder(ids)[0]
        outs = []
        for i in range(len(prompts)):
            cond = text[i : i + 1].expand(self.samples, -1, -1)
            outs.append(modules.unet(self.x_t, self.t, encoder_hidden_states=cond).sample)
        return torch.stack(outs).float()


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


@dataclass(frozen=True)
class Subject:
    """A concept as the metrics see it: its prompts come from its token and class word."""

    name: str
    slot: int
    token: str
    class_word: str

    def own(self) -> list[str]:
        return [t.format(token=self.token, cls=self.class_word) for t in OWN_TEMPLATES]

    def prior(self) -> list[str]:
        return [t.format(cls=self.class_word) for t in PRIOR_TEMPLATES]


def measure(
    probe: Probe,
    base: Modules,
    merged: AbstractContextManager[Modules],
    alone: Callable[[Subject], AbstractContextManager[Modules]],
    subjects: Sequence[Subject],
) -> list[ConceptMetrics]:
    """The section-10 metrics of each subject, whatever made the merged and the alone models:
    ``merged`` yields the merged model, ``alone(s)`` the base with s alone."""
    with merged as mod:
        m_preds = {
            s.name: (probe.predict(mod, s.own()), probe.predict(mod, s.prior())) for s in subjects
        }
    results = []
    for s in subjects:
        e_b, p_b = probe.predict(base, s.own()), probe.predict(base, s.prior())
        with alone(s) as mod:
            e_s, p_s = probe.predict(mod, s.own()), probe.predict(mod, s.prior())
        e_m, p_m = m_preds[s.name]
        results.append(concept_metrics(s.name, s.slot, e_b, e_s, e_m, p_b, p_s, p_m))
    return results


def evaluate(
    registry: Registry,
    concepts: Sequence[str],
    merged: Path | None,
    config: EvalConfig,
    clip: ClipConfig | None = None,
) -> list[ConceptMetrics]:
    """Metrics for each of ``concepts`` in the merged model at ``merged`` (a diffusers folder),
    or, without one, in an in-memory merge of exactly ``concepts``; with ``clip``, the CLIP
    alignment scores too."""
    if not concepts:
        raise InvalidInput("name at least one concept to evaluate")
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
    results = measure(
        probe, base, in_merged, lambda s: applied(full_plan.only(s.name), base), subjects
    )
    if clip is None or clip_model is None:
        return results
    scores = clip_alignment(clip_model, base_dir, full_plan, subjects, merged, clip)
    return [
        replace(
            m, clip_image_alignment=scores[m.concept][0], clip_text_alignment=scores[m.concept][1]
        )
        for m in results
    ]


def clip_alignment(
    clip_model: Clip,
    base_dir: Path,
    plan: MergePlan,
    subjects: Sequence[Subject],
    merged: Path | None,
    config: ClipConfig,
) -> dict[str, tuple[float, float]]:
    """(image alignment, text alignment) per concept; see clip_score.py."""
    from blockctl.clip_score import image_alignment, text_alignment
    from blockctl.sample import generate, load_pipeline

    pipe = load_pipeline(base_dir)

    def images(p: Any, prompt: str) -> list[Any]:
        return generate(p, [prompt], config.seed, config.steps, config.guidance, config.images)[0]

    def with_plan(sub: MergePlan, prompts: dict[str, str]) -> dict[str, list[Any]]:
        modules = Modules(pipe.unet, pipe.text_encoder, pipe.tokenizer)
        tokenizer = pipe.tokenizer
        try:
            with applied(sub, modules) as mod:
                pipe.tokenizer = mod.tokenizer
                return {c: images(pipe, p) for c, p in prompts.items()}
        finally:
            pipe.tokenizer = tokenizer

    prompt = {s.name: s.own()[0] for s in subjects}
    if merged is not None:
        merged_pipe = load_pipeline(merged)
        in_merged = {c: images(merged_pipe, p) for c, p in prompt.items()}
    else:
        in_merged = with_plan(plan, prompt)
    out = {}
    for s in subjects:
        alone = with_plan(plan.only(s.name), {s.name: prompt[s.name]})[s.name]
        out[s.name] = (
            image_alignment(clip_model, in_merged[s.name], alone),
            text_alignment(clip_model, in_merged[s.name], s.prior()[0]),
        )
    return out
