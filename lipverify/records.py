"""Crash-safe result files: atomic JSON/CSV/torch writes (temp file + ``os.replace``) and an
append-only per-step CSV that is flushed after every row.

A reader never sees a half-written JSON or checkpoint: the new content goes to a temporary file
in the same directory, is fsynced, then renamed over the old one (atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lipverify._validation import LipverifyError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results get the usual permissions
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write_bytes(Path(path), text.encode())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write (non-finite floats become null)."""
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise LipverifyError(f"missing file {path}") from exc
    except json.JSONDecodeError as exc:
        raise LipverifyError(f"malformed JSON in {path}: {exc}") from exc


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(Path(path), buf.getvalue())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def format_rows(columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


class StepLog:
    """Per-step CSV: rewritten atomically from ``rows`` on open (so a resumed run drops rows written
    after its last checkpoint), then one flushed line per :meth:`append`. Floats are written with
    ``repr`` (round-trip exact); missing values are empty cells, booleans 0/1."""

    def __init__(
        self, path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]] = ()
    ) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        atomic_write_text(self.path, format_rows(self.columns, rows))
        self._fh = open(self.path, "a", newline="")
        self._writer = csv.writer(self._fh, lineterminator="\n")

    def append(self, row: Mapping[str, Any]) -> None:
        unknown = set(row) - set(self.columns)
        if unknown:
            raise LipverifyError(f"record has columns not in the CSV header: {sorted(unknown)}")
        self._writer.writerow([_cell(row.get(c)) for c in self.columns])
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_steps(path: str | Path) -> tuple[list[str], list[dict[str, float | None]]]:
    """Read a steps CSV: (columns, rows) with floats (empty cells -> None)."""
    path = Path(path)
    if not path.is_file():
        raise LipverifyError(f"missing per-step record {path}")
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            columns = next(reader)
        except StopIteration as exc:
            raise LipverifyError(f"empty per-step record {path}") from exc
        rows = []
        for i, line in enumerate(reader, start=2):
            if len(line) != len(columns):
                raise LipverifyError(
                    f"malformed line {i} in {path}: {len(line)} cells, header has {len(columns)}"
                )
            try:
                rows.append({c: (float(v) if v != "" else None) for c, v in zip(columns, line, strict=True)})
            except ValueError as exc:
                raise LipverifyError(f"malformed line {i} in {path}: {exc}") from exc
    return columns, rows
