"""Whole networks: swap torchvision's GoogLeNet onto the fused blocks, and back.

* :func:`fuse_googlenet` replaces every Inception block of a built model (pretrained
  weights loaded or not) by a :class:`FusedInceptionModule` holding the same tensors,
  and makes a torchvision ``GoogLeNet`` a :class:`~inception_fused.network.FusedGoogLeNet`,
  whose eval forward on CPU runs the whole network as one C++ call (network.py).
* :class:`TorchvisionFusedInception` goes into ``torchvision.models.GoogLeNet(blocks=...)``.
* :func:`unfuse_googlenet` / :func:`to_reference` restore plain PyTorch blocks.
* :func:`googlenet` builds the paper's network (5x5 branch, two auxiliary heads) for
  training from scratch, with :func:`googlenet_loss` weighting the heads by 0.3.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.googlenet import (
    BasicConv2d,
    GoogLeNet,
    GoogLeNetOutputs,
    Inception,
    InceptionAux,
)

from .folding import conv_blocks
from .module import FusedInceptionModule
from .network import FusedGoogLeNet
from .reference import InceptionModule

# "During training, their loss gets added to the total loss of the network with a
# discount weight (the losses of the auxiliary classifiers were weighted by 0.3)."
# (arXiv 1409.4842, section 5)
AUX_LOSS_WEIGHT = 0.3


class TorchvisionFusedInception(FusedInceptionModule):
    """:class:`FusedInceptionModule` with torchvision's Inception signature and 3x3 branch 3.

    For ``torchvision.models.GoogLeNet(blocks=[BasicConv2d, TorchvisionFusedInception,
    InceptionAux])``: the model then has torchvision's state-dict keys and loads its
    pretrained weights. ``conv_block`` is accepted and ignored, as torchvision passes it.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        conv_block: Any = None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            ch1x1,
            ch3x3red,
            ch3x3,
            ch5x5red,
            ch5x5,
            pool_proj,
            branch3_kernel=3,
            backend=backend,
        )


def _swap_blocks(
    model: nn.Module, swap: Callable[[nn.Module], nn.Module], kinds: tuple[type, ...]
) -> int:
    """Replace every submodule that is an instance of ``kinds`` by ``swap(submodule)``."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, kinds):
                setattr(parent, name, swap(child))
                swapped += 1
    return swapped


def fuse_googlenet(
    model: nn.Module, *, inplace: bool = True, backend: str | None = None
) -> nn.Module:
    """Replace every Inception block of ``model`` by a :class:`FusedInceptionModule`.

    Works on ``torchvision.models.googlenet`` (any ``aux_logits``/``transform_input``,
    with or without ``weights=``) and on any model holding torchvision ``Inception`` or
    our :class:`InceptionModule` blocks. The fused blocks hold the same parameter and buffer
    tensors (``inplace=False`` swaps a deep copy instead), so device, dtype, train/eval
    mode, state-dict keys and the model's predictions are unchanged. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)

    def fuse(block: nn.Module) -> FusedInceptionModule:
        if isinstance(block, FusedInceptionModule):
            return block
        return FusedInceptionModule.from_module(
            block, share_parameters=True, backend=backend
        )

    kinds = (Inception, InceptionModule)
    if not _swap_blocks(model, fuse, kinds):
        raise ValueError(
            f"found no Inception block to fuse in {type(model).__name__} (looked for "
            f"torchvision.models.googlenet.Inception and inception_fused.InceptionModule)"
        )
    if type(model) is GoogLeNet:  # subclasses keep their own forward
        model.__class__ = FusedGoogLeNet
    return model


def to_reference(block: FusedInceptionModule) -> nn.Module:
    """The plain PyTorch block holding ``block``'s tensors (shared, not copied).

    torchvision's ``Inception`` where it fits (3x3 branch 3, with BatchNorm: what
    :func:`fuse_googlenet` converts from), our :class:`InceptionModule` otherwise.
    """
    blocks = conv_blocks(block)
    sizes = (block.in_channels, *(b.conv.out_channels for b in blocks))
    c_in, c1, r3, r5, c3, c5, pool = sizes  # conv_blocks order: reduces before convs
    args = (c_in, c1, r3, c3, r5, c5, pool)
    with torch.device("meta"):  # skeleton only: its tensors are replaced below
        if block.branch3_kernel == 3 and block.batch_norm:
            plain = Inception(*args)
        else:
            plain = InceptionModule(
                *args, branch3_kernel=block.branch3_kernel, batch_norm=block.batch_norm
            )
    for ours, theirs in zip(conv_blocks(plain), blocks, strict=True):
        ours.conv = theirs.conv
        ours.bn = theirs.bn
    return plain.train(block.training)


def unfuse_googlenet(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Undo :func:`fuse_googlenet`: every fused block becomes :func:`to_reference` of it."""
    if not inplace:
        model = copy.deepcopy(model)
    _swap_blocks(model, to_reference, (FusedInceptionModule,))
    if type(model) is FusedGoogLeNet:
        model.__dict__.pop("_network_plan", None)
        model.__dict__.pop("_plan_cache", None)
        model.__class__ = GoogLeNet
    return model


def googlenet(
    num_classes: int = 1000,
    *,
    aux_logits: bool = True,
    transform_input: bool = False,
    dropout: float = 0.4,
    dropout_aux: float = 0.7,
    backend: str | None = None,
) -> FusedGoogLeNet:
    """The paper's GoogLeNet (arXiv 1409.4842, Table 1 and Fig. 3) on fused blocks.

    As in the paper: a 5x5 conv in every Inception block's third branch, two auxiliary
    classifiers on 4a and 4d (5x5/3 average pool to 4x4, 1x1 conv with 128 filters, FC 1024,
    70% dropout, FC to the classes) that run in train mode only, 40% dropout before the
    last FC. Train with :func:`googlenet_loss`, which adds the auxiliary losses weighted by
    0.3. As in torchvision (whose ``GoogLeNet`` class this builds, so its forward, outputs
    and weight initialisation apply), every conv is followed by BatchNorm instead of the
    paper's local response normalisation.

    Returns a :class:`~inception_fused.network.FusedGoogLeNet` (a
    ``torchvision.models.GoogLeNet``); in train mode with ``aux_logits`` its
    forward returns ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)``.
    """

    def inception(*channels: int) -> FusedInceptionModule:
        return FusedInceptionModule(*channels, branch3_kernel=5, backend=backend)

    return FusedGoogLeNet(
        num_classes=num_classes,
        aux_logits=aux_logits,
        transform_input=transform_input,
        init_weights=True,
        blocks=[BasicConv2d, inception, InceptionAux],
        dropout=dropout,
        dropout_aux=dropout_aux,
    )


def googlenet_loss(
    outputs: GoogLeNetOutputs | torch.Tensor,
    target: torch.Tensor,
    aux_weight: float = AUX_LOSS_WEIGHT,
) -> torch.Tensor:
    """Cross-entropy of the logits plus ``aux_weight`` x that of each auxiliary head.

    Takes what a GoogLeNet's forward returns: ``GoogLeNetOutputs`` in train mode with
    auxiliary heads, a logits tensor otherwise (then the plain cross-entropy).
    """
    if isinstance(outputs, torch.Tensor):
        return F.cross_entropy(outputs, target)
    loss = F.cross_entropy(outputs.logits, target)
    for aux in (outputs.aux_logits1, outputs.aux_logits2):
        if aux is not None:
            loss = loss + aux_weight * F.cross_entropy(aux, target)
    return loss
