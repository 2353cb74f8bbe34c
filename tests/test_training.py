"""Training runs: config loading, records, exact resume, regularisers, CLI."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types

import pytest
import torch

from lipverify import LipverifyError
from lipverify.cli import main
from lipverify.records import read_steps
from lipverify.training import LAYER_FIELDS, TrainConfig, _Run, load_config, step_columns, train

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread per module


def tiny(**kw) -> TrainConfig:
    base = dict(train_size=200, batch_size=16, steps=6, checkpoint_every=2, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def test_load_config_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[train]\nmodel = "convnet"\nlr = 1\nbatch_norm = true\ntrain_size = 100\n')
    c = load_config(p, ["steps=7", "dropout=0.25", "data_dir=none", "autoaugment=false"])
    assert (c.model, c.lr, c.batch_norm, c.train_size, c.steps, c.dropout) == (
        "convnet",
        1.0,
        True,
        100,
        7,
        0.25,
    )
    assert isinstance(c.lr, float) and c.data_dir is None
    top = tmp_path / "top.toml"
    top.write_text("steps = 3\n")
    assert load_config(top).steps == 3
    assert load_config(None) == TrainConfig()


def test_load_config_errors(tmp_path):
    with pytest.raises(LipverifyError, match=r"unknown config key 'stepz'.*valid keys: model, dataset"):
        load_config(None, ["stepz=3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(LipverifyError, match="unknown config key 'learning_rate'"):
        load_config(bad)
    with pytest.raises(LipverifyError, match="cannot parse 'abc' as int"):
        load_config(None, ["steps=abc"])
    with pytest.raises(LipverifyError, match="batch_size must be >= 2"):
        load_config(None, ["batch_size=1"])
    with pytest.raises(LipverifyError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(LipverifyError, match="expected str"):
        (tmp_path / "t.toml").write_text("model = 3\n")
        load_config(tmp_path / "t.toml")


def test_autoaugment_needs_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(LipverifyError, match=r"pip install lipverify\[vision\]"):
            TrainConfig(model="convnet", autoaugment=True).validate()
    else:
        pytest.skip("torchvision is installed")


def test_run_writes_records_and_meta(tmp_path):
    out = train(tiny(full_gradient_every=3), tmp_path / "run", progress=False)
    columns, rows = read_steps(out / "steps.csv")
    assert columns == step_columns(["fc1", "fc2", "fc3"])
    for key in ("step", "loss", "log_bound", "net_mu", "net_psi", "net_phi_sq", "net_phi_sq_cross"):
        assert key in columns
    assert [f"fc1.{f}" for f in LAYER_FIELDS] == [c for c in columns if c.startswith("fc1.")]
    assert [r["step"] for r in rows] == list(range(7))
    assert rows[-1]["loss"] is None and rows[-1]["log_bound"] is not None
    assert (
        rows[0]["fc1.mu_full"] is not None
        and rows[1]["fc1.mu_full"] is None
        and rows[3]["fc2.mu_full"] is not None
    )
    # the log bound at step t+1 is ln K of the weights after step t: consistent with the observed jumps
    for t in range(6):
        jump = sum(rows[t][f"{n}.dsigma_observed"] for n in ("fc1",))
        assert math.isclose(
            rows[t + 1]["fc1.sigma"] - rows[t]["fc1.sigma"], jump, rel_tol=1e-9, abs_tol=1e-12
        )
        assert math.isclose(
            rows[t]["log_bound"], sum(math.log(rows[t][f"{n}.sigma"]) for n in ("fc1", "fc2", "fc3"))
        )
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["status"] == "complete"
        and meta["config"]["steps"] == 6
        and meta["layers"] == ["fc1", "fc2", "fc3"]
    )
    assert {"torch", "python", "lipverify"} <= set(meta["versions"]) and meta["seeds"] == {
        "init": 0,
        "sampling": 0,
    }
    assert (out / "checkpoint.pt").exists()
    assert not list(out.glob(".*tmp"))


def test_update_exceeds_gap_column(tmp_path):
    # <layer>.update_exceeds_gap: |Delta W|_2 >= (sigma_1 - sigma_2) / 2 at W_t, recorded as 0/1
    # with the discrete truth; a tiny learning rate keeps every update clear of the gap, a huge one
    # (diverging later is irrelevant: 2 steps) does not.
    flags = {}
    for lr in (1e-6, 20.0):
        out = train(tiny(dtype="float64", steps=2, lr=lr), tmp_path / f"r{lr}", progress=False)
        columns, rows = read_steps(out / "steps.csv")
        assert "fc1.update_exceeds_gap" in columns
        assert rows[-1]["fc1.update_exceeds_gap"] is None  # final row: no step taken
        flags[lr] = {r[f"{n}.update_exceeds_gap"] for r in rows[:2] for n in ("fc1", "fc2", "fc3")}
    assert flags[1e-6] == {0.0}
    assert 1.0 in flags[20.0]


def test_first_order_prediction_is_the_recorded_drift_in_float64(tmp_path):
    # Plain SGD: Delta W = -eta G_bar, so u^T Delta W v equals mu (batch-mean drift).
    out = train(tiny(dtype="float64", steps=3), tmp_path / "r", progress=False)
    _, rows = read_steps(out / "steps.csv")
    for r in rows[:3]:
        for n in ("fc1", "fc2", "fc3"):
            assert math.isclose(r[f"{n}.dsigma_first"], r[f"{n}.mu"], rel_tol=1e-9)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "dropout": 0.2,
            "mixup": 0.4,
            "label_smoothing": 0.1,
            "grad_noise": "gaussian",
            "grad_noise_std": 0.01,
            "weight_decay": 1e-3,
            "grad_scale": 0.5,
            "label_noise": 0.2,
            "probe_every": 2,
            "full_gradient_every": 2,
        },
        # the checkpoint lands before a step without the probe: its sigma must not depend on whether
        # the process still holds the spectrum computed after the previous step
        {"probe_every": 2, "checkpoint_every": 3},
    ],
)
def test_resume_after_kill_gives_identical_records(tmp_path, overrides):
    config = tiny(steps=7, **{"checkpoint_every": 2, **overrides})
    straight = train(config, tmp_path / "straight", progress=False)
    killed = tmp_path / "killed"
    train(config, killed, progress=False, stop_after=5)  # last checkpoint at step 4, rows 0..4 on disk
    meta = json.loads((killed / "meta.json").read_text())
    assert meta["status"] == "stopped"
    _, partial = read_steps(killed / "steps.csv")
    assert len(partial) == 5
    # simulate a kill between checkpoints: one more row on disk than the checkpoint holds
    train(config, killed, progress=False)
    assert (killed / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    every = config.checkpoint_every
    assert json.loads((killed / "meta.json").read_text())["resumed_from_step"] == 5 // every * every


def test_resume_refuses_a_different_config(tmp_path):
    train(tiny(steps=2), tmp_path, progress=False)
    with pytest.raises(LipverifyError, match=r"different config \(differs in \['lr'\]\)"):
        train(tiny(steps=2, lr=0.1), tmp_path, progress=False)


def test_failure_is_recorded(tmp_path, monkeypatch):
    def boom(self):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(_Run, "train_step", boom)
    with pytest.raises(RuntimeError):
        train(tiny(), tmp_path, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "failed" and "simulated failure" in meta["error"]


def test_convnet_with_batch_norm_dropout_and_fgsm(tmp_path):
    config = tiny(
        model="convnet", batch_norm=True, dropout=0.3, fgsm_eps=0.05, batch_size=8, steps=2, train_size=40
    )
    out = train(config, tmp_path, progress=False)
    _, rows = read_steps(out / "steps.csv")
    assert all(rows[0][f"{n}.psi"] > 0 for n in ("conv1", "conv2", "conv3", "fc1", "fc2"))


def test_gradient_noise_changes_the_update_and_the_terms(tmp_path):
    base = _Run(tiny())
    noisy = _Run(tiny(grad_noise="uniform", grad_noise_std=0.05))
    r0, r1 = base.train_step(), noisy.train_step()
    # same batch and initialisation: the injected noise adds eta^2 beta^2 to phi^2 ...
    assert math.isclose(r1["fc2.phi"] ** 2, r0["fc2.phi"] ** 2 + (0.05 * 0.05) ** 2, rel_tol=1e-6)
    # ... and moves the weights (observed change differs from the noise-free run)
    assert r1["fc2.dsigma_observed"] != r0["fc2.dsigma_observed"]


def test_cli_train_and_report(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--out", str(out), "--no-progress", "steps=4", "train_size=100", "batch_size=16"])
    assert rc == 0
    assert (out / "summary.json").exists() and (out / "figure.png").read_bytes()[:4] == b"\x89PNG"
    assert "K_T_predicted_mean" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--no-progress", "stepz=4"]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_report_dispatches_sweeps(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("lipverify.claims")
    fake.report_sweep = lambda path: calls.append(path) or 0
    monkeypatch.setitem(sys.modules, "lipverify.claims", fake)
    (tmp_path / "sweep.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 0
    assert calls == [tmp_path]


def test_autoaugment_path_with_a_stand_in_torchvision(inverting_torchvision):
    # torchvision is optional and absent here: a stand-in policy (invert the image) checks the wiring.
    run = _Run(tiny(model="convnet", autoaugment=True, batch_size=4, train_size=20).validate())
    g = run.gen.get_state()
    x, _ = run.batch()
    run.gen.set_state(g)
    idx = torch.randperm(20, generator=run.gen)[:4]
    expected = 1 - torch.nn.functional.pad(run.images[idx].float() / 255, (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    inner = (slice(None), slice(None), slice(2, 30), slice(2, 30))
    assert torch.allclose(x[inner], expected[inner]) and inverting_torchvision == ["cifar10"]


FLOAT_FIELDS = (
    "lr",
    "init_scale",
    "grad_scale",
    "weight_decay",
    "mixup",
    "fgsm_eps",
    "grad_noise_std",
    "dropout",
    "label_smoothing",
    "label_noise",
)


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_float_fields_are_refused(key, value):
    # nan passes `< 0` and `> 0` range checks; weight_decay=nan used to end in a LinAlgError
    extra = ["grad_noise=gaussian"] if key == "grad_noise_std" else []
    with pytest.raises(LipverifyError, match=rf"invalid config: {key} must be a finite number, got"):
        load_config(None, [f"{key}={value}", *extra])


def test_bad_device_seed_and_type_are_config_errors():
    with pytest.raises(LipverifyError, match=r"device must be 'cpu' or 'cuda\[:index\]', got 'foo'"):
        load_config(None, ["device=foo"])
    with pytest.raises(LipverifyError, match="device must be"):
        load_config(None, ["device=meta"])
    with pytest.raises(LipverifyError, match=r"seed_sampling must be in .*got 99999999999999999999999"):
        load_config(None, ["seed_sampling=99999999999999999999999"])
    # the derived label-noise seed seed_sampling + 1_000_003 must fit too
    with pytest.raises(LipverifyError, match="seed_sampling must be in"):
        load_config(None, [f"seed_sampling={2**64 - 1}"])
    with pytest.raises(LipverifyError, match="seed_init must be in"):
        load_config(None, [f"seed_init={-(2**63) - 1}"])
    assert load_config(None, [f"seed_init={2**64 - 1}", "seed_sampling=-5"]).seed_sampling == -5
    with pytest.raises(LipverifyError, match=r"invalid config: batch_size must be int, got 16\.0"):
        TrainConfig(batch_size=16.0).validate()
    with pytest.raises(LipverifyError, match=r"lr must be float, got '0\.05'"):
        TrainConfig(lr="0.05").validate()


def test_config_file_must_be_a_file_with_a_train_table(tmp_path):
    (tmp_path / "five.toml").write_text("train = 5\n")
    with pytest.raises(LipverifyError, match=r"'train' in .*five.toml must be a table"):
        load_config(tmp_path / "five.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(LipverifyError, match=r"dir.toml is a directory; expected a TOML file"):
        load_config(tmp_path / "dir.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(LipverifyError, match="malformed TOML"):
        load_config(tmp_path / "bin.toml")


def test_non_finite_sigma_is_divergence_at_that_step(tmp_path, monkeypatch):
    # probe_every=2: step 1 records only sigma; an overflowed sigma there is divergence, not a record
    from lipverify.probe import DynamicsProbe

    real = DynamicsProbe.sigmas

    def sigmas(self):
        return {name: math.inf if name == "fc2" else s for name, s in real(self).items()}

    monkeypatch.setattr(DynamicsProbe, "sigmas", sigmas)
    with pytest.raises(LipverifyError, match=r"training diverged at step 1: log_bound is inf"):
        train(tiny(probe_every=2), tmp_path, progress=False)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["status"] == "failed" and "training diverged at step 1" in meta["error"]
    _, rows = read_steps(tmp_path / "steps.csv")
    assert [r["step"] for r in rows] == [0]  # the records before the divergence are kept
    # probe_every=1: only the final row (weights after the last step) uses sigmas()
    monkeypatch.setattr(DynamicsProbe, "sigmas", lambda self: {n: math.nan for n in self.layer_names})
    with pytest.raises(LipverifyError, match=r"training diverged at step 2: log_bound is nan"):
        train(tiny(steps=2), tmp_path / "final", progress=False)


def test_overflowing_prediction_is_complete_and_flagged_not_applicable(tmp_path, capsys):
    # lr = 1e4: every recorded number is finite, but exp(sum psi_bar) overflows from step 1 on; this
    # used to fail the run with "diverged; smaller lr" and no summary. Step 0's psi_bar (~6e5 here, from
    # the initial weights) alone overflows exp; 2 steps so that no later, trajectory-dependent step (a
    # stall at zero loss here, NaN elsewhere) decides the outcome
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", "steps=2", "train_size=128", "batch_size=16", "lr=1e4"]
    assert main(["train", *args]) == 0
    err = capsys.readouterr().err
    assert "verdict (forecast, full-data mu): not applicable: " in err and "the run itself is finite" in err
    assert "verdict (one-step decomposition, batch mu; not a forecast): not applicable: " in err
    assert "smaller lr" not in err and "lr = 10000.0" in err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "not applicable" and summary["K_T_predicted_mean"] is None


def test_tiny_sigma_is_reportable_with_what_happened(tmp_path, capsys):
    # the issue's run, init_scale = 1e-5: fc3's sigma_1 = 6.4e-6 gives psi/sigma = 4e3 per step
    # (measured): exp overflows at step 1 while training stays finite
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", "steps=30", "init_scale=1e-5"]
    assert main(["train", *args]) == 0
    err = capsys.readouterr().err
    assert re.search(
        r"not applicable: fc\d: sigma_1 = \S+ at step \d+, relative term .* the Theorem 17 prediction overflows",  # noqa: E501
        err,
    ), err
    assert "diverged" not in err
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"


def test_huge_lr_term_overflow_names_step_and_lr(tmp_path, capsys):
    # lr = 1e300: psi = lr^2 / 2 tr(H Sigma) is inf by arithmetic at step 0 (it used to say
    # "fc1: psi is not finite ... check the inputs" with no step or lr)
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", "steps=3", "train_size=128", "batch_size=16", "lr=1e300"]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(
        r"training diverged at step 0: fc\d: psi is not finite .*try a smaller lr \(lr = 1e\+300\)", err
    ), err
    assert "check the inputs" not in err
    assert json.loads((out / "meta.json").read_text())["status"] == "failed"


def test_sharpness_columns_and_stability_warning(tmp_path, capsys):
    out = train(
        tiny(steps=3, sharpness_every=2, lr=1.0, checkpoint_every=0), tmp_path / "run", progress=False
    )
    _, rows = read_steps(out / "steps.csv")
    assert [r.get("sharpness") is not None for r in rows[:3]] == [True, False, True]
    for r in (rows[0], rows[2]):
        assert r["sharpness"] > 0 and r["lr_sharpness"] == pytest.approx(1.0 * r["sharpness"], rel=1e-12)
    assert rows[1].get("lr_sharpness") is None
    # lambda_max of the fresh MLP's loss is about 2 (2.0 measured): lr = 1 puts lr * lambda above 1.5
    err = capsys.readouterr().err
    assert err.count("lr * lambda_max = ") == 1 and "at step 0" in err, err
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"
    off = train(tiny(steps=2, sharpness_every=0), tmp_path / "off", progress=False)
    _, rows = read_steps(off / "steps.csv")
    assert all(r.get("sharpness") is None for r in rows)


@pytest.mark.parametrize(
    "route, defer",
    [("host", False), ("host", True), ("device", True)],
    ids=["in-step", "deferred", "device-deferred"],
)
def test_overflowing_activations_are_divergence_at_their_step(tmp_path, capsys, monkeypatch, route, defer):
    # fc1's output overflows to +-inf at step 5 by construction (a forward hook multiplying by the
    # dtype's max twice), so the loss is NaN and the gradients overflow there on every CPU; a large lr
    # reached that only by luck of the trajectory (lr = 2 diverged at step 34 on one CPU and stalled
    # with dead ReLUs on another). The probe used to stop first, with "fc1: mu is not finite ... check
    # the inputs" (no step, no lr).
    import lipverify.training as training_mod

    overflow_step = 5
    real_build = training_mod.build_model

    def build_overflowing(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = []

        def overflow(module, inputs, out):
            if not (module.training and torch.is_grad_enabled()):
                return None
            calls.append(1)  # one training forward per step in this config
            if len(calls) <= overflow_step:
                return None
            big = torch.finfo(out.dtype).max
            return out * big * big  # +-inf where nonzero (0 stays 0: no NaN planted by the hook)

        model.fc1.register_forward_hook(overflow)
        return model

    monkeypatch.setattr(training_mod, "build_model", build_overflowing)
    monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", route)
    out = tmp_path / "run"
    # full_gradient_every=0: no full-data passes, so the hook sees one training forward per step
    args = ["--out", str(out), "--no-progress", "steps=20", "train_size=256", "batch_size=32", "lr=0.05"]
    args.append("full_gradient_every=0")
    # defer_reads: step 5 is read after step 6 was issued; the error still names step 5, and step 4's
    # record (read after step 5 was issued) is kept
    args.append(f"defer_reads={str(defer).lower()}")
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"training diverged at step {overflow_step}: .*smaller lr \(lr = 0.05\)", err), err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "failed" and f"training diverged at step {overflow_step}" in meta["error"]
    _, rows = read_steps(out / "steps.csv")
    assert [r["step"] for r in rows] == list(range(overflow_step))  # the finite records are kept


def test_cli_overrides_may_follow_options(tmp_path):
    from lipverify.cli import parse_args

    out = tmp_path / "cli"
    argv = ["train", "steps=2", "--out", str(out), "--no-progress", "train_size=64", "batch_size=8"]
    assert main(argv) == 0
    assert json.loads((out / "meta.json").read_text())["config"]["train_size"] == 64
    args = parse_args(["sweep", "--smoke", "x.toml", "--jobs", "2"])
    assert (args.command, args.config, args.smoke, args.jobs) == ("sweep", "x.toml", True, 2)
    args = parse_args(["simulate", "--paths", "10", "ou", "--no-plot"])
    assert (args.command, args.case, args.paths, args.no_plot) == ("simulate", "ou", 10, True)
    assert parse_args(["report", "d"]).run_dir == "d"
    with pytest.raises(SystemExit):
        parse_args(["train", "steps=2", "--bogus"])


# ------------------------------------------------------------------ locks, interrupts, output dirs

#: A `lipverify train` process that stops at step PAUSE (before computing it) of its first run, writes
#: READY and waits for GO: another process can then act on the same directory mid-run.
PAUSING_CLI = """
import pathlib, sys, time
from lipverify.cli import main
from lipverify.training import _Run

ready, go, pause_at = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
original = _Run.train_step

def paused(self):
    if self.step == pause_at and not ready.exists():
        ready.write_text("")
        deadline = time.time() + 300
        while not go.exists():
            if time.time() > deadline:
                raise SystemExit("GO never came")
            time.sleep(0.02)
    return original(self)

_Run.train_step = paused
sys.exit(main(sys.argv[4:]))
"""


def start_paused(tmp_path, pause_at: int, *cli_args: str):
    """Start PAUSING_CLI with ``cli_args``; return (process, go file) once it is paused."""
    import subprocess
    import time

    script = tmp_path / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    ready, go = tmp_path / "READY", tmp_path / "GO"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(ready), str(go), str(pause_at), *cli_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the pausing process did not pause (rc {proc.returncode}): {err[-2000:]}")
        time.sleep(0.05)
    return proc, go


TINY_ARGS = ["train_size=64", "batch_size=8", "steps=4", "checkpoint_every=2", "lr=0.05"]


def test_second_train_on_a_running_dir_fails_at_once_and_touches_nothing(tmp_path, capsys):
    """Issue 12: two `lipverify train --out SAME`. The second exits 2 at once with a one-line error
    naming the holder's pid, leaves every file of the first untouched, and the first completes.
    (Before the lock the second resumed the first's checkpoint and rewrote its steps.csv: exit 0.)"""
    from lipverify.prediction import check_prediction

    out = tmp_path / "run"
    first, go = start_paused(tmp_path, 2, "train", "--out", str(out), "--no-progress", *TINY_ARGS)
    try:
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        assert (out / ".lock.owner").read_text().startswith(f"pid {first.pid} on ")
        rc = main(["train", "--out", str(out), "--no-progress", *TINY_ARGS])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.count("\n") == 1
        assert f"run directory {out} is in use by another lipverify process (pid {first.pid} on " in err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    finally:
        go.write_text("")
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    assert json.loads((out / "meta.json").read_text())["status"] == "complete"
    _, rows = read_steps(out / "steps.csv")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    check_prediction(out)
    assert not (out / ".lock.owner").exists()  # released: the next train may take the directory
    assert main(["train", "--out", str(out), "--no-progress", *TINY_ARGS]) == 0


def test_ctrl_c_inside_a_step_keeps_the_last_checkpoint_and_resumes_identically(
    tmp_path, monkeypatch, capsys
):
    """KeyboardInterrupt raised inside step 5 (checkpoints every 2): exit 130, one line on stderr
    with the resume command, meta.json status "interrupted" at step 5 with checkpoint step 4;
    running that command continues to records equal to an uninterrupted run's."""
    args = ["train_size=200", "batch_size=16", "steps=7", "checkpoint_every=2", "lr=0.05"]
    config = load_config(None, args)
    straight = train(config, tmp_path / "straight", progress=False)
    original = _Run.train_step

    def interrupted(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(_Run, "train_step", interrupted)
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--out", str(out), *args]) == 130
    err = capsys.readouterr().err
    assert err == (
        f"lipverify train: interrupted at step 5; resume with: lipverify train {' '.join(args)} --out {out}\n"
    )
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["status"], meta["interrupted_at_step"], meta["checkpoint_step"]) == ("interrupted", 5, 4)
    monkeypatch.setattr(_Run, "train_step", original)
    assert main(["train", "--no-progress", "--out", str(out), *args]) == 0
    assert (out / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from_step"] == 4


def test_sigint_finishes_the_step_and_checkpoints_at_it(tmp_path, monkeypatch):
    """A real SIGINT during step 5 (checkpoints every 3): the step completes, a checkpoint is written
    at step 5 (not only the one at 3), status "interrupted"; the resume starts at 5 and gives the
    uninterrupted records. The default SIGINT handler is back afterwards."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a non-default handler in this test process")
    config = tiny(steps=7, checkpoint_every=3)
    straight = train(config, tmp_path / "straight", progress=False)
    original = _Run.train_step

    def signalled(self):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(_Run, "train_step", signalled)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(config, out, progress=False)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["status"], meta["interrupted_at_step"], meta["checkpoint_step"]) == ("interrupted", 5, 5)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 5
    monkeypatch.setattr(_Run, "train_step", original)
    train(config, out, progress=False)
    assert (out / "steps.csv").read_text() == (straight / "steps.csv").read_text()
    assert json.loads((out / "meta.json").read_text())["resumed_from_step"] == 5


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """--out below a regular file (chmod does not stop root): exit 2, one line, nothing computed."""

    def never(self, config):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(_Run, "__init__", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["train", "--out", str(blocker / "run"), "steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot write to {blocker / 'run'}: a parent of it is a file" in err
    assert main(["train", "--out", str(blocker), "steps=2"]) == 2
    assert "it exists and is not a directory" in capsys.readouterr().err
    assert main(["report", str(blocker)]) == 2


def test_thread_counts_are_recorded_and_a_resume_with_others_warns(tmp_path):
    import warnings

    config = tiny(steps=4)
    train(config, tmp_path / "a", progress=False, stop_after=3)
    threads = {"intraop": 1, "interop": torch.get_num_interop_threads()}
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["threads"] == threads
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same counts: no warning
        train(config, tmp_path / "a", progress=False)
    train(config, tmp_path / "b", progress=False, stop_after=3)
    torch.set_num_threads(2)
    try:
        with pytest.warns(RuntimeWarning, match=r"torch threads .* the last bits"):
            train(config, tmp_path / "b", progress=False)
    finally:
        torch.set_num_threads(1)
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert meta["threads"]["intraop"] == 2 and meta["threads_before_resume"] == threads


def test_full_gradient_period_defaults_to_a_30_percent_overhead():
    from lipverify.training import TrainConfig, full_gradient_period

    # N / (0.3 c b): MLP on MNIST-5k 5000 / (0.3 * 11.6 * 128) = 11.2; ConvNet 10000 / (0.3 * 1.8 * 128)
    assert full_gradient_period(TrainConfig(), 5000) == 12
    assert full_gradient_period(TrainConfig(model="convnet"), 10000) == 145
    assert full_gradient_period(TrainConfig(probe_every=5), 5000) == 15  # lands on probed steps
    assert full_gradient_period(TrainConfig(full_gradient_every=0), 5000) == 0
    assert full_gradient_period(TrainConfig(full_gradient_every=7), 5000) == 7


def test_train_leads_with_the_expectation_based_forecast(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--no-progress", "steps=6", "train_size=128", "batch_size=16"]
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("forecast: expectation-based forecast")
    assert json.loads((out / "meta.json").read_text())["full_gradient_every"] == 3  # ceil(2.3)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary)[1] == "forecast" and summary["forecast"]["available"]
    assert summary["forecast"]["calibration"]["verdict"] in ("calibrated", "too narrow", "too wide")


def test_cuda_graphs_key_gives_the_same_records_on_the_device_route(tmp_path, monkeypatch):
    # cuda_graphs=true: the probe's spectra through lipverify.probe.graphs (on CPU its static-buffer
    # stand-in, the route CUDA takes); the records are those of the uncaptured device route, bit for
    # bit, also across a resume from a checkpoint
    import lipverify.probe.graphs as probe_graphs

    monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", "device")
    train(tiny(steps=5), tmp_path / "plain", progress=False)
    calls = []
    real_call = probe_graphs.SpectraGraph.__call__
    monkeypatch.setattr(probe_graphs.SpectraGraph, "__call__", lambda *a: calls.append(1) or real_call(*a))
    graphs = tiny(steps=5, cuda_graphs=True)
    train(graphs, tmp_path / "graphs", progress=False)
    assert (tmp_path / "graphs" / "steps.csv").read_text() == (tmp_path / "plain" / "steps.csv").read_text()
    assert len(calls) >= 4  # one batched spectra call per step after the cold first one
    train(graphs, tmp_path / "resumed", progress=False, stop_after=3)
    train(graphs, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / "steps.csv").read_text() == (tmp_path / "plain" / "steps.csv").read_text()
    with pytest.raises(LipverifyError, match="cuda_graphs"):
        monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", "host")
        train(graphs, tmp_path / "host", progress=False)


@pytest.mark.parametrize("route", ["host", "device"])
def test_defer_reads_gives_the_same_files_bit_for_bit(tmp_path, monkeypatch, route):
    # defer_reads: each record read a step later (after the next step is issued); with the device
    # route also the probe's after_step on the side stream (on CPU the same forks and joins in order).
    # steps.csv is the in-step run's, also across a stop after 3 steps (the pending record is flushed
    # at the stop, none is lost) and the resume from the checkpoint at step 2
    monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", route)
    train(tiny(steps=5), tmp_path / "in_step", progress=False)
    expected = (tmp_path / "in_step" / "steps.csv").read_text()
    deferred = tiny(steps=5, defer_reads=True, side_stream=route == "device")
    train(deferred, tmp_path / "deferred", progress=False)
    assert (tmp_path / "deferred" / "steps.csv").read_text() == expected
    train(deferred, tmp_path / "resumed", progress=False, stop_after=3)
    _, rows = read_steps(tmp_path / "resumed" / "steps.csv")
    assert [r["step"] for r in rows] == [0, 1, 2]
    train(deferred, tmp_path / "resumed", progress=False)
    assert (tmp_path / "resumed" / "steps.csv").read_text() == expected
    with pytest.raises(LipverifyError, match="side_stream needs defer_reads = true"):
        tiny(side_stream=True).validate()


def test_a_deferred_training_step_reads_the_host_only_after_it_is_issued(monkeypatch):
    # defer_reads on the device route: no host read between the start of a step and its SGD update
    # (the host never waits for the device while it issues the step), and the previous step's record
    # in three reads (the packed loss/accuracy/finiteness/cross-layer squares, the terms, the truth).
    # The wrong variant is the in-step loop, which reads before the update.
    from lipverify.probe.interpose import counting
    from lipverify.training import _Run

    monkeypatch.setenv("LIPVERIFY_PROBE_ROUTE", "device")

    def reads(deferred: bool) -> tuple[int, int, list]:
        run = _Run(tiny(sharpness_every=0, full_gradient_every=0, defer_reads=deferred).validate())
        step = run.advance if deferred else run.train_step
        for _ in range(3):
            step()
        seen = {}
        update = run.optimizer.step
        with counting() as c:

            def spy(*args, **kwargs):
                seen["before_update"] = c.sync_count
                return update(*args, **kwargs)

            run.optimizer.step = spy
            rows = step()
        return seen["before_update"], c.sync_count, rows

    before, total, rows = reads(deferred=True)
    print(f"deferred step: {before} host reads before the update, {total} in all")
    assert before == 0 and total <= 3
    assert [r["step"] for r in rows] == [2]
    before, _, _ = reads(deferred=False)
    assert before > 0


def test_a_device_route_training_step_reads_the_host_four_times():
    # issue 15: the step's loss, accuracy and gradient finiteness in one read, the probe's terms and
    # truth one packed read each, and one for the cross-layer squares that both network_terms' cross
    # term and the cross-layer diagnostic use. Earlier steps read 10 times (three separate reads of
    # loss/accuracy/finiteness, one per layer and one more in cross_layer_diffusion), then 5 (the
    # square sum computed and read twice); the budget rejects both.
    from lipverify.probe.interpose import counting
    from lipverify.training import _Run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIPVERIFY_PROBE_ROUTE", "device")
        run = _Run(tiny(sharpness_every=0, full_gradient_every=0).validate())
        for _ in range(3):
            run.train_step()
        with counting() as c:
            run.train_step()
    print(f"host reads per training step: {c.sync_count} {dict(c.syncs)}")
    assert c.sync_count <= 4


def test_amp_bf16_runs_every_forward_of_the_step_in_bfloat16(tmp_path, monkeypatch):
    # amp = "bf16": the step's forward (and FGSM's, and the full-data gradient's) under bfloat16
    # autocast; the sharpness monitor stays float32 (documented). The wrong variant is the float32
    # run: none of its forwards is autocast, and its records differ.
    import torch.nn as nn

    seen: list[tuple[bool, bool]] = []
    real_forward = nn.Linear.forward

    def spy(self, x):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu") == torch.bfloat16))
        return real_forward(self, x)

    monkeypatch.setattr(nn.Linear, "forward", spy)
    common = dict(steps=4, sharpness_every=0, full_gradient_every=2, fgsm_eps=0.01)
    train(tiny(**common, amp="bf16"), tmp_path / "bf16", progress=False)
    assert seen and all(on and bf16 for on, bf16 in seen)
    seen.clear()
    train(tiny(**common), tmp_path / "fp32", progress=False)
    assert seen and not any(on for on, _ in seen)
    _, bf16 = read_steps(tmp_path / "bf16" / "steps.csv")
    _, fp32 = read_steps(tmp_path / "fp32" / "steps.csv")
    # the same batches, bfloat16 arithmetic: step 0's loss to bf16's resolution (unit roundoff 2^-8)
    assert bf16[0]["loss"] != fp32[0]["loss"]
    assert abs(bf16[0]["loss"] - fp32[0]["loss"]) <= 4 * 2**-8 * fp32[0]["loss"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"amp": "fp16"}, "float16 needs loss scaling"),
        ({"amp": "tf32"}, "amp must be one of none, bf16"),
        ({"amp": "bf16", "dtype": "float64"}, "needs dtype = 'float32'"),
        ({"amp": "bf16", "model": "convnet", "conv_norm_every": 2}, "conv_norm_every needs amp = 'none'"),
    ],
)
def test_amp_config_errors(overrides, message):
    with pytest.raises(LipverifyError, match=message):
        tiny(**overrides).validate()
