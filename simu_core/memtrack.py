"""Peak tensor memory of a piece of code, on any device, real or simulated.

:class:`TensorMemoryTracker` is a ``TorchDispatchMode`` that counts the bytes of every tensor storage
alive while it is active: a storage is counted when an operator first returns a tensor on it (or
when :meth:`TensorMemoryTracker.register` is given one that already exists, e.g. a model's
parameters) and uncounted when Python frees it. Its peak is the CPU counterpart of
``torch.cuda.max_memory_allocated``: tensor storages only, not the allocator's caching or kernels'
internal workspaces, so on CPU it is not the process RSS (glibc keeps freed pages).

Under ``FakeTensorMode`` the same tracker measures a run without allocating anything: fake tensors
have real sizes and dtypes, so the peak of a simulated training step of a 7B model is computed on
a laptop in seconds (:mod:`simu_core.planning` does this). Tensors on other devices than the
ones asked for are ignored; tensor subclasses that wrap others (DTensor) are counted through their
local tensors, which operators return as plain tensors.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker"]


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages created while active (``with tracker: ...``).

    Args:
        device_types: count only tensors on these device types (default: every device).
    """

    def __init__(self, device_types: Iterable[str] | None = None) -> None:
        super().__init__()
        self.device_types = None if device_types is None else frozenset(device_types)
        self.live = 0
        self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def register(self, tensors: Iterable[torch.Tensor]) -> int:
        """Count tensors that already exist (parameters, buffers, inputs); returns the bytes added."""
        before = self.live
        for tensor in tensors:
            self._add(tensor)
        return self.live - before

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now (e.g. at the start of a step)."""
        self.peak = self.live

    def _add(self, tensor: torch.Tensor) -> None:
        if type(tensor).__name__ == "DTensor":  # counted through its local tensor, returned by ops
            tensor = tensor.to_local()
        if self.device_types is not None and tensor.device.type not in self.device_types:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage of their own
            return
        key = id(storage)
        if key in self._storages:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def release(_ref: weakref.ref, key: int = key, size: int = size) -> None:
            self.live -= size
            self._storages.pop(key, None)

        # Python keeps one storage object per storage while any tensor uses it, so the weak
        # reference dies exactly when the storage is freed.
        self._storages[key] = weakref.ref(storage, release)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._add(value)
        return out
