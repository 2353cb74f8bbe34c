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
    [resources]                   # optional, --backend ray only: what each run's Ray task reserves
    num_cpus = 1                  #   CPUs per run (default 1; torch still uses one thread)
    num_gpus = 1                  #   GPUs per run whose device is "cuda" (default 1; < 1 shares one)

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

Backends (:func:`run_sweep` ``backend=``): ``"local"`` (default) runs in this process
(``jobs=1``) or a process pool (:mod:`lipverify.sweep.local`); ``"ray"`` runs each run as one Ray
task on a local Ray instance or a running cluster (:mod:`lipverify.sweep.ray_backend`, needs
``pip install "lipverify[ray]"``). Both write the same run directories and sweep.json, so a sweep
started on one finishes on the other. ``[resources]`` is not part of the stored sweep config: it
does not change results.

Submodules: :mod:`lipverify.sweep.grid` (config, grid), :mod:`lipverify.sweep.local` (sweep.json,
one run, the pool), :mod:`lipverify.sweep.ray_backend`. Every public name is re-exported here.
"""

from lipverify.records import atomic_write_text
from lipverify.sweep.grid import (
    CLAIMS,
    RESOURCE_KEYS,
    SMOKE_MAX_VALUES,
    SMOKE_STEPS,
    SMOKE_TRAIN_SIZE,
    SWEEP_KEYS,
    RunSpec,
    SweepConfig,
    load_sweep_config,
    parse_sweep_config,
    resolve_train_config,
    train_config_fields,
)
from lipverify.sweep.local import (
    BACKENDS,
    RUNNING_ELSEWHERE,
    SCHEMA_VERSION,
    RunFn,
    SweepResult,
    atomic_write_json,
    check_sweep_dir,
    read_meta,
    read_sweep,
    run_sweep,
    train_run,
    write_sweep_doc,
)

__all__ = [
    "BACKENDS",
    "CLAIMS",
    "RESOURCE_KEYS",
    "RUNNING_ELSEWHERE",
    "SCHEMA_VERSION",
    "SMOKE_MAX_VALUES",
    "SMOKE_STEPS",
    "SMOKE_TRAIN_SIZE",
    "SWEEP_KEYS",
    "RunFn",
    "RunSpec",
    "SweepConfig",
    "SweepResult",
    "atomic_write_json",
    "atomic_write_text",
    "check_sweep_dir",
    "load_sweep_config",
    "parse_sweep_config",
    "read_meta",
    "read_sweep",
    "resolve_train_config",
    "run_sweep",
    "train_config_fields",
    "train_run",
    "write_sweep_doc",
]
