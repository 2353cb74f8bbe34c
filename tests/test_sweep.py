"""Sweeps (issue 6): grid expansion, input errors, skip/resume, failed runs, the real smoke sweep."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lipverify import LipverifyError
from lipverify.sweep import (
    SCHEMA_VERSION,
    SMOKE_STEPS,
    SMOKE_TRAIN_SIZE,
    load_sweep_config,
    parse_sweep_config,
    read_sweep,
    run_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"

#: TrainConfig fields of the issue-5 contract (the fake runs below do not need lipverify.training).
FIELDS = {
    "model": "mlp",
    "dataset": "mnist5k",
    "data_dir": None,
    "train_size": None,
    "batch_size": 128,
    "lr": 0.05,
    "steps": 300,
    "init": "default",
    "init_scale": 1.0,
    "seed_init": 0,
    "seed_sampling": 0,
    "grad_scale": 1.0,
    "grad_noise": "none",
    "grad_noise_std": 0.0,
    "label_noise": 0.0,
    "probe_every": 1,
    "full_gradient_every": 0,
    "checkpoint_every": 50,
}


def fake_resolve(overrides):
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise LipverifyError(f"unknown {unknown}")
    return FIELDS | dict(overrides)


def fake_run(config, run_dir):
    """Cheap stand-in for lipverify.training.train: meta.json + steps.csv; fails when lr < 0."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "calls.txt").open("a") as fh:
        fh.write("call\n")
    meta = {"config": config, "status": "running"}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    if config["lr"] < 0:
        meta["status"] = "failed"
        (run_dir / "meta.json").write_text(json.dumps(meta))
        raise RuntimeError(f"negative learning rate {config['lr']}")
    rows = ["step,loss,log_bound,net_mu,net_psi,net_phi_sq,net_phi_sq_cross"]
    for t in range(config["steps"] + 1):
        rows.append(f"{t},{1 / (t + 1)},{0.01 * t},0.01,0.001,0.0001,0")
    (run_dir / "steps.csv").write_text("\n".join(rows) + "\n")
    meta["status"] = "complete"
    (run_dir / "meta.json").write_text(json.dumps(meta))


def calls(sweep_dir: Path) -> dict[str, int]:
    return {
        p.parent.name: len(p.read_text().splitlines())
        for p in sorted((sweep_dir / "runs").glob("*/calls.txt"))
    }


def config(**extra):
    data = {
        "claim": "batch_size",
        "base": {"steps": 3, "lr": 0.1},
        "grid": {"batch_size": [8, 16], "seed_sampling": [0, 1, 2]},
    }
    data.update(extra)
    return parse_sweep_config(data, name="t", fields=FIELDS)


def test_grid_expansion_product_and_cases():
    cfg = parse_sweep_config(
        {
            "claim": "init",
            "base": {"steps": 5},
            "grid": {"init_scale": [0.5, 1.0, 2.0], "seed_init": [0, 1]},
            "cases": [{"init": "default"}, {"init": "kaiming_normal", "lr": 0.01}],
        },
        fields=FIELDS,
    )
    runs = cfg.expand()
    assert len(runs) == 3 * 2 * 2
    assert len({r.name for r in runs}) == len(runs)
    combos = {(r.overrides["init"], r.overrides["init_scale"], r.overrides["seed_init"]) for r in runs}
    assert len(combos) == 12
    assert all(r.overrides["steps"] == 5 for r in runs)
    assert all(r.overrides["lr"] == 0.01 for r in runs if r.overrides["init"] == "kaiming_normal")
    assert all("lr" not in r.overrides for r in runs if r.overrides["init"] == "default")
    # stable names: a second expansion gives the same directories
    assert [r.name for r in cfg.expand()] == [r.name for r in runs]


def test_smoke_shrinks_steps_data_and_grid():
    cfg = parse_sweep_config(
        {
            "claim": "batch_size",
            "base": {"steps": 500, "train_size": 1000},
            "grid": {"batch_size": [8, 16, 32, 64], "seed_sampling": list(range(10))},
            "smoke": {"steps": 2, "grid": {"seed_sampling": [5, 6]}},
        },
        fields=FIELDS,
    )
    runs = cfg.expand(smoke=True)
    assert len(runs) == 3 * 2  # batch sizes capped at 3 values, seeds replaced by [smoke.grid]
    assert {r.overrides["seed_sampling"] for r in runs} == {5, 6}
    assert all(r.overrides["steps"] == 2 and r.overrides["train_size"] == SMOKE_TRAIN_SIZE for r in runs)
    plain = parse_sweep_config(
        {"claim": "init", "base": {"steps": 500}, "grid": {"seed_init": [0]}}, fields=FIELDS
    )
    assert plain.expand(smoke=True)[0].overrides["steps"] == SMOKE_STEPS
    assert plain.expand()[0].overrides["steps"] == 500


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"claim": "init", "grid": {"learning_rate": [0.1]}}, "learning_rate"),
        ({"claim": "init", "base": {"bogus": 1}, "grid": {"lr": [0.1]}}, "bogus"),
        ({"claim": "init", "grid": {"lr": [0.1]}, "cases": [{"nope": 1}]}, "nope"),
        ({"claim": "init", "grid": {"lr": [0.1]}, "smoke": {"grid": {"zzz": [1]}}}, "zzz"),
        ({"claim": "init", "grid": {}}, "empty"),
        ({"claim": "init"}, "empty"),
        ({"claim": "init", "grid": {"lr": []}}, "empty"),
        ({"claim": "init", "grid": {"lr": 0.1}}, "list"),
        ({"claim": "nothing", "grid": {"lr": [0.1]}}, "claim"),
        ({"claim": "init", "grid": {"lr": [0.1]}, "extra": 1}, "extra"),
        ({"claim": "init", "grid": {"lr": [0.1]}, "cases": [{"lr": 0.2}]}, "both"),
    ],
)
def test_bad_sweep_configs_are_refused(data, match):
    with pytest.raises(LipverifyError, match=match):
        parse_sweep_config(data, fields=FIELDS)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("claim = [")
    with pytest.raises(LipverifyError, match="TOML"):
        load_sweep_config(bad, fields=FIELDS)
    with pytest.raises(LipverifyError, match="not found"):
        load_sweep_config(tmp_path / "missing.toml", fields=FIELDS)


def test_skip_complete_and_resume_interrupted(tmp_path):
    cfg = config()
    result = run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert len(result.runs) == 6 and not result.failed
    assert set(calls(tmp_path).values()) == {1}
    doc = read_sweep(tmp_path)
    assert doc["schema_version"] == SCHEMA_VERSION and doc["sweep"]["claim"] == "batch_size"
    assert all(r["status"] == "complete" and r["config"]["steps"] == 3 for r in doc["runs"])

    # second invocation: everything complete -> nothing runs
    result = run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert all(r["skipped"] for r in result.runs)
    assert set(calls(tmp_path).values()) == {1}

    # an interrupted run (meta.json still "running") is resumed, the others are not touched
    victim = doc["runs"][2]
    meta_path = tmp_path / victim["dir"] / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["status"] = "running"
    meta_path.write_text(json.dumps(meta))
    result = run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    counts = calls(tmp_path)
    assert counts.pop(victim["name"]) == 2
    assert set(counts.values()) == {1}
    assert [r["name"] for r in result.ran] == [victim["name"]]
    assert all(r["status"] == "complete" for r in read_sweep(tmp_path)["runs"])


def test_incompatible_sweep_dir_refused_before_any_run(tmp_path):
    run_sweep(config(), tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    before = calls(tmp_path)
    other = config(base={"steps": 4, "lr": 0.1})
    with pytest.raises(LipverifyError, match="different sweep config"):
        run_sweep(other, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    with pytest.raises(LipverifyError, match="different sweep config"):
        run_sweep(config(), tmp_path, smoke=True, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    doc = json.loads((tmp_path / "sweep.json").read_text())
    doc["schema_version"] = SCHEMA_VERSION + 1
    (tmp_path / "sweep.json").write_text(json.dumps(doc))
    with pytest.raises(LipverifyError, match="schema version"):
        run_sweep(config(), tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert calls(tmp_path) == before


def test_run_dir_with_other_config_refused(tmp_path):
    cfg = config()
    name = cfg.expand()[0].name
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "meta.json").write_text(
        json.dumps({"config": fake_resolve({"steps": 99}), "status": "complete"})
    )
    with pytest.raises(LipverifyError, match="different config"):
        run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert calls(tmp_path) == {}
    assert not (tmp_path / "sweep.json").exists()


def test_failed_run_reported_others_complete_in_parallel(tmp_path):
    cfg = parse_sweep_config(
        {"claim": "noisy_gradient", "base": {"steps": 2}, "grid": {"lr": [0.1, -1.0, 0.2]}}, fields=FIELDS
    )
    result = run_sweep(cfg, tmp_path, jobs=2, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    status = {r["params"]["lr"]: r for r in read_sweep(tmp_path)["runs"]}
    assert status[-1.0]["status"] == "failed"
    assert "negative learning rate" in status[-1.0]["error"]
    assert status[0.1]["status"] == status[0.2]["status"] == "complete"
    assert [r["params"]["lr"] for r in result.failed] == [-1.0]
    # the failed run is retried (resumed) on the next invocation, the complete ones are skipped
    run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert sorted(calls(tmp_path).values()) == [1, 1, 2]


def test_jobs_must_be_positive(tmp_path):
    with pytest.raises(LipverifyError, match="jobs"):
        run_sweep(config(), tmp_path, jobs=0, run_fn=fake_run, resolve=fake_resolve)


@pytest.mark.parametrize(
    "path", sorted(EXPERIMENTS.glob("sweep_*.toml")) + sorted(EXPERIMENTS.glob("gpu/*.toml"))
)
def test_experiment_configs_are_valid(path):
    pytest.importorskip("lipverify.training")
    cfg = load_sweep_config(path)
    for smoke in (False, True):
        runs = cfg.expand(smoke=smoke)
        assert runs
    assert len(cfg.expand(smoke=True)) <= len(cfg.expand())


def test_all_six_claims_have_a_cpu_config():
    from lipverify.sweep import CLAIMS

    pytest.importorskip("lipverify.training")
    claims = {load_sweep_config(p).claim for p in EXPERIMENTS.glob("sweep_*.toml")}
    assert claims == set(CLAIMS)


# ------------------------------------------------------------------------------------ real training


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "lipverify.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_real_smoke_sweep_and_report(tmp_path):
    """End to end with the real ``train``: ``lipverify sweep --smoke`` (3 seeds), ``lipverify report``."""
    pytest.importorskip("lipverify.training")
    pytest.importorskip("lipverify.prediction")
    toml = tmp_path / "tiny.toml"
    toml.write_text(
        'claim = "trajectories"\n'
        '[base]\nmodel = "mlp"\ndataset = "mnist5k"\ntrain_size = 48\nbatch_size = 8\nsteps = 4\n'
        "checkpoint_every = 2\n"
        "[grid]\nseed_sampling = [0, 1, 2]\n"
    )
    out = tmp_path / "sweep"
    proc = _cli("sweep", toml, "--smoke", "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = read_sweep(out)
    assert [r["status"] for r in doc["runs"]] == ["complete"] * 3
    assert doc["smoke"] is True
    for r in doc["runs"]:
        meta = json.loads((out / r["dir"] / "meta.json").read_text())
        assert meta["status"] == "complete"

    proc = _cli("report", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "claims.json").read_text())
    assert report["claim"] == "trajectories"
    # the paper's 8.7 (seed spread negligible against the change) and ours, F8.7 (spread vs Theorem 17)
    assert [(c["id"], c["kind"]) for c in report["claims"]] == [("8.7", "paper"), ("F8.7", "framework")]
    assert report["claims"][0]["verdict"] in ("pass", "fail", "inconclusive")
    assert all(math.isfinite(r["std_log_K"]) for r in report["claims"][0]["numbers"]["checkpoints"])
    assert (out / "claims.md").read_text().startswith("# Claims")
    assert (out / "trajectories.png").stat().st_size > 0


def test_real_interrupted_run_is_resumed_by_the_sweep(tmp_path):
    """A real run stopped mid-way (as a killed process leaves it) is reported failed, then resumed from
    its checkpoint by the next invocation, reproducing the uninterrupted run's records exactly."""
    training = pytest.importorskip("lipverify.training")
    cfg = parse_sweep_config(
        {
            "claim": "trajectories",
            "base": {"train_size": 32, "batch_size": 4, "steps": 4, "checkpoint_every": 2},
            "grid": {"seed_sampling": [0]},
        },
        name="resume",
    )

    def interrupted(config, run_dir):
        return training.train(training.TrainConfig(**config), run_dir, progress=False, stop_after=3)

    first = run_sweep(cfg, tmp_path / "a", run_fn=interrupted, log=lambda m: None)
    assert first.runs[0]["status"] == "failed" and "stopped" in first.runs[0]["error"]
    second = run_sweep(cfg, tmp_path / "a", log=lambda m: None)
    assert second.runs[0]["status"] == "complete" and not second.runs[0]["skipped"]
    meta = json.loads((tmp_path / "a" / second.runs[0]["dir"] / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["resumed_from_step"] == 2
    straight = run_sweep(cfg, tmp_path / "b", log=lambda m: None)
    rows = [
        (tmp_path / d / r["dir"] / "steps.csv").read_text()
        for d, r in (("a", second.runs[0]), ("b", straight.runs[0]))
    ]
    assert rows[0] == rows[1]
    # and a third invocation skips it
    assert run_sweep(cfg, tmp_path / "a", log=lambda m: None).runs[0]["skipped"]


def test_bad_value_refused_before_any_run(tmp_path):
    pytest.importorskip("lipverify.training")
    cfg = parse_sweep_config({"claim": "init", "base": {"steps": 2}, "grid": {"init": ["default", "xavier"]}})
    with pytest.raises(LipverifyError, match="xavier"):
        run_sweep(cfg, tmp_path, log=lambda m: None)
    assert not (tmp_path / "sweep.json").exists()


def test_sweep_values_are_coerced_like_a_train_config():
    # batch_size = 16.0 used to start every run (each then failed), lr = "0.05" to raise a TypeError
    pytest.importorskip("lipverify.training")
    from lipverify.sweep import resolve_train_config

    cfg = parse_sweep_config(
        {
            "claim": "init",
            "base": {"lr": "0.05", "steps": 2},
            "grid": {"init_scale": [1, 2.5]},
            "cases": [{"weight_decay": 0}],
            "smoke": {"steps": "1", "grid": {"init_scale": [3]}},
        }
    )
    assert cfg.base["lr"] == 0.05 and cfg.grid["init_scale"] == [1.0, 2.5]
    assert isinstance(cfg.grid["init_scale"][0], float) and isinstance(cfg.cases[0]["weight_decay"], float)
    assert cfg.smoke == {"steps": 1, "grid": {"init_scale": [3.0]}}
    assert resolve_train_config({"lr": "0.05"})["lr"] == 0.05
    for where, data in [
        ("[base]", {"base": {"batch_size": 16.0}, "grid": {"seed_init": [0]}}),
        ("[grid]", {"grid": {"batch_size": [16, 16.0]}}),
        ("case 0", {"cases": [{"batch_size": 16.0}]}),
        ("[smoke]", {"grid": {"seed_init": [0]}, "smoke": {"batch_size": 16.0}}),
        ("[smoke.grid]", {"grid": {"seed_init": [0]}, "smoke": {"grid": {"batch_size": [16.0]}}}),
    ]:
        with pytest.raises(
            LipverifyError, match=rf"{re.escape(where)}: config key 'batch_size': expected int"
        ):
            parse_sweep_config({"claim": "init", **data})
    with pytest.raises(LipverifyError, match="cannot parse 'abc' as float"):
        parse_sweep_config({"claim": "init", "base": {"lr": "abc"}, "grid": {"seed_init": [0]}})


def test_smoke_caps_batch_size_at_the_smoke_train_size(tmp_path):
    # the default batch_size 128 > SMOKE_TRAIN_SIZE used to fail every smoke run
    pytest.importorskip("lipverify.training")
    plain = parse_sweep_config({"claim": "init", "base": {"steps": 500}, "grid": {"seed_init": [0]}})
    assert plain.expand(smoke=True)[0].overrides["batch_size"] == SMOKE_TRAIN_SIZE
    assert "batch_size" not in plain.expand()[0].overrides
    grid = parse_sweep_config(
        {"claim": "batch_size", "grid": {"batch_size": [32, 128, 256]}, "cases": [{"seed_init": 0}]}
    )
    assert [r.overrides["batch_size"] for r in grid.expand(smoke=True)] == [32, SMOKE_TRAIN_SIZE]
    case = parse_sweep_config({"claim": "init", "cases": [{"batch_size": 100}, {"batch_size": 8}]})
    assert [r.overrides["batch_size"] for r in case.expand(smoke=True)] == [SMOKE_TRAIN_SIZE, 8]
    # a per-run train_size below the batch size is refused before any run starts
    small = parse_sweep_config({"claim": "init", "base": {"batch_size": 32}, "grid": {"train_size": [16]}})
    with pytest.raises(LipverifyError, match="batch_size 32 exceeds train_size 16"):
        run_sweep(small, tmp_path, smoke=True, log=lambda m: None)
    assert not (tmp_path / "sweep.json").exists()


def test_sweep_config_that_is_a_directory(tmp_path):
    with pytest.raises(LipverifyError, match="cannot read sweep config"):
        load_sweep_config(tmp_path)


# ------------------------------------------------------------------ concurrent drivers (issue 12)


def test_run_held_by_another_process_is_running_elsewhere_then_finished(tmp_path):
    """A run whose directory is locked elsewhere is skipped as "running elsewhere" (not failed, not
    run twice); the other runs complete; sweep.json says so; a later sweep finishes it."""
    import threading

    from lipverify.records import run_dir_lock
    from lipverify.sweep import RUNNING_ELSEWHERE

    cfg = config()
    held = tmp_path / "runs" / cfg.expand()[1].name
    taken, release = threading.Event(), threading.Event()

    def hold():
        with run_dir_lock(held):
            taken.set()
            release.wait(120)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(60)
        result = run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    finally:
        release.set()
        holder.join()
    assert [r["name"] for r in result.running_elsewhere] == [held.name]
    assert (
        not result.failed and "is in use by another lipverify process" in result.running_elsewhere[0]["error"]
    )
    assert held.name not in calls(tmp_path) and set(calls(tmp_path).values()) == {1}
    stored = {r["name"]: r["status"] for r in read_sweep(tmp_path)["runs"]}
    assert stored.pop(held.name) == RUNNING_ELSEWHERE and set(stored.values()) == {"complete"}
    later = run_sweep(cfg, tmp_path, run_fn=fake_run, resolve=fake_resolve, log=lambda m: None)
    assert [r["name"] for r in later.ran] == [held.name]
    assert all(r["status"] == "complete" for r in read_sweep(tmp_path)["runs"])
    assert set(calls(tmp_path).values()) == {1}


def test_sweep_json_merge_keeps_the_newer_record_of_each_run(tmp_path):
    """Two drivers writing sweep.json: a run's record observed later by the other driver is not
    overwritten by this driver's older view, and this driver's newer outcome replaces an older one."""
    from lipverify.sweep import write_sweep_doc

    cfg = config()
    specs = cfg.expand()
    mine = [
        {"name": s.name, "status": "pending", "error": None, "status_at": 0.0, "skipped": False}
        for s in specs[:2]
    ]
    theirs = [
        dict(mine[0], status="complete", status_at=50.0),
        dict(mine[1], status="failed", status_at=50.0),
    ]
    doc_path = tmp_path / "sweep.json"
    write_sweep_doc(doc_path, cfg, False, theirs)
    mine[1].update(status="complete", status_at=60.0)
    write_sweep_doc(doc_path, cfg, False, mine)
    assert [r["status"] for r in read_sweep(tmp_path)["runs"]] == ["complete", "complete"]
    mine[0].update(status="running elsewhere", status_at=40.0)  # an older observation loses too
    write_sweep_doc(doc_path, cfg, False, mine)
    assert read_sweep(tmp_path)["runs"][0]["status"] == "complete"


def test_sweep_out_below_a_file_is_refused_before_any_run(tmp_path, capsys):
    from lipverify.cli import main

    toml = tmp_path / "s.toml"
    toml.write_text('claim = "init"\n[base]\nsteps = 2\n[grid]\nseed_sampling = [0]\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["sweep", str(toml), "--out", str(blocker / "sweep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write to {blocker / 'sweep'}" in err


def test_two_real_sweeps_on_one_directory(tmp_path, capsys):
    """The scenario of issue 12 with real training: sweep A is inside run r000 when sweep B starts
    on the same directory. B reports r000 "running elsewhere" (before the lock it resumed A's run and
    rewrote its steps.csv under it) and completes r001; A then finishes r000, does not redo r001,
    exits 0; sweep.json says both complete, and a third sweep runs nothing."""
    pytest.importorskip("lipverify.training")
    from test_training import start_paused

    from lipverify.cli import main
    from lipverify.prediction import check_prediction

    toml = tmp_path / "two.toml"
    toml.write_text(
        'claim = "trajectories"\n'
        "[base]\ntrain_size = 32\nbatch_size = 4\nsteps = 4\ncheckpoint_every = 2\n"
        "[grid]\nseed_sampling = [0, 1]\n"
    )
    out = tmp_path / "sweep"
    first, go = start_paused(tmp_path, 2, "sweep", str(toml), "--out", str(out))
    try:
        rc = main(["sweep", str(toml), "--out", str(out)])
        printed = capsys.readouterr().out
    finally:
        go.write_text("")
        _, first_err = first.communicate(timeout=300)
    assert rc == 0, printed
    assert "sweep two: 1/2 runs complete" in printed
    assert re.search(
        r"RUNNING ELSEWHERE r000_seed_sampling=0: .*in use by another lipverify process", printed
    )
    assert first.returncode == 0, first_err
    doc = read_sweep(out)
    assert [r["status"] for r in doc["runs"]] == ["complete", "complete"]
    for r in doc["runs"]:
        check_prediction(out / r["dir"])
    for r in doc["runs"]:  # each trained once, from scratch: A did not resume B's finished r001
        assert "resumed_from_step" not in json.loads((out / r["dir"] / "meta.json").read_text())
    third = run_sweep(load_sweep_config(toml), out, log=lambda m: None)
    assert all(r["skipped"] for r in third.runs)


# ------------------------------------------------------------------------- Ray backend (issue 17)


def test_ray_backend_without_ray_is_a_clear_error_before_anything_is_written(tmp_path, monkeypatch):
    """No Ray installed: --backend ray names the extra to install and writes nothing; the package,
    the backend module and the CLI still import (rejects a top-level ``import ray``)."""
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(LipverifyError, match=r'pip install "lipverify\[ray\]"'):
        run_sweep(config(), tmp_path / "s", backend="ray", run_fn=fake_run, resolve=fake_resolve)
    assert not (tmp_path / "s").exists()
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import lipverify.sweep, lipverify.sweep.ray_backend, lipverify.commands.sweep\n"
        "from lipverify.cli import build_parser\n"
        "a = build_parser().parse_args(['sweep', 'x.toml', '--backend', 'ray', '--address', 'h:6379'])\n"
        "assert (a.backend, a.address, a.max_retries) == ('ray', 'h:6379', 2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_backend_options_and_resources_are_checked(tmp_path):
    with pytest.raises(LipverifyError, match="unknown sweep backend 'dask'"):
        run_sweep(config(), tmp_path, backend="dask", run_fn=fake_run, resolve=fake_resolve)
    with pytest.raises(LipverifyError, match="max-retries"):
        run_sweep(config(), tmp_path, backend="ray", max_retries=-1, run_fn=fake_run, resolve=fake_resolve)
    with pytest.raises(LipverifyError, match="--address is only used with --backend ray"):
        run_sweep(config(), tmp_path, address="h:6379", run_fn=fake_run, resolve=fake_resolve)
    assert not (tmp_path / "sweep.json").exists()
    ok = config(resources={"num_cpus": 2, "num_gpus": 0.5})
    assert ok.resources == {"num_cpus": 2, "num_gpus": 0.5}
    assert ok.as_dict() == config().as_dict()  # resources do not change results: same sweep.json
    for bad, match in [
        ({"num_cpus": 0}, "num_cpus must be an integer >= 1"),
        ({"num_cpus": 1.5}, "num_cpus must be an integer >= 1"),
        ({"num_gpus": 1.5}, r"num_gpus must be in \(0, 1\]"),
        ({"num_gpus": 0}, r"num_gpus must be in \(0, 1\]"),
        ({"gpus": 1}, "unknown key"),
    ]:
        with pytest.raises(LipverifyError, match=match):
            config(resources=bad)


def test_ray_resolves_a_cuda_run_without_a_gpu_on_the_driver_and_refuses_cuda_index():
    """On a cluster the GPUs are on the nodes: device 'cuda' resolves on a CPU-only driver (the
    local resolver refuses it there); 'cuda:1' is refused (Ray shows each task one GPU, cuda:0)."""
    pytest.importorskip("lipverify.training")
    import torch

    from lipverify.sweep import resolve_train_config
    from lipverify.sweep.ray_backend import resolve_for_cluster, task_resources

    full = resolve_for_cluster({"device": "cuda", "steps": 2})
    assert full["device"] == "cuda" and full["steps"] == 2
    assert task_resources(full, {}) == {"num_cpus": 1, "num_gpus": 1}
    assert task_resources(resolve_for_cluster({}), {"num_cpus": 3, "num_gpus": 0.5}) == {"num_cpus": 3}
    if not torch.cuda.is_available():
        with pytest.raises(LipverifyError, match="CUDA is not available"):
            resolve_train_config({"device": "cuda"})
    with pytest.raises(LipverifyError, match="use device = 'cuda'"):
        resolve_for_cluster({"device": "cuda:1"})


def test_unreachable_ray_address_is_a_quick_clear_error():
    """A HOST:PORT nobody listens on is refused at once (ray.init would retry for minutes)."""
    import socket

    from lipverify.sweep.ray_backend import check_reachable

    with socket.socket() as sock:  # a port that was free a moment ago: closed now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(LipverifyError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout=5)
    with socket.socket() as sock:  # a listening port passes
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        check_reachable(f"127.0.0.1:{sock.getsockname()[1]}", timeout=5)
    check_reachable("auto")  # other forms are Ray's to resolve
