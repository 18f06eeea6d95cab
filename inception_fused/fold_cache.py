"""Cached values derived from tensors (folded, packed weights) that never go stale unseen.

A tensor's ``_version`` counts in-place writes made through autograd-visible ops, but it
misses several ways PyTorch changes weights and statistics: fused optimizers
(``Adam(fused=True)`` ...) write parameters in place without bumping it, as do edits
through ``.data``, and the running-statistics update inside ``F.batch_norm``. A
:class:`FoldCache` therefore rebuilds its value when any of these happened:

- a watched tensor was replaced (compared by identity) or written in place (``_version``);
- an optimizer stepped over a watched tensor (a process-wide ``torch.optim`` step hook);
- :func:`invalidate_all` was called, or the owner called :meth:`FoldCache.clear` (owners
  do on ``train()``/``eval()`` and in ``_apply``: ``.to()``, ``.double()`` swap ``.data``).

Watch a BatchNorm's ``num_batches_tracked`` along with its running statistics: the
train-mode ``nn.BatchNorm2d`` forward bumps its version with ``add_``, while the running
mean and variance it updates inside ``F.batch_norm`` keep theirs. :func:`module_tensors`
returns every parameter and buffer of some modules, ``num_batches_tracked`` included.

Not seen (documented in the README; call :func:`refold` after them): ``.data`` edits and
``.data`` assignment outside any optimizer step or mode switch, optimizers that are not
``torch.optim.Optimizer`` subclasses and write without bumping versions, and in-place
edits of inference tensors (they carry no version counter; they are compared by identity).
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

T = TypeVar("T")

# Process-wide invalidation events, newest last: (event number, ids of the tensors it may
# have changed, or None for all tensors). A cache that has fallen further behind than the
# log reaches rebuilds.
_LOG_LENGTH = 64
_events: collections.deque[tuple[int, frozenset[int] | None]] = collections.deque(
    maxlen=_LOG_LENGTH
)
_event_count = 0
_structure_count = 0
_clear_count = 0


def _record(ids: frozenset[int] | None) -> None:
    global _event_count
    _event_count += 1
    _events.append((_event_count, ids))


def invalidate_all() -> None:
    """Make every FoldCache in the process rebuild on its next use."""
    _record(None)


def refold(model: nn.Module | None = None) -> None:
    """Rebuild folded weights on their next use: those cached by ``model``'s modules, or
    every one in the process. For weight edits nothing can detect (``p.data.copy_(...)``
    outside any optimizer step or train/eval switch, see the module docstring)."""
    if model is None:
        invalidate_all()
        return
    for m in model.modules():
        for value in vars(m).values():
            if isinstance(value, FoldCache):
                value.clear()


def _after_optimizer_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    _record(
        frozenset(id(p) for group in optimizer.param_groups for p in group["params"])
    )


def structure_version() -> int:
    """Bumped whenever any module anywhere registers a parameter, buffer or submodule
    (``module.weight = nn.Parameter(...)``, ``block.bn = ...``, ``load_state_dict(...,
    assign=True)``, parametrizations): owners that cache *which* tensors or modules to
    watch look them up again when it changed."""
    return _structure_count


def epoch() -> tuple[int, int, int]:
    """Counts of what can make a FoldCache stale without a watched tensor's version
    moving: module registrations, invalidation events (optimizer steps,
    :func:`invalidate_all`) and :meth:`FoldCache.clear` calls, process-wide. Two equal
    epochs: none of them happened in between."""
    return (_structure_count, _event_count, _clear_count)


def _after_registration(*_: Any) -> None:
    global _structure_count
    _structure_count += 1


optim_module.register_optimizer_step_post_hook(_after_optimizer_step)
nn_module.register_module_parameter_registration_hook(_after_registration)
nn_module.register_module_buffer_registration_hook(_after_registration)
nn_module.register_module_module_registration_hook(_after_registration)


def tensor_dicts(modules: Iterable[nn.Module]) -> tuple[dict, ...]:
    """The parameter and buffer dicts of ``modules``: what :func:`dict_tensors` reads.
    The dicts live as long as their modules; keep them until structure_version()
    changes."""
    return tuple(d for m in modules for d in (m._parameters, m._buffers) if d)


def dict_tensors(dicts: Iterable[dict]) -> list[torch.Tensor]:
    """The tensors in ``dicts`` (unset ones left out), cheap enough for every call. Read
    afresh each time: torch.func.functional_call writes into these dicts directly."""
    return [t for d in dicts for t in d.values() if t is not None]


def module_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """Every parameter and buffer held directly by ``modules`` (unset ones left out)."""
    return dict_tensors(tensor_dicts(modules))


_version = operator.attrgetter("_version")


def tensor_versions(tensors: Sequence[torch.Tensor | None]) -> list[int]:
    """Each tensor's version counter (in-place writes bump it); -1 for None and for
    inference tensors, which have none."""
    try:
        return list(map(_version, tensors))
    except (AttributeError, RuntimeError):  # None; inference tensors have no counter
        return [-1 if t is None or t.is_inference() else t._version for t in tensors]


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class FoldCache(Generic[T]):
    """One value built from some tensors, rebuilt whenever any of them may have changed.

    ``get(tensors, build, extra_key)`` returns the cached ``build()`` result while the
    same tensor objects (identity) have the same versions, ``extra_key`` (e.g. the compute
    dtype) is equal, and no optimizer step over one of them nor :func:`invalidate_all`
    happened since it was built; otherwise it calls ``build()`` and caches that, except
    during a CUDA graph capture. The cache holds references to the watched tensors, so
    their ids stay unique while it does.
    """

    __slots__ = ("_event", "_ids", "_key", "_tensors", "_value", "_versions")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Drop the value: the next :meth:`get` rebuilds."""
        global _clear_count
        _clear_count += 1
        self._value: T | None = None
        self._tensors: tuple[torch.Tensor | None, ...] = ()
        self._ids: frozenset[int] = frozenset()
        self._versions: list[int] = []
        self._key: Hashable = None
        self._event = -1

    @property
    def value(self) -> T | None:
        """The cached value as it stands (None when empty), without a staleness check."""
        return self._value

    def get(
        self,
        tensors: Sequence[torch.Tensor | None],
        build: Callable[[], T],
        extra_key: Hashable = (),
    ) -> T:
        versions = tensor_versions(tensors)
        if (
            self._event < 0
            or versions != self._versions
            or len(tensors) != len(self._tensors)
            or not all(map(operator.is_, tensors, self._tensors))
            or extra_key != self._key
            or (self._event != _event_count and self._stepped())
        ):
            if capturing():
                # A value built now lives in the graph's memory, unset until its first
                # replay: the graph refolds on every replay and the cache stays stale.
                return build()
            self._value = build()
            self._tensors, self._ids = tuple(tensors), frozenset(map(id, tensors))
            self._versions, self._key = versions, extra_key
        self._event = _event_count
        return self._value  # type: ignore[return-value]

    def _stepped(self) -> bool:
        """Whether an event since this cache's last use may have changed its tensors."""
        if not _events or _events[0][0] > self._event + 1:
            return True  # fell behind the log
        return any(
            ids is None or not self._ids.isdisjoint(ids)
            for number, ids in _events
            if number > self._event
        )

    def __reduce__(self) -> tuple[type, tuple]:
        # Pickled or deep-copied empty: a derived value would go stale, and a copied
        # module watches its own copied tensors.
        return (FoldCache, ())
