"""The model families blockctl trains and merges, and what tells them apart.

A family is chosen once, at ``init``, from the base's ``model_index.json`` (``_class_name``) and
stored in the layout; everything after reads it from there. Only the facts that differ between
families live here, so the code paths that use them stay one:

- ``sd``: ``StableDiffusionPipeline`` (SD 1.x and 2.x): one CLIP text encoder, whose last
  hidden state conditions the UNet;
- ``sdxl``: ``StableDiffusionXLPipeline``: two text encoders (CLIP ViT-L ``text_encoder``,
  OpenCLIP bigG ``text_encoder_2``) whose penultimate hidden states are concatenated, plus
  ``text_encoder_2``'s pooled embedding and the ``add_time_ids`` micro-conditioning.

Light to import: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from blockctl.errors import InvalidInput


@dataclass(frozen=True)
class TextPart:
    """One text encoder and its tokenizer, as a pipeline folder names them."""

    encoder: str  # diffusers component: "text_encoder", "text_encoder_2"
    tokenizer: str  # "tokenizer", "tokenizer_2"
    model_class: str  # the transformers class of the encoder
    kohya_prefix: str  # its LoRA modules' prefix in kohya key style


@dataclass(frozen=True)
class Family:
    name: str
    pipeline_class: str
    text: tuple[TextPart, ...]
    # Conditioning: the penultimate hidden states of every encoder side by side, the last
    # encoder's pooled projection and add_time_ids (SDXL); else the last hidden state (SD).
    dual_text: bool

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(p.encoder for p in self.text)

    def part(self, encoder: str) -> TextPart:
        for p in self.text:
            if p.encoder == encoder:
                return p
        raise InvalidInput(f"{self.pipeline_class} has no component {encoder!r}")


SD = Family(
    name="sd",
    pipeline_class="StableDiffusionPipeline",
    text=(TextPart("text_encoder", "tokenizer", "CLIPTextModel", "lora_te_"),),
    dual_text=False,
)
SDXL = Family(
    name="sdxl",
    pipeline_class="StableDiffusionXLPipeline",
    text=(
        TextPart("text_encoder", "tokenizer", "CLIPTextModel", "lora_te1_"),
        TextPart("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "lora_te2_"),
    ),
    dual_text=True,
)
FAMILIES = {f.name: f for f in (SD, SDXL)}
SUPPORTED = ", ".join(f"{f.pipeline_class} ({f.name})" for f in FAMILIES.values())


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown model family {name!r}; this blockctl knows {SUPPORTED}"
        ) from None


def family_of_pipeline(class_name: str | None) -> Family:
    """The family of a pipeline class; anything else is refused naming the supported ones."""
    for family in FAMILIES.values():
        if family.pipeline_class == class_name:
            return family
    raise InvalidInput(
        f"blockctl cannot train a {class_name or 'pipeline without a _class_name'}; "
        f"supported: {SUPPORTED}",
        hint="pass the base's text-to-image pipeline folder (SD 1.x/2.x or SDXL base)",
    )
