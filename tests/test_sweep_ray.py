"""Sweeps on Ray (issue 17): one local Ray instance with 2 CPUs shared by the module; a smoke sweep
through the CLI, records identical to the local backend (and a sweep started on the pool finished on
Ray), a worker killed after its first checkpoint resumed from it, a run that keeps dying recorded as
failed, and a sweep directory the nodes do not see refused before any run. Skipped without Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lipverify import LipverifyError
from lipverify.sweep import parse_sweep_config, read_sweep, run_sweep

ray = pytest.importorskip("ray")
training = pytest.importorskip("lipverify.training")

from lipverify.sweep import ray_backend  # noqa: E402  (needs the skips above first)

#: Tiny real runs: 4 steps, a checkpoint at step 2 (the one a killed worker's retry resumes from).
TINY = {"train_size": 32, "batch_size": 4, "steps": 4, "checkpoint_every": 2}


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (start-up costs seconds); run_sweep reuses it."""
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield ray
    if started:
        ray.shutdown()


def tiny_sweep(name: str, seeds: list[int], **base) -> object:
    return parse_sweep_config(
        {"claim": "trajectories", "base": TINY | base, "grid": {"seed_sampling": seeds}}, name=name
    )


def run_files(sweep_dir: Path, record: dict) -> tuple[str, dict]:
    run_dir = sweep_dir / record["dir"]
    return (run_dir / "steps.csv").read_text(), json.loads((run_dir / "meta.json").read_text())


def comparable(record: dict) -> dict:
    """The parts of a sweep.json record that do not depend on when or where a run ran."""
    return {k: record[k] for k in ("name", "dir", "params", "config", "status", "error")}


def test_ray_records_equal_the_local_backend_and_a_pool_sweep_finishes_on_ray(cluster, tmp_path):
    """Same config, local pool vs Ray: the same run directories, sweep.json records and steps.csv
    bytes. Rejects a Ray backend that trains with other settings (another seed stream, device or
    thread count changes the records), writes elsewhere, or records other statuses. Then a sweep
    interrupted on the local backend (run r001 stopped after step 3, its checkpoint at step 2) is
    finished on Ray: r000 skipped, r001 resumed from step 2 (rejects a restart from step 0) and
    equal to the uninterrupted run; a third, local invocation runs nothing."""
    cfg = tiny_sweep("cmp", [0, 1])
    local = run_sweep(cfg, tmp_path / "local", log=quiet)
    on_ray = run_sweep(cfg, tmp_path / "ray", backend="ray", log=quiet)
    assert [r["status"] for r in on_ray.runs] == ["complete", "complete"]
    docs = [read_sweep(tmp_path / d) for d in ("local", "ray")]
    assert [comparable(r) for r in docs[0]["runs"]] == [comparable(r) for r in docs[1]["runs"]]
    assert docs[0]["sweep"] == docs[1]["sweep"]
    for a, b in zip(local.runs, on_ray.runs, strict=True):
        (rows_a, meta_a), (rows_b, meta_b) = run_files(tmp_path / "local", a), run_files(tmp_path / "ray", b)
        assert rows_a == rows_b
        assert meta_a["config"] == meta_b["config"] and meta_b["status"] == "complete"
        assert meta_b["threads"]["intraop"] == 1  # one torch thread per CPU task

    def stop_second(config, run_dir):
        stop = 3 if config["seed_sampling"] == 1 else None
        return training.train(training.TrainConfig(**config), run_dir, progress=False, stop_after=stop)

    mixed = tmp_path / "mixed"
    first = run_sweep(cfg, mixed, run_fn=stop_second, log=quiet)
    assert [r["status"] for r in first.runs] == ["complete", "failed"]
    second = run_sweep(cfg, mixed, backend="ray", log=quiet)
    assert [r["skipped"] for r in second.runs] == [True, False]
    assert [r["status"] for r in read_sweep(mixed)["runs"]] == ["complete", "complete"]
    rows, meta = run_files(mixed, second.runs[1])
    assert meta["status"] == "complete" and meta["resumed_from_step"] == 2
    assert rows == run_files(tmp_path / "local", local.runs[1])[0]
    assert all(r["skipped"] for r in run_sweep(cfg, mixed, log=quiet).runs)


def make_crashing_run(marks: str):
    """A run function whose worker process dies: seed 0 once, right after its first checkpoint
    (``train(stop_after=checkpoint_every)`` writes it, then ``os._exit``), seed 1 on every attempt
    before training; each attempt appends its pid to ``marks/attempts-<seed>``. A closure, so Ray
    pickles it by value (the workers cannot import this test module)."""

    def crashing_run(config, run_dir):
        seed = config["seed_sampling"]
        with open(os.path.join(marks, f"attempts-{seed}"), "a") as fh:
            fh.write(f"{os.getpid()}\n")
        crashed_once = os.path.exists(os.path.join(marks, "crashed-0"))
        if seed == 1:
            os._exit(1)
        if seed == 0 and not crashed_once:
            cfg = training.TrainConfig(**config)
            training.train(cfg, run_dir, progress=False, stop_after=cfg.checkpoint_every)
            open(os.path.join(marks, "crashed-0"), "w").close()
            os._exit(1)
        return training.train(training.TrainConfig(**config), run_dir, progress=False)

    return crashing_run


def test_killed_worker_is_retried_from_its_checkpoint_and_a_dying_run_fails_alone(cluster, tmp_path):
    """Seed 0's worker dies after its step-2 checkpoint: Ray retries the task, which resumes from
    step 2 (meta.json resumed_from_step; rejects a retry that restarts from step 0) and ends with the
    records of an uninterrupted run. Seed 1's worker dies on every attempt: with max_retries=1 it
    is tried exactly twice (rejects Ray's default of 3 retries, i.e. the option not passed) and is
    recorded failed with Ray's error; seed 2 completes (rejects a crash failing the sweep)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = tiny_sweep("faults", [0, 1, 2])
    result = run_sweep(
        cfg, tmp_path / "s", backend="ray", max_retries=1, run_fn=make_crashing_run(str(marks)), log=quiet
    )
    status = {r["params"]["seed_sampling"]: r for r in read_sweep(tmp_path / "s")["runs"]}
    assert (marks / "crashed-0").exists()
    attempts = {s: (marks / f"attempts-{s}").read_text().split() for s in (0, 1, 2)}
    assert len(attempts[0]) == 2 and attempts[0][0] != attempts[0][1]  # a new worker process
    rows, meta = run_files(tmp_path / "s", status[0])
    assert status[0]["status"] == "complete" and meta["resumed_from_step"] == 2
    straight = run_sweep(tiny_sweep("faults", [0]), tmp_path / "straight", log=quiet)
    assert rows == run_files(tmp_path / "straight", straight.runs[0])[0]
    assert len(attempts[1]) == 2
    assert status[1]["status"] == "failed" and "after 1 retries" in status[1]["error"]
    assert [r["params"]["seed_sampling"] for r in result.failed] == [1]
    assert status[2]["status"] == "complete" and len(attempts[2]) == 1


def test_cli_smoke_sweep_on_ray(cluster, tmp_path, capsys):
    """``lipverify sweep --smoke --backend ray``: every run complete, the table printed, exit 0."""
    from lipverify.cli import main

    toml = tmp_path / "tiny.toml"
    toml.write_text(
        'claim = "trajectories"\n[base]\ntrain_size = 32\nbatch_size = 4\nsteps = 4\n'
        "[grid]\nseed_sampling = [0, 1]\n[resources]\nnum_cpus = 1\n"
    )
    out = tmp_path / "sweep"
    assert main(["sweep", str(toml), "--smoke", "--backend", "ray", "--out", str(out)]) == 0
    assert "sweep tiny: 2/2 runs complete" in capsys.readouterr().out
    doc = read_sweep(out)
    assert doc["smoke"] is True and [r["status"] for r in doc["runs"]] == ["complete", "complete"]


def test_storage_the_nodes_do_not_see_is_refused_before_any_run(cluster, tmp_path):
    """A node that cannot read the driver's token file (a path not mounted there), or reads other
    content (node-local disk at the same path), fails the probe, which runs in a Ray worker, not
    in the driver (rejects a driver-side ``os.access`` check: the directory exists and is writable
    here). A run task that does not see sweep.json fails clearly instead of writing elsewhere. An
    --out below a file, and a run needing a GPU the cluster lacks, are refused before any run."""
    shared = tmp_path / "shared"
    shared.mkdir()
    assert ray_backend.check_shared_storage(ray, shared) == 1
    assert not list(shared.iterdir())  # the token file is removed
    with pytest.raises(LipverifyError, match=r"not shared.*cannot read the driver's check file"):
        ray_backend.probe_nodes(ray, shared, "a-token-never-written")
    (shared / f"{ray_backend.SHARED_CHECK_PREFIX}abc").write_text("another driver's")
    with pytest.raises(LipverifyError, match="sees another directory at that path"):
        ray_backend.probe_nodes(ray, shared, "abc")

    task = ray.remote(ray_backend.run_task)
    lost = tmp_path / "not-a-sweep"
    outcome = ray.get(task.remote(None, {}, str(lost / "runs" / "r000"), str(lost)))
    assert outcome["status"] == "failed" and "is not visible on node" in outcome["error"]
    assert not lost.exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(LipverifyError, match="cannot write to"):
        run_sweep(tiny_sweep("x", [0]), blocker / "sweep", backend="ray", log=quiet)
    gpu = parse_sweep_config(
        {"claim": "init", "base": TINY | {"device": "cuda"}, "grid": {"seed_init": [0]}}, name="gpu"
    )
    with pytest.raises(LipverifyError, match=r"no node of the Ray cluster has.*num_gpus=1"):
        run_sweep(gpu, tmp_path / "gpu", backend="ray", log=quiet)
    assert not (tmp_path / "gpu" / "runs").exists()
