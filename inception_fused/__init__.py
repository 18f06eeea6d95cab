"""GoogLeNet's Inception module as a few fused Triton kernels, drop-in for PyTorch."""

from .module import FusedInceptionModule
from .reference import InceptionModule

__all__ = ["FusedInceptionModule", "InceptionModule"]
