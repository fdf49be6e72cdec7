"""Finding a base model and reading its weights tensor by tensor, without instantiating it.

A base is a diffusers pipeline folder (``model_index.json`` + component folders), a Hub id
(downloaded through huggingface_hub's cache, ``HF_HUB_OFFLINE`` honoured), or ``toy`` for the
embedded default. Only safetensors weights are read: pickled ``.bin`` files never are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from blockctl.clip_names import spellings
from blockctl.errors import InvalidInput, ValidationFailed

if TYPE_CHECKING:
    import torch

TOY = "toy"
# File stem of each component's weights in a diffusers folder.
_STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_PATTERNS = ["*.json", "*.txt", "*.safetensors", "tokenizer/*", "scheduler/*"]


def resolve_base(spec: str) -> Path:
    """A local diffusers folder for ``spec`` (``toy``, a path, or a Hub id)."""
    if spec == TOY:
        from blockctl.toy import weights_path

        return weights_path()
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise InvalidInput(
                f"{spec} is not a diffusers pipeline folder (no model_index.json)",
                hint="pass a folder written by save_pretrained, a Hub id, or 'toy'",
            )
        return path
    if _HUB_ID.match(spec):
        return _download(spec)
    raise InvalidInput(f"base {spec!r} is neither an existing folder, a Hub id, nor 'toy'")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from blockctl.errors import RegistryUnavailable

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        raise RegistryUnavailable(
            f"base {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be "
            "reached (offline?)",
            hint="download it once online, or pass a local diffusers folder",
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise RegistryUnavailable(f"could not download base {repo_id!r}: {exc}") from exc


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str
    shape: tuple[int, ...]


class BaseFolder:
    """Read access to the weights of a diffusers pipeline folder, one tensor at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def component_dir(self, component: str) -> Path:
        return self.root / component

    def weight_files(self, component: str) -> list[Path]:
        """The safetensors files holding a component's weights (several when sharded)."""
        folder = self.component_dir(component)
        stem = _STEMS.get(component, "diffusion_pytorch_model")
        for variant in ("", ".fp16"):
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if not index.is_file():
                index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                return [folder / name for name in sorted(set(weight_map.values()))]
        if folder.is_dir() and any(folder.glob("*.bin")):
            raise InvalidInput(
                f"{folder} holds only pickled .bin weights; blockctl reads safetensors only",
                hint="convert the model with save_pretrained(..., safe_serialization=True)",
            )
        raise InvalidInput(f"no safetensors weights for component {component!r} in {self.root}")

    def tensors(self, component: str) -> dict[str, TensorInfo]:
        return dict(self._tensors(component))

    def _tensors(self, component: str) -> dict[str, TensorInfo]:
        cache = self._infos
        if component not in cache:
            infos: dict[str, TensorInfo] = {}
            for file in self.weight_files(component):
                with safe_open(str(file), framework="pt") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                        sl = handle.get_slice(key)
                        infos[key] = TensorInfo(file, str(sl.get_dtype()), tuple(sl.get_shape()))
            cache[component] = infos
        return cache[component]

    @cached_property
    def _infos(self) -> dict[str, dict[str, TensorInfo]]:
        return {}

    def stored_key(self, component: str, key: str) -> str:
        """The key as this folder stores it, with or without ``text_model.`` (clip_names)."""
        tensors = self._tensors(component)
        for candidate in spellings(key):
            if candidate in tensors:
                return candidate
        raise ValidationFailed(f"base has no tensor {component}.{key}")

    def info(self, component: str, key: str) -> TensorInfo:
        return self._tensors(component)[self.stored_key(component, key)]

    def read(self, component: str, key: str) -> torch.Tensor:
        stored = self.stored_key(component, key)
        with safe_open(str(self._tensors(component)[stored].file), framework="pt") as handle:
            return handle.get_tensor(stored)
