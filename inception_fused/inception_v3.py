"""Inception-v3 (and the FID networks built on it) with fused eval forwards.

:func:`fuse_inception_v3` switches the classes of the layers it recognises in a module
tree to fused subclasses: modules, parameters and state dict stay as they are, and
:func:`unfuse_inception_v3` switches them back. A fused layer's eval forward (no
autograd, no autocast, no hooks, not traced) runs a :class:`~inception_fused.program.Program`:
as one C++ call for float32/float64 CPU tensors, as Triton launches for CUDA tensors
(one per conv, into its channel slice). What one program covers:

- torchvision ``Inception3``: the whole network (transform_input, stem, the eleven
  Mixed blocks, average pool, FC).
- pytorch-fid ``InceptionV3``: each of its ``blocks`` (the stem up to each max pool,
  the Mixed blocks, the final average pool): one call per block it returns.
- torch-fidelity ``FeatureExtractorInceptionV3`` and torchmetrics' ``NoTrainInceptionV3``
  (FID, KID, IS, MiFID): each stem conv and each Mixed block, the package's forward
  (resizing, feature taps) around them.

Blocks are recognised by their exact class and the pooling that class does: pytorch-fid's
``FIDInceptionE_2`` is an instance of torchvision's ``InceptionE`` but max-pools.
Otherwise (training, gradients, other devices or dtypes) the package's own forward runs.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .cpu import CPU_DTYPES, confirmed_program, has_forward_hooks, load_extension
from .fold_cache import FoldCache, module_tensors
from .kernels.launch import interpreting
from .network import TRANSFORM_AFFINE
from .program import (
    BlockGraph,
    HeadOp,
    Pool,
    ProgramBuilder,
    TritonProgram,
    basic_conv_ok,
    max_pool_ok,
)

# The Mixed blocks' structure (torchvision models/inception.py; pytorch-fid and
# torch-fidelity keep its submodule names).
GRAPHS = {
    "A": BlockGraph((
        "x>branch1x1",
        "x>branch5x5_1>branch5x5_2",
        "x>branch3x3dbl_1>branch3x3dbl_2>branch3x3dbl_3",
        "pool>branch_pool",
    )),
    "B": BlockGraph(
        ("x>branch3x3", "x>branch3x3dbl_1>branch3x3dbl_2>branch3x3dbl_3"),
        pass_through=True,
    ),
    "C": BlockGraph((
        "x>branch1x1",
        "x>branch7x7_1>branch7x7_2>branch7x7_3",
        "x>branch7x7dbl_1>branch7x7dbl_2>branch7x7dbl_3>branch7x7dbl_4>branch7x7dbl_5",
        "pool>branch_pool",
    )),
    "D": BlockGraph(
        ("x>branch3x3_1>branch3x3_2", "x>branch7x7x3_1>branch7x7x3_2>branch7x7x3_3>branch7x7x3_4"),
        pass_through=True,
    ),
    "E": BlockGraph((
        "x>branch1x1",
        "x>branch3x3_1>branch3x3_2a",
        "branch3x3_1>branch3x3_2b",
        "x>branch3x3dbl_1>branch3x3dbl_2>branch3x3dbl_3a",
        "branch3x3dbl_2>branch3x3dbl_3b",
        "pool>branch_pool",
    )),
}

_TV = "torchvision.models.inception."
_FID = "pytorch_fid.inception."
_TF = "torch_fidelity.feature_extractor_inceptionv3."
EXCLUDE = Pool.AVG_EXCLUDE_PAD
# Exact class (module.qualname) -> (graph, the pool branch's pool).
BLOCKS = {
    _TV + "InceptionA": ("A", Pool.AVG),
    _FID + "FIDInceptionA": ("A", EXCLUDE),
    _TF + "InceptionA": ("A", EXCLUDE),
    _TV + "InceptionB": ("B", Pool.NONE),
    _TF + "InceptionB": ("B", Pool.NONE),
    _TV + "InceptionC": ("C", Pool.AVG),
    _FID + "FIDInceptionC": ("C", EXCLUDE),
    _TF + "InceptionC": ("C", EXCLUDE),
    _TV + "InceptionD": ("D", Pool.NONE),
    _TF + "InceptionD": ("D", Pool.NONE),
    _TV + "InceptionE": ("E", Pool.AVG),
    _FID + "FIDInceptionE_1": ("E", EXCLUDE),
    _FID + "FIDInceptionE_2": ("E", Pool.MAX),
    _TF + "InceptionE_1": ("E", EXCLUDE),
    _TF + "InceptionE_2": ("E", Pool.MAX),
}
CONVS = (_TV + "BasicConv2d", _TF + "BasicConv2d")
NETWORK = _TV + "Inception3"
FID_NETWORK = _FID + "InceptionV3"


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _original(m: nn.Module) -> str:
    """The exact class a layer had before fusing."""
    cls = type(m)
    return _name(cls.__bases__[1] if issubclass(cls, FusedLayer) else cls)


def _add_layer(builder: ProgramBuilder, m: nn.Module) -> bool:
    """Appends one recognised layer; False for anything the program cannot run."""
    name = _original(m)
    if name in CONVS and basic_conv_ok(m):
        builder.conv(m)
    elif name in BLOCKS:
        graph, pool = BLOCKS[name]
        convs = [m.get_submodule(c) for _, c in GRAPHS[graph].edges()]
        if not all(_original(c) in CONVS and basic_conv_ok(c) for c in convs):
            return False
        builder.block(m, GRAPHS[graph], pool)
    elif max_pool_ok(m):
        builder.max_pool(m)
    elif type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1)):
        builder.head(None)
    else:
        return False
    return True


def _layers_program(layers: list[nn.Module], in_channels: int, affine=None):
    """The program of ``layers`` in forward order, or None if one is not recognised. A
    Linear after the average pool is the head's FC (eval dropout and flatten between)."""
    builder = ProgramBuilder(in_channels, affine)
    for m in layers:
        head = builder.program.ops[-1] if builder.program.ops else None
        if isinstance(head, HeadOp):
            if type(m) is not nn.Linear or head.fc is not None:
                return None
            head.fc = m
        elif not _add_layer(builder, m):
            return None
    return builder.finish()


class FusedLayer(nn.Module):
    """Mixed into a recognised layer's class by :func:`fuse_inception_v3`: the eval
    forward runs the layer's program (:meth:`_layers` say which layers) as one C++ call
    where it applies, the layer's own forward otherwise."""

    def _layers(self) -> tuple[list[nn.Module], int, torch.Tensor | None]:
        """The layers the program runs, its input channels and its input affine."""
        return [self], _in_channels(self), None

    def forward(self, *args: Any, **kwargs: Any):
        x = args[0] if len(args) == 1 and not kwargs else None
        run = self._program(x) if isinstance(x, torch.Tensor) else None
        if run is not None:
            return run(x)
        return super().forward(*args, **kwargs)

    def _backend(self, x: torch.Tensor) -> str | None:
        """"cpu" (the C++ backend), "triton" (CUDA, or the interpreter on CPU with
        backend="triton"), or None: the layer's own forward."""
        backend = self.__dict__.get("_fused_backend")
        if x.is_cuda:
            ok = backend in (None, "triton") and not torch.is_autocast_enabled("cuda")
            return "triton" if ok else None
        if not x.is_cpu or x.dtype not in CPU_DTYPES or torch.is_autocast_enabled("cpu"):
            return None
        if backend == "triton":
            return "triton" if interpreting() else None
        return "cpu"

    def _program(self, x: torch.Tensor):
        """The cached program for x on its backend, or None where the layer's own forward
        runs."""
        if (
            self.training
            or x.dim() != 4
            or not x.is_floating_point()
            or torch.compiler.is_compiling()  # torch.compile, torch.export, ONNX export
            or torch.jit.is_tracing()  # and the TorchScript ONNX exporter
            or torch.jit.is_scripting()
            or (x.requires_grad and torch.is_grad_enabled())
            or (backend := self._backend(x)) is None
        ):
            return None
        return confirmed_program(self, x, backend, lambda: self._runnable_program(x, backend))

    def _runnable_program(self, x: torch.Tensor, backend: str):
        """The full test (cpu.Confirmed skips it while nothing changed): the program for
        ``x`` if every layer is one it runs, with no hooks and no parameter that needs a
        gradient now; else None."""
        layers, c_in, affine = self._layers()
        modules = tuple(mm for m in layers for mm in m.modules())
        params = [p for m in layers for p in m.parameters()]
        if (
            x.shape[1] != c_in
            or not params
            or any(p.dtype != x.dtype or p.device != x.device for p in params)
            or (torch.is_grad_enabled() and any(p.requires_grad for p in params))
            or has_forward_hooks(m for m in modules if m is not self)
        ):
            return None
        cache = self.__dict__.get("_program_cache")
        if cache is None:
            cache = self.__dict__["_program_cache"] = FoldCache()

        def build():
            program = _layers_program(layers, c_in, affine)
            if program is None or (backend == "triton" and not TritonProgram.runs(program)):
                return None
            if backend == "triton":
                forward = TritonProgram.build(program, x.dtype, x.device)
            else:
                forward = load_extension().Program(*program.encode(x.dtype)).forward
            if type(layers[-1]) is not nn.AdaptiveAvgPool2d:
                return forward
            return lambda inp: forward(inp)[:, :, None, None]  # the pool's [N, C, 1, 1]

        # Every tensor of every layer's modules: a Mixed block's convs and BNs hold theirs
        # in submodules (watching the layers' own, only the FC's were seen).
        key = (x.dtype, x.device, backend, x.shape[1], affine is not None)
        return cache.get(module_tensors(modules), build, key)

    def train(self, mode: bool = True):
        cache = self.__dict__.get("_program_cache")
        if cache is not None:
            cache.clear()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True):
        cache = self.__dict__.get("_program_cache")
        if cache is not None:
            cache.clear()
        return super()._apply(fn, recurse)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica.__dict__.pop("_program_cache", None)
        replica.__dict__.pop("_confirmed", None)
        return replica

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_program_cache", None)
        state.pop("_confirmed", None)
        return state


def _in_channels(m: nn.Module) -> int:
    first = m.conv if hasattr(m, "conv") else next(
        c.conv for c in m.children() if hasattr(c, "conv")
    )
    return first.in_channels


class _FusedSequence(FusedLayer):
    """pytorch-fid's blocks: an nn.Sequential of stem convs, pools and Mixed blocks."""

    def _layers(self):
        layers = list(self.children())
        # A leading max pool keeps the channels: the first layer after it says how many.
        c_in = next(_in_channels(m) for m in layers if not max_pool_ok(m))
        return layers, c_in, None


class _FusedInception3(FusedLayer):
    """torchvision's Inception3: the whole eval forward (aux logits only train)."""

    def _layers(self):
        names = [
            "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
            "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
            "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
            "Mixed_7c", "avgpool", "fc",
        ]  # fmt: skip
        layers = [getattr(self, n) for n in names]
        return layers, 3, TRANSFORM_AFFINE if self.transform_input else None

    def _runnable_program(self, x: torch.Tensor, backend: str):
        if type(self.dropout) is not nn.Dropout:
            return None
        return super()._runnable_program(x, backend)


_FUSED_CLASSES: dict[type, type] = {}


def fused_class(cls: type) -> type:
    """The fused subclass of a recognised layer class (made once per class, kept in this
    module under a stable name so pickles of fused models load)."""
    if cls not in _FUSED_CLASSES:
        name = _name(cls)
        if name == NETWORK:
            mixin = _FusedInception3
        elif cls is nn.Sequential:
            mixin = _FusedSequence
        else:
            mixin = FusedLayer
        qualname = "Fused_" + name.replace(".", "_")
        fused = type(qualname, (mixin, cls), {"__module__": __name__, "__qualname__": qualname})
        setattr(sys.modules[__name__], qualname, fused)
        _FUSED_CLASSES[cls] = fused
    return _FUSED_CLASSES[cls]


def _recognised(m: nn.Module) -> bool:
    name = _original(m)
    return name in BLOCKS or name in CONVS or name == NETWORK


def fuse_inception_v3(
    model: nn.Module, *, inplace: bool = True, backend: str | None = None
) -> nn.Module:
    """Fuse every Inception-v3 layer of ``model``: torchvision ``Inception3``, pytorch-fid
    ``InceptionV3``, torch-fidelity ``FeatureExtractorInceptionV3``, torchmetrics'
    ``NoTrainInceptionV3`` (or a metric holding one), or any tree containing their layers.

    Same outputs and state dict; ``inplace=False`` fuses a deep copy. ``backend``: None
    (the C++ backend for float32/float64 CPU tensors, Triton for CUDA tensors), "cpu" (C++
    only) or "triton" (Triton only; on CPU through the interpreter, for tests).
    """
    if backend not in (None, "cpu", "triton"):
        raise ValueError(
            f"fuse_inception_v3: backend must be None, 'cpu' or 'triton', got {backend!r}"
        )
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    fid_blocks = {
        id(seq)
        for m in model.modules()
        if _original(m) == FID_NETWORK
        for seq in m.blocks
    }
    for m in model.modules():
        if isinstance(m, FusedLayer):
            continue
        if _recognised(m) or (type(m) is nn.Sequential and id(m) in fid_blocks):
            m.__class__ = fused_class(type(m))
            m._fused_backend = backend
    return model


def unfuse_inception_v3(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo :func:`fuse_inception_v3`: every fused layer gets its original class back."""
    if not inplace:
        import copy

        model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, FusedLayer):
            m.__dict__.pop("_program_cache", None)
            m.__dict__.pop("_fused_backend", None)
            m.__class__ = type(m).__bases__[1]
    return model


def __getattr__(name: str) -> type:
    # Unpickling a fused model looks its classes up here: rebuild them from their names.
    if name.startswith("Fused_"):
        for cls_name in (*BLOCKS, *CONVS, NETWORK, "torch.nn.modules.container.Sequential"):
            if "Fused_" + cls_name.replace(".", "_") == name:
                module, _, qual = cls_name.rpartition(".")
                return fused_class(getattr(__import__(module, fromlist=[qual]), qual))
    raise AttributeError(name)
