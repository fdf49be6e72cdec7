"""Instant composition in memory: switch any subset of a registry's published concepts into one
loaded Stable Diffusion pipeline, and back out, without writing a merged model.

Slots make any subset one exact weight update: ``W' = W + Σ_s scale_s·B_s A_s`` per targeted
weight, the concept tokens' rows appended to the text encoder's vocabulary. A ``Composer`` bound
to a pipeline does that in one of two modes:

- ``"fuse"`` (the default) keeps the targeted weights (and the embedding and tokenizer) once as
  loaded, and each ``set`` recomputes them from those originals: one float32 matmul per target,
  cast to the weight's dtype on its device. Denoising then runs at the base's speed: no adapter
  layers, nothing extra per step.
- ``"branch"`` (layouts whose targets all read text, as the default ``cross-kv`` does) never
  writes a weight: the loaded concepts run as one low-rank branch per target
  (``blockctl.slot_branch``), and a switch writes one mask vector and the tokens, well under a
  millisecond, at the price of that branch over the 77 text tokens in each cross-attention
  layer.

Nothing else in the pipeline is touched; after ``restore`` the pipeline is the base again, bit
for bit.

    pipe = StableDiffusionPipeline.from_pretrained(base_folder, dtype=torch.float16).to("cuda")
    with compose(pipe, registry, ["rex", "brick"], scales={"rex": 0.8}):
        image = pipe("a photo of <rex> star on a <brick> background").images[0]

Checks are the merge's (``plan_merge``): an unknown or unpublished concept is a slot conflict
(exit code 3), an adapter made for another layout or base, or a pipeline whose targeted weights
are not the registry's base, fails validation (exit code 4).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from blockctl.apply import Key, Modules, Overlay, plan_deltas
from blockctl.base_model import BaseFolder, resolve_base
from blockctl.conditioning import pool_at_end_token
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import Layout, layout_of
from blockctl.merge.plan import MergePlan, check_request, plan_merge
from blockctl.slot_branch import SlotBank, TargetLayers, image_reading
from registry.base import Registry

MODES = ("fuse", "branch")


class Composer:
    """Switches subsets of a registry's published concepts in and out of one loaded pipeline.

    ``pipe`` is a diffusers Stable Diffusion pipeline (anything with ``unet``, ``text_encoder``
    and ``tokenizer``; an SDXL one's ``text_encoder_2`` and ``tokenizer_2`` get the concept
    tokens too), on the device and in the dtype it will run in; its targeted weights must
    be the registry's base (compared exactly, after casting the base to the pipeline's dtype).
    While concepts are set, ``pipe.tokenizer`` is a copy that knows their tokens, with the ids a
    merged folder of the same concepts would give them; ``restore`` puts the original back.

    ``mode``:

    - ``"fuse"`` (the default): each ``set`` writes ``W + Σ scale·B A`` into the targeted
      weights from a kept copy of the originals, one matmul per target; denoising then runs
      exactly the base's arithmetic, and a float32 pipeline equals the merged folder bit for bit.
    - ``"branch"``: the weights are never written. While concepts are set, each target layer is
      wrapped in a ``BranchLinear`` holding every loaded concept's block, and ``set`` writes
      only a mask (and the tokens); ``restore`` takes the wrappers out, so the pipeline is the
      base's object graph again. Only for layouts whose targets all read text (``cross-kv``,
      with or without text-encoder targets); an ``attn`` layout is refused (InvalidInput): its
      branch would run on every image token. Predictions equal fuse mode's up to rounding (the
      low-rank product is not rounded into the weight first).

    Each concept's adapter is read, checked and moved to the pipeline's device once, on first
    use (or ahead of time with ``load``).

    Thread safety: ``set``, ``restore`` and ``load`` take a lock, so concurrent calls on one
    Composer are serialised; they may come from any thread (a thread other than the one that
    made the Composer reads adapters through a registry handle of its own). Nothing can stop
    another thread from running the pipeline *during* a switch, though, and it would see a
    mix of two subsets: run generation and switching from one thread, or hold one lock of
    your own around both. To serve different subsets at the same time, give each worker its
    own pipeline and Composer. Both modes alike; in branch mode, forwards that run while no
    switch does are as safe as on the base (the branch's cache of ``A_all x`` only ever serves
    the very tensor it was computed from). Two Composers on one pipeline are refused (the
    second sees weights that are no longer the base's, or layers wrapped by the first's branch).
    Save the pipeline (``save_pretrained``) only after ``restore``: in branch mode its target
    layers are wrappers while concepts are set.

    Move the pipeline (``.to(device or dtype)``) before making its Composer, not after.
    """

    def __init__(self, pipe: Any, registry: Registry | str | Path, mode: str = "fuse") -> None:
        if mode not in MODES:
            raise InvalidInput(f"unknown compose mode {mode!r}; choose one of {', '.join(MODES)}")
        self._pipe = pipe
        self._registry = _open(registry)
        self.layout: Layout = layout_of(self._registry)
        self.mode = mode
        if mode == "branch":
            _check_branchable(self.layout)
        modules = _modules_of(pipe)
        keys = [(t.component, t.module) for t in self.layout.targets]
        weight = _check_is_base(modules, self.layout, keys)
        self._layers = TargetLayers({c: modules.component(c) for c, _ in keys}, keys)
        self._device = weight.device
        self._plans: dict[str, MergePlan] = {}  # concept -> its plan alone, on the device
        self._bases: dict[int, torch.Tensor] = {}
        self._active: dict[str, float] = {}
        self._lock = threading.RLock()
        self._owner = threading.get_ident()
        self._local = threading.local()
        self._bank: SlotBank | None = None
        if mode == "branch":
            self._bank = SlotBank(
                self._bases, self.layout.rank, self.layout.scale, weight.dtype, weight.device
            )
        # The tokens go in the same way in both modes; only fuse mode keeps and writes weights.
        self._overlay = Overlay(modules, keys if self._bank is None else ())
        # SDXL: the concept tokens' rows in the second text encoder too, through an Overlay of
        # their own (no weights: the first one holds every targeted weight)
        self._overlay_2: Overlay | None = None
        if modules.text_encoder_2 is not None:
            self._overlay_2 = Overlay(
                Modules(modules.unet, modules.text_encoder_2, modules.tokenizer_2), ()
            )

    @property
    def active(self) -> dict[str, float]:
        """The concepts now in the pipeline, with their scales."""
        return dict(self._active)

    def load(self, concepts: Sequence[str]) -> None:
        """Read and check these concepts' adapters now rather than on first ``set``."""
        with self._lock:
            missing = [c for c in dict.fromkeys(concepts) if c not in self._plans]
            if missing:
                self._keep(plan_merge(self._registry_here(), missing, {}))

    def set(self, concepts: Sequence[str], scales: Mapping[str, float] | None = None) -> None:
        """Make the pipeline ``base + Σ scale·ΔW`` of exactly ``concepts`` (any order; scale 1
        unless given); an empty list is the base."""
        if isinstance(concepts, str):
            raise InvalidInput(f"concepts must be a list of names, not the string {concepts!r}")
        scales = dict(scales or {})
        check_request(concepts, scales)
        with self._lock:
            if not concepts:
                self.restore()
                return
            self.load(concepts)
            self._apply(self._combined(concepts, scales))

    def use(self, plan: MergePlan) -> None:
        """Set the concepts of a plan made by ``plan_merge`` on this Composer's registry."""
        if plan.layout.layout_hash != self.layout.layout_hash:
            raise InvalidInput("the plan was made for another registry layout")
        with self._lock:
            self._keep(plan)
            scales = {s.concept: s.scale for s in plan.selected}
            self._apply(self._combined(list(scales), scales))

    def restore(self) -> None:
        """Back to the base, bit for bit: targeted weights (branch mode: the layers' original
        objects), embedding and tokenizer. Nothing to do where this Composer has nothing set."""
        with self._lock:
            if self._active:
                self._reset()

    def __enter__(self) -> Composer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    # -- internals -------------------------------------------------------------------------------
    def _registry_here(self) -> Registry:
        """The registry, opened again in a thread other than the one that made the Composer:
        the embedded registry's SQLite connection belongs to the thread that opened it."""
        if threading.get_ident() == self._owner:
            return self._registry
        here: Registry | None = getattr(self._local, "registry", None)
        if here is None:
            here = self._local.registry = _open(self._registry.location)
        return here

    def _keep(self, plan: MergePlan) -> None:
        """Cache each of the plan's concepts alone, its tensors on the pipeline's device (branch
        mode: its blocks go into the bank, and the cached plan keeps only its tokens)."""
        for width, basis in plan.bases.items():
            if width not in self._bases:
                self._bases[width] = basis.to(self._device, torch.float32)
        new = [sel for sel in plan.selected if sel.concept not in self._plans]
        for sel in new:
            alone = plan.only(sel.concept)
            kept = (
                {
                    target: {slot: b.to(self._device, torch.float32) for slot, b in ups.items()}
                    for target, ups in alone.ups.items()
                }
                if self._bank is None
                else {}
            )
            self._plans[sel.concept] = replace(alone, ups=kept, bases=self._bases)
        if self._bank is not None:
            self._bank.append(
                [(sel.slot, {t: ups[sel.slot] for t, ups in plan.ups.items()}) for sel in new]
            )

    def _combined(self, concepts: Sequence[str], scales: Mapping[str, float]) -> MergePlan:
        """One plan for exactly ``concepts``, assembled from the cached single-concept plans
        (the inverse of ``MergePlan.only``): by slot, as ``plan_merge`` orders them."""
        parts = sorted((self._plans[c] for c in concepts), key=lambda p: p.selected[0].slot)
        return replace(
            parts[0],
            selected=tuple(
                replace(p.selected[0], scale=float(scales.get(p.selected[0].concept, 1.0)))
                for p in parts
            ),
            ups={
                name: {s: b for p in parts for s, b in p.ups[name].items()} for name in parts[0].ups
            },
            text_rows={
                encoder: tuple(row for p in parts for row in p.text_rows.get(encoder, ()))
                for encoder in self.layout.token_dims
            },
        )

    def _apply(self, plan: MergePlan) -> None:
        if not self._layers.wrapped:  # (with this Composer's wrappers in, nobody else's can be)
            self._layers.check()  # before anything is touched: the pipeline may be another's
        try:
            if self._bank is None:
                self._pipe.tokenizer = self._overlay.apply(plan_deltas(plan), plan.token_rows)
            else:
                self._bank.show({s.slot: s.scale for s in plan.selected})
                self._layers.wrap(self._bank)
                self._pipe.tokenizer = self._overlay.apply(_untouched, plan.token_rows)
            if self._overlay_2 is not None:
                rows = plan.text_rows.get("text_encoder_2", ())
                self._pipe.tokenizer_2 = self._overlay_2.apply(_untouched, rows)
        except BaseException:
            self._reset()
            raise
        self._active = {s.concept: s.scale for s in plan.selected}

    def _reset(self) -> None:
        self._layers.unwrap()
        if self._bank is not None:
            self._bank.forget_inputs()
        self._pipe.tokenizer = self._overlay.restore()
        if self._overlay_2 is not None:
            self._pipe.tokenizer_2 = self._overlay_2.restore()
        self._active = {}


@contextmanager
def compose(
    pipe: Any,
    registry: Registry | str | Path,
    concepts: Sequence[str],
    scales: Mapping[str, float] | None = None,
    mode: str = "fuse",
) -> Iterator[Any]:
    """``pipe`` with ``concepts`` composed in (see ``Composer``), restored on exit."""
    with Composer(pipe, registry, mode) as composer:
        composer.set(concepts, scales)
        yield pipe


def _open(registry: Registry | str | Path) -> Registry:
    if isinstance(registry, Registry):
        return registry
    from registry import open_registry

    return open_registry(str(registry))


def _modules_of(pipe: Any) -> Modules:
    unet, text_encoder, tokenizer = (
        getattr(pipe, name, None) for name in ("unet", "text_encoder", "tokenizer")
    )
    if unet is None or text_encoder is None or tokenizer is None:
        raise InvalidInput(
            "compose needs a Stable Diffusion pipeline (with unet, text_encoder and tokenizer)"
        )
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)  # SDXL
    tokenizer_2 = getattr(pipe, "tokenizer_2", None)
    for encoder, tok in ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)):
        if encoder is not None:
            pool_at_end_token(encoder, tok)  # the pooled embedding at the end token, not ours
    return Modules(unet, text_encoder, tokenizer, text_encoder_2, tokenizer_2)


def _untouched(key: Key) -> None:
    """Branch mode's weight deltas: none, every weight stays as loaded."""
    return None


def _check_branchable(layout: Layout) -> None:
    reading_images = image_reading(layout)
    if reading_images:
        raise InvalidInput(
            f"branch mode needs targets that read only text, but this registry's layout "
            f"({layout.preset}) targets {len(reading_images)} layer(s) that read the image, "
            f"e.g. {reading_images[0]}: a branch there would run on every image token",
            hint="use mode='fuse' for this registry",
        )


def _check_is_base(modules: Modules, layout: Layout, keys: Sequence[Key]) -> torch.Tensor:
    """Refuse a pipeline whose targeted weights are not the registry's base (read from the base
    folder, which ``plan_merge`` checks against the layout's fingerprint, and cast to the
    pipeline's dtype), or whose target layers another Composer's branch wraps; returns one of
    the weights (for their device and dtype)."""
    base = BaseFolder(resolve_base(layout.base))
    weight = None
    for component, module in keys:
        try:
            weight = modules.weight((component, module))
        except InvalidInput as exc:
            raise ValidationFailed(f"the pipeline is not this registry's base: {exc}") from None
        stored = base.read(component, f"{module}.weight")
        if weight.shape != stored.shape or not torch.equal(
            weight.detach(), stored.to(weight.device, weight.dtype)
        ):
            raise ValidationFailed(
                f"the pipeline's {component}.{module} is not the registry's base weight "
                f"(another model, or concepts already fused into it)",
                hint=f"load the pipeline from the registry's base, {layout.base}",
            )
    assert weight is not None  # a layout has at least one target
    return weight
