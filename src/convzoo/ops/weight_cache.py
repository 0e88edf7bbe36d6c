"""A value derived from a module's weights, rebuilt when any of them is replaced or modified in place.

Deploy forms keep such values (a multiplied-out kernel, a repacked operand, a check of the weights) so
that they are not recomputed on every call. The key holds the tensors themselves, compared by identity,
with their version counters: a replaced parameter (even one that reuses the freed memory of the old one)
and every in-place change that autograd tracks (``copy_``, ``mul_``, ``load_state_dict``) rebuild it.
Writes through ``.data`` bypass the version counter, as they bypass autograd; call :meth:`clear` after them.
Inference tensors (made under ``torch.inference_mode``) have no version counter; for them only a
replacement is seen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from torch import Tensor

T = TypeVar("T")


def _stamp(tensor: Tensor) -> tuple[int | None, int]:
    return None if tensor.is_inference() else tensor._version, tensor.data_ptr()


class WeightCache(Generic[T]):
    """``get(tensors, build)``: ``build()``'s value, kept until one of ``tensors`` changes (see the module)."""

    def __init__(self) -> None:
        self._key: tuple[tuple[Tensor, tuple[int | None, int]], ...] | None = None
        self._value: T | None = None

    def _holds(self, tensors: tuple[Tensor, ...]) -> bool:
        if self._key is None or len(self._key) != len(tensors):
            return False
        return all(held is t and stamp == _stamp(t) for (held, stamp), t in zip(self._key, tensors, strict=True))

    def get(self, tensors: tuple[Tensor, ...], build: Callable[[], T]) -> T:
        """The cached value for ``tensors``, built (and kept) if they changed since the last call."""
        if not self._holds(tensors):
            self._value = build()
            self._key = tuple((t, _stamp(t)) for t in tensors)
        return self._value  # type: ignore[return-value]

    def __deepcopy__(self, memo: dict) -> WeightCache[T]:
        return WeightCache()

    def __reduce__(self) -> tuple[type, tuple]:
        return WeightCache, ()

    def clear(self) -> None:
        """Forget the value (after writes the version counter does not see, e.g. through ``.data``)."""
        self._key, self._value = None, None
