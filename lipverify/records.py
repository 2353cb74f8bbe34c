"""Crash-safe result files: atomic JSON/CSV/torch writes (temp file + ``os.replace``) and an
append-only per-step CSV that is flushed after every row.

A reader never sees a half-written JSON or checkpoint: the new content goes to a temporary file
in the same directory, is fsynced, then renamed over the old one (atomic on POSIX).

Two processes never write one run directory: :func:`run_dir_lock` holds ``<run_dir>/.lock`` (an
OS file lock through ``filelock``, released by the kernel when the holder dies) for the whole of a
``train()``; a second process gets :class:`RunDirBusy` at once, naming the holder from the side
file ``<run_dir>/.lock.owner``. :func:`ensure_writable_dir` checks an output directory before any
computation.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import socket
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

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


# --------------------------------------------------------------------------------------------------
# output directories and run-directory locks

#: Lock file of a run directory, and the side file naming its holder (both hidden: not results).
LOCK_NAME = ".lock"
LOCK_OWNER_NAME = ".lock.owner"


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` (with parents) and check that a file can be created in it, before any
    computation writes there. Returns ``Path(path)``. Raises :class:`LipverifyError` with one line
    ("cannot write to X: reason") when a component is a regular file, permission is denied, the file
    system is read-only, ... A real create-and-delete (not ``os.access``): root ignores modes."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LipverifyError(f"cannot write to {path}: it exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".lipverify-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        if isinstance(exc, FileExistsError | NotADirectoryError):
            reason = "a parent of it is a file, not a directory"
        raise LipverifyError(f"cannot write to {path}: {reason}") from exc
    return path


class RunDirBusy(LipverifyError):
    """The run directory is locked by another process (``holder``: its pid/host, when known)."""

    def __init__(self, run_dir: Path, holder: str) -> None:
        self.run_dir = Path(run_dir)
        self.holder = holder
        super().__init__(f"run directory {run_dir} is in use by another lipverify process ({holder})")


#: Run directories this thread holds: resolved path -> nesting depth. A sweep worker takes the
#: lock, then ``train()`` in it takes it again (re-entrant within a thread, exclusive across
#: threads and processes).
_held = threading.local()


def _lock_holder(run_dir: Path) -> str:
    try:
        text = (run_dir / LOCK_OWNER_NAME).read_text().strip()
    except OSError:
        text = ""
    return text or "holder unknown"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path):
    """Hold ``run_dir``'s lock for the ``with`` block; :class:`RunDirBusy` at once if another
    process (or thread) holds it. Creates ``run_dir``. Writes ``pid N on HOST`` to
    ``.lock.owner`` while held and removes it before releasing (so a stale owner is never named)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LipverifyError(f"cannot write to {run_dir}: {exc.strerror or exc}") from exc
    key = str(run_dir.resolve())
    depth = getattr(_held, "depth", None)
    if depth is None:
        depth = _held.depth = {}
    if depth.get(key):
        depth[key] += 1
        try:
            yield run_dir
        finally:
            depth[key] -= 1
        return
    lock = FileLock(run_dir / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout as exc:
        raise RunDirBusy(run_dir, _lock_holder(run_dir)) from exc
    owner = run_dir / LOCK_OWNER_NAME
    depth[key] = 1
    try:
        atomic_write_text(owner, f"pid {os.getpid()} on {socket.gethostname()}\n")
        yield run_dir
    finally:
        depth.pop(key, None)
        try:
            with contextlib.suppress(FileNotFoundError):
                owner.unlink()
        finally:
            lock.release()


@contextlib.contextmanager
def short_lock(path: str | Path, timeout: float = 120.0):
    """A lock held for a short read-modify-write (e.g. of a sweep's sweep.json); waits up to
    ``timeout`` seconds for another holder, then raises :class:`LipverifyError`."""
    lock = FileLock(Path(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout as exc:
        raise LipverifyError(f"{path} stayed locked by another process for {timeout:g} s") from exc
    try:
        yield
    finally:
        lock.release()
