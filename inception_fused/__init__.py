"""GoogLeNet's Inception module as a few fused Triton kernels, drop-in for PyTorch."""

from .fold_cache import refold
from .googlenet import (
    AUX_LOSS_WEIGHT,
    TorchvisionFusedInception,
    fuse_googlenet,
    googlenet,
    googlenet_loss,
    to_reference,
    unfuse_googlenet,
)
from .module import FusedInceptionModule
from .reference import InceptionModule

__all__ = [
    "AUX_LOSS_WEIGHT",
    "FusedInceptionModule",
    "InceptionModule",
    "TorchvisionFusedInception",
    "fuse_googlenet",
    "googlenet",
    "googlenet_loss",
    "refold",
    "to_reference",
    "unfuse_googlenet",
]
