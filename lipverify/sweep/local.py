"""Running a sweep: sweep.json, skip/resume, the run of one configuration, the local process pool
(``--backend local``, the default). :mod:`lipverify.sweep.ray_backend` runs the same runs as Ray
tasks through :func:`run_sweep` ``backend="ray"``.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lipverify._validation import LipverifyError
from lipverify.records import RunDirBusy, atomic_write_text, ensure_writable_dir, run_dir_lock, short_lock
from lipverify.sweep.grid import SweepConfig, resolve_train_config

#: Status of a run whose directory another process holds (skipped; a later sweep finishes it).
RUNNING_ELSEWHERE = "running elsewhere"

#: Version of the sweep.json layout; a directory written under another version is refused.
SCHEMA_VERSION = 1

#: Where the runs of a sweep execute (``run_sweep(backend=...)``, ``lipverify sweep --backend``).
BACKENDS = ("local", "ray")

RunFn = Callable[[dict, Path], Any]


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --------------------------------------------------------------------------------------------------
# running


def train_run(config: dict, run_dir: Path) -> Path:
    """Default run function: ``lipverify.training.train`` on the resolved config, no progress bar."""
    from lipverify.training import TrainConfig, train

    return train(TrainConfig(**config), run_dir, progress=False)


def _execute(run_fn: RunFn, config: dict, run_dir: str) -> dict:
    """Run one configuration (in a worker process or in-process) with one torch thread, holding the
    run directory's lock; never raises (KeyboardInterrupt aside). A run directory held by another
    process gives status ``"running elsewhere"``; one completed (same config) by another process
    since the sweep started is not run again."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    skipped = False
    try:
        with run_dir_lock(run_dir):
            meta = read_meta(Path(run_dir))
            if (
                meta is not None
                and meta.get("status") == "complete"
                and _same_config(meta.get("config"), config)
            ):
                skipped = True
            else:
                run_fn(dict(config), Path(run_dir))
    except RunDirBusy as exc:
        status, error = RUNNING_ELSEWHERE, str(exc)
    except Exception as exc:  # a failed run is reported, the sweep goes on
        status, error = "failed", f"{type(exc).__name__}: {exc}"
    else:
        status, error = "complete", None
        meta = read_meta(Path(run_dir))
        if meta is not None and meta.get("status") not in (None, "complete"):
            status, error = "failed", f"run function returned but meta.json says {meta.get('status')!r}"
    finally:
        torch.set_num_threads(threads)
    outcome = {"status": status, "error": error, "wall_s": round(time.perf_counter() - start, 3)}
    if skipped:
        outcome["skipped"] = True
    return outcome


def read_meta(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "meta.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _same_config(stored: Mapping[str, Any] | None, config: Mapping[str, Any]) -> bool:
    """A run dir's meta.json config equals ``config`` on every key of ``config``."""
    if not isinstance(stored, Mapping):
        return False
    return all(_canon(stored.get(k)) == _canon(v) for k, v in config.items())


def _canon(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    return value


@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the sweep dir and the run records written to sweep.json."""

    sweep_dir: Path
    runs: list[dict]

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.runs if r["status"] == "failed"]

    @property
    def ran(self) -> list[dict]:
        return [r for r in self.runs if not r.get("skipped")]

    @property
    def running_elsewhere(self) -> list[dict]:
        """Runs whose directory another process held: neither complete nor failed."""
        return [r for r in self.runs if r["status"] == RUNNING_ELSEWHERE]


def _sweep_doc(config: SweepConfig, smoke: bool, runs: list[dict]) -> dict:
    from lipverify import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "lipverify_version": __version__,
        "name": config.name,
        "smoke": smoke,
        "sweep": config.as_dict(),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": runs,
    }


def write_sweep_doc(doc_path: Path, config: SweepConfig, smoke: bool, runs: list[dict]) -> None:
    """Write sweep.json by read-merge-write under ``.sweep.lock``: for each run, the record with the
    larger ``status_at`` (this driver's or the one on disk, written by another driver) wins; ties
    go to this driver. A file of another sweep or schema is not merged (it was refused earlier)."""
    with short_lock(doc_path.parent / ".sweep.lock"):
        stored: dict[str, dict] = {}
        try:
            old = json.loads(doc_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if (
            isinstance(old, dict)
            and old.get("schema_version") == SCHEMA_VERSION
            and old.get("sweep") == json.loads(json.dumps(config.as_dict()))
            and bool(old.get("smoke")) == smoke
        ):
            stored = {r["name"]: r for r in old.get("runs", []) if isinstance(r, dict) and "name" in r}
        merged = []
        for record in runs:
            other = stored.get(record["name"])
            newer = other is not None and _status_at(other) > _status_at(record)
            merged.append(other if newer else record)
        atomic_write_json(doc_path, _sweep_doc(config, smoke, merged))


def _status_at(record: Mapping[str, Any]) -> float:
    value = record.get("status_at")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def check_sweep_dir(sweep_dir: Path, config: SweepConfig, smoke: bool) -> dict | None:
    """Refuse a directory that holds another sweep: different schema or different sweep config."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        return None
    doc = read_sweep(sweep_dir, hint="; choose another --out or delete the directory")
    if doc.get("sweep") != json.loads(json.dumps(config.as_dict())) or bool(doc.get("smoke")) != smoke:
        raise LipverifyError(
            f"{path} holds a different sweep config (or smoke setting) than the one given: "
            "choose another --out or delete the directory"
        )
    return doc


def run_sweep(
    config: SweepConfig,
    sweep_dir: str | Path,
    jobs: int = 1,
    smoke: bool = False,
    run_fn: RunFn | None = None,
    resolve: Callable[[Mapping[str, Any]], dict] | None = None,
    log: Callable[[str], None] | None = None,
    *,
    backend: str = "local",
    address: str | None = None,
    max_retries: int = 2,
    progress: bool = False,
) -> SweepResult:
    """Run every run of the sweep that is not already complete; write sweep.json after each one.

    ``backend="local"``: ``jobs > 1`` a ProcessPoolExecutor (spawn context) with that many workers,
    one torch thread each; ``jobs == 1`` in this process. ``backend="ray"``: each run one Ray task
    (:func:`lipverify.sweep.ray_backend.execute_on_ray`) on a local Ray instance with ``jobs`` CPUs,
    or on the running cluster at ``address``; a task whose worker dies is retried (resuming from the
    run's checkpoint) up to ``max_retries`` times; ``progress`` shows one bar (done/running/failed).
    ``run_fn(config_dict, run_dir)`` trains one run (default :func:`train_run`; must be picklable -
    a module-level function - when ``jobs > 1`` or on Ray); ``resolve(overrides)`` gives the full
    config dict (default: TrainConfig with its defaults, which also validates the values; on Ray a
    ``cuda`` device is checked on the cluster, not on the driver).
    """
    if backend not in BACKENDS:
        raise LipverifyError(f"unknown sweep backend {backend!r}; choose one of {list(BACKENDS)}")
    if jobs < 1:
        raise LipverifyError(f"--jobs must be >= 1, got {jobs}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise LipverifyError(f"--max-retries must be an integer >= 0, got {max_retries!r}")
    if address is not None and backend != "ray":
        raise LipverifyError("--address is only used with --backend ray")
    if Path(sweep_dir).exists() and not Path(sweep_dir).is_dir():
        raise LipverifyError(f"cannot write to {sweep_dir}: it exists and is not a directory")
    ray_backend = None
    if backend == "ray":
        from lipverify.sweep import ray_backend

        ray_backend.import_ray()  # a missing extra is an error before anything is written
        if resolve is None:
            resolve = ray_backend.resolve_for_cluster
    run_fn = train_run if run_fn is None else run_fn
    resolve = resolve_train_config if resolve is None else resolve
    if log is None and progress:
        from tqdm import tqdm

        log = lambda msg: tqdm.write(msg, file=sys.stderr)  # above the progress bar
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    sweep_dir = Path(sweep_dir)
    specs = config.expand(smoke)
    # every check before any run starts
    check_sweep_dir(sweep_dir, config, smoke)
    runs: list[dict] = []
    for spec in specs:
        try:
            full = resolve(spec.overrides)
        except LipverifyError as exc:
            raise LipverifyError(f"sweep run {spec.name}: {exc}") from exc
        run_dir = sweep_dir / "runs" / spec.name
        meta = read_meta(run_dir)
        record = {
            "name": spec.name,
            "dir": f"runs/{spec.name}",
            "params": spec.params,
            "config": full,
            "status": "pending",
            "error": None,
            "skipped": False,
            "status_at": 0.0,  # nothing observed yet: a record on disk from another driver wins
        }
        if meta is not None:
            if not _same_config(meta.get("config"), full):
                raise LipverifyError(
                    f"{run_dir} holds a run with a different config; delete it or choose another --out"
                )
            if meta.get("status") == "complete":
                record.update(status="complete", skipped=True, status_at=time.time())
        runs.append(record)
    ensure_writable_dir(sweep_dir)
    doc_path = sweep_dir / "sweep.json"
    write_sweep_doc(doc_path, config, smoke, runs)

    todo = [r for r in runs if r["status"] != "complete"]
    where = f"Ray ({address or f'local instance, {jobs} CPU(s)'})" if backend == "ray" else f"{jobs} job(s)"
    log(
        f"sweep {config.name} ({config.claim}): {len(runs)} runs, {len(runs) - len(todo)} already "
        f"complete, {len(todo)} to run with {where} -> {sweep_dir}"
    )
    done = 0

    def save() -> None:
        write_sweep_doc(doc_path, config, smoke, runs)

    def finish(record: dict, outcome: dict) -> None:
        nonlocal done
        done += 1
        record.update(outcome, status_at=time.time())
        save()
        extra = f": {outcome['error']}" if outcome["error"] else ""
        log(f"[{done}/{len(todo)}] {record['name']} {outcome['status']} ({outcome['wall_s']:.1f} s){extra}")

    if ray_backend is not None:
        if todo:
            ray_backend.execute_on_ray(
                todo,
                sweep_dir,
                run_fn,
                finish,
                save,
                jobs=jobs,
                address=address,
                max_retries=max_retries,
                resources=config.resources,
                progress=progress,
                log=log,
            )
    elif jobs == 1 or len(todo) <= 1:
        for record in todo:
            record.update(status="running", status_at=time.time())
            try:
                outcome = _execute(run_fn, record["config"], str(sweep_dir / record["dir"]))
            except KeyboardInterrupt:
                record.update(status="interrupted", error="KeyboardInterrupt", status_at=time.time())
                save()
                raise
            finish(record, outcome)
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            futures = {}
            for record in todo:
                record.update(status="running", status_at=time.time())
                fut = pool.submit(_execute, run_fn, record["config"], str(sweep_dir / record["dir"]))
                futures[fut] = record
            for fut in as_completed(futures):
                try:
                    outcome = fut.result()
                except Exception as exc:  # the worker process died (e.g. killed for memory)
                    outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "wall_s": 0.0}
                finish(futures[fut], outcome)
    return SweepResult(sweep_dir=sweep_dir, runs=runs)


def read_sweep(sweep_dir: str | Path, hint: str = "") -> dict:
    """Load and schema-check a sweep directory's sweep.json (``hint`` is appended to errors)."""
    path = Path(sweep_dir) / "sweep.json"
    if not path.exists():
        raise LipverifyError(f"{sweep_dir} is not a sweep directory (no sweep.json)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LipverifyError(f"{path} is not valid JSON: {exc}{hint}") from exc
    version = doc.get("schema_version") if isinstance(doc, dict) else None
    if version != SCHEMA_VERSION:
        raise LipverifyError(
            f"{path} has sweep schema version {version!r}, this lipverify reads {SCHEMA_VERSION}: "
            f"incompatible sweep directory{hint}"
        )
    return doc
