"""The whole GoogLeNet eval forward as a network plan: one C++ call, or 25 Triton launches.

The plan is the same on both backends: every conv's BatchNorm folded into its weights and
bias, the Inception blocks' folds taken from the blocks themselves
(:meth:`FusedInceptionModule.folded`), transform_input applied while conv1 loads the
image, maxpool1 taken while conv2 loads its input, the stride-2 max pools between stages
written once, and the head (average pool, eval dropout = identity, FC) in one step.
:func:`build_plan` hands it to the C++ backend as a :class:`~inception_fused.program.Program`
(the blocks one instance of the Inception block graph Inception-v3's blocks also are;
weights packed for its GEMM micro-kernel, Winograd transforms for the 3x3 convs,
activation buffers held between calls); :func:`build_triton_plan` to the Triton kernels (kernels/conv.py, max_pool.py,
head.py and the blocks' own): conv1, conv2 with its pool, conv3, maxpool2, nine blocks of
two launches (stem and pool tiles, then 3x3/5x5 tiles; three above MERGED_ROWS pixels),
maxpool3, maxpool4 and the head make 25 launches at batch 1, with no host
synchronisation and, after the first forward of a shape, no allocation but the logits.

:class:`FusedGoogLeNet` is what :func:`~inception_fused.fuse_googlenet` turns a
torchvision ``GoogLeNet`` into: same modules, parameters and state dict, whose forward
runs the plan where it applies (eval mode, no autograd, no autocast, no hooks, not being
traced; float32/float64 on the C++ backend for CPU tensors, any float dtype on the Triton
backend for CUDA tensors or the interpreter) and torchvision's forward otherwise
(training with aux heads, torch.compile / torch.export / ONNX export, hooks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torchvision.models.googlenet import BasicConv2d, GoogLeNet

from .cpu import CPU_DTYPES, confirmed_program, has_forward_hooks, load_extension
from .eval_launch import inception_eval_forward
from .fold_cache import FoldCache, module_tensors
from .folding import FoldedInception, accumulator_dtype, fold_conv_block
from .kernels.conv import launch_conv_relu, pooled_size
from .kernels.head import launch_avg_pool_fc
from .kernels.launch import interpreting, on_device, pair
from .kernels.max_pool import launch_max_pool
from .kernels.workspace import Workspace, release
from .module import FusedInceptionModule
from .program import BlockGraph, Pool, ProgramBuilder, transform_rows

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
# The same as a program's input affine: [2, 3] rows scale, shift.
TRANSFORM_AFFINE = torch.tensor([TRANSFORM_SCALE, TRANSFORM_SHIFT], dtype=torch.float64)


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
    """MaxPool2d(kernel, stride 2, ceil_mode=True), no padding: what the plan runs."""
    return (
        type(pool) is nn.MaxPool2d
        and pair(pool.kernel_size) == (kernel, kernel)
        and pair(pool.stride) == (2, 2)
        and pair(pool.padding) == (0, 0)
        and pair(pool.dilation) == (1, 1)
        and pool.ceil_mode
        and not pool.return_indices
    )


def plan_applies(model: GoogLeNet, backend: str = "cpu") -> bool:
    """Whether ``model`` has the layer structure the plan executes, with blocks that run
    on ``backend`` ("cpu" or "triton")."""
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
            and b.backend in ("auto", backend)
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

    cpp: object  # inception_fused._C.Program
    dtype: torch.dtype
    folds: tuple[FoldedInception, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpp.forward(x)


# Workspaces a plan keeps: one per input (shape, strides, dtype, device, stream).
WORKSPACES = 4


@dataclass
class TritonPlan:
    """The plan's tensors for the Triton kernels, and its forward as launches (25 at
    batch 1) into maps kept between calls (kernels/workspace.py)."""

    dtype: torch.dtype
    transform: torch.Tensor | None  # [4, 3]: 0, 1, scale, shift per image channel
    stem: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # conv1..3: packed w, bias
    folds: tuple[FoldedInception, ...]
    fc: tuple[torch.Tensor, torch.Tensor]  # weight [classes, C], bias
    workspaces: dict[tuple, Workspace] = field(default_factory=dict)  # oldest first

    def workspace(self, x: torch.Tensor) -> Workspace:
        """The maps of a forward on inputs like ``x``. A stream has its own: two
        streams' forwards may run at once."""
        stream = torch.cuda.current_stream(x.device).stream_id if x.is_cuda else 0
        key = (x.shape, x.stride(), x.dtype, x.device, stream)
        found = self.workspaces[key] = self.workspaces.pop(key, None) or Workspace()
        if len(self.workspaces) > WORKSPACES:
            del self.workspaces[next(iter(self.workspaces))]
        return found

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (w1, b1), (w2, b2), (w3, b3) = self.stem

        def then(done: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
            release(done)  # read by the launch that made result: free for later maps
            return result

        with on_device(x), self.workspace(x):
            y = launch_conv_relu(x, w1, b1, 7, stride=2, transform=self.transform)
            y = then(y, launch_conv_relu(y, w2, b2, 1, pool="max_s2"))  # + maxpool1
            y = then(y, launch_conv_relu(y, w3, b3, 3))
            y = then(y, launch_max_pool(y, 3))
            for f, (_, pool) in zip(self.folds, BLOCKS, strict=True):
                y = then(y, inception_eval_forward(y, f))
                if pool:
                    y = then(y, launch_max_pool(y, pool))
        return launch_avg_pool_fc(y, *self.fc)  # the logits: the caller's to keep


def build_triton_plan(
    model: GoogLeNet, dtype: torch.dtype, folds: tuple[FoldedInception, ...]
) -> TritonPlan:
    """Fold every layer of ``model`` for the Triton kernels, once."""
    device = model.fc.weight.device
    acc = accumulator_dtype(dtype)
    with torch.no_grad():
        stem = tuple(
            fold_conv_block(getattr(model, n), dtype)
            for n in ("conv1", "conv2", "conv3")
        )
        transform = None
        if model.transform_input:
            transform = transform_rows(TRANSFORM_AFFINE).to(device, acc)
        fc = (
            model.fc.weight.detach().to(dtype),
            model.fc.bias.detach().to(acc).contiguous(),
        )
    return TritonPlan(dtype, transform, stem, folds, fc)


# GoogLeNet's Inception block as the program's block graph (reference.InceptionModule's
# submodule names); its pool branch max-pools (3x3/s1/p1, ceil mode: the same windows).
BLOCK_GRAPH = BlockGraph(("x>branch1", "x>branch2.0>branch2.1", "x>branch3.0>branch3.1",
                          "pool>branch4.1"))  # fmt: skip


def build_plan(
    model: GoogLeNet,
    dtype: torch.dtype,
    folds: tuple[FoldedInception, ...] | None = None,
) -> NetworkPlan:
    """The whole network as one C++ :class:`~inception_fused.program.Program`: the stem
    convs and pools, the blocks (their own graph), the pools between stages and the
    head, BN folded into every conv, once.

    ``folds``: the blocks' cached folds the plan's cache is keyed by (default: theirs)."""
    if folds is None:
        folds = blocks_folded(model, dtype)
    affine = TRANSFORM_AFFINE if model.transform_input else None
    builder = ProgramBuilder(model.conv1.conv.in_channels, affine)
    builder.conv(model.conv1)
    builder.max_pool(model.maxpool1)
    builder.conv(model.conv2)
    builder.conv(model.conv3)
    builder.max_pool(model.maxpool2)
    for name, _ in BLOCKS:
        builder.block(getattr(model, name), BLOCK_GRAPH, Pool.MAX)
        if name in POOL_AFTER:
            builder.max_pool(getattr(model, POOL_AFTER[name]))
    builder.head(model.fc)
    tensors, ints = builder.finish().encode(dtype)
    cpp = load_extension().Program(tensors, ints)
    return NetworkPlan(cpp, dtype, folds)


class FusedGoogLeNet(GoogLeNet):
    """torchvision's ``GoogLeNet`` whose eval forward runs as one C++ call where it can.

    Not constructed directly: :func:`~inception_fused.fuse_googlenet` switches a built
    ``GoogLeNet``'s class to this one (modules, parameters, state dict unchanged) and
    :func:`~inception_fused.unfuse_googlenet` switches it back.
    """

    _network_plan: NetworkPlan | TritonPlan | None = None

    def forward(self, x: torch.Tensor):
        if self.training:
            self._network_plan = None  # train-mode forwards update BN statistics
        elif (backend := self._plan_backend(x)) is not None:
            plan = confirmed_program(self, x, backend, lambda: self._runnable_plan(x, backend))
            if plan is not None:
                return plan(x)
        return super().forward(x)

    def _plan_backend(self, x: torch.Tensor) -> str | None:
        """The backend whose plan would run ``x`` as far as ``x`` and torch's modes tell:
        "cpu", "triton", or None (torchvision's forward)."""
        if (
            torch.compiler.is_compiling()  # torch.compile, torch.export, ONNX export
            or torch.jit.is_tracing()  # and the TorchScript ONNX exporter
            or torch.jit.is_scripting()
            or not isinstance(x, torch.Tensor)
            or not x.is_floating_point()
            or x.dim() != 4
            or (x.requires_grad and torch.is_grad_enabled())
            or not _large_enough(x.shape[2], x.shape[3])
        ):
            return None
        if x.is_cuda:
            return None if torch.is_autocast_enabled("cuda") else "triton"
        if not x.is_cpu or x.dtype not in CPU_DTYPES or torch.is_autocast_enabled("cpu"):
            return None
        blocks = (getattr(self, name, None) for name, _ in BLOCKS)
        interpreted = interpreting() and all(getattr(b, "backend", None) == "triton" for b in blocks)
        return "triton" if interpreted else "cpu"

    def _runnable_plan(self, x: torch.Tensor, backend: str) -> NetworkPlan | TritonPlan | None:
        """The full test (cpu.Confirmed skips it while nothing changed): the plan for
        ``x`` if the model is one it runs (plan_applies), with no hooks and no parameter
        that needs a gradient now; else None."""
        weight = self.conv1.conv.weight
        if (
            x.shape[1] != self.conv1.conv.in_channels
            or x.dtype != weight.dtype
            or x.device != weight.device
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
            or not plan_applies(self, backend)
            or has_forward_hooks(self.modules())  # hooks expect their modules to run
        ):
            return None
        return self._plan(x.dtype, backend)

    def _plan(self, dtype: torch.dtype, backend: str) -> NetworkPlan | TritonPlan:
        """The cached plan, rebuilt as a block's fold would be (fold_cache.FoldCache:
        replaced or written tensors, optimizer steps, train-mode forwards through
        ``num_batches_tracked``) or when a block refolded."""
        folds = blocks_folded(self, dtype)
        cache = self.__dict__.get("_plan_cache")
        if cache is None or self._network_plan is None:
            cache = self.__dict__["_plan_cache"] = FoldCache()
        build = build_triton_plan if backend == "triton" else build_plan
        # The plan holds the folds, so their ids stay unique while it is cached.
        key = (dtype, backend, self.transform_input, tuple(map(id, folds)))
        self._network_plan = cache.get(
            module_tensors(stem_modules(self)), lambda: build(self, dtype, folds), key
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
        replica.__dict__.pop("_confirmed", None)
        return replica

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_network_plan", None)  # never pickle derived weights
        state.pop("_plan_cache", None)
        state.pop("_confirmed", None)
        return state


def _large_enough(height: int, width: int) -> bool:
    """Whether every stage of the plan has at least one pixel (else torchvision's own
    forward runs, and raises what it raises)."""
    for size in (height, width):
        size = (size - 1) // 2 + 1  # conv1 7x7/2, padding 3
        for kernel in (3, 3, 3, 2):  # maxpool1 .. maxpool4: stride 2, ceil_mode
            if size - kernel + 1 < 0:
                return False  # PyTorch: "Output size is too small"
            size = pooled_size(size, kernel)
    return True
