"""The whole GoogLeNet eval forward as one C++ call: the network plan.

:func:`build_plan` decides once, in Python, what the C++ backend runs (csrc/network.h):
every conv's BatchNorm folded into its weights and bias, weights packed for the GEMM
micro-kernel, Winograd transforms for the 3x3 convs, the Inception blocks' folds taken
from the blocks themselves (:meth:`FusedInceptionModule.folded`), the stride-2 max pools
between stages, and the head (average pool, eval dropout = identity, FC). The plan holds
its activation buffers between calls.

:class:`FusedGoogLeNet` is what :func:`~inception_fused.fuse_googlenet` turns a
torchvision ``GoogLeNet`` into: same modules, parameters and state dict, whose forward
runs the plan where it applies (eval mode, no autograd, float32/float64 CPU input, C++
backend, no hooks, not being traced) and torchvision's forward otherwise (training with
aux heads, torch.compile / torch.export / ONNX export, CUDA, other dtypes, hooks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d, GoogLeNet

from .cpu import CPU_DTYPES, load_extension, winograd_transform, winograd_weights
from .fold_cache import FoldCache, module_tensors
from .folding import FoldedInception, fold_conv_block, pack_weight
from .module import FusedInceptionModule

# Blocks in forward order and the max pool torchvision's GoogLeNet takes after each
# (kernel, stride 2, ceil_mode); 0: none.
BLOCKS = (
    ("inception3a", 0),
    ("inception3b", 3),  # maxpool3
    ("inception4a", 0),
    ("inception4b", 0),
    ("inception4c", 0),
    ("inception4d", 0),
    ("inception4e", 2),  # maxpool4
    ("inception5a", 0),
    ("inception5b", 0),
)
POOL_AFTER = {"inception3b": "maxpool3", "inception4e": "maxpool4"}

# torchvision's transform_input: x_c * scale_c + shift_c (ImageNet statistics -> the
# normalisation the ported weights expect).
TRANSFORM_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
TRANSFORM_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)


def _is_conv(block: nn.Module, kernel: int, stride: int, padding: int) -> bool:
    """A torchvision BasicConv2d (conv without bias + BatchNorm with running stats)."""
    if not isinstance(block, BasicConv2d):
        return False
    conv, bn = block.conv, block.bn
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (kernel, kernel)
        and conv.stride == (stride, stride)
        and conv.padding == (padding, padding)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
    )


def _is_pool(pool: nn.Module, kernel: int) -> bool:
    """MaxPool2d(kernel, stride 2, ceil_mode=True), no padding: what network.cpp runs."""

    def pair(v: int | Sequence[int]) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, Sequence) else (v, v)

    return (
        type(pool) is nn.MaxPool2d
        and pair(pool.kernel_size) == (kernel, kernel)
        and pair(pool.stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and pool.ceil_mode
        and not pool.return_indices
    )


def plan_applies(model: GoogLeNet) -> bool:
    """Whether ``model`` has the layer structure network.cpp executes."""
    blocks = [getattr(model, name, None) for name, _ in BLOCKS]
    avgpool = getattr(model, "avgpool", None)
    return (
        _is_conv(model.conv1, 7, 2, 3)
        and _is_conv(model.conv2, 1, 1, 0)
        and _is_conv(model.conv3, 3, 1, 1)
        and _is_pool(model.maxpool1, 3)
        and _is_pool(model.maxpool2, 3)
        and _is_pool(model.maxpool3, 3)
        and _is_pool(model.maxpool4, 2)
        and all(
            isinstance(b, FusedInceptionModule)
            and b.batch_norm
            and b.backend in ("auto", "cpu")
            for b in blocks
        )
        and type(avgpool) is nn.AdaptiveAvgPool2d
        and avgpool.output_size in (1, (1, 1))
        and type(model.dropout) is nn.Dropout
        and type(model.fc) is nn.Linear
    )


def stem_modules(model: GoogLeNet) -> tuple[nn.Module, ...]:
    """The modules outside the blocks whose tensors the plan folds and packs."""
    stem = (model.conv1, model.conv2, model.conv3)
    return (*(m for b in stem for m in (b.conv, b.bn)), model.fc)


def blocks_folded(model: GoogLeNet, dtype: torch.dtype) -> tuple[FoldedInception, ...]:
    """The nine blocks' cached folds, in network order."""
    return tuple(getattr(model, name).folded(dtype) for name, _ in BLOCKS)


@dataclass
class NetworkPlan:
    """The C++ plan plus what it was built from (kept alive: the plan points into it)."""

    cpp: object  # inception_fused._C.NetworkPlan
    dtype: torch.dtype
    folds: tuple[FoldedInception, ...]
    modules: tuple[nn.Module, ...]  # whose hooks would be skipped

    def has_hooks(self) -> bool:
        from torch.nn.modules import module as module_globals

        if (
            module_globals._global_forward_hooks
            or module_globals._global_forward_pre_hooks
        ):
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpp.forward(x)


def build_plan(
    model: GoogLeNet,
    dtype: torch.dtype,
    folds: tuple[FoldedInception, ...] | None = None,
) -> NetworkPlan:
    """Fold, pack and hand every layer of ``model`` to the C++ backend, once.

    ``folds``: the blocks' folds (default: their cached ``FusedInceptionModule.folded``)."""
    ext = load_extension()
    if folds is None:
        folds = blocks_folded(model, dtype)
    empty = torch.empty(0, dtype=dtype)
    with torch.no_grad():
        transform = (
            torch.tensor([TRANSFORM_SCALE, TRANSFORM_SHIFT], dtype=dtype)
            if model.transform_input
            else empty
        )
        # The C++ side reads every tensor in the network's dtype.
        stem = [
            fold_conv_block(getattr(model, n), dtype)
            for n in ("conv1", "conv2", "conv3")
        ]
        stem = [(w, b.to(dtype)) for w, b in stem]
        w3 = winograd_transform(ext, stem[2][0], 3)
        tensors = [transform, *stem[0], *stem[1], *stem[2], empty if w3 is None else w3]
        ints = []
        for f, (_, pool) in zip(folds, BLOCKS, strict=True):
            u3, u5 = winograd_weights(ext, f)
            block = [f.stem_w, f.stem_b, f.pool_w, f.pool_b, f.w3, f.b3, f.w5, f.b5]
            tensors += [t.to(dtype) for t in block]
            tensors += [empty if u is None else u for u in (u3, u5)]
            ints += [f.c1, f.r3, f.k3, f.k5, pool]
        tensors += [
            pack_weight(model.fc.weight.detach()[:, :, None, None], dtype),
            model.fc.bias.detach().to(dtype).contiguous(),
        ]
    cpp = ext.NetworkPlan([t.contiguous() for t in tensors], ints)
    return NetworkPlan(cpp, dtype, folds, tuple(model.modules()))


class FusedGoogLeNet(GoogLeNet):
    """torchvision's ``GoogLeNet`` whose eval forward runs as one C++ call where it can.

    Not constructed directly: :func:`~inception_fused.fuse_googlenet` switches a built
    ``GoogLeNet``'s class to this one (modules, parameters, state dict unchanged) and
    :func:`~inception_fused.unfuse_googlenet` switches it back.
    """

    _network_plan: NetworkPlan | None = None

    def forward(self, x: torch.Tensor):
        if self.training:
            self._network_plan = None  # train-mode forwards update BN statistics
        elif self._runs_plan(x):
            plan = self._plan(x.dtype)
            if not plan.has_hooks():  # hooks expect their modules to run
                return plan(x)
        return super().forward(x)

    def _runs_plan(self, x: torch.Tensor) -> bool:
        if (
            torch.compiler.is_compiling()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export()
            or not isinstance(x, torch.Tensor)
            or x.device.type != "cpu"
            or x.dtype not in CPU_DTYPES
            or x.dim() != 4
            or x.shape[1] != self.conv1.conv.in_channels
            or x.dtype != self.conv1.conv.weight.dtype
            or x.device != self.conv1.conv.weight.device
            or not _large_enough(x.shape[2], x.shape[3])
        ):
            return False
        if torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        ):
            return False  # autograd needs the per-layer graph
        return plan_applies(self)

    def _plan(self, dtype: torch.dtype) -> NetworkPlan:
        """The cached plan, rebuilt as a block's fold would be (fold_cache.FoldCache:
        replaced or written tensors, optimizer steps, train-mode forwards through
        ``num_batches_tracked``) or when a block refolded."""
        folds = blocks_folded(self, dtype)
        cache = self.__dict__.get("_plan_cache")
        if cache is None or self._network_plan is None:
            cache = self.__dict__["_plan_cache"] = FoldCache()
        # The plan holds the folds, so their ids stay unique while it is cached.
        key = (dtype, self.transform_input, tuple(map(id, folds)))
        self._network_plan = cache.get(
            module_tensors(stem_modules(self)),
            lambda: build_plan(self, dtype, folds),
            key,
        )
        return self._network_plan

    def train(self, mode: bool = True) -> FusedGoogLeNet:
        self._network_plan = None
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> FusedGoogLeNet:
        self._network_plan = None  # .to() / .double() swap param.data in place
        return super()._apply(fn, recurse)

    def _replicate_for_data_parallel(self) -> FusedGoogLeNet:
        # A replica copies __dict__: it must not share (and race on) this plan.
        replica = super()._replicate_for_data_parallel()
        replica._network_plan = None
        replica.__dict__.pop("_plan_cache", None)
        return replica

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_network_plan", None)  # never pickle derived weights
        state.pop("_plan_cache", None)
        return state


def _large_enough(height: int, width: int) -> bool:
    """Whether every stage of the plan has at least one pixel (else torchvision's own
    forward runs, and raises what it raises)."""
    for size in (height, width):
        size = (size - 1) // 2 + 1  # conv1 7x7/2, padding 3
        for kernel in (3, 3, 3, 2):  # maxpool1 .. maxpool4: stride 2, ceil_mode
            if size - kernel + 1 < 0:
                return False  # PyTorch: "Output size is too small"
            out = (size - kernel + 1) // 2 + 1
            size = out - 1 if (out - 1) * 2 >= size else out
    return True
