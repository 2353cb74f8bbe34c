"""Run records of a sweep directory, and the series the claim rules read from them.

A record is::

    {"name": str, "params": dict, "config": TrainConfig dict,
     "summary": lipverify.prediction.summarize_run(...),
     "series": {steps.csv column: list of floats}, "layers": {layer: {"m": int, "n": int}}}
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lipverify._validation import LipverifyError
from lipverify.sweep import read_sweep


def read_steps_csv(path: Path) -> dict[str, list[float]]:
    """steps.csv -> column -> list of floats (booleans as 0/1, empty cells as NaN)."""
    cols: dict[str, list[float]] = {}
    with Path(path).open(newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                cols.setdefault(k, []).append(_to_float(v))
    if not cols:
        raise LipverifyError(f"{path} has no rows")
    return cols


def _to_float(v: str | None) -> float:
    if v is None or v == "":
        return math.nan
    low = v.strip().lower()
    if low in ("true", "false"):
        return 1.0 if low == "true" else 0.0
    try:
        return float(v)
    except ValueError:
        return math.nan


def layer_shapes(run_dir: Path, meta: Mapping[str, Any] | None = None) -> dict[str, dict[str, int]]:
    """Matrix-view shapes (m, n) of the probed layers: from meta.json when it records them, else from
    the weights in checkpoint.pt (``<layer>.weight``, conv weights reshaped to (out, in*kh*kw))."""
    meta = meta or {}
    for key in ("layers", "layer_shapes"):
        value = meta.get(key)
        if isinstance(value, Mapping):
            out = {}
            for name, shape in value.items():
                if isinstance(shape, Mapping) and "m" in shape:
                    out[name] = {"m": int(shape["m"]), "n": int(shape["n"])}
                elif isinstance(shape, list | tuple) and len(shape) >= 2:
                    out[name] = {"m": int(shape[0]), "n": int(math.prod(shape[1:]))}
            if out:
                return out
    ckpt = Path(run_dir) / "checkpoint.pt"
    if not ckpt.exists():
        return {}
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key in ("model", "model_state", "model_state_dict", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out = {}
    for name, tensor in state.items():
        if name.endswith(".weight") and hasattr(tensor, "ndim") and tensor.ndim >= 2:
            out[name[: -len(".weight")]] = {"m": int(tensor.shape[0]), "n": int(math.prod(tensor.shape[1:]))}
    return out


def load_records(
    sweep_dir: str | Path, summarize: Callable[[Path], dict] | None = None
) -> tuple[dict, list, list]:
    """(sweep.json, records of complete runs, problem runs [{name, status, error}])."""
    sweep_dir = Path(sweep_dir)
    doc = read_sweep(sweep_dir)
    if summarize is None:
        from lipverify.prediction import summarize_run as summarize
    records, problems = [], []
    for run in doc["runs"]:
        run_dir = sweep_dir / run["dir"]
        if run.get("status") != "complete":
            problems.append({"name": run["name"], "status": run.get("status"), "error": run.get("error")})
            continue
        try:
            meta = json.loads((run_dir / "meta.json").read_text()) if (run_dir / "meta.json").exists() else {}
            record = {
                "name": run["name"],
                "params": run.get("params", {}),
                "config": run["config"],
                "summary": summarize(run_dir),
                "series": read_steps_csv(run_dir / "steps.csv"),
                "layers": layer_shapes(run_dir, meta),
            }
        except Exception as exc:  # an unreadable run is reported, the others are evaluated
            problems.append(
                {"name": run["name"], "status": "unreadable", "error": f"{type(exc).__name__}: {exc}"}
            )
            continue
        records.append(record)
    return doc, records, problems


def series(record: dict, key: str) -> np.ndarray:
    """One steps.csv column of a record as a float64 array; a clear error when it is missing."""
    try:
        return np.asarray(record["series"][key], dtype=float)
    except KeyError as exc:
        raise LipverifyError(f"run {record.get('name')}: steps.csv has no column {key!r}") from exc


def network_terms(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu_bar, psi_bar, phi_bar^2)`` per recorded step, forward-filled over the steps the probe
    skipped (``probe_every > 1`` leaves them empty), as :func:`lipverify.prediction.summarize_run`
    does: the last measured terms stand for the steps until the next measurement. The final row
    (step T, after the last update) has no terms of its own and is filled too; nothing uses it."""
    out = []
    for key in ("net_mu", "net_psi", "net_phi_sq"):
        values = series(record, key)
        measured = np.isfinite(values)
        if not measured.any() or not measured[0]:
            raise LipverifyError(f"run {record.get('name')}: {key} is not measured at the first step")
        last = np.maximum.accumulate(np.where(measured, np.arange(len(values)), 0))
        out.append(values[last])
    return out[0], out[1], out[2]


def predicted_path(record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Theorem 17 along one run's steps.csv: ``(steps, E[K_t], Var[K_t])`` at the recorded steps.

    Row i's terms (forward-filled over steps without the probe, :func:`network_terms`) describe the
    change from step s_i to s_{i+1} and are weighted by s_{i+1} - s_i;
    ``E[K_t] = K_0 exp(sum (mu + psi))``, ``Var = E^2 (exp(sum phi^2) - 1)``.
    """
    from lipverify.dynamics import NetworkTerms, predict_bound

    steps = series(record, "step")
    log_bound = series(record, "log_bound")
    mu, psi, phi_sq = network_terms(record)
    if len(steps) < 2:
        raise LipverifyError(f"run {record.get('name')}: fewer than two recorded steps")
    dt = np.diff(steps)
    terms = [
        NetworkTerms(
            log_bound=float(log_bound[i]), mu=mu[i] * dt[i], psi=psi[i] * dt[i], phi_sq=phi_sq[i] * dt[i]
        )
        for i in range(len(dt))
    ]
    pred = predict_bound(terms, math.exp(log_bound[0]))
    return steps, pred.mean.numpy(), pred.var.numpy()
