"""Randomized Output Erasure (DESIGN section 4), as this project reads it; kept in one module
so the reading can be measured and changed in one place.

Each step, with probability ``p_roe``, an erasure batch is drawn: prompts from a randomized pool
that NEVER holds the concept's token. Its target is the model's own prediction with the slot
adapter switched off; the loss adds ``λ_roe · mse(ε_{θ+Δ}(x_t, c_rand), ε_θ(x_t, c_rand))``.

Choice of latents (``roe_latents``): ``concept`` reuses the concept batch's noised latents and
timesteps (the first ``roe_batch_size`` of them), where the adapter has learnt to act, so "the
same images, asked for with any other prompt, are denoised as the base would"; ``random`` draws
unit-Gaussian latents (the scaled VAE latents' own statistics: a stand-in for images nobody has
shown the trainer, such as other contributors' concepts) noised at the same timesteps;
``mixed`` flips a coin per erasure item. Which one the defaults use is the identity sweep's
call (benchmarks/results/identity_sweep.json).

Because the learnt token never appears in an erasure prompt, the erasure loss never moves the
token embedding: it constrains only the slot blocks ``B_s``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# A small built-in English vocabulary for real bases (no download, no external list).
ENGLISH_WORDS: tuple[str, ...] = tuple(
    """
    person man woman child boy girl baby face portrait people crowd dog cat bird horse cow sheep
    fish car truck bus bicycle boat train plane house building tower bridge street road city
    village forest tree flower grass garden field mountain hill river lake sea beach sky cloud
    sun moon star night morning rain snow fog desert island castle church room kitchen table
    chair sofa bed window door lamp book cup bottle plate bowl apple banana cake bread pizza
    shirt dress hat shoes bag watch phone computer guitar piano painting drawing sculpture toy
    ball robot statue red green blue yellow orange purple pink black white gray brown golden
    silver bright dark old young small large tall happy calm colorful wooden metal glass stone
    photo picture illustration sketch render style sunset landscape closeup wide view scene
    sitting standing running walking flying swimming smiling wearing holding near under over
    with in on at of the a and beautiful detailed realistic vintage modern abstract cartoon
    """.split()  # noqa: SIM905
)
TEMPLATES: tuple[str, ...] = (
    "a photo of a {w}",
    "a picture of {w} and {w}",
    "{w} {w}",
    "a {w} {w} {w}",
    "{w} with a {w} in the {w}",
    "a painting of a {w} {w}",
)


@dataclass(frozen=True)
class ErasurePool:
    """Where to sample "elsewhere": prompts that must not trigger the concept."""

    token: str
    class_word: str
    words: tuple[str, ...]
    others: tuple[str, ...]  # other registered concepts' tokens and names
    random_pieces: tuple[str, ...]  # ordinary tokenizer pieces for random token strings

    def sample(self, gen: random.Random, n: int) -> list[str]:
        return [self._one(gen) for _ in range(n)]

    def _one(self, gen: random.Random) -> str:
        # Draw until clean: a random string may by chance spell the token; never train on it.
        for _ in range(100):
            prompt = self._draw(gen)
            if self.token not in prompt:
                return prompt
        return f"a photo of a {self.class_word}"

    def _draw(self, gen: random.Random) -> str:
        kind = gen.randrange(4 if self.others else 3)
        if kind == 0:
            return f"a photo of a {self.class_word}"
        if kind == 1:
            template = gen.choice(TEMPLATES)
            words = [gen.choice(self.words) for _ in range(template.count("{w}"))]
            if gen.random() < 0.3:
                words[gen.randrange(len(words))] = self.class_word
            return template.replace("{w}", "{}").format(*words)
        if kind == 2:
            pieces = self.random_pieces or self.words
            return " ".join(gen.choice(pieces) for _ in range(gen.randint(1, 6)))
        other = gen.choice(self.others)
        return gen.choice((other, f"a photo of {other}", f"{other} {gen.choice(self.words)}"))


def build_pool(
    tokenizer: object,
    token: str,
    class_word: str,
    concept: str,
    others: Iterable[str],
) -> ErasurePool:
    """The pool for one concept; ``others`` are tokens and names of other registered concepts."""
    words = vocabulary(tokenizer)
    banned = {token, concept}
    other_names = tuple(sorted({o for o in others if o and o not in banned and token not in o}))
    return ErasurePool(
        token=token,
        class_word=class_word,
        words=tuple(w for w in words if w not in banned),
        others=other_names,
        random_pieces=random_pieces(tokenizer, banned),
    )


def vocabulary(tokenizer: object) -> tuple[str, ...]:
    """The toy world's words when the tokenizer knows them as whole words (the embedded base),
    else the built-in English list."""
    from blockctl.toy.vocab import world_words

    world = world_words()
    single = sum(1 for w in world if len(_ids(tokenizer, w)) == 1)
    return world if single >= 0.8 * len(world) else ENGLISH_WORDS


def random_pieces(tokenizer: object, banned: set[str], limit: int = 4096) -> tuple[str, ...]:
    """Decoded ordinary vocabulary entries (no specials, no added tokens), for random strings."""
    vocab: dict[str, int] = tokenizer.get_vocab()  # type: ignore[attr-defined]
    added = set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    pieces = []
    for piece in sorted(vocab, key=vocab.__getitem__):
        if piece in added or piece in special:
            continue
        text = piece.replace("</w>", "").strip()
        if text.isalpha() and text.isascii() and text not in banned:
            pieces.append(text)
        if len(pieces) >= limit:
            break
    return tuple(dict.fromkeys(pieces))


def _ids(tokenizer: object, text: str) -> Sequence[int]:
    return tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[operator]


@dataclass(frozen=True)
class ErasureBatch:
    ids: torch.Tensor  # erasure prompts' token ids (k, L)
    noisy: torch.Tensor  # noised latents (k, C, H, W)
    timesteps: torch.Tensor  # (k,)

    def to(self, device: torch.device | str) -> ErasureBatch:
        return ErasureBatch(self.ids.to(device), self.noisy.to(device), self.timesteps.to(device))


def erasure_batch(
    ids: torch.Tensor,
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    latents: str,
    gen: torch.Generator,
) -> ErasureBatch:
    """Pair ``k`` erasure prompts with latents: the concept batch's first ``k`` noised latents,
    unit-Gaussian latents noised at the same timesteps, or a per-item coin flip of the two."""
    k = ids.shape[0]
    own, t = noisy[:k], timesteps[:k]
    if latents == "concept":
        return ErasureBatch(ids, own, t)
    shape = own.shape
    fresh = scheduler.add_noise(
        torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), t
    ).to(own.dtype)
    if latents == "random":
        return ErasureBatch(ids, fresh, t)
    pick = (torch.rand(k, generator=gen) < 0.5).view(k, *([1] * (own.dim() - 1)))
    return ErasureBatch(ids, torch.where(pick, fresh, own), t)


def draw(gen: random.Random, probability: float) -> bool:
    """Whether this step has an erasure batch."""
    return gen.random() < probability


def erasure_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mse(ε_{θ+Δ}(x_t, c_rand), ε_θ(x_t, c_rand))``; ``target`` is computed without grad."""
    return F.mse_loss(student.float(), target.detach().float())
