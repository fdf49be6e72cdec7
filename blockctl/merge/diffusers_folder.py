"""Merge into a diffusers pipeline folder: what ``from_pretrained`` loads.

Every safetensors file of a changed component is streamed tensor by tensor; everything else
(vae, scheduler, configs, …) is linked to the base's file (``blockctl.linking``; copied byte
for byte with ``--copy``) unless ``--dtype`` recasts it. Concept tokens are appended to each
tokenizer and their rows to its text encoder's token embedding (on SDXL both:
``tokenizer``/``text_encoder`` and ``tokenizer_2``/``text_encoder_2``). Pickled weights are
never copied: blockctl only ever writes safetensors.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockctl.errors import InvalidInput
from blockctl.layout import TOKEN_EMBEDDING_KEY
from blockctl.linking import Placer
from blockctl.merge.plan import parse_dtype
from blockctl.merge.record import RECORD_NAME
from blockctl.merge.writers import computed_ahead, pause_mid_write
from blockctl.safetensors_io import StreamWriter, TensorReader, read_entries

if TYPE_CHECKING:
    from blockctl.merge import MergeOptions, MergePlan

_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
Place = Callable[[Path, Path], object]  # how an unchanged file gets from the base to the output


class DiffusersFolder:
    def outputs(self, out: Path, plan: MergePlan) -> list[Path]:
        return [out]

    def write(self, plan: MergePlan, temps: list[Path], options: MergeOptions) -> list[str]:
        placer = Placer(copy=options.copy)
        write_folder(plan, plan.base.root, temps[0], parse_dtype(options.dtype), placer)
        return placer.notes()


WRITER = DiffusersFolder()


def write_folder(
    plan: MergePlan,
    src: Path,
    dst: Path,
    dtype: torch.dtype | None,
    place: Place = shutil.copyfile,
) -> None:
    dst.mkdir()
    paused = False
    parts = plan.layout.model_family.text
    encoders = {p.encoder for p in parts}
    tokenizers = {p.tokenizer: p.encoder for p in parts if plan.text_rows.get(p.encoder)}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        target = dst / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if path.suffix in _PICKLES:
            continue
        component = rel.parts[0] if len(rel.parts) > 1 else ""
        if path.suffix == ".safetensors" and component:
            _write_weights(plan, component, path, target, dtype, place)
            if not paused:
                pause_mid_write()
                paused = True
        elif (
            component in encoders
            and rel.parts[1:] == ("config.json",)
            and (plan.text_rows.get(component) or dtype is not None)
        ):
            _write_text_config(plan, component, path, target, dtype)
        elif component in tokenizers:
            continue  # written below, from the tokenizer itself
        else:
            place(path, target)
    for tokenizer, encoder in tokenizers.items():
        _write_tokenizer(plan, encoder, src / tokenizer, dst / tokenizer, place)
    record = plan.record("diffusers", dtype)
    (dst / RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _write_weights(
    plan: MergePlan,
    component: str,
    src: Path,
    dst: Path,
    dtype: torch.dtype | None,
    place: Place,
) -> None:
    entries = {e.key: e for e in read_entries(src)}
    if all(plan.passthrough(component, e, dtype) for e in entries.values()):
        place(src, dst)  # nothing changes: the bytes are the base's
        return
    with TensorReader(src) as reader:
        # The base's own data order, so the untouched runs are copied in file order.
        order = reader.keys_in_file_order()
        out_entries = [plan.out_entry(component, entries[k], dtype) for k in order]
        changed = [k for k in order if not plan.passthrough(component, entries[k], dtype)]
        ahead = computed_ahead(changed, lambda k: plan.produce(component, k, reader.get(k), dtype))
        with (
            contextlib.closing(ahead),
            StreamWriter(dst, out_entries, plan.metadata("diffusers", dtype)) as writer,
        ):
            for key in order:
                if plan.passthrough(component, entries[key], dtype):
                    writer.copy(key, reader)
                else:
                    done, tensor = next(ahead)
                    assert done == key
                    writer.write(key, tensor)


def _write_text_config(
    plan: MergePlan, encoder: str, src: Path, dst: Path, dtype: torch.dtype | None
) -> None:
    config = json.loads(src.read_text())
    added = plan.text_rows.get(encoder, ())
    if added:
        rows = plan.base.info(encoder, TOKEN_EMBEDDING_KEY).shape[0]
        config["vocab_size"] = rows + len(added)
        # Pool at the real end token, not at the argmax of the ids (an added token): see
        # conditioning.pool_at_end_token. Only where a concept token makes it matter.
        end = _end_token_id(plan.base.root / plan.layout.model_family.part(encoder).tokenizer)
        if end is not None:
            config["eos_token_id"] = end
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = str(dtype).removeprefix("torch.")
    dst.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _end_token_id(tokenizer_dir: Path) -> int | None:
    """The id of CLIP's end token in a tokenizer folder, read from its vocabulary files."""
    end = "<|endoftext|>"
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token", end)
        end = eos.get("content", end) if isinstance(eos, dict) else str(eos)
    vocab_json = tokenizer_dir / "vocab.json"
    if vocab_json.is_file():
        vocab = json.loads(vocab_json.read_text(encoding="utf-8"))
        if end in vocab:
            return int(vocab[end])
    tokenizer_json = tokenizer_dir / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        for added in data.get("added_tokens", []):
            if added.get("content") == end:
                return int(added["id"])
        vocab = (data.get("model") or {}).get("vocab") or {}
        if end in vocab:
            return int(vocab[end])
    return None


def _write_tokenizer(plan: MergePlan, encoder: str, src: Path, dst: Path, place: Place) -> None:
    rows = plan.base.info(encoder, TOKEN_EMBEDDING_KEY).shape[0]
    tokens = [tok for tok, _ in plan.text_rows[encoder]]
    dst.mkdir(parents=True, exist_ok=True)
    if (src / "tokenizer.json").is_file():
        # The tokenizers library edits tokenizer.json directly: what add_tokens does inside
        # transformers, without paying seconds to import transformers.
        _add_to_tokenizer_json(src / "tokenizer.json", dst / "tokenizer.json", tokens, rows)
    else:  # only vocab.json/merges.txt (e.g. SD 1.5 as published): let transformers build it
        _add_with_transformers(src, dst, tokens, rows)
    # Everything else (config, vocab.json/merges.txt for old-style readers) stays as it was.
    for path in sorted(src.iterdir()):
        if path.is_file() and not (dst / path.name).exists() and path.suffix not in _PICKLES:
            place(path, dst / path.name)


def _check_ids(ids: Sequence[int | None], tokens: list[str], rows: int, size: int) -> None:
    if size != rows:
        raise InvalidInput(
            f"the base's tokenizer has {size} tokens but its text encoder has {rows} "
            "embedding rows; cannot place the concept tokens"
        )
    if ids != list(range(rows, rows + len(tokens))):
        raise InvalidInput(f"the tokenizer gave the concept tokens ids {ids}, not new ones")


def _taken(vocab: dict[str, int], tokens: list[str]) -> None:
    taken = [tok for tok in tokens if tok in vocab]
    if taken:
        raise InvalidInput(f"token(s) already in the base's vocabulary: {', '.join(taken)}")


def _add_to_tokenizer_json(src: Path, dst: Path, tokens: list[str], rows: int) -> None:
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(src))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    _taken(tokenizer.get_vocab(with_added_tokens=True), tokens)
    # transformers' add_tokens(str) makes exactly these: normalized, not special.
    tokenizer.add_tokens([AddedToken(t, normalized=True, special=False) for t in tokens])
    _check_ids([tokenizer.token_to_id(t) for t in tokens], tokens, rows, size)
    tokenizer.save(str(dst))


def _add_with_transformers(src: Path, dst: Path, tokens: list[str], rows: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    size = len(tokenizer)
    _taken(tokenizer.get_vocab(), tokens)
    tokenizer.add_tokens(tokens)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    _check_ids(ids if isinstance(ids, list) else [ids], tokens, rows, size)
    tokenizer.save_pretrained(str(dst))
