"""Triton kernel families, one file each with its launcher."""

from .interpreter_compat import patch_interpreter_index

patch_interpreter_index()
