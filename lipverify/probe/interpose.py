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
"""

from __future__ import annotations

import collections
import contextlib
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


def _op_name(func) -> str:
    return str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)


class SyncCounter(TorchDispatchMode):
    """Counts every dispatched ATen operation (``ops``, by name) and the host reads among them
    (``syncs``, by name, including the Python-level reads ``Tensor.tolist/numpy/item/cpu``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
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
def counting() -> Iterator[SyncCounter]:
    """``with counting() as c: ...`` then ``c.op_count``, ``c.sync_count``, ``c.syncs``."""
    with SyncCounter() as counter:
        yield counter
