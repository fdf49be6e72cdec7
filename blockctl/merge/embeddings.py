"""The concept tokens of a single-file or LoRA merge, in the image tools' own embedding format.

Neither output can carry new tokens (AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file``
build the stock CLIP vocabulary; diffusers refuses a LoRA file holding keys without "lora"), so
beside ``OUT`` a folder ``<OUT stem>.embeddings/`` holds one textual-inversion file per concept,
``<concept>.safetensors``, with the rows of the concept's tokens (n × width, in token order):

- SD 1.x/2.x: the single tensor ``emb_params``. AUTOMATIC1111 reads a one-tensor file as a
  "diffuser concept", ComfyUI falls back to a file's first tensor, and diffusers'
  ``load_textual_inversion(file, token=...)`` takes a one-key state dict as it is.
- SDXL: ``clip_l`` (rows of the CLIP ViT-L encoder, ``text_encoder``) and ``clip_g`` (OpenCLIP
  ViT-bigG, ``text_encoder_2``): the keys AUTOMATIC1111 and ComfyUI pick per text encoder.

Both tools search the subfolders of their embeddings folder and name an embedding after its
file's stem, so the folder is dropped in as it is and the concept's name is what a prompt says
(``rex`` in AUTOMATIC1111, ``embedding:rex`` in ComfyUI). The folder also holds a merge record
(``blockctl_merge.json``, which those tools skip), so ``merge --force`` may replace it; ``OUT``'s
own record names the files, so ``verify --merged`` checks them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockctl.layout import TOKEN_EMBEDDING_KEY
from blockctl.merge.plan import parse_dtype
from blockctl.merge.record import RECORD_NAME
from blockctl.safetensors_io import CODE_DTYPES, Entry, StreamWriter

if TYPE_CHECKING:
    from blockctl.merge import MergeOptions, MergePlan

SUFFIX = ".embeddings"
RECORD_KEY = "embeddings"  # in OUT's merge record: {concept: file name in the folder}
# The key each text component's rows go under, per model family.
FAMILY_KEYS: dict[str, dict[str, str]] = {
    "sd": {"text_encoder": "emb_params"},  # SD 1.x/2.x
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
}


def family_of(components: Iterable[str]) -> str:
    """The family whose text components (diffusers' names) these are. Enough for SD and SDXL;
    a family with the same names as another (Flux's CLIP and T5 are also ``text_encoder`` and
    ``text_encoder_2``) has to be named instead."""
    wanted = set(components)
    for family, keys in FAMILY_KEYS.items():
        if set(keys) == wanted:
            return family
    raise ValueError(f"no embedding layout for the text components {sorted(wanted)}")


def embeddings_dir(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + SUFFIX)


def file_name(concept: str) -> str:
    # Concept names are checked to a portable alphabet (blockctl.names), so one is a file name.
    return f"{concept}.safetensors"


def embedding_tensors(
    rows: Mapping[str, torch.Tensor], family: str | None = None
) -> dict[str, torch.Tensor]:
    """One concept's embedding file: its rows per text component (``{"text_encoder": n×768}``
    for SD 1.x, plus ``"text_encoder_2": n×1280`` for SDXL) under the keys its family's
    clients read."""
    family = family or family_of(rows)
    keys = FAMILY_KEYS.get(family)
    if keys is None:
        raise ValueError(f"no embedding layout for the family {family!r}")
    if set(rows) != set(keys):
        raise ValueError(f"{family} embeddings need rows for {sorted(keys)}, not {sorted(rows)}")
    counts = {t.shape[0] if t.dim() == 2 else -1 for t in rows.values()}
    if len(counts) != 1 or -1 in counts:
        raise ValueError("each text component needs the same number of rows, as n × width")
    return {keys[c]: rows[c] for c in sorted(rows)}


def concept_rows(plan: MergePlan) -> dict[str, dict[str, torch.Tensor]]:
    """concept → text component → the rows of its tokens (n × width, float32), for every
    selected concept that has tokens (on SDXL, in both text encoders)."""
    by_encoder = {encoder: dict(rows) for encoder, rows in plan.text_rows.items()}
    return {
        s.concept: {
            encoder: torch.cat([rows[t] for t in s.tokens]) for encoder, rows in by_encoder.items()
        }
        for s in plan.selected
        if s.tokens
    }


def _with_tokens(plan: MergePlan) -> list[str]:
    return [s.concept for s in plan.selected if s.tokens]


def outputs(out: Path, plan: MergePlan) -> list[Path]:
    return [embeddings_dir(out)] if _with_tokens(plan) else []


def record_entry(plan: MergePlan) -> dict[str, object]:
    """What ``OUT``'s merge record says about the folder beside it: the file of each concept
    (nothing when no concept has tokens). Not the folder's name, so that the same inputs give
    the same bytes whatever ``OUT`` is called."""
    concepts = _with_tokens(plan)
    return {RECORD_KEY: {c: file_name(c) for c in concepts}} if concepts else {}


def write(plan: MergePlan, temps: list[Path], options: MergeOptions, fmt: str) -> list[str]:
    """Write the folder into ``temps[0]`` (if ``outputs`` gave one); return the note for the
    user."""
    if not temps:
        return []
    dtype = parse_dtype(options.dtype)
    folder = temps[0]
    folder.mkdir()
    for concept, rows in concept_rows(plan).items():
        stored = {c: t.to(_stored(plan, c, dtype)) for c, t in rows.items()}
        # Each file says where its rows came from: the merge record of its concept alone.
        meta = plan.only(concept).metadata(f"{fmt}-embedding", dtype)
        write_file(folder / file_name(concept), stored, meta, plan.layout.family)
    record = plan.record(f"{fmt}-embeddings", dtype)
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    names = ", ".join(_with_tokens(plan))
    return [
        f"concept tokens are in {embeddings_dir(options.out).name}/ ({names}): "
        "textual-inversion embeddings for AUTOMATIC1111, ComfyUI and diffusers"
    ]


def write_file(
    path: Path,
    rows: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    family: str | None = None,
) -> None:
    """One concept's embedding file from its rows per text component (``embedding_tensors``)."""
    tensors = embedding_tensors(rows, family)
    entries = [Entry(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamWriter(path, entries, metadata) as writer:
        for key, tensor in tensors.items():
            writer.write(key, tensor.contiguous())


def _stored(plan: MergePlan, component: str, dtype: torch.dtype | None) -> torch.dtype:
    """``--dtype`` if given, else the dtype of the base's own token embedding."""
    code = plan.base.info(component, TOKEN_EMBEDDING_KEY).dtype
    return dtype or CODE_DTYPES.get(code, torch.float32)
