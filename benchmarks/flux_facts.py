"""Facts about Flux for docs/flux.md, measured on diffusers' own FluxTransformer2DModel.

1. Shapes: the model is built with diffusers' defaults (FLUX.1's sizes) on the meta device (no
   weights, no download); every linear layer that reads text is listed with its input and
   output width and count.
2. Data flow: on a tiny random Flux transformer, which text-stream inputs depend on the image
   latents? The text stream entering each block is recorded (forward pre-hooks) for two
   different latents with the same prompt.

Usage: ``python benchmarks/flux_facts.py`` (CPU, a few seconds).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

# Linear layers whose input is text (T5 tokens, their later states, or the pooled CLIP
# vector), by name pattern within the model.
TEXT_READERS = {
    "context_embedder": "T5 tokens into the text stream",
    "time_text_embed.text_embedder.linear_1": "pooled CLIP vector into the modulation vector",
    "transformer_blocks.*.attn.add_q_proj": "text stream (double blocks): queries",
    "transformer_blocks.*.attn.add_k_proj": "text stream (double blocks): keys",
    "transformer_blocks.*.attn.add_v_proj": "text stream (double blocks): values",
    "single_transformer_blocks.*.attn.to_k": "text and image tokens together: keys",
    "single_transformer_blocks.*.attn.to_v": "text and image tokens together: values",
}


def _pattern(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def shapes() -> None:
    with init_empty_weights():
        model = FluxTransformer2DModel()  # the defaults: FLUX.1's sizes
    config = model.config
    print(
        "config:",
        {k: config[k] for k in ("num_layers", "num_single_layers", "attention_head_dim")}
        | {
            k: config[k]
            for k in ("num_attention_heads", "joint_attention_dim", "pooled_projection_dim")
        },
    )
    print("inner dim:", model.inner_dim)
    found: Counter[tuple[str, int, int]] = Counter()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _pattern(name) in TEXT_READERS:
            found[(_pattern(name), module.in_features, module.out_features)] += 1
    for (pattern, d_in, d_out), count in sorted(found.items()):
        print(f"{count:3d} × {pattern}: {d_in} → {d_out}  ({TEXT_READERS[pattern]})")
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters: {total / 1e9:.2f} B")


def data_flow() -> None:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        in_channels=4,
        num_layers=3,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=8,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            seen[name] = kwargs["encoder_hidden_states"].detach().clone()

        return hook

    for i, block in enumerate(model.transformer_blocks):
        block.register_forward_pre_hook(record(f"double block {i}"), with_kwargs=True)
    for i, block in enumerate(model.single_transformer_blocks):
        block.register_forward_pre_hook(record(f"single block {i}"), with_kwargs=True)
    text = torch.randn(1, 5, 24)
    pooled = torch.randn(1, 8)
    img_ids = torch.tensor([[0.0, y, x] for y in range(4) for x in range(4)])  # a 4×4 grid
    inputs = {
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
    }
    runs = []
    for seed in (1, 2):
        latents = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            model(hidden_states=latents, **inputs)
        runs.append(dict(seen))
    print("text stream entering each block, two different latents, same prompt:")
    for name in runs[0]:
        diff = float((runs[0][name] - runs[1][name]).abs().max())
        print(f"  {name}: max |difference| = {diff:.3g}")


if __name__ == "__main__":
    shapes()
    data_flow()
