"""``verify --merged``: do a merged output's weights equal base + Σ ΔW? (DESIGN section 9)

Deliberately independent of the merge code path: the expected weights are recomputed in
float64 from the registry's adapters, its basis and the base, one slot at a time
(``W + Σ_s scale_s·B_s A_s`` with ``A_s`` sliced straight from the stored basis), and the merged
tensors are read back from disk. Which concepts and scales went in comes from the output's own
merge record; the adapters must still be the ones it names (same sha256).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from blockctl.adapter import load_adapter, token_key, up_key
from blockctl.base_model import BaseFolder, resolve_base
from blockctl.clip_names import canonical_module, prefixed_module
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.layout import (
    TOKEN_EMBEDDING_KEY,
    Layout,
    basis_key,
    layout_of,
    sha256_file,
)
from blockctl.merge.record import read_record
from registry.base import Registry

# Relative error (max|merged − expected| / max|expected| per tensor) each dtype's rounding
# stays within: float32 accumulates ~1e-7 per op, float16 rounds at 2^-11, bfloat16 at 2^-8.
DEFAULT_TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3, "float64": 1e-9}


@dataclass(frozen=True)
class MergedReport:
    path: str
    output: str
    concepts: tuple[str, ...]
    tolerance: float
    errors: dict[str, float]  # component → max relative error over its tensors
    problems: tuple[str, ...] = ()
    checked: int = 0  # tensors compared
    worst: dict[str, str] = field(default_factory=dict)  # component → tensor with that error

    @property
    def ok(self) -> bool:
        return not self.problems and all(e <= self.tolerance for e in self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "path": self.path,
            "output": self.output,
            "concepts": list(self.concepts),
            "tolerance": self.tolerance,
            "max_relative_error": self.errors,
            "worst_tensor": self.worst,
            "tensors_checked": self.checked,
            "problems": list(self.problems),
        }


class _Expected:
    """Expected tensors, recomputed from the registry in float64."""

    def __init__(self, registry: Registry, layout: Layout, record: dict[str, Any]) -> None:
        self.layout = layout
        with safe_open(str(registry.basis_path()), framework="pt") as handle:
            self.bases = {d: handle.get_tensor(basis_key(d)).double() for d in layout.widths}
        if sha256_file(registry.basis_path()) != layout.basis_sha256:
            raise ValidationFailed("the registry's basis does not match its layout sha256")
        self.adapters = []
        self.token_rows: list[torch.Tensor] = []
        for item in record["concepts"]:
            path = registry.adapter_file(item["concept"])
            if sha256_file(path) != item["sha256"]:
                raise ValidationFailed(
                    f"the adapter of {item['concept']!r} changed since this output was merged"
                )
            adapter = load_adapter(path)
            factor = layout.scale * float(item["scale"])
            self.adapters.append((int(item["slot"]), factor, adapter))
            self.token_rows += [adapter.tensors[token_key(t)].double() for t in item["tokens"]]
        self.targets = {(t.component, f"{t.module}.weight"): t for t in layout.targets}

    def delta(self, component: str, key: str) -> torch.Tensor | None:
        target = self.targets.get((component, canonical_module(key)))
        if target is None:
            return None
        r = self.layout.rank
        total = torch.zeros(target.out_features, target.in_features, dtype=torch.float64)
        for slot, factor, adapter in self.adapters:
            down = self.bases[target.in_features][:, slot * r : (slot + 1) * r].T
            total += factor * (adapter.tensors[up_key(target.name)].double() @ down)
        return total


def _rel_error(merged: torch.Tensor, expected: torch.Tensor) -> float:
    if tuple(merged.shape) != tuple(expected.shape):
        return float("inf")
    m, e = merged.double(), expected.double()
    scale = float(e.abs().max()) if e.numel() else 0.0
    err = float((m - e).abs().max()) if e.numel() else 0.0
    return err / scale if scale > 0 else err


def check_merged(registry: Registry, path: Path, tolerance: float | None = None) -> MergedReport:
    if not path.exists():
        raise InvalidInput(f"{path} does not exist")
    record = read_record(path)
    layout = layout_of(registry)
    output = str(record.get("output", ""))
    concepts = tuple(str(c["concept"]) for c in record.get("concepts", []))
    problems: list[str] = []
    if record.get("layout_hash") != layout.layout_hash:
        problems.append("merged for another layout (layout hash differs from this registry's)")
        return MergedReport(str(path), output, concepts, tolerance or 0.0, {}, tuple(problems))
    expected = _Expected(registry, layout, record)
    base = BaseFolder(resolve_base(layout.base))
    pairs = _pairs(path, output, base)
    errors: dict[str, float] = {}
    worst: dict[str, str] = {}
    checked = 0
    dtypes: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for component, key, merged, base_tensor, stored in pairs:
        seen.add((component, canonical_module(key)))
        if stored.is_floating_point:
            dtypes.add(str(stored).removeprefix("torch."))
        if output == "lora":
            want = expected.delta(component, key)
            if want is None:
                module = canonical_module(key.removesuffix(".weight"))
                problems.append(f"{component}.{module} is not a target of this registry's layout")
                continue
        else:
            want = base_tensor.double()
            delta = expected.delta(component, key)
            if delta is not None:
                want = want + delta
            is_tokens = component == "text_encoder" and canonical_module(key) == TOKEN_EMBEDDING_KEY
            if is_tokens and output == "diffusers" and expected.token_rows:
                want = torch.cat([want, *expected.token_rows], dim=0)
        err = _rel_error(merged, want)
        checked += 1
        if err >= errors.get(component, -1.0):
            errors[component], worst[component] = err, key
    if output in ("single-file", "lora"):
        token_err = _sidecar_error(path, record, expected)
        if token_err is None:
            problems.append("the concept-token sidecar (.tokens.safetensors) is missing")
        else:
            errors["tokens"], worst["tokens"] = token_err, "token rows"
    if not checked:
        problems.append("no tensors to compare")

    missing = sorted(set(expected.targets) - seen)
    if missing:
        problems.append(f"{len(missing)} target(s) missing, e.g. {'.'.join(missing[0])}")
    if tolerance is None:
        tolerance = max((DEFAULT_TOLERANCE.get(d, 1e-3) for d in dtypes), default=1e-5)
    return MergedReport(
        str(path), output, concepts, tolerance, errors, tuple(problems), checked, worst
    )


# (component, base key, merged tensor, base tensor, dtype the output stores it in)
def _sidecar_error(path: Path, record: dict[str, Any], expected: _Expected) -> float | None:
    from blockctl.merge.single_file import sidecar_path

    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    tokens = [t for item in record["concepts"] for t in item["tokens"]]
    with safe_open(str(sidecar), framework="pt") as handle:
        if sorted(handle.keys()) != sorted(tokens):
            return float("inf")
        return max(
            (
                _rel_error(handle.get_tensor(t), row)
                for t, row in zip(tokens, expected.token_rows, strict=True)
            ),
            default=0.0,
        )


Pair = tuple[str, str, torch.Tensor, torch.Tensor, torch.dtype]


def _pairs(path: Path, output: str, base: BaseFolder) -> Iterator[Pair]:
    """One ``Pair`` at a time."""
    if output == "diffusers":
        merged = BaseFolder(path)
        for component in ("unet", "text_encoder", "vae"):
            for key in sorted(base.tensors(component)):
                got = merged.read(component, key)
                yield component, key, got, base.read(component, key), got.dtype
    elif output == "single-file":
        yield from _single_file_pairs(path, base)
    elif output == "lora":
        yield from _lora_pairs(path, base)
    else:
        raise InvalidInput(f"{path}: unknown merged output kind {output!r}")


def _single_file_pairs(path: Path, base: BaseFolder) -> Iterator[Pair]:
    from blockctl.merge.single_file import key_mapper

    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        for component in ("unet", "text_encoder", "vae"):
            mapper: Callable[[str], str] = key_mapper(base, component)
            for key in sorted(base.tensors(component)):
                ldm = mapper(key)
                if ldm not in stored:
                    raise ValidationFailed(f"{path.name} lacks {ldm}")
                original = base.read(component, key)
                got = handle.get_tensor(ldm)
                yield component, key, got.reshape(original.shape), original, got.dtype


def _lora_pairs(path: Path, base: BaseFolder) -> Iterator[Pair]:
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        modules = sorted(k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))
        pairs = [(m, f"{m}.lora_A.weight", f"{m}.lora_B.weight") for m in modules]
        if not pairs:  # kohya keys: the module name is not recoverable, so match targets
            pairs = _kohya_pairs(keys, base)
        for name, a_key, b_key in pairs:
            component, module = name.split(".", 1)
            up, down = handle.get_tensor(b_key), handle.get_tensor(a_key)
            product = up.double() @ down.double()
            yield component, f"{module}.weight", product, torch.empty(0), up.dtype


def _kohya_pairs(keys: set[str], base: BaseFolder) -> list[tuple[str, str, str]]:
    out = []
    for prefix, component in (("lora_unet_", "unet"), ("lora_te_", "text_encoder")):
        names = {k.split(".", 1)[0] for k in keys if k.startswith(prefix)}
        for name in sorted(names):
            module = _kohya_module(name[len(prefix) :], base, component)
            out.append(
                (f"{component}.{module}", f"{name}.lora_down.weight", f"{name}.lora_up.weight")
            )
    return out


def _kohya_module(flat: str, base: BaseFolder, component: str) -> str:
    for key in base.tensors(component):
        module = canonical_module(key.removesuffix(".weight"))
        # Text encoder names come with ``text_model.`` (what clients expect) or, from
        # earlier blockctl versions, without it.
        if flat in (module.replace(".", "_"), prefixed_module(module).replace(".", "_")):
            return module
    raise ValidationFailed(f"kohya module {flat!r} matches no layer of the base")
