"""``lipverify sweep --backend ray``: each run of a sweep is one Ray task (issue 17).

Storage: run directories live on a path every node of the cluster mounts at the same place (NFS,
a cluster file system); tasks write their results there themselves, exactly as a local-pool
worker does, so a sweep may be started on one backend and finished on the other, a complete run
is skipped and an interrupted one resumes from its ``checkpoint.pt``. Before any run is submitted
the driver writes a token file into the sweep directory and one zero-CPU probe task per alive
node reads it back and creates a file there: a node that does not see the directory (node-local
disk, a path not mounted) or cannot write to it stops the sweep with a :class:`LipverifyError`
naming the node. Each run task checks again that it sees ``sweep.json`` and fails clearly if not.

Resources per task: ``num_cpus`` from the config's ``[resources]`` (default 1) with torch held at
one thread (as in the local pool, so records match it bit for bit); ``num_gpus`` (default 1) when
the run's device is ``cuda``: Ray then makes one GPU visible to the task, seen as ``cuda:0``, so a
run's device must be ``cuda`` (not ``cuda:N``).

Faults: a task whose worker process dies (killed, out of memory, node lost) is retried by Ray up
to ``max_retries`` times; the retry trains through :func:`lipverify.training.train`, which resumes
from the run's last checkpoint. A run that still fails is recorded ``"failed"`` with Ray's error;
the other runs go on. Ctrl-C on the driver cancels every unfinished task (``ray.cancel``: a
KeyboardInterrupt in the task, which ``train`` turns into a checkpoint at the step boundary and
``meta.json`` status ``"interrupted"``), waits up to :data:`CANCEL_GRACE_S` for them, records
``"interrupted"`` in sweep.json and re-raises; rerunning the command resumes them.

``import ray`` happens only here, inside functions: the default install does not need it.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lipverify._validation import LipverifyError
from lipverify.records import LOCK_OWNER_NAME, atomic_write_text
from lipverify.sweep.grid import resolve_train_config
from lipverify.sweep.local import RunFn, _execute

#: Prefix of the token file the driver writes for the shared-storage check (removed afterwards).
SHARED_CHECK_PREFIX = ".lipverify-shared-check."

#: Seconds every node has to answer the shared-storage probe (a worker start on each node).
PROBE_TIMEOUT_S = 120.0

#: Seconds the driver waits, after Ctrl-C, for cancelled tasks to write their checkpoints.
CANCEL_GRACE_S = 60.0

#: Seconds between progress-bar refreshes while waiting for tasks.
POLL_S = 1.0


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`LipverifyError` saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise LipverifyError(
            f'--backend ray needs Ray, which is not installed ({exc}): pip install "lipverify[ray]"'
        ) from exc
    return ray


def resolve_for_cluster(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`lipverify.sweep.grid.resolve_train_config`, except that a ``cuda`` device is not
    required on the driver (the GPUs are on the cluster's nodes; ``train`` checks it in the task).
    ``cuda:N`` is refused: Ray makes one GPU visible per task, as ``cuda:0``."""
    device = str(overrides.get("device", "cpu"))
    if not device.startswith("cuda"):
        return resolve_train_config(overrides)
    if device != "cuda":
        raise LipverifyError(
            f"invalid config: device {device!r} with --backend ray: use device = 'cuda' "
            "(Ray gives each task its own GPU, which the task sees as cuda:0)"
        )
    full = resolve_train_config({**overrides, "device": "cpu"})
    full["device"] = "cuda"
    return full


def task_resources(config: Mapping[str, Any], resources: Mapping[str, Any]) -> dict[str, float]:
    """Ray resources of one run's task: ``num_cpus`` (``[resources]``, default 1) and, for a
    ``cuda`` run, ``num_gpus`` (``[resources]``, default 1)."""
    out: dict[str, float] = {"num_cpus": resources.get("num_cpus", 1)}
    if str(config.get("device", "cpu")).startswith("cuda"):
        out["num_gpus"] = resources.get("num_gpus", 1)
    return out


def run_task(run_fn: RunFn, config: dict, run_dir: str, sweep_dir: str) -> dict:
    """Body of one run's Ray task: check this node sees the sweep directory (its ``sweep.json``),
    then :func:`lipverify.sweep.local._execute` (one torch thread, the run directory's lock, never
    raises; a worker that dies inside it is what Ray retries)."""
    if not (Path(sweep_dir) / "sweep.json").is_file():
        return {
            "status": "failed",
            "error": (
                f"sweep directory {sweep_dir} is not visible on node {socket.gethostname()} (no "
                "sweep.json there): --out must be on storage every node mounts at the same path"
            ),
            "wall_s": 0.0,
        }
    return _execute(run_fn, config, run_dir)


def probe_dir(sweep_dir: str, token: str) -> tuple[str, str | None]:
    """Body of the storage probe on one node: ``(hostname, problem or None)``. The node must read
    the driver's token file ``SHARED_CHECK_PREFIX + token`` with content ``token`` and create a
    file in the sweep directory."""
    host = socket.gethostname()
    path = Path(sweep_dir) / f"{SHARED_CHECK_PREFIX}{token}"
    try:
        seen = path.read_text()
    except OSError as exc:
        return host, f"cannot read the driver's check file {path} ({exc.strerror or type(exc).__name__})"
    if seen != token:
        return host, f"{path} holds other content: this node sees another directory at that path"
    try:
        fd, probe = tempfile.mkstemp(dir=sweep_dir, prefix=".lipverify-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return host, f"cannot write to {sweep_dir} ({exc.strerror or type(exc).__name__})"
    return host, None


def probe_nodes(ray: Any, sweep_dir: Path, token: str, timeout: float = PROBE_TIMEOUT_S) -> int:
    """Run :func:`probe_dir` once on every alive node (zero CPUs, pinned to the node); raise
    :class:`LipverifyError` listing each node that failed. Returns the number of nodes checked."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(probe_dir)
    refs = {
        probe.options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
        ).remote(str(sweep_dir), token): node
        for node in nodes
    }
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    problems = []
    for ref in ready:
        where = refs[ref].get("NodeManagerAddress", refs[ref]["NodeID"])
        try:
            host, problem = ray.get(ref)
        except ray.exceptions.RayError as exc:
            problems.append(f"node {where}: the check failed ({type(exc).__name__}: {_first_line(exc)})")
            continue
        if problem is not None:
            problems.append(f"node {where} ({host}): {problem}")
    for ref in late:
        ray.cancel(ref, force=True)
        where = refs[ref].get("NodeManagerAddress", refs[ref]["NodeID"])
        problems.append(f"node {where}: no answer to the storage check within {timeout:g} s")
    if problems:
        raise LipverifyError(
            f"sweep directory {sweep_dir} is not shared, writable storage for this Ray cluster: "
            + "; ".join(problems)
            + ". Put --out on a path every node mounts at the same place (e.g. NFS)"
        )
    return len(nodes)


def check_shared_storage(ray: Any, sweep_dir: Path) -> int:
    """Write a fresh token file into ``sweep_dir``, :func:`probe_nodes`, remove the file."""
    token = secrets.token_hex(16)
    path = Path(sweep_dir) / f"{SHARED_CHECK_PREFIX}{token}"
    atomic_write_text(path, token)
    try:
        return probe_nodes(ray, Path(sweep_dir), token)
    finally:
        path.unlink(missing_ok=True)


#: Seconds to wait for a TCP connection to ``--address`` before giving up (Ray itself waits minutes).
CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection within ``timeout`` seconds, else
    :class:`LipverifyError` (``ray.init`` would retry for minutes). Other forms (``auto``,
    ``ray://...``) are left to Ray."""
    match = re.fullmatch(r"([^:/\s]+):(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match[1], int(match[2])), timeout=timeout).close()
    except OSError as exc:
        raise LipverifyError(
            f"cannot reach the Ray cluster at {address} ({exc.strerror or type(exc).__name__}): "
            "is `ray start --head` running there, and is the port open from this machine?"
        ) from exc


def connect(ray: Any, address: str | None, jobs: int) -> bool:
    """Start a local Ray instance with ``jobs`` CPUs (``address`` None) or join the cluster at
    ``address``; reuse an already initialised Ray (returns False: then it is not shut down)."""
    if ray.is_initialized():
        return False
    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(address="local", num_cpus=jobs, include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=address, logging_level="warning")
    except (ConnectionError, ValueError, RuntimeError) as exc:
        target = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
        raise LipverifyError(f"cannot start or join {target}: {_first_line(exc)}") from exc
    return True


def _check_feasible(ray: Any, needs: list[dict[str, float]]) -> None:
    """Refuse a task no single node can ever hold (Ray would queue it forever)."""
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    for need in {tuple(sorted(n.items())) for n in needs}:
        if not any(all(node.get(names[k], 0) >= v for k, v in need) for node in nodes):
            wants = ", ".join(f"{k}={v:g}" for k, v in need)
            raise LipverifyError(
                f"no node of the Ray cluster has the resources one run needs ({wants}); "
                "lower [resources] in the sweep config, or add such a node"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def execute_on_ray(
    todo: list[dict],
    sweep_dir: Path,
    run_fn: RunFn,
    finish: Callable[[dict, dict], None],
    save: Callable[[], None],
    *,
    jobs: int,
    address: str | None,
    max_retries: int,
    resources: Mapping[str, Any],
    progress: bool,
    log: Callable[[str], None],
) -> None:
    """Run the records ``todo`` (of :func:`lipverify.sweep.local.run_sweep`) as Ray tasks;
    ``finish(record, outcome)`` each as it ends; on Ctrl-C cancel the rest, mark them
    ``"interrupted"``, ``save()`` and re-raise."""
    from tqdm import tqdm

    ray = import_ray()
    sweep_dir = Path(sweep_dir).resolve()  # the tasks' working directory is not the driver's
    started_here = connect(ray, address, jobs)
    pending: dict[Any, dict] = {}
    try:
        needs = [task_resources(r["config"], resources) for r in todo]
        _check_feasible(ray, needs)
        nodes = check_shared_storage(ray, sweep_dir)
        log(f"Ray: {nodes} node(s) see {sweep_dir}; up to {max_retries} retries per run")
        task = ray.remote(run_task)
        for record, need in zip(todo, needs, strict=True):
            ref = task.options(
                **need, max_retries=max_retries, retry_exceptions=False, name=f"lipverify:{record['name']}"
            ).remote(run_fn, record["config"], str(sweep_dir / record["dir"]), str(sweep_dir))
            record.update(status="running", status_at=time.time())
            pending[ref] = record
        failed = done = 0
        with tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress) as bar:

            def show() -> None:
                # a run holds its directory's lock (owner file) while it trains; the rest wait
                running = sum((sweep_dir / r["dir"] / LOCK_OWNER_NAME).exists() for r in pending.values())
                bar.set_postfix(done=done, running=running, queued=len(pending) - running, failed=failed)

            show()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    record = pending.pop(ref)
                    outcome = _outcome(ray, ref, max_retries)
                    failed += outcome["status"] == "failed"
                    done += 1
                    finish(record, outcome)
                    bar.update(1)
                show()
    except KeyboardInterrupt:
        _cancel(ray, pending, save, log)
        raise
    finally:
        if started_here:
            ray.shutdown()


def _outcome(ray: Any, ref: Any, max_retries: int) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the worker died more often than it may be retried
        return {
            "status": "failed",
            "error": f"{type(exc).__name__} after {max_retries} retries: {_first_line(exc)}",
            "wall_s": 0.0,
        }


def _cancel(ray: Any, pending: dict[Any, dict], save: Callable[[], None], log: Callable[[str], None]) -> None:
    """Ctrl-C: interrupt every unfinished task (train checkpoints at the step boundary), wait for
    them, record each run's status in sweep.json."""
    log(f"interrupted: cancelling {len(pending)} run(s), waiting up to {CANCEL_GRACE_S:g} s for checkpoints")
    for ref in pending:
        ray.cancel(ref, force=False)
    if pending:
        ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_GRACE_S)
    for ref, record in pending.items():
        try:
            outcome = ray.get(ref, timeout=0)
        except Exception:  # cancelled, or still stopping: its last checkpoint is what a rerun resumes
            outcome = {"status": "interrupted", "error": "KeyboardInterrupt (sweep driver)"}
        record.update(outcome, status_at=time.time())
    save()
