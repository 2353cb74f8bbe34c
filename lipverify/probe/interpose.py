"""Host-synchronisation and ATen-operation counters for the probe's device route (tests, benchmarks).

:class:`SyncCounter` is a ``TorchDispatchMode`` that sees every ATen operation dispatched at the top
level (an operation's own internals are not re-dispatched to the mode) and counts

* ``aten._local_scalar_dense`` (``float(t)``, ``int(t)``, ``bool(t)``, ``t.item()``, indexing with a
  0-d tensor), and the operations that read a value on the host on CUDA although they do not call it
  at the top level: ``_linalg_eigh`` / ``linalg_svd`` / ``_linalg_svd`` / ``linalg_eig`` (their LAPACK
  info is checked on the host), ``_linalg_check_errors``, ``linalg_cholesky`` (not ``_ex``),
  ``nonzero``, ``equal``, ``is_nonzero``, ``masked_select``, ``unique`` variants;
* ``_to_copy`` / ``copy_`` from a non-CPU tensor to the CPU (``.cpu()``, ``.to("cpu")`` of a device
  tensor; on CPU itself these are no-ops and not dispatched, so they cannot be seen there);

and it intercepts the Python-level reads ``Tensor.tolist``, ``Tensor.numpy``, ``Tensor.item`` and
``Tensor.cpu`` while it is active (by wrapping the methods), which a dispatch mode does not see on
CPU (``tolist`` dispatches nothing, ``numpy`` only a ``detach``). Not detectable here: reads through
other Python paths (``memoryview``, ``__array__`` via numpy functions, ``storage()``), and
synchronisations inside an operation that this list does not name (the CUDA tests with
``torch.cuda.set_sync_debug_mode("error")`` cover those on a GPU).

With ``sites=True`` it also attributes each operation to the innermost function of the lipverify
package on the Python stack that issued it (``sites``: ``"probe/resolvent.py:_spectra_core"`` and so
on; a lipverify model's forward is ``"models.py:forward"``; :data:`OUTSIDE` for the operations no
lipverify function issued, e.g. the backward, the loss and the optimiser of a training step written
outside lipverify; under ``lipverify train`` they are charged to its step function): where a step's
operation count comes from (``benchmarks/probe_phases.py --op-sites``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Operations that read a device value on the host (see the module docstring).
HOST_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.is_nonzero",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_consecutive",
        "aten.unique_dim",
        "aten._linalg_eigh",
        "aten.linalg_eig",
        "aten.linalg_svd",
        "aten._linalg_svd",
        "aten._linalg_check_errors",
        "aten.linalg_cholesky",
    }
)
_PY_READS = ("tolist", "numpy", "item", "cpu")
#: Operations that only make a new view or read metadata: no kernel runs for them on any device
#: (:attr:`SyncCounter.compute_op_count` leaves them out).
VIEW_OPS = frozenset(
    {
        "aten.view",
        "aten._unsafe_view",
        "aten.alias",
        "aten.detach",
        "aten.select",
        "aten.slice",
        "aten.transpose",
        "aten.t",
        "aten.permute",
        "aten.unsqueeze",
        "aten.squeeze",
        "aten.squeeze_",
        "aten.unsqueeze_",
        "aten.expand",
        "aten.as_strided",
        "aten.unbind",
        "aten.split",
        "aten.split_with_sizes",
        "aten.diagonal",
        "aten.promote_types",
        "aten.result_type",
    }
)


#: :attr:`SyncCounter.sites` key of operations issued outside the lipverify package.
OUTSIDE = "(outside lipverify)"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _issuing_site() -> str:
    """``"<file relative to the package>:<function>"`` of the innermost lipverify frame on the stack
    (this module's own frames skipped), or :data:`OUTSIDE`."""
    frame = sys._getframe(1)
    while frame is not None:
        relative = _package_relative(frame.f_code.co_filename)
        if relative is not None:
            return f"{relative}:{frame.f_code.co_name}"
        frame = frame.f_back
    return OUTSIDE


@functools.cache
def _package_relative(path: str) -> str | None:
    """``path`` relative to the lipverify package ('/'-separated), None outside it or for this module."""
    path = os.path.abspath(path)
    if not path.startswith(_PACKAGE_DIR) or path == os.path.abspath(__file__):
        return None
    return path[len(_PACKAGE_DIR) :].replace(os.sep, "/")


def _op_name(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


class SyncCounter(TorchDispatchMode):
    """Counts every dispatched ATen operation (``ops``, by name) and the host reads among them
    (``syncs``, by name, including the Python-level reads ``Tensor.tolist/numpy/item/cpu``); with
    ``sites=True`` also the operations per issuing lipverify function (``sites``; see the module
    docstring; it walks the Python stack once per operation, so it is for diagnostics, not tests'
    hot loops)."""

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.sites: collections.Counter[str] = collections.Counter()
        self._track_sites = sites
        self._saved: dict[str, object] = {}

    @property
    def op_count(self) -> int:
        return sum(self.ops.values())

    @property
    def compute_op_count(self) -> int:
        """Operations that run a kernel: :attr:`op_count` without :data:`VIEW_OPS` (on a GPU, the
        probe's kernel launches)."""
        return sum(c for name, c in self.ops.items() if name not in VIEW_OPS)

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = _op_name(func)
        self.ops[name] += 1
        if self._track_sites:
            self.sites[_issuing_site()] += 1
        if name in HOST_SYNC_OPS:
            self.syncs[name] += 1
        elif name in ("aten._to_copy", "aten.copy_"):
            src = args[1] if name == "aten.copy_" else args[0]
            dst_device = args[0].device if name == "aten.copy_" else (kwargs or {}).get("device", src.device)
            to_host = torch.device(dst_device).type == "cpu"
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and to_host:
                self.syncs[f"{name} to cpu"] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for attr in _PY_READS:
            original = getattr(torch.Tensor, attr)
            self._saved[attr] = original

            def counted(t, *a, _original=original, _attr=attr, **k):
                self.syncs[f"Tensor.{_attr}"] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, attr, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for attr, original in self._saved.items():
                setattr(torch.Tensor, attr, original)
            self._saved.clear()


@contextlib.contextmanager
def counting(sites: bool = False) -> Iterator[SyncCounter]:
    """``with counting() as c: ...`` then ``c.op_count``, ``c.sync_count``, ``c.syncs`` (and
    ``c.sites`` with ``sites=True``)."""
    with SyncCounter(sites) as counter:
        yield counter
