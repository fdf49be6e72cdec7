"""``verify --merged``: do a merged output's weights equal base + Σ ΔW? (docs/design.md §9)

Deliberately independent of the merge code path: the expected weights are recomputed in
float64 from the registry's adapters, its basis and the base, one slot at a time
(``W + Σ_s scale_s·B_s A_s`` with ``A_s`` sliced straight from the stored basis), and the merged
tensors are read back from disk. Which concepts and scales went in comes from the output's own
merge record; the adapters must still be the ones it names (same sha256).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from blockctl.adapter import load_adapter, token_key, up_key
from blockctl.base_model import BaseFolder, resolve_base
from blockctl.clip_names import canonical_module
from blockctl.errors import InvalidInput, ValidationFailed
from blockctl.family import Family
from blockctl.layout import (
    TOKEN_EMBEDDING_KEY,
    Layout,
    basis_key,
    layout_of,
    sha256_file,
)
from blockctl.merge.embeddings import RECORD_KEY
from blockctl.merge.record import read_record
from blockctl.safetensors_io import read_header
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
        # per text encoder: (token, expected row) in merge order
        self.rows: dict[str, list[tuple[str, torch.Tensor]]] = {e: [] for e in layout.token_dims}
        # concept → text component → its tokens' rows (n × width), for the embedding files
        self.embeddings: dict[str, dict[str, torch.Tensor]] = {}
        for item in record["concepts"]:
            path = registry.adapter_file(item["concept"])
            if sha256_file(path) != item["sha256"]:
                raise ValidationFailed(
                    f"the adapter of {item['concept']!r} changed since this output was merged"
                )
            adapter = load_adapter(path)
            factor = layout.scale * float(item["scale"])
            self.adapters.append((int(item["slot"]), factor, adapter))
            for encoder, rows in self.rows.items():
                found = [
                    (t, adapter.tensors[token_key(t, encoder)].double()) for t in item["tokens"]
                ]
                rows += found
                if found:
                    self.embeddings.setdefault(item["concept"], {})[encoder] = torch.cat(
                        [row for _, row in found]
                    )
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
    if output.endswith(("-embeddings", "-embedding")):  # the folder or one of its files
        raise InvalidInput(
            f"{path} holds the concept embeddings of a merge; verify the merged file beside it"
        )
    concepts = tuple(str(c["concept"]) for c in record.get("concepts", []))
    problems: list[str] = []
    if record.get("layout_hash") != layout.layout_hash:
        problems.append("merged for another layout (layout hash differs from this registry's)")
        return MergedReport(str(path), output, concepts, tolerance or 0.0, {}, tuple(problems))
    expected = _Expected(registry, layout, record)
    base = BaseFolder(resolve_base(layout.base))
    pairs = _pairs(path, output, base, layout.model_family)
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
            rows = expected.rows.get(component)
            is_tokens = canonical_module(key) == TOKEN_EMBEDDING_KEY
            if is_tokens and output == "diffusers" and rows:
                want = torch.cat([want, *(row for _, row in rows)], dim=0)
        err = _rel_error(merged, want)
        checked += 1
        if err >= errors.get(component, -1.0):
            errors[component], worst[component] = err, key
    if output in ("single-file", "lora") and RECORD_KEY in record:
        found = _check_embeddings(path, record[RECORD_KEY], expected)
        problems += found.problems
        dtypes |= found.dtypes
        if found.dtypes:
            errors["embeddings"], worst["embeddings"] = found.error, found.worst
    elif output in ("single-file", "lora") and expected.embeddings:
        # Merged by an earlier blockctl, which put every token row in one sidecar file.
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


@dataclass(frozen=True)
class _EmbeddingsFound:
    error: float  # max relative error over the files' rows
    worst: str  # the file and key with that error
    dtypes: frozenset[str]  # of the rows compared (none: nothing could be compared)
    problems: tuple[str, ...]


def _check_embeddings(path: Path, entry: Any, expected: _Expected) -> _EmbeddingsFound:
    """The embedding files the merge record names, in the folder beside ``path``: one per
    concept with tokens, holding exactly the keys of its family, rows equal to the adapters'."""
    from blockctl.merge.embeddings import embedding_tensors, embeddings_dir

    files = _embeddings_entry(entry)
    if files is None:
        return _EmbeddingsFound(0.0, "", frozenset(), ("the record's embeddings entry is damaged",))
    folder = embeddings_dir(path)
    problems: list[str] = []
    missing = sorted(set(expected.embeddings) - set(files))
    if missing:
        problems.append(f"no embedding file recorded for {', '.join(missing)}")
    error, worst, dtypes = 0.0, "", set()
    for concept, name in sorted(files.items()):
        shown, file = f"{folder.name}/{name}", folder / name
        want = expected.embeddings.get(concept)
        if want is None:
            problems.append(f"{shown}: {concept!r} has no concept tokens in this merge")
            continue
        if not file.is_file():
            problems.append(f"the embedding {shown} is missing")
            continue
        try:
            read_header(file)  # a damaged file is refused with a reason, not a crash
            got = load_file(str(file))
        except (ValidationFailed, SafetensorError) as exc:
            problems.append(f"the embedding {shown} is unreadable: {exc}")
            continue
        want_keys = embedding_tensors(want)
        if set(got) != set(want_keys):
            problems.append(f"{shown} holds {sorted(got)}, not {sorted(want_keys)}")
            continue
        for key, rows in want_keys.items():
            dtypes.add(str(got[key].dtype).removeprefix("torch."))
            err = _rel_error(got[key], rows)
            if err >= error:
                error, worst = err, f"{shown} {key}"
    return _EmbeddingsFound(error, worst, frozenset(dtypes), tuple(problems))


def _embeddings_entry(entry: Any) -> dict[str, str] | None:
    """``{concept: file}`` from the record, if every name is a plain file name (the record is
    read from a file: it never gets to point elsewhere)."""
    if not isinstance(entry, dict):
        return None
    names = [*entry.keys(), *entry.values()]
    if not all(isinstance(n, str) and n and Path(n).name == n and n != ".." for n in names):
        return None
    return {str(c): str(f) for c, f in entry.items()}


def _sidecar_error(path: Path, record: dict[str, Any], expected: _Expected) -> float | None:
    """The one-file token sidecar of SD merges by an earlier blockctl (keyed by token)."""
    sidecar = path.with_name(path.name.removesuffix(".safetensors") + ".tokens.safetensors")
    if not sidecar.is_file():
        return None
    tokens = [t for item in record["concepts"] for t in item["tokens"]]
    with safe_open(str(sidecar), framework="pt") as handle:
        if sorted(handle.keys()) != sorted(tokens):
            return float("inf")
        return max(
            (
                _rel_error(handle.get_tensor(t), row)
                for t, (_, row) in zip(tokens, expected.rows["text_encoder"], strict=True)
            ),
            default=0.0,
        )


# (component, base key, merged tensor, base tensor, dtype the output stores it in)
Pair = tuple[str, str, torch.Tensor, torch.Tensor, torch.dtype]


def _pairs(path: Path, output: str, base: BaseFolder, family: Family) -> Iterator[Pair]:
    """One ``Pair`` at a time."""
    if output == "diffusers":
        merged = BaseFolder(path)
        for component in ("unet", *family.text_encoders, "vae"):
            for key in sorted(base.tensors(component)):
                got = merged.read(component, key)
                yield component, key, got, base.read(component, key), got.dtype
    elif output == "single-file":
        yield from _single_file_pairs(path, base, family)
    elif output == "lora":
        yield from _lora_pairs(path, base, family)
    else:
        raise InvalidInput(f"{path}: unknown merged output kind {output!r}")


def _single_file_pairs(path: Path, base: BaseFolder, family: Family) -> Iterator[Pair]:
    from blockctl.merge.single_file import components, placer

    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        for component in components(family):
            place = placer(base, family, component)
            for key in sorted(base.tensors(component)):
                where = place(key)
                if where is None:  # a buffer the layout does not store
                    continue
                if where.key not in stored:
                    raise ValidationFailed(f"{path.name} lacks {where.key}")
                original = base.read(component, key)
                got = handle.get_tensor(where.key)
                yield component, key, where.extract(got, original.shape), original, got.dtype


def _lora_pairs(path: Path, base: BaseFolder, family: Family) -> Iterator[Pair]:
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        modules = sorted(k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))
        pairs = [(m, f"{m}.lora_A.weight", f"{m}.lora_B.weight") for m in modules]
        if not pairs:  # kohya keys: the module name is not recoverable, so match targets
            pairs = _kohya_pairs(keys, base, family)
        for name, a_key, b_key in pairs:
            component, module = name.split(".", 1)
            up, down = handle.get_tensor(b_key), handle.get_tensor(a_key)
            product = up.double() @ down.double()
            yield component, f"{module}.weight", product, torch.empty(0), up.dtype


def _kohya_pairs(keys: set[str], base: BaseFolder, family: Family) -> list[tuple[str, str, str]]:
    """The kohya names back to modules, through a table of every Linear-shaped weight of the
    base named the way the writer names them (and, for the text encoders, as earlier blockctl
    versions did: without ``text_model``)."""
    from blockctl.merge.lora import kohya_namer

    namer = kohya_namer(base, family)
    table: dict[str, tuple[str, str]] = {}
    for component in ("unet", *family.text_encoders):
        for key, info in base.tensors(component).items():
            if not key.endswith(".weight") or len(info.shape) != 2:
                continue
            module = canonical_module(key.removesuffix(".weight"))
            table[namer(component, module)] = (component, module)
            if component != "unet":
                bare = family.part(component).kohya_prefix + module.replace(".", "_")
                table.setdefault(bare, (component, module))
    out = []
    for name in sorted({k.split(".", 1)[0] for k in keys}):
        if name not in table:
            raise ValidationFailed(f"kohya module {name!r} matches no layer of the base")
        component, module = table[name]
        out.append((f"{component}.{module}", f"{name}.lora_down.weight", f"{name}.lora_up.weight"))
    return out
