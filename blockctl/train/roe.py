"""Randomized Output Erasure (docs/design.md §4), as this project reads it; kept in one module
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

Stand-in tokens (``roe_standin``): a share of the erasure prompts carry one or two stand-in
token embeddings where a concept token would sit ("a photo of ⟨x⟩ {class}", "a {word} in ⟨x⟩
style", ...). Every other contributor's concept token is, to this adapter, a token nobody has
learnt yet; without stand-ins no erasure prompt ever held one, and the slot learnt to act on any
unusual token. A stand-in is drawn fresh each time: a random ordinary word's (or the class
word's) embedding plus a random offset of ``roe_standin_offset`` × its norm, kept inside the
norm bound learnt tokens are held to, i.e. drawn from where learnt tokens actually end. The
embeddings go in through scratch rows of the embedding (``TokenEmbedding.set_scratch``), never
through tokenizer entries. A share ``roe_empty`` of the prompts is the empty prompt, which
classifier-free guidance subtracts from every prompt and amplifies by (guidance − 1).

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


STANDIN = "{x}"  # where a stand-in token sits in an erasure prompt
# {c}: the concept's own class word half of the time (another contributor's concept of the same
# class), else a random word; {w}: a random word.
STANDIN_TEMPLATES: tuple[str, ...] = (
    "a photo of {x} {c}",
    "{x} {c}",
    "{x} {w}",
    "a photo of {x} {w}",
    "a {w} in {x} style",
    "a {w} on a {x} background",
    "a photo of {x} {c} on a {x} background",
    "a photo of {x} {w} in {x} style",
)
MAX_STANDINS = 2  # per prompt, the most any template holds


@dataclass(frozen=True)
class ErasureMix:
    """What share of erasure prompts carry stand-in tokens, and what share are empty."""

    standin: float = 0.0
    empty: float = 0.0


@dataclass(frozen=True)
class ErasurePool:
    """Where to sample "elsewhere": prompts that must not trigger the concept."""

    token: str
    class_word: str
    words: tuple[str, ...]
    others: tuple[str, ...]  # other registered concepts' tokens and names
    random_pieces: tuple[str, ...]  # ordinary tokenizer pieces for random token strings
    anchors: tuple[int, ...] = ()  # token ids whose embeddings stand-ins start from

    def sample(self, gen: random.Random, n: int, mix: ErasureMix = ErasureMix()) -> list[str]:
        """``n`` prompts; stand-in places are marked ``{x}`` (see ``tokenize_with_standins``)."""
        return [self._one(gen, mix) for _ in range(n)]

    def _one(self, gen: random.Random, mix: ErasureMix) -> str:
        # Draw until clean: a random string may by chance spell the token; never train on it.
        for _ in range(100):
            prompt = self._mixed(gen, mix)
            if self.token not in prompt:
                return prompt
        return f"a photo of a {self.class_word}"

    def _mixed(self, gen: random.Random, mix: ErasureMix) -> str:
        if not (mix.standin or mix.empty):  # no extra draw: runs without them stay as they were
            return self._draw(gen)
        u = gen.random()
        if u < mix.empty:
            return ""
        if u < mix.empty + mix.standin:
            return self._standin(gen)
        return self._draw(gen)

    def _standin(self, gen: random.Random) -> str:
        template = gen.choice(STANDIN_TEMPLATES)
        cls = self.class_word if gen.random() < 0.5 else gen.choice(self.words)
        return template.replace("{c}", cls).replace("{w}", gen.choice(self.words))

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
    kept = tuple(w for w in words if w not in banned)
    return ErasurePool(
        token=token,
        class_word=class_word,
        words=kept,
        others=other_names,
        random_pieces=random_pieces(tokenizer, banned),
        anchors=anchor_ids(tokenizer, kept, class_word),
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


def tokenize_with_standins(
    tokenizer: Any, prompts: Sequence[str], first_id: int
) -> tuple[torch.Tensor, int]:
    """Token ids (k, L) of ``prompts`` padded as the text encoder expects; the j-th ``{x}`` of
    the batch becomes id ``first_id + j`` (a scratch row). Returns the ids and how many
    stand-ins they hold. Prompts without ``{x}`` tokenize exactly as ``tokenizer(...)`` does."""
    length = int(tokenizer.model_max_length)
    plain = tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    used = 0
    for i, prompt in enumerate(prompts):
        if STANDIN not in prompt:
            continue
        body: list[int] = []
        for j, piece in enumerate(prompt.split(STANDIN)):
            if j:
                body.append(first_id + used)
                used += 1
            if piece.strip():
                body.extend(_ids(tokenizer, piece.strip()))
        row = [tokenizer.bos_token_id, *body[: length - 2], tokenizer.eos_token_id]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else row[-1]
        plain[i] = torch.tensor(row + [pad] * (length - len(row)))
    return plain, used


def anchor_ids(tokenizer: object, words: Sequence[str], class_word: str) -> tuple[int, ...]:
    """Token ids whose embeddings stand-ins start from: ordinary words and the class word."""
    ids = {i for w in (*words, class_word) for i in _ids(tokenizer, w)}
    return tuple(sorted(int(i) for i in ids))


def standin_rows(
    table: torch.Tensor,
    anchors: Sequence[int],
    count: int,
    offset: float,
    max_norm: float | None,
    gen: torch.Generator,
) -> torch.Tensor:
    """``count`` stand-in embeddings (count × dim, float32): a random anchor row plus a random
    direction of ``offset`` × the row's norm, scaled back inside ``max_norm`` if given."""
    pick = torch.tensor(anchors)[torch.randint(len(anchors), (count,), generator=gen)]
    rows = table[pick.to(table.device)].detach().float().cpu()
    direction = torch.randn(rows.shape, generator=gen)
    direction = direction / direction.norm(dim=1, keepdim=True)
    rows = rows + offset * rows.norm(dim=1, keepdim=True) * direction
    if max_norm is not None:
        rows = rows * (max_norm / rows.norm(dim=1, keepdim=True)).clamp(max=1.0)
    return rows


@dataclass(frozen=True)
class ErasureBatch:
    ids: torch.Tensor  # erasure prompts' token ids (k, L); SDXL: (k, 2, L), one per tokenizer
    noisy: torch.Tensor  # noised latents (k, C, H, W)
    timesteps: torch.Tensor  # (k,)
    standins: torch.Tensor | None = None  # scratch rows the ids refer to (m, dim)
    # SDXL: the same stand-ins in text_encoder_2 (from its own table, the same anchor ids),
    # and the add_time_ids of the latents the prompts are asked on (k, 6).
    standins_2: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def standin_rows(self) -> dict[str, torch.Tensor | None]:
        """The scratch rows by text encoder (``ConceptAdapter.set_scratch``)."""
        return {"text_encoder": self.standins, "text_encoder_2": self.standins_2}

    def to(self, device: torch.device | str) -> ErasureBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return ErasureBatch(
            self.ids.to(device), self.noisy.to(device), self.timesteps.to(device),
            move(self.standins), move(self.standins_2), move(self.time_ids),
        )  # fmt: skip


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
