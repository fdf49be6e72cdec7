"""Ordinary LoRA, the identity benchmark's baseline: what people merge today.

Each concept trains a peft LoRA (trainable, random-init ``A``; zero ``B``) on the SAME targets,
rank, scale, learnt token, photos, steps, learning rates and per-step draws as blockctl's trainer
(it runs inside the trainer's own session, with the slot blocks left at zero and out of the
optimizer), with no ROE. Merging N of them uses peft's ``add_weighted_adapter``:
``cat`` is the exact sum of the deltas (what diffusers' ``set_adapters`` + ``fuse_lora`` do),
``ties`` and ``dare_linear`` are the TIES and DARE merges as peft's and diffusers' merging guides
use them (weights 1, density 0.5).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from blockctl.apply import Modules, deltas_applied
from blockctl.base_model import resolve_base
from blockctl.evaluate import EvalConfig, Probe, Subject, measure, renderer
from blockctl.layout import layout_of
from blockctl.train import loop
from blockctl.train.config import lr_factor
from blockctl.train.run import TrainRequest, prepare
from registry import Registry

COMBINATIONS = {"lora-sum": "cat", "lora-ties": "ties", "lora-dare": "dare_linear"}
DENSITY = 0.5


@dataclass(frozen=True)
class LoraConcept:
    name: str
    token: str
    class_word: str
    path: Path  # {module}.lora_A / {module}.lora_B / token


def unet_targets(reg: Registry) -> list[str]:
    return [t.module for t in layout_of(reg).targets if t.component == "unet"]


def train_lora(
    reg: Registry, photos: Path, name: str, out: Path, overrides: dict[str, Any]
) -> float:
    """Train ``name``'s ordinary LoRA into ``out``; returns the seconds it took."""
    from peft import LoraConfig, inject_adapter_in_model

    started = time.perf_counter()
    request = TrainRequest(
        photos=photos, concept=name, out_dir=out.parent / "run" / name,
        overrides={**overrides, "roe": False}, publish=False, sample=False,
    )  # fmt: skip
    session = prepare(reg, request, say=lambda _m: None)
    inputs, layout = session.inputs, session.layout
    if any(t.component != "unet" for t in layout.targets):
        raise SystemExit("the LoRA baseline covers UNet targets only")
    cfg = inputs.config
    unet = inputs.components.unet
    # The slot wrappers stay (their B is zero and never trained); LoRA wraps the Linear inside.
    pattern = "|".join(m.replace(".", r"\.") + r"\.base" for m in unet_targets(reg))
    config = LoraConfig(r=layout.rank, lora_alpha=round(layout.rank * layout.scale),
                        target_modules=f"^({pattern})$")  # fmt: skip
    torch.manual_seed(cfg.seed)  # peft's random A
    inject_adapter_in_model(config, unet)
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    row = inputs.adapter.embedding_parameters()
    optimizer = torch.optim.AdamW(
        [{"params": lora, "lr": cfg.lr}, {"params": row, "lr": cfg.embedding_lr}],
        weight_decay=cfg.weight_decay,
    )
    for step in range(cfg.steps):
        for group, base_lr in zip(optimizer.param_groups, (cfg.lr, cfg.embedding_lr), strict=True):
            group["lr"] = base_lr * lr_factor(cfg, step)
        batch = loop.micro_batch(inputs, step, 0, 0)
        pred = session.model(batch.noisy, batch.timesteps, batch.ids)[0]
        loss = F.mse_loss(pred.float(), batch.target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + row, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tensors = {"token": row[0].detach().clone()}
    for module in unet_targets(reg):
        layer: Any = unet.get_submodule(module + ".base")
        tensors[f"{module}.lora_A"] = layer.lora_A["default"].weight.detach().clone()
        tensors[f"{module}.lora_B"] = layer.lora_B["default"].weight.detach().clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"scale": str(layout.scale), "rank": str(layout.rank)})
    return time.perf_counter() - started


def own_delta(concept: LoraConcept, modules: Sequence[str]) -> dict[tuple[str, str], torch.Tensor]:
    """The concept's own ΔW = scale · B A (its model alone, unmerged)."""
    t = load_file(str(concept.path))
    # lora_alpha = rank · scale, so peft's scaling alpha/r is the layout's scale
    scale = float(_meta(concept.path)["scale"])
    return {("unet", m): scale * t[f"{m}.lora_B"] @ t[f"{m}.lora_A"] for m in modules}


def merged_delta(
    base: Path, concepts: Sequence[LoraConcept], modules: Sequence[str], method: str, seed: int
) -> dict[tuple[str, str], torch.Tensor]:
    """The merged ΔW per target from peft's ``add_weighted_adapter``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    rank = int(_meta(concepts[0].path)["rank"])
    scale = float(_meta(concepts[0].path)["scale"])
    config = LoraConfig(r=rank, lora_alpha=round(rank * scale), target_modules=list(modules))
    model: Any = get_peft_model(unet, config, adapter_name=concepts[0].name)
    for c in concepts[1:]:
        model.add_adapter(c.name, config)
    names = [c.name for c in concepts]
    with torch.no_grad():
        for c in concepts:
            t = load_file(str(c.path))
            for m in modules:
                layer: Any = model.base_model.model.get_submodule(m)
                layer.lora_A[c.name].weight.copy_(t[f"{m}.lora_A"])
                layer.lora_B[c.name].weight.copy_(t[f"{m}.lora_B"])
    torch.manual_seed(seed)  # DARE's random drops
    kwargs = {} if method == "cat" else {"density": DENSITY}
    model.base_model.add_weighted_adapter(
        names, [1.0] * len(names), "merged", combination_type=method, **kwargs
    )
    out = {}
    for m in modules:
        layer = model.base_model.model.get_submodule(m)
        out[("unet", m)] = layer.get_delta_weight("merged").detach().float()
    return out


def lora_row(
    method: str, base: Path, concepts: Sequence[LoraConcept], modules: Sequence[str], seed: int
) -> dict[str, Any]:
    """Merge (timed: load adapters, merge with peft, fuse, save the UNet), then measure."""
    from identity_common import row

    base_modules = Modules.load(base)
    rows = [(c.token, load_file(str(c.path))["token"].reshape(1, -1)) for c in concepts]
    t0 = time.perf_counter()
    merged = merged_delta(base, concepts, modules, COMBINATIONS[method], seed)
    with tempfile.TemporaryDirectory() as tmp, deltas_applied(base_modules, merged, rows) as m:
        m.unet.save_pretrained(Path(tmp) / "unet")  # type: ignore[operator]
    merge_seconds = time.perf_counter() - t0

    by_name = {c.name: (c, token_row) for c, token_row in zip(concepts, rows, strict=True)}

    def alone(s: Subject) -> AbstractContextManager[Modules]:
        concept, token_row = by_name[s.name]
        return deltas_applied(base_modules, own_delta(concept, modules), [token_row])

    subjects = [Subject(c.name, i, c.token, c.class_word) for i, c in enumerate(concepts)]
    config = EvalConfig()
    probe = Probe(base_modules, base / "scheduler", config)
    in_merged = deltas_applied(base_modules, merged, rows)
    render = renderer(base, config)
    metrics, _ = measure(probe, base_modules, in_merged, alone, subjects, config.guidance, render)
    return row(method, [c.name for c in concepts], metrics, merge_seconds, seed=seed)


def base_dir(reg: Registry) -> Path:
    return resolve_base(layout_of(reg).base)


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
