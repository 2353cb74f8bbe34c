"""Whether this Python can run the tree from PYTHONPATH without installing anything.

``benchmarks/device_check.sh`` asks this first: the lent GPU machine has no network and its own
torch (see /work/.library/device/KINDS.md), so installing the pinned torch there can only fail, and
slowly. Prints each runtime requirement with its version, then ``missing: ...``; exits 0 when
nothing is missing, 1 otherwise.

    python benchmarks/device_env.py
"""

from __future__ import annotations

import importlib
import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: What the device check's tests import besides the package's own dependencies (from the test
#: extra; not mlxtend, torchsde, ray or ruff, which those tests do not need).
TEST_MODULES = ("pytest", "hypothesis")


def runtime_requirements(pyproject: Path = PYPROJECT) -> tuple[tuple[str, ...], tuple[int, int]]:
    """``(modules, torch floor)`` read from pyproject.toml: the names of ``project.dependencies``
    (each imports under its own name) plus :data:`TEST_MODULES`, and ``(major, minor)`` of torch's
    ``>=`` bound."""
    names, floor = [], None
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        name, spec = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(.*)", requirement).groups()
        names.append(name)
        if name == "torch":
            bound = re.search(r">=\s*(\d+)\.(\d+)", spec)
            floor = (int(bound[1]), int(bound[2])) if bound else None
    if floor is None:
        raise SystemExit(f"{pyproject}: no 'torch>=X.Y' among project.dependencies")
    return tuple(names) + TEST_MODULES, floor


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``2.11.0+cu130`` or ``2.13.0a0+git1234``."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def missing_requirements(
    modules: tuple[str, ...] | None = None, min_torch: tuple[int, int] | None = None
) -> tuple[list[str], list[str]]:
    """``(found, missing)``: ``name version`` of each module that imports, ``name (why)`` of each that
    does not or (torch) is older than ``min_torch``; both default to :func:`runtime_requirements`."""
    if modules is None or min_torch is None:
        required, floor = runtime_requirements()
        modules = required if modules is None else modules
        min_torch = floor if min_torch is None else min_torch
    found, missing = [], []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # whatever stops the import means: not usable
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
            continue
        version = str(getattr(module, "__version__", "?"))
        found.append(f"{name} {version}")
        if name == "torch" and release(version) < min_torch:
            missing.append(f"torch >= {min_torch[0]}.{min_torch[1]} (found {version})")
    return found, missing


def main() -> int:
    found, missing = missing_requirements()
    print(f"python {sys.version.split()[0]} at {sys.executable}")
    for line in found:
        print(f"   {line}")
    print("   missing: " + (", ".join(missing) if missing else "nothing"))
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
