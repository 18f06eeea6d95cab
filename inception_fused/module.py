"""FusedInceptionModule: the drop-in nn.Module, its BN-folding cache and backend dispatch."""

from __future__ import annotations

import copy
import os
from typing import Any, NoReturn

import torch
from torch import nn

from .cpu import CPU_DTYPES
from .folding import FoldedInception, conv_blocks, fold_inception
from .kernels.launch import interpreting
from .library import eval_forward
from .onnx_export import exporting_onnx
from .reference import InceptionModule
from .training import bn_batch_stats, fused_train_forward

BACKENDS = ("auto", "triton", "cpu", "reference")


def _default_backend() -> str:
    return os.environ.get("INCEPTION_FUSED_BACKEND", "auto")


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
        self._fold_cache: tuple[tuple, FoldedInception] | None = None

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

        The key holds the storage address and version counter of every tensor the fold
        reads, looked up afresh on each call, so in-place edits, optimizer steps, replaced
        parameters, ``load_state_dict`` and ``.to()`` all invalidate it. (Direct attribute
        lookups: walking ``self.parameters()`` cost ~0.3 ms per call.)
        """
        key = (dtype,) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device)
            for t in _folded_tensors(self)
            if t is not None
        )
        if self._fold_cache is None or self._fold_cache[0] != key:
            with torch.no_grad():
                self._fold_cache = (key, fold_inception(self, dtype))
        return self._fold_cache[1]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_fold_cache"] = None  # never pickle derived weights: they would go stale
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
        self._check_input(x)
        if exporting_onnx():  # no ONNX runtime knows our op: see onnx_export.py
            return super().forward(x)
        backend = self._resolve_backend(x)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        if backend == "reference" or (self.training and self._syncs_batch_stats()):
            # SyncBatchNorm (convert_sync_batchnorm swapped our BNs) shares batch statistics
            # across processes, which only the reference math does.
            return super().forward(x)
        if self.training or needs_grad or not self._has_running_stats():
            # Batch statistics or gradients: the Triton train kernels behind an autograd
            # op. The C++ backend is eval-only, so CPU training runs the reference math,
            # as do BN layers that disagree on train/eval mode and empty inputs.
            batch_stats = bn_batch_stats(self)
            if backend != "triton" or batch_stats is None or x.numel() == 0:
                return super().forward(x)
            return fused_train_forward(self, x, batch_stats)
        if torch.compiler.is_compiling():
            # A traced graph cannot check the cache key (storage addresses): fold inside
            # the graph instead (Inductor's freezing turns it into constants).
            return eval_forward(x, fold_inception(self, x.dtype), backend)
        return eval_forward(x, self.folded(x.dtype), backend)

    def _syncs_batch_stats(self) -> bool:
        return any(isinstance(b.bn, nn.SyncBatchNorm) for b in conv_blocks(self))

    def _has_running_stats(self) -> bool:
        return all(
            b.bn is None or b.bn.running_mean is not None for b in conv_blocks(self)
        )

    def _resolve_backend(self, x: torch.Tensor) -> str:
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
            if x.dtype not in CPU_DTYPES:
                raise TypeError(
                    f"the Triton interpreter on CPU runs float32 and float64, got {x.dtype}"
                )
            return "triton"
        if x.device.type != "cpu":
            raise RuntimeError(f"no fused backend for tensors on {x.device}")
        if x.dtype in CPU_DTYPES:
            return "cpu"
        if self.backend == "cpu":
            raise TypeError(
                f"the C++ CPU backend runs float32 and float64, got {x.dtype}; use "
                f"backend='reference' (or 'auto') for other dtypes on CPU"
            )
        return "reference"  # auto: no fused CPU kernel for this dtype

    def _check_input(self, x: torch.Tensor) -> None:
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
        weight = self.branch1.conv.weight
        if x.device != weight.device:
            raise ValueError(
                f"input is on {x.device} but the module's parameters are on {weight.device}"
            )
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input dtype {x.dtype} does not match the module's parameter dtype "
                f"{weight.dtype}; convert one of them or use torch.autocast"
            )


def _folded_tensors(module: InceptionModule) -> list[torch.Tensor | None]:
    """Every tensor fold_inception reads (None where a layer has no such tensor)."""
    tensors = []
    for block in conv_blocks(module):
        tensors += [block.conv.weight, block.conv.bias]
        if block.bn is not None:
            bn = block.bn
            tensors += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tensors
