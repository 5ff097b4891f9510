"""Stand-ins for pycuda's memory where a test runs CUDA-owning code on the CPU (no GPU here)."""

from __future__ import annotations

from typing import Any

import numpy as np


class HostAllocation:
    """pycuda's HostAllocation as far as PinnedHostBuffer reaches: the `.base` of the array `pagelocked_empty`
    returns, with `free()` (recorded in `freed`)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self._memory = np.zeros(shape, dtype)
        self.__array_interface__ = self._memory.__array_interface__
        self.freed = False

    def free(self) -> None:
        self.freed = True


def pagelocked_empty(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """An array whose `.base` is a HostAllocation, as pycuda.driver.pagelocked_empty gives."""
    return np.asarray(HostAllocation(shape, dtype))
