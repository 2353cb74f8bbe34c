"""Sweep configs: parse and validate the TOML, apply --smoke, expand the grid into runs.

See :mod:`lipverify.sweep` for the config format. Nothing here runs training.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipverify._validation import LipverifyError

#: Claims of Section 8 that :mod:`lipverify.claims` knows how to evaluate.
CLAIMS = ("init", "near_convergence", "noisy_gradient", "label_noise", "batch_size", "trajectories")

#: Top-level keys of a sweep config.
SWEEP_KEYS = ("claim", "description", "base", "grid", "cases", "smoke", "options", "resources")

#: Keys of the optional ``[resources]`` table (what each Ray task reserves; the local pool ignores it).
RESOURCE_KEYS = ("num_cpus", "num_gpus")

#: --smoke caps (applied before the config's own [smoke] table): at most this many steps, this
#: many training samples and this many values per grid key.
SMOKE_STEPS = 6
SMOKE_TRAIN_SIZE = 64
SMOKE_MAX_VALUES = 3


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
    resources: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON form, stored in sweep.json and compared on resume (``name`` and ``resources`` are
        not part of it: neither changes a run's results)."""
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
    resources = _parse_resources(table("resources"), name)
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
        resources=resources,
    )


def _parse_resources(table: Mapping[str, Any], name: str) -> dict:
    """``[resources]``: ``num_cpus`` an int >= 1, ``num_gpus`` a number in (0, 1] or an int >= 1
    (Ray's fractional-GPU rule)."""
    bad = sorted(set(table) - set(RESOURCE_KEYS))
    if bad:
        raise LipverifyError(
            f"sweep config {name}: [resources] names unknown key(s) {bad}; allowed: {list(RESOURCE_KEYS)}"
        )
    out = dict(table)
    cpus = out.get("num_cpus", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise LipverifyError(
            f"sweep config {name}: [resources] num_cpus must be an integer >= 1, got {cpus!r}"
        )
    gpus = out.get("num_gpus", 1)
    if (
        isinstance(gpus, bool)
        or not isinstance(gpus, int | float)
        or not math.isfinite(gpus)
        or gpus <= 0
        or (gpus > 1 and gpus != int(gpus))
    ):
        raise LipverifyError(
            f"sweep config {name}: [resources] num_gpus must be in (0, 1] or a whole number, got {gpus!r}"
        )
    return out


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
