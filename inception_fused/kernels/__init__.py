"""Triton kernel families, one file each with its launcher."""
