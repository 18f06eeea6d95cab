"""GoogLeNet's and Inception-v3's Inception blocks as fused kernels, drop-in for PyTorch."""

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
from .inception_v3 import fuse_inception_v3, unfuse_inception_v3
from .module import FusedInceptionModule
from .reference import InceptionModule

__all__ = [
    "AUX_LOSS_WEIGHT",
    "FusedInceptionModule",
    "InceptionModule",
    "TorchvisionFusedInception",
    "fuse_googlenet",
    "fuse_inception_v3",
    "googlenet",
    "googlenet_loss",
    "refold",
    "to_reference",
    "unfuse_googlenet",
    "unfuse_inception_v3",
]
