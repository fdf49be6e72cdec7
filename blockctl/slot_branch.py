"""Loaded concepts as ONE unfused low-rank branch per target, switched by a mask.

Slots give every concept disjoint rows of the registry's basis, so the blocks of all loaded
concepts stack into one low-rank branch per targeted Linear:

    y = W x + B_all · (m ⊙ (A_all x))

``A_all`` stacks the loaded concepts' down-projections ``A_s`` (|loaded|·r × d; the same for
every target of input width d, so held once per width), ``B_all`` their up-projections
(out × |loaded|·r, each block already × the layout's scale) and ``m`` is each loaded column's
scale, 0 for a concept not selected, one vector shared by every target. Switching to another
subset writes ``m`` in place: no weight is touched, and the base Linear objects are only
wrapped, never changed, so taking the wrappers out gives back the base exactly.

This pays only where the branch is cheap to run at every step: targets that read the prompt's
text tokens (the UNet's cross-attention ``to_k``/``to_v``: 77 tokens a prompt whatever the image
size; the text encoder's projections, which run once a prompt). ``image_reading`` names the
targets that do not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blockctl import blocks
from blockctl.clip_names import submodule
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import PRESETS, Layout

# (component, module) of a target, as blockctl.apply names it
Key = tuple[str, str]


def image_reading(layout: Layout) -> list[str]:
    """The layout's targets whose input is not text (e.g. ``attn1``/``to_q``/``to_out.0``):
    a branch there runs on every image token of every denoising step."""
    text_only = PRESETS["cross-kv"]  # the preset of the UNet layers that read the text
    return [
        t.name
        for t in layout.targets
        if t.component != "text_encoder" and not text_only.match(t.module)
    ]


class SlotBank:
    """The loaded concepts' blocks (in load order) and the mask, on one device in one dtype.

    ``A_all x`` is computed once per input and width and reused by the other targets of that
    width (every cross-attention layer reads the same prompt encoding, and a pipeline passes
    the same tensor at every denoising step). The cache holds the input itself, so a hit is the
    same tensor object, unmodified since (its version counter), with no switch or load since;
    it is skipped while autograd records and for inference-mode tensors, which carry no
    version counter.
    """

    def __init__(
        self,
        bases: Mapping[int, torch.Tensor],
        rank: int,
        scale: float,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._bases, self._rank, self._scale = bases, rank, scale
        self._dtype, self._device = dtype, device
        self.slots: list[int] = []  # the slot of each loaded block, in column order
        self.downs: dict[int, torch.Tensor] = {}  # width -> A_all (k·r × d)
        self.ups: dict[str, torch.Tensor] = {}  # target name -> B_all (out × k·r)
        self.mask = torch.zeros(0, dtype=dtype, device=device)
        self._lows: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def append(self, ups: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> None:
        """Add concepts' blocks: (slot, target name -> B_s) each; new columns start at 0."""
        if not ups:
            return
        new = [slot for slot, _ in ups]
        self.slots += new
        for width, basis in self._bases.items():
            down = blocks.stacked_down(basis, new, self._rank)
            self.downs[width] = self._grow(self.downs.get(width), down, 0)
        for target in ups[0][1]:
            up = torch.cat([by_target[target].float() * self._scale for _, by_target in ups], 1)
            self.ups[target] = self._grow(self.ups.get(target), up, 1)
        self.mask = torch.cat([self.mask, self.mask.new_zeros(len(new) * self._rank)])
        self._lows.clear()

    def _grow(self, old: torch.Tensor | None, new: torch.Tensor, dim: int) -> torch.Tensor:
        new = new.to(self._device, self._dtype)
        return new if old is None else torch.cat([old, new], dim)

    def show(self, scales: Mapping[int, float]) -> None:
        """Columns of the slots in ``scales`` at their scale, every other loaded column at 0.
        Written into the mask in place (compiled graphs holding it stay valid)."""
        per_slot = torch.tensor([float(scales.get(s, 0.0)) for s in self.slots])
        self.mask.copy_(per_slot.repeat_interleave(self._rank))
        self._lows.clear()

    def forget_inputs(self) -> None:
        self._lows.clear()

    def add(self, target: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y + B_all (m ⊙ A_all x)`` for one target: one ``addmm`` (a single kernel on a GPU)
        once ``A_all x`` is cached."""
        up = self.ups[target].to(x.device, x.dtype)
        low = self._low(x)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), up.T)
        return out.view(y.shape)

    def _low(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        cacheable = not torch.is_grad_enabled() and not x.is_inference()
        if cacheable:
            hit = self._lows.get(width)
            if hit is not None and hit[0] is x and hit[1] == x._version:
                return hit[2]
        down = self.downs[width].to(x.device, x.dtype)  # no-ops unless the pipeline moved
        low = F.linear(x, down) * self.mask.to(x.device, x.dtype)
        if cacheable:
            self._lows[width] = (x, x._version, low)
        return low


class BranchLinear(nn.Module):
    """A targeted layer plus its share of the bank's branch; the layer itself is untouched."""

    def __init__(self, base: nn.Module, bank: SlotBank, target: str) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.bank = bank  # a plain attribute: a SlotBank is no submodule and has no state_dict

    @property
    def weight(self) -> torch.Tensor:  # diffusers and transformers read e.g. ``to_k.weight``
        weight: torch.Tensor = self.base.weight  # type: ignore[assignment]
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias: torch.Tensor | None = getattr(self.base, "bias", None)
        return bias

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bank.add(self.target, x, self.base(x))


class TargetLayers:
    """The targeted layers of loaded modules, as they were when a Composer was made: wraps them
    in ``BranchLinear`` and takes the wrappers out, and refuses a pipeline whose target layers
    someone else replaced (another Composer's branch) meanwhile."""

    def __init__(self, roots: Mapping[str, nn.Module], keys: Sequence[Key]) -> None:
        self._roots = roots
        # Each target's module path as the loaded model spells it (CLIP text encoders may or
        # may not have the ``text_model.`` level the layout's names carry).
        self._paths = {key: self._spelling(key) for key in keys}
        self._layers = {key: self._live(key) for key in keys}
        for (component, module), layer in self._layers.items():
            if isinstance(layer, BranchLinear):
                raise ValidationFailed(
                    f"the pipeline's {component}.{module} already carries concepts (another "
                    "Composer in branch mode has them set)",
                    hint="restore that Composer first",
                )
        self._wrappers: dict[Key, BranchLinear] = {}

    @property
    def wrapped(self) -> bool:
        return bool(self._wrappers)

    def check(self) -> None:
        """Every target is still its layer, or this object's wrapper of it."""
        for key, layer in self._layers.items():
            live = self._live(key)
            if live is not layer and live is not self._wrappers.get(key):
                raise ValidationFailed(
                    f"the pipeline's {'.'.join(key)} was replaced since the Composer was made "
                    "(another Composer switching concepts in branch mode?)",
                    hint="restore the other Composer first",
                )

    def wrap(self, bank: SlotBank) -> None:
        if self._wrappers:
            return
        self.check()
        try:
            for (component, module), layer in self._layers.items():
                wrapper = BranchLinear(layer, bank, f"{component}.{module}")
                self._roots[component].set_submodule(self._paths[(component, module)], wrapper)
                self._wrappers[(component, module)] = wrapper
        except BaseException:
            self.unwrap()
            raise

    def unwrap(self) -> None:
        """This object's wrappers out, the original layer objects back in their place."""
        for key, wrapper in self._wrappers.items():
            if self._live(key) is wrapper:
                self._roots[key[0]].set_submodule(self._paths[key], self._layers[key])
        self._wrappers = {}

    def _live(self, key: Key) -> nn.Module:
        return self._roots[key[0]].get_submodule(self._paths[key])

    def _spelling(self, key: Key) -> str:
        try:
            path, _ = submodule(self._roots[key[0]], key[1])
        except AttributeError:
            raise InvalidInput(f"the {key[0]} has no module {key[1]!r}") from None
        return path
