"""Lipschitz records along a run (``lipschitz_every``) and their report (lipschitz.csv, lipschitz.png)."""

from __future__ import annotations

import math

import pytest
import torch

from lipverify import LipverifyError
from lipverify import lipschitz as lip
from lipverify.commands.report import report_run
from lipverify.records import read_json, read_steps
from lipverify.training import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def tiny(**kw) -> TrainConfig:
    base = dict(
        train_size=64,
        batch_size=16,
        steps=5,
        checkpoint_every=2,
        lr=0.05,
        sharpness_every=0,
        lipschitz_samples=4,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_convnet_records_bounds_beside_K_and_the_report_draws_them(tmp_path, capsys):
    out = train(tiny(model="convnet", lipschitz_every=2), tmp_path, progress=False)
    _, lrows = read_steps(out / "lipschitz.csv")
    _, srows = read_steps(out / "steps.csv")
    assert [int(r["step"]) for r in lrows] == [0, 2, 4, 5]  # every k steps and the last
    by_step = {int(r["step"]): r for r in srows}
    for r in lrows:
        assert 0 < r["lower_secant"] <= r["upper"]
        assert r["upper"] > r["K"]  # the convs' true norms exceed their reshaped sigma_1 here
        # K as the framework records it (steps.csv, float32 weights: SVD agreement to 1e-5)
        assert r["K"] == pytest.approx(math.exp(by_step[int(r["step"])]["log_bound"]), rel=1e-5)
        for name in ("conv1", "conv2", "conv3", "fc1", "fc2"):
            assert r[f"{name}.lower"] <= r[f"{name}.upper"]
            assert r[f"{name}.reshaped"] == pytest.approx(by_step[int(r["step"])][f"{name}.sigma"], rel=1e-5)
        for name in ("conv1", "conv2", "conv3"):
            profile = [r[f"{name}.radial_{i}"] for i in range(8) if r[f"{name}.radial_{i}"] is not None]
            assert profile and all(v > 0 for v in profile)
    report_run(out)
    assert (out / "lipschitz.png").stat().st_size > 0
    block = read_json(out / "summary.json")["lipschitz"]
    assert block["records"] == 4 and block["last"]["step"] == 5
    assert "certified upper" in capsys.readouterr().out


def test_report_rejects_an_empirical_lower_bound_above_the_certified_upper(tmp_path):
    out = train(tiny(lipschitz_every=5, steps=5), tmp_path, progress=False)
    lip.summarize_lipschitz(out)  # consistent records pass
    path = out / "lipschitz.csv"
    lines = path.read_text().splitlines()
    cols = lines[0].split(",")
    cells = lines[1].split(",")
    cells[cols.index("lower_secant")] = repr(2 * float(cells[cols.index("upper")]))
    path.write_text("\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n")
    with pytest.raises(LipverifyError, match="exceeds the certified upper bound"):
        lip.summarize_lipschitz(out)


def _steps_without_time(path):
    _, rows = read_steps(path)
    return rows


def test_recording_leaves_the_trajectory_unchanged_and_a_global_rng_user_is_caught(tmp_path, monkeypatch):
    """With dropout the run draws from torch's global RNG: records that drew from it would shift
    every later mask. The same comparison rejects such a recorder (the wrong variant)."""
    plain = train(tiny(dropout=0.3), tmp_path / "plain", progress=False)
    recorded = train(tiny(dropout=0.3, lipschitz_every=2), tmp_path / "rec", progress=False)
    assert _steps_without_time(plain / "steps.csv") == _steps_without_time(recorded / "steps.csv")
    real = lip.lipschitz_record

    def leaky(*args, **kwargs):
        torch.rand(1)  # a recorder that touches the global RNG
        return real(*args, **kwargs)

    monkeypatch.setattr(lip, "lipschitz_record", leaky)
    leaked = train(tiny(dropout=0.3, lipschitz_every=2), tmp_path / "leak", progress=False)
    assert _steps_without_time(plain / "steps.csv") != _steps_without_time(leaked / "steps.csv")


def test_resumed_run_records_the_same_bounds(tmp_path):
    config = tiny(lipschitz_every=2, steps=6)
    full = train(config, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train(config, part, progress=False, stop_after=3)  # killed after step 3 (checkpoint at 2)
    train(config, part, progress=False)

    def records(d):
        _, rows = read_steps(d / "lipschitz.csv")
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert records(full) == records(part)


def test_config_checks():
    with pytest.raises(LipverifyError, match="lipschitz_every needs batch_norm = false"):
        TrainConfig(model="convnet", batch_norm=True, lipschitz_every=5).validate()
    with pytest.raises(LipverifyError, match="lipschitz_every must be >= 0"):
        TrainConfig(lipschitz_every=-1).validate()
    with pytest.raises(LipverifyError, match="lipschitz_samples must be >= 1"):
        TrainConfig(lipschitz_samples=0).validate()
