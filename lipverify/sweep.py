"""Parameter sweeps for the Section 8 implications (issue 6): expand a grid, run it, resume it.

A sweep config is a TOML file::

    claim = "batch_size"          # which Section 8 claim lipverify.claims evaluates on the runs
    description = "..."           # optional
    [base]                        # TrainConfig keys shared by every run
    steps = 200
    [grid]                        # key = list of values; the runs are the Cartesian product
    batch_size = [16, 32, 64]
    seed_sampling = [0, 1, 2]
    [[cases]]                     # optional: each case is a table of keys varied together (zipped);
    init = "default"              # the runs are grid x cases
    [smoke]                       # optional overrides for --smoke (TrainConfig keys, and a grid table)
    steps = 4
    [smoke.grid]
    seed_sampling = [0, 1, 2]
    [options]                     # optional keyword arguments of the claim's evaluation function

The sweep directory holds ``sweep.json`` (schema version, lipverify version, the sweep config, and
every run with its config, status and error) and ``runs/<name>/`` (one ``lipverify train`` run
directory each). Runs already complete with the same config are skipped; interrupted ones are
resumed (``train`` resumes from ``checkpoint.pt``). Every input problem (unknown parameter, empty
grid, a directory holding another sweep or another schema, an unwritable directory) raises
:class:`LipverifyError` before any run starts; a run that fails is recorded with its error and the
others go on.

Concurrent drivers: each run is executed under its run directory's lock
(:func:`lipverify.records.run_dir_lock`); a run another process holds (a second ``lipverify sweep``
or a ``lipverify train --out`` into it) is recorded as ``"running elsewhere"`` - not failed - and a
later invocation finishes it. ``sweep.json`` is written by read-merge-write under a short lock
(``.sweep.lock``): each run record carries ``status_at`` (epoch seconds of the observation), and the
newer record of a run wins, so two drivers never erase each other's outcomes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import multiprocessing
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipverify._validation import LipverifyError
from lipverify.records import RunDirBusy, atomic_write_text, ensure_writable_dir, run_dir_lock, short_lock

#: Status of a run whose directory another process holds (skipped; a later sweep finishes it).
RUNNING_ELSEWHERE = "running elsewhere"

#: Version of the sweep.json layout; a directory written under another version is refused.
SCHEMA_VERSION = 1

#: Claims of Section 8 that :mod:`lipverify.claims` knows how to evaluate.
CLAIMS = ("init", "near_convergence", "noisy_gradient", "label_noise", "batch_size", "trajectories")

#: Top-level keys of a sweep config.
SWEEP_KEYS = ("claim", "description", "base", "grid", "cases", "smoke", "options")

#: --smoke caps (applied before the config's own [smoke] table): at most this many steps, this
#: many training samples and this many values per grid key.
SMOKE_STEPS = 6
SMOKE_TRAIN_SIZE = 64
SMOKE_MAX_VALUES = 3

RunFn = Callable[[dict, Path], Any]


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def train_config_fields() -> dict[str, Any]:
    """TrainConfig field -> default value (from :mod:`lipverify.training`)."""
    from lipverify.training import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = None
    return out


def resolve_train_config(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The full TrainConfig (as a dict) a run with these overrides trains with. Every value goes
    through the coercion of ``lipverify train --config`` (:func:`lipverify.training.coerce_value`:
    strings parsed, ints widened to float, other type mismatches refused), then the config through
    ``TrainConfig.validate`` and a check that ``batch_size`` does not exceed ``train_size`` (the
    run would fail on it), so that a bad value stops the sweep before any run."""
    from lipverify.training import TrainConfig, coerce_value

    values = {key: coerce_value(key, value) for key, value in overrides.items()}
    config = TrainConfig(**values).validate()
    if config.train_size is not None and config.batch_size > config.train_size:
        raise LipverifyError(
            f"invalid config: batch_size {config.batch_size} exceeds train_size {config.train_size}"
        )
    return dataclasses.asdict(config)


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory name, the grid values that select it, its overrides."""

    name: str
    params: dict
    overrides: dict


@dataclass(frozen=True)
class SweepConfig:
    """A parsed, validated sweep config (see the module docstring)."""

    claim: str
    base: dict
    grid: dict
    cases: list = field(default_factory=list)
    smoke: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    description: str = ""
    name: str = "sweep"

    def as_dict(self) -> dict:
        """JSON form, stored in sweep.json and compared on resume (``name`` is not part of it)."""
        return {
            "claim": self.claim,
            "description": self.description,
            "base": self.base,
            "grid": self.grid,
            "cases": self.cases,
            "smoke": self.smoke,
            "options": self.options,
        }

    def effective(self, smoke: bool = False) -> SweepConfig:
        """The config actually run: itself, or with the --smoke shrinking applied.

        Smoke: ``steps <= SMOKE_STEPS``, ``train_size <= SMOKE_TRAIN_SIZE``, at most
        ``SMOKE_MAX_VALUES`` values per grid key, full-gradient probes off, then the config's own
        ``[smoke]`` table (TrainConfig keys override ``base``; ``[smoke.grid]`` replaces grid lists).
        Last, ``batch_size`` (TrainConfig's default 128 when unset) is capped at the resulting
        ``[base]`` ``train_size`` in ``base``, the grid and the cases, like the other caps: a smoke
        run of a config written for the full data set then still runs. A capped grid list keeps
        each value once. A ``train_size`` set per run (grid or case) is not capped; a batch larger
        than it is refused by :func:`resolve_train_config` before any run starts.
        """
        if not smoke:
            return self
        base = dict(self.base)
        base["steps"] = min(int(base.get("steps", SMOKE_STEPS)), SMOKE_STEPS)
        size = base.get("train_size")
        base["train_size"] = SMOKE_TRAIN_SIZE if size is None else min(int(size), SMOKE_TRAIN_SIZE)
        base["full_gradient_every"] = 0
        base["full_gradient_clean"] = False  # it needs the full-gradient probe
        base["checkpoint_every"] = max(1, base["steps"] // 2)
        grid = {k: list(v)[:SMOKE_MAX_VALUES] for k, v in self.grid.items()}
        overrides = {k: v for k, v in self.smoke.items() if k != "grid"}
        base.update(overrides)
        grid.update(self.smoke.get("grid", {}))
        cases = [dict(c) for c in self.cases]
        size = base.get("train_size")
        if isinstance(size, int) and not isinstance(size, bool):

            def cap(b: Any) -> Any:
                return min(b, size) if isinstance(b, int) and not isinstance(b, bool) else b

            base["batch_size"] = cap(base.get("batch_size", train_config_fields()["batch_size"]))
            if "batch_size" in grid:
                grid["batch_size"] = list(dict.fromkeys(cap(b) for b in grid["batch_size"]))
            for case in cases:
                if "batch_size" in case:
                    case["batch_size"] = cap(case["batch_size"])
        return dataclasses.replace(self, base=base, grid=grid, cases=cases, smoke={})

    def expand(self, smoke: bool = False) -> list[RunSpec]:
        """The runs: Cartesian product of the grid lists (in file order), times the cases.

        Each run's overrides are ``base | case | grid point``; its name is ``r<index>-<key=value...>``
        (stable for a given config, so a re-run finds its directories again).
        """
        cfg = self.effective(smoke)
        keys = list(cfg.grid)
        cases = cfg.cases or [{}]
        runs = []
        for case, values in itertools.product(cases, itertools.product(*(cfg.grid[k] for k in keys))):
            params = dict(case)
            params.update(zip(keys, values, strict=True))
            overrides = dict(cfg.base)
            overrides.update(params)
            runs.append(RunSpec(name=_run_name(len(runs), params), params=params, overrides=overrides))
        return runs


def _slug(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text)


def _run_name(index: int, params: Mapping[str, Any]) -> str:
    parts = [f"r{index:03d}"] + [f"{k}={_slug(v)}" for k, v in params.items()]
    return "_".join(parts)[:120]


def _check_value(key: str, value: Any, where: str) -> None:
    if isinstance(value, dict | list):
        raise LipverifyError(f"{where}: {key} must be a single value, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise LipverifyError(f"{where}: {key} = {value} is not finite")


def parse_sweep_config(
    data: Mapping[str, Any], name: str = "sweep", fields: Iterable[str] | None = None
) -> SweepConfig:
    """Validate a sweep config dict (the parsed TOML). ``fields``: the TrainConfig field names
    (default: read from :class:`lipverify.training.TrainConfig`). With the default, every value of
    ``[base]``, ``[grid]``, ``[[cases]]``, ``[smoke]`` and ``[smoke.grid]`` is coerced to its
    field's type as ``lipverify train --config`` does (:func:`lipverify.training.coerce_value`), so
    ``lr = "0.05"`` is read as 0.05 and ``batch_size = 16.0`` is refused here, before any run."""
    known = set(train_config_fields() if fields is None else fields)
    if fields is None:
        from lipverify.training import coerce_value
    else:

        def coerce_value(key: str, value: Any) -> Any:  # stand-in fields carry no types
            return value

    def coerce(table: dict, where: str) -> dict:
        out = {}
        for key, value in table.items():
            try:
                out[key] = coerce_value(key, value)
            except LipverifyError as exc:
                raise LipverifyError(f"sweep config {name} {where}: {exc}") from exc
        return out

    unknown_top = sorted(set(data) - set(SWEEP_KEYS))
    if unknown_top:
        raise LipverifyError(
            f"sweep config {name}: unknown top-level key(s) {unknown_top}; allowed: {list(SWEEP_KEYS)}"
        )
    claim = data.get("claim")
    if claim not in CLAIMS:
        raise LipverifyError(f"sweep config {name}: claim must be one of {list(CLAIMS)}, got {claim!r}")

    def check_keys(table: Mapping[str, Any], where: str) -> None:
        bad = sorted(set(table) - known)
        if bad:
            raise LipverifyError(
                f"sweep config {name}: {where} names unknown parameter(s) {bad} "
                f"(not TrainConfig fields; known: {sorted(known)})"
            )

    def table(key: str) -> dict:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise LipverifyError(f"sweep config {name}: [{key}] must be a table")
        return dict(value)

    base = table("base")
    check_keys(base, "[base]")
    for k, v in base.items():
        _check_value(k, v, f"sweep config {name} [base]")
    base = coerce(base, "[base]")
    grid = table("grid")
    check_keys(grid, "[grid]")
    cases = data.get("cases", [])
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise LipverifyError(f"sweep config {name}: [[cases]] must be an array of tables")
    if not grid and not cases:
        raise LipverifyError(f"sweep config {name}: the grid is empty (no [grid] lists and no [[cases]])")
    for k, values in grid.items():
        if not isinstance(values, list):
            raise LipverifyError(f"sweep config {name}: [grid] {k} must be a list of values")
        if not values:
            raise LipverifyError(f"sweep config {name}: [grid] {k} is an empty list: the grid is empty")
        for v in values:
            _check_value(k, v, f"sweep config {name} [grid]")
        grid[k] = [coerce({k: v}, "[grid]")[k] for v in values]
    cases = [dict(c) for c in cases]
    for i, case in enumerate(cases):
        if not case:
            raise LipverifyError(f"sweep config {name}: case {i} is empty")
        check_keys(case, f"case {i}")
        for k, v in case.items():
            _check_value(k, v, f"sweep config {name} case {i}")
        cases[i] = coerce(case, f"case {i}")
        clash = sorted(set(case) & set(grid))
        if clash:
            raise LipverifyError(f"sweep config {name}: case {i} and [grid] both set {clash}")
    smoke = table("smoke")
    smoke_grid = smoke.get("grid", {})
    if not isinstance(smoke_grid, dict):
        raise LipverifyError(f"sweep config {name}: [smoke.grid] must be a table")
    check_keys({k: v for k, v in smoke.items() if k != "grid"}, "[smoke]")
    check_keys(smoke_grid, "[smoke.grid]")
    for k, values in smoke_grid.items():
        if not isinstance(values, list) or not values:
            raise LipverifyError(f"sweep config {name}: [smoke.grid] {k} must be a non-empty list")
    smoke_values = coerce({k: v for k, v in smoke.items() if k != "grid"}, "[smoke]")
    if "grid" in smoke:
        smoke_values["grid"] = {
            k: [coerce({k: v}, "[smoke.grid]")[k] for v in vs] for k, vs in smoke_grid.items()
        }
    options = table("options")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise LipverifyError(f"sweep config {name}: description must be a string")
    return SweepConfig(
        claim=claim,
        base=base,
        grid=grid,
        cases=cases,
        smoke=smoke_values,
        options=options,
        description=description,
        name=name,
    )


def load_sweep_config(path: str | Path, fields: Iterable[str] | None = None) -> SweepConfig:
    """Read and validate a sweep config TOML file (see the module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise LipverifyError(f"sweep config not found: {path}") from exc
    except OSError as exc:  # e.g. a directory
        raise LipverifyError(f"cannot read sweep config {path}: {exc}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise LipverifyError(f"sweep config {path} is not valid TOML: {exc}") from exc
    return parse_sweep_config(data, name=path.stem, fields=fields)


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
) -> SweepResult:
    """Run every run of the sweep that is not already complete; write sweep.json after each one.

    ``jobs > 1``: a ProcessPoolExecutor (spawn context) with that many workers, one torch thread
    each; ``jobs == 1``: in this process. ``run_fn(config_dict, run_dir)`` trains one run (default
    :func:`train_run`; must be a module-level function when ``jobs > 1``); ``resolve(overrides)`` gives
    the full config dict (default: TrainConfig with its defaults, which also validates the values).
    """
    if jobs < 1:
        raise LipverifyError(f"--jobs must be >= 1, got {jobs}")
    if Path(sweep_dir).exists() and not Path(sweep_dir).is_dir():
        raise LipverifyError(f"cannot write to {sweep_dir}: it exists and is not a directory")
    run_fn = train_run if run_fn is None else run_fn
    resolve = resolve_train_config if resolve is None else resolve
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
    log(
        f"sweep {config.name} ({config.claim}): {len(runs)} runs, {len(runs) - len(todo)} already "
        f"complete, {len(todo)} to run with {jobs} job(s) -> {sweep_dir}"
    )
    done = 0

    def finish(record: dict, outcome: dict) -> None:
        nonlocal done
        done += 1
        record.update(outcome, status_at=time.time())
        write_sweep_doc(doc_path, config, smoke, runs)
        extra = f": {outcome['error']}" if outcome["error"] else ""
        log(f"[{done}/{len(todo)}] {record['name']} {outcome['status']} ({outcome['wall_s']:.1f} s){extra}")

    if jobs == 1 or len(todo) <= 1:
        for record in todo:
            record.update(status="running", status_at=time.time())
            try:
                outcome = _execute(run_fn, record["config"], str(sweep_dir / record["dir"]))
            except KeyboardInterrupt:
                record.update(status="interrupted", error="KeyboardInterrupt", status_at=time.time())
                write_sweep_doc(doc_path, config, smoke, runs)
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
