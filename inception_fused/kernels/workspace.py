"""Buffers a fixed sequence of launches keeps between calls: a network plan allocates
nothing after its first forward, and a CUDA graph captured from it replays into the
memory its eager runs use.

Inside ``with workspace:`` every map a launcher allocates (``launch.empty_channels_last``,
``launch.aligned_rows``, ``launch.kernel_layout``'s copy) is carved from the workspace's
flat buffers, and a map handed to :func:`release` once its last reader is launched may
hold a later map (the kernels run in stream order, as with torch's caching allocator).
The first run decides which buffer each map takes, best fit, and allocates; later runs
repeat those decisions and raise if the sequence of maps changed.
"""

from __future__ import annotations

import contextvars
import math

import torch

_active: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar(
    "inception_fused_workspace", default=None
)


class Workspace:
    def __init__(self) -> None:
        self._token: contextvars.Token | None = None
        self._forget()

    def _forget(self) -> None:
        self._buffers: list[torch.Tensor] = []  # flat uint8
        self._taken: list[int] = []  # per map of the first run: its buffer's index
        self._free: list[int] | None = []  # the first run's free buffers; None after it
        self._next = 0

    def __enter__(self) -> None:
        self._next = 0
        self._token = _active.set(self)

    def __exit__(self, *exc: object) -> None:
        _active.reset(self._token)
        if exc[0] is None:
            self._free = None  # the sequence is recorded
        else:  # a run that raised (a refused input) records nothing
            self._forget()

    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers)

    def take(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``nbytes`` for the next map."""
        if self._free is not None:
            fits = [i for i in self._free if self._buffers[i].numel() >= nbytes]
            if fits:
                index = min(fits, key=lambda i: self._buffers[i].numel())
                self._free.remove(index)
            else:
                index = len(self._buffers)
                self._buffers.append(
                    torch.empty(nbytes, dtype=torch.uint8, device=device)
                )
            self._taken.append(index)
        elif self._next >= len(self._taken):
            raise RuntimeError("workspace: more maps than its first run allocated")
        else:
            index = self._taken[self._next]
        self._next += 1
        buffer = self._buffers[index]
        if buffer.numel() < nbytes or buffer.device != device:
            raise RuntimeError("workspace: a map differs from its first run's")
        return buffer

    def release(self, t: torch.Tensor) -> None:
        if self._free is None:
            return
        ptr = t.untyped_storage().data_ptr()
        for i, buffer in enumerate(self._buffers):
            if buffer.data_ptr() == ptr and i not in self._free:
                self._free.append(i)


def empty(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
) -> torch.Tensor:
    """torch.empty, from the active workspace where there is one; ``channels_last``: a
    4-D [N, C, H, W] tensor stored as [N, H, W, C]."""
    workspace = _active.get()
    if workspace is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)
    nbytes = math.prod(shape) * dtype.itemsize
    flat = workspace.take(nbytes, torch.device(device))[:nbytes].view(dtype)
    if channels_last:
        n, c, h, w = shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(shape)


def release(t: torch.Tensor) -> None:
    """``t`` (a map from the active workspace) is dead once the launches made so far
    run: its buffer may hold a later map. Anything else (the caller's input) stays."""
    workspace = _active.get()
    if workspace is not None:
        workspace.release(t)
