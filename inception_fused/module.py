"""FusedInceptionModule: the drop-in nn.Module, its BN-folding cache and backend dispatch."""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, NamedTuple, NoReturn

import torch
from torch import nn

from .cpu import CPU_DTYPES
from .eval_op import eval_forward
from .fold_cache import FoldCache, dict_tensors, structure_version, tensor_dicts
from .folding import FoldedInception, conv_blocks, fold_inception
from .kernels.launch import interpreting
from .onnx_export import exporting_onnx
from .reference import InceptionModule
from .training import bn_batch_stats, fused_train_forward

BACKENDS = ("auto", "triton", "cpu", "reference")


def _default_backend() -> str:
    return os.environ.get("INCEPTION_FUSED_BACKEND", "auto")


class _Layout(NamedTuple):
    """Which submodules a forward reads: looked up again only when any module anywhere
    registered a parameter, buffer or submodule (fold_cache.structure_version)."""

    structure: int
    first_conv: nn.Module  # its weight's device and dtype are the module's
    bns: tuple[nn.Module, ...]  # the six BatchNorms; () with batch_norm=False
    tensor_dicts: tuple[dict, ...]  # every submodule's parameter and buffer dicts
    syncs_batch_stats: bool  # a SyncBatchNorm (convert_sync_batchnorm) among the BNs
    tracks_running_stats: bool  # every BN has running statistics (buffers, not None)


def _layout(module: InceptionModule) -> _Layout:
    blocks = conv_blocks(module)
    bns = () if blocks[0].bn is None else tuple(b.bn for b in blocks)
    return _Layout(
        structure=structure_version(),
        first_conv=blocks[0].conv,
        bns=bns,
        tensor_dicts=tensor_dicts(module.modules()),
        syncs_batch_stats=any(isinstance(bn, nn.SyncBatchNorm) for bn in bns),
        tracks_running_stats=all(bn.running_mean is not None for bn in bns),
    )


def _dtypes(x: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, output dtype) of a call: ``x``'s, or under autocast the reference's
    output dtype; on CPU the kernels compute in fp32 and the result is cast."""
    device_type = x.device.type
    if x.dtype == torch.float64 or not torch.is_autocast_enabled(device_type):
        return x.dtype, x.dtype
    low = torch.get_autocast_dtype(device_type)
    return (x.dtype if device_type == "cpu" else low), low


class FusedInceptionModule(InceptionModule):
    """Inception block computed by fused Triton kernels; same parameters as the reference.

    Constructor, parameter names and state-dict keys are :class:`InceptionModule`'s. Eval
    mode runs two kernel launches over BN-folded weights (folded once, cached, and refolded
    when any parameter or buffer changes). Train mode and calls that need gradients (e.g.
    frozen-BN fine-tuning) run the train kernels behind an autograd op (training.py) on
    the Triton backend; on the C++ CPU backend (eval only) they run the reference math.

    ``backend``: ``"auto"`` (Triton for CUDA tensors, the C++ backend for float32/float64
    CPU tensors, plain PyTorch for other CPU dtypes),
    ``"triton"`` (insist on Triton; on CPU tensors only through the interpreter,
    ``TRITON_INTERPRET=1``), ``"cpu"`` (insist on the C++ backend) or ``"reference"``
    (plain PyTorch). The ``INCEPTION_FUSED_BACKEND`` environment variable sets the default.
    """

    def __init__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.backend = backend or _default_backend()
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        self._fold_cache: FoldCache[FoldedInception] = FoldCache()
        self._cached_layout: _Layout | None = None

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        *,
        share_parameters: bool = False,
        backend: str | None = None,
    ) -> FusedInceptionModule:
        """Build from our :class:`InceptionModule` or torchvision's ``Inception``.

        The conv and BN submodules are copied (or, with ``share_parameters=True``, reused:
        same Parameter objects, as when swapping blocks inside a model). Device, dtype,
        BN eps/momentum and train/eval mode carry over.
        """
        blocks = conv_blocks(module)
        convs = [b.conv for b in blocks]
        c_in = convs[0].in_channels
        sizes = [c.out_channels for c in convs]  # c1, r3, c3, r5, c5, pool
        batch_norm = getattr(blocks[0], "bn", None) is not None
        with torch.device("meta"):  # skeleton only: its tensors are replaced below
            fused = cls(
                c_in,
                *sizes,
                branch3_kernel=convs[4].kernel_size[0],
                batch_norm=batch_norm,
                backend=backend,
            )
        take = (lambda m: m) if share_parameters else copy.deepcopy
        for ours, theirs in zip(conv_blocks(fused), blocks, strict=True):
            ours.conv = take(theirs.conv)
            ours.bn = take(theirs.bn) if batch_norm else None
        return fused.train(module.training)

    def folded(self, dtype: torch.dtype) -> FoldedInception:
        """BN-folded, kernel-packed weights for ``dtype``, refolded only when stale.

        Stale means (fold_cache.FoldCache): a parameter or buffer was replaced or written
        in place (``_version``: in-place edits, ``load_state_dict``, train-mode forwards
        through ``num_batches_tracked``), an optimizer stepped over one (fused and foreach
        ones too), a BN's ``eps`` changed, the module switched train/eval mode or was
        moved (``.to()``), or
        ``inception_fused.refold(model)`` was called. Edits that bypass all of these
        (``p.data.copy_(...)`` in eval mode) need that call.
        """
        layout = self._layout()
        return self._cached_fold(layout, dict_tensors(layout.tensor_dicts), dtype)

    def _cached_fold(
        self, layout: _Layout, tensors: list[torch.Tensor], dtype: torch.dtype
    ) -> FoldedInception:
        # BN eps is folded in too, and no version counts its edits.
        key = (dtype, *(bn.eps for bn in layout.bns))
        return self._fold_cache.get(tensors, functools.partial(self._fold, dtype), key)

    def _fold(self, dtype: torch.dtype) -> FoldedInception:
        with torch.no_grad():
            return fold_inception(self, dtype)

    def _layout(self) -> _Layout:
        layout = self._cached_layout
        if layout is None or layout.structure != structure_version():
            layout = self._cached_layout = _layout(self)
        return layout

    def train(self, mode: bool = True) -> FusedInceptionModule:
        # A switch ends or starts a training phase: whatever changed the weights during
        # it (even edits through .data), the next eval call folds afresh.
        self._fold_cache.clear()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> FusedInceptionModule:
        # .to() / .cuda() / .double() swap param.data: same tensors, same versions.
        self._fold_cache.clear()
        return super()._apply(fn, recurse)

    def _replicate_for_data_parallel(self) -> FusedInceptionModule:
        # nn.DataParallel's replicas copy __dict__: each needs its own fold (of its own
        # device's tensors) and its own submodules' layout, not the original's.
        replica = super()._replicate_for_data_parallel()
        replica._fold_cache = FoldCache()
        replica._cached_layout = None
        return replica

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_cached_layout"] = None  # module references of the original
        return state

    def __prepare_scriptable__(self) -> NoReturn:
        # torch.jit.script calls this on every submodule before compiling any of them.
        raise RuntimeError(
            "FusedInceptionModule does not support torch.jit.script: its kernels are "
            "registered as a torch.library custom op (inception_fused::eval_forward) for "
            "torch.compile and torch.export, which replace TorchScript. Use "
            "torch.compile(model) or torch.export.export(model, ...), or script the plain "
            "PyTorch model from inception_fused.unfuse_googlenet / to_reference."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # While tracing, read the module afresh: a graph cannot check a cache.
        tracing = torch.compiler.is_compiling()
        layout = _layout(self) if tracing else self._layout()
        self._check_input(x, layout.first_conv.weight)
        if exporting_onnx():  # no ONNX runtime knows our op: see onnx_export.py
            return super().forward(x)
        compute_dtype, out_dtype = _dtypes(x)
        backend = self._resolve_backend(x, compute_dtype)
        if backend == "reference":
            return super().forward(x)
        training = self.training or any(bn.training for bn in layout.bns)
        if training and layout.syncs_batch_stats:
            # SyncBatchNorm shares batch statistics across processes, which only the
            # reference math does.
            return super().forward(x)
        tensors = dict_tensors(layout.tensor_dicts)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(t.requires_grad for t in tensors)
        )
        if training or needs_grad or not layout.tracks_running_stats:
            # Batch statistics or gradients: the Triton train kernels behind an autograd
            # op. The C++ backend is eval-only, so CPU training runs the reference math,
            # as do BN layers that disagree on train/eval mode and empty inputs.
            batch_stats = bn_batch_stats(self)
            if backend != "triton" or batch_stats is None or x.numel() == 0:
                return super().forward(x)
            return fused_train_forward(self, x, batch_stats)
        if tracing:  # fold inside the graph (Inductor's freezing makes it constants)
            f = fold_inception(self, compute_dtype)
        else:
            f = self._cached_fold(layout, tensors, compute_dtype)
        out = eval_forward(
            x if x.dtype == compute_dtype else x.to(compute_dtype), f, backend
        )
        return out if out_dtype == compute_dtype else out.to(out_dtype)

    def _resolve_backend(self, x: torch.Tensor, dtype: torch.dtype) -> str:
        """The backend for ``x`` computed in ``dtype``."""
        if self.backend == "reference":
            return "reference"
        if x.is_cuda:
            if self.backend == "cpu":
                raise RuntimeError("backend='cpu' runs CPU tensors, got a CUDA tensor")
            return "triton"
        if self.backend == "triton":
            if not interpreting():
                raise RuntimeError(
                    f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set "
                    f"before importing inception_fused to interpret the kernels on CPU; "
                    f"got a tensor on {x.device}"
                )
            if dtype not in CPU_DTYPES:
                raise TypeError(
                    f"the Triton interpreter on CPU runs float32 and float64, got {dtype}"
                )
            return "triton"
        if x.device.type != "cpu":
            raise RuntimeError(f"no fused backend for tensors on {x.device}")
        if dtype in CPU_DTYPES:
            return "cpu"
        if self.backend == "cpu":
            raise TypeError(
                f"the C++ CPU backend runs float32 and float64, got {dtype}; use "
                f"backend='reference' (or 'auto') for other dtypes on CPU"
            )
        return "reference"  # auto: no fused CPU kernel for this dtype

    def _check_input(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point input, got dtype {x.dtype}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        if x.device != weight.device:
            raise ValueError(
                f"input is on {x.device} but the module's parameters are on {weight.device}"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the module's parameter dtype "
                f"{weight.dtype}; convert one of them or use torch.autocast"
            )
