"""One concept's token rows in the textual-inversion layout SDXL clients read: ``clip_l``
(n × 768, the rows for ``text_encoder``) and ``clip_g`` (n × 1280, for ``text_encoder_2``), n the
concept's tokens.

That is what diffusers documents for SDXL embeddings (``pipe.load_textual_inversion(
state["clip_g"], token=..., text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)``, and
the same with ``clip_l``, ``pipe.text_encoder`` and ``pipe.tokenizer``) and what ComfyUI's SDXL
embedding loader looks up by those two keys. The per-concept embedding files written beside
single-file and LoRA outputs (``merge/embeddings.py``, SD 1.x/2.x's ``emb_params``) call this for
SDXL layouts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from blockctl.errors import InvalidInput

if TYPE_CHECKING:
    from blockctl.merge.plan import MergePlan


def sdxl_embedding(plan: MergePlan, concept: str) -> dict[str, torch.Tensor]:
    """``{"clip_l": …, "clip_g": …}`` (float32) for ``concept`` of an SDXL merge plan."""
    family = plan.layout.model_family
    if not family.dual_text:
        raise InvalidInput(f"the {family.pipeline_class} layout has no clip_l/clip_g embeddings")
    tokens = {tok for s in plan.selected if s.concept == concept for tok in s.tokens}
    if not tokens:
        raise InvalidInput(f"{concept!r} is not part of this merge")
    out = {}
    for part in family.text:
        rows = [row for tok, row in plan.text_rows[part.encoder] if tok in tokens]
        assert part.embedding_name is not None
        out[part.embedding_name] = torch.cat(rows).to(torch.float32).contiguous()
    return out
