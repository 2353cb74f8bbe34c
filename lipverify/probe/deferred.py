"""Results of the probe's device route: one packed tensor per call, read on the host later.

A :class:`DeferredResults` is a read-only mapping ``layer name -> result`` whose values are built
from one packed tensor (one row per layer) the first time any value is read. On CUDA the packed
tensor is copied into pinned host memory with ``non_blocking=True`` when the mapping is made, and
the first read waits for that copy only (an event), not for the whole device queue; on CPU the read
is a ``tolist()``. So the probe call that returns it issues no host synchronisation, and the caller
decides when to pay for one (e.g. a step later, or every ``log_every`` steps).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


class DeferredResults(Mapping):
    """``name -> value`` built by ``build(rows)`` from ``packed`` (L, F), row i for ``names[i]``.

    ``build`` receives the rows as Python floats (``packed.tolist()``) and returns the dict; it is
    where host-side checks raise (a non-finite term, a degenerate spectrum). Iterating over the names
    or ``len`` reads nothing; any value access (``[]``, ``values()``, ``items()``) resolves all."""

    def __init__(
        self,
        names: list[str],
        packed: torch.Tensor,
        build: Callable[[list[list[float]]], dict],
        tensors: Mapping[str, Any] | None = None,
    ):
        #: device tensors the caller may compute with before the results are read (e.g. the terms'
        #: noise projections and sigma_1 column, for a diagnostic packed into the caller's own read)
        self.tensors = dict(tensors or {})
        self._names = list(names)
        self._build = build
        self._value: dict | None = None
        self._event = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            self._packed = host
        else:
            self._packed = packed

    @property
    def packed(self) -> torch.Tensor:
        """The packed rows (on the host once the copy has finished; see :meth:`resolve`)."""
        return self._packed

    def resolve(self) -> dict[str, Any]:
        """The results as a plain dict (waits for the device copy the first time)."""
        if self._value is None:
            if self._event is not None:
                self._event.synchronize()
            self._value = self._build(self._packed.tolist())
        return self._value

    def __getitem__(self, name: str) -> Any:
        return self.resolve()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        state = "resolved" if self._value is not None else "pending"
        return f"DeferredResults({state}, layers={self._names})"
