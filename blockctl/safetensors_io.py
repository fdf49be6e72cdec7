"""Safetensors I/O in one place: the dtype tables, an untrusting header reader, a streaming
reader and writer, and atomic saves.

``StreamWriter`` writes the header first, from shapes and dtypes known in advance, then each
tensor's bytes in the announced order as it is produced, so peak memory is about the largest
tensor, not the model. ``TensorReader`` reads single tensors with plain reads; ``read_entries``
reads only the header, through ``safe_open``. ``read_header`` checks a file byte by byte before
anything trusts it, so a truncated file, a header that lies about sizes or a huge header is
refused with a reason instead of a crash.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from blockctl.atomic import atomic_write
from blockctl.errors import ValidationFailed

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
CODE_WIDTHS = {  # bytes per element, by safetensors dtype code
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 16 * 1024 * 1024
_CHUNK = 64 << 20  # fallback copy buffer: bounded, whatever the run length


@dataclass(frozen=True)
class Entry:
    """One tensor the writer will receive: its key, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The safetensors header (length prefix included) for tensors laid out in this order."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_CODES:
            raise ValueError(f"{e.key}: dtype {e.dtype} cannot be stored in safetensors here")
        header[e.key] = {
            "dtype": DTYPE_CODES[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    # The data section starts 8-byte aligned, as safetensors' own writer pads it.
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class StreamWriter:
    """Write a safetensors file tensor by tensor, in the order of ``entries``."""

    def __init__(
        self, path: Path, entries: Sequence[Entry], metadata: Mapping[str, str] | None = None
    ) -> None:
        keys = [e.key for e in entries]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate tensor keys")
        self.path = path
        self._entries = list(entries)
        self._next = 0
        self._run: tuple[TensorReader, int, int] | None = None  # pending kernel copy
        # Unbuffered, so ``copy`` can hand ranges to the kernel between our own writes.
        self._fh: io.FileIO = io.FileIO(path, "xb")
        self._write_all(header_bytes(self._entries, metadata))

    def _expect(self, key: str) -> Entry:
        if self._next >= len(self._entries):
            raise ValueError(f"unexpected tensor {key!r}: every announced tensor was written")
        expected = self._entries[self._next]
        if key != expected.key:
            raise ValueError(f"tensor {key!r} written out of order (expected {expected.key!r})")
        return expected

    def _write_all(self, data: memoryview | bytes | bytearray) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._fh.write(view) or 0 :]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        self._flush_run()
        expected = self._expect(key)
        if tensor.dtype != expected.dtype or tuple(tensor.shape) != expected.shape:
            raise ValueError(
                f"{key}: got {tensor.dtype}{list(tensor.shape)}, "
                f"announced {expected.dtype}{list(expected.shape)}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        if flat.numel():
            self._write_all(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def copy(self, key: str, reader: TensorReader, source_key: str | None = None) -> None:
        """Copy a tensor's bytes unchanged from ``reader`` (same dtype and element count; the
        shape may differ, e.g. a 1×1 conv stored as a matrix). Runs of tensors adjacent in the
        source are copied at once by the kernel (``copy_file_range``), so untouched tensors
        never pass through Python or count in RSS."""
        expected = self._expect(key)
        dtype, _, (offset, nbytes) = reader.span(source_key or key)
        if dtype != expected.dtype or nbytes != expected.nbytes:
            raise ValueError(f"{key}: source {dtype} of {nbytes} bytes does not match its entry")
        run = self._run
        if run is not None and run[0] is reader and run[1] + run[2] == offset:
            self._run = (reader, run[1], run[2] + nbytes)
        else:
            self._flush_run()
            self._run = (reader, offset, nbytes)
        self._next += 1

    def _flush_run(self) -> None:
        if self._run is None:
            return
        reader, offset, nbytes = self._run
        self._run = None
        # Linux only: macOS and Windows have no ``os.copy_file_range``.
        kernel_copy = getattr(os, "copy_file_range", None)
        done = 0
        try:
            while kernel_copy is not None and done < nbytes:
                n = kernel_copy(reader.fileno(), self._fh.fileno(), nbytes - done, offset + done)
                if n == 0:
                    raise ValueError(f"{reader.path.name}: truncated tensor data")
                done += n
        except OSError:  # no kernel copy between these filesystems
            pass
        # Whatever the kernel did not copy goes through memory, in bounded chunks.
        for start in range(offset + done, offset + nbytes, _CHUNK):
            self._write_all(reader.read_bytes(start, min(_CHUNK, offset + nbytes - start)))

    def close(self) -> None:
        """Finish the file; an incomplete file is an error (the caller discards it)."""
        if self._fh.closed:
            return
        try:
            self._flush_run()
        finally:
            self._fh.close()
        if self._next != len(self._entries):
            missing = self._entries[self._next].key
            raise ValueError(f"{self.path.name}: {missing!r} and later tensors were never written")

    def abort(self) -> None:
        self._run = None
        self._fh.close()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def read_entries(path: Path) -> list[Entry]:
    """Keys, dtypes and shapes of a safetensors file, in key order, without reading data."""
    out = []
    with safe_open(str(path), framework="pt") as handle:
        for key in sorted(handle.keys()):
            sl = handle.get_slice(key)
            code = sl.get_dtype()
            if code not in CODE_DTYPES:
                raise ValueError(f"{path.name}: tensor {key!r} has unsupported dtype {code}")
            out.append(Entry(key, CODE_DTYPES[code], tuple(sl.get_shape())))
    return out


class TensorReader:
    """Reads single tensors of a safetensors file with plain reads, not safe_open's memory
    map: every page of a mapped file stays resident (and counted in RSS) while the mapping is
    open, so mapping a 1.7 GB UNet would cost 1.7 GB however carefully it is streamed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: io.BufferedReader = path.open("rb")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        self._header = json.loads(self._fh.read(n))
        self._start = 8 + n
        self._lock = threading.Lock()

    def keys_in_file_order(self) -> list[str]:
        tensors = [k for k in self._header if k != "__metadata__"]
        return sorted(tensors, key=lambda k: self._header[k]["data_offsets"][0])

    def span(self, key: str) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
        """dtype, shape and (absolute offset, byte length) of one tensor."""
        info = self._header.get(key)
        if key == "__metadata__" or not isinstance(info, dict):
            raise KeyError(f"{self.path.name} has no tensor {key!r}")
        begin, end = info["data_offsets"]
        return CODE_DTYPES[info["dtype"]], tuple(info["shape"]), (self._start + begin, end - begin)

    def fileno(self) -> int:
        return self._fh.fileno()

    def read_bytes(self, offset: int, nbytes: int) -> bytearray:
        """``nbytes`` at ``offset``; safe to call from several threads at once."""
        buf = bytearray(nbytes)
        view = memoryview(buf)
        done = 0
        while done < nbytes:
            n = self._read_into(view[done:], offset + done)
            if n == 0:
                raise ValueError(f"{self.path.name}: truncated data at offset {offset + done}")
            done += n
        return buf

    def _read_into(self, view: memoryview, offset: int) -> int:
        # Positional reads need no shared file position; Windows has no ``os.preadv``, so
        # there a seek and a read happen together under the lock instead.
        positional = getattr(os, "preadv", None)
        if positional is not None:
            return int(positional(self._fh.fileno(), [view], offset))
        with self._lock:
            self._fh.seek(offset)
            return self._fh.readinto(view) or 0

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, (offset, nbytes) = self.span(key)
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.read_bytes(offset, nbytes), dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_header(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a safetensors header without trusting it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise ValidationFailed(f"{path.name}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise ValidationFailed(
                    f"{path.name}: not a safetensors file, or a hostile one: header claims "
                    f"{n} bytes (limit {MAX_HEADER_BYTES})"
                )
            if 8 + n > size:
                raise ValidationFailed(f"{path.name}: truncated (header runs past end of file)")
            raw = fh.read(n)
    except OSError as exc:
        raise ValidationFailed(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationFailed(f"{path.name}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ValidationFailed(f"{path.name}: not a safetensors file (header is not an object)")
    _check_offsets(path.name, header, size - 8 - n)
    return header


def _check_offsets(name: str, header: dict[str, Any], data_len: int) -> None:
    spans = []
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    ends = [v.get("data_offsets", [0, 0])[1] for v in entries.values() if isinstance(v, dict)]
    if ends and all(isinstance(e, int) for e in ends) and max(ends) > data_len:
        raise ValidationFailed(
            f"{name}: truncated (tensor data needs {max(ends)} bytes, file has {data_len})"
        )
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise ValidationFailed(f"{name}: metadata must map strings to strings")
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            width = CODE_WIDTHS[dtype]
            count = math.prod(int(d) for d in shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationFailed(f"{name}: malformed header entry for {key!r}") from exc
        if not (0 <= start <= end <= data_len) or end - start != count * width:
            raise ValidationFailed(
                f"{name}: header lies about the size of {key!r} "
                f"({end - start} bytes for {dtype}{list(shape)}, data section {data_len})"
            )
        spans.append((start, end))
    spans.sort()
    cursor = 0
    for start, end in spans:
        if start != cursor:
            raise ValidationFailed(f"{name}: tensor data overlaps or leaves gaps")
        cursor = end
    if cursor != data_len:
        raise ValidationFailed(f"{name}: {data_len - cursor} trailing bytes after tensor data")


def save_file_atomic(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]
) -> None:
    """``safetensors.torch.save_file``, written to a temporary sibling and renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as staged:
        save_file(dict(tensors), str(staged.temp), metadata=dict(metadata))
