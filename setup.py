"""inception_fused: GoogLeNet's Inception module as fused Triton kernels (+ a C++ CPU backend).

The CPU extension needs torch at build time: install with
``pip install --no-build-isolation -e .`` (the Makefile does).
"""

import glob
import os

from setuptools import find_packages, setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources:
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The kernels twice on x86-64: a baseline build (SSE2, runs on every x86-64 CPU) and
    # an AVX2 + FMA one; inception_fused/cpu.py loads the one the CPU runs.
    variants = {"_C": ["-Wno-psabi"]}
    if os.uname().machine == "x86_64":
        variants["_C_avx2"] = ["-mavx2", "-mfma"]
    for name, flags in variants.items():
        ext_modules.append(
            CppExtension(
                f"inception_fused.{name}",
                sources,
                extra_compile_args=["-O3", "-fopenmp", *flags],
                extra_link_args=["-fopenmp"],
            )
        )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(
    name="inception_fused",
    version="0.1.0",
    description="GoogLeNet's Inception module as fused Triton kernels, drop-in for PyTorch",
    packages=find_packages(include=["inception_fused", "inception_fused.*"]),
    # The GPU tiles per shape (kernels/tiles.py).
    package_data={"inception_fused.kernels": ["tile_table.json"]},
    python_requires=">=3.10",
    # Oldest stack tested (make test-oldest, README "Supported versions"): torch 2.7.1
    # with the triton 3.3.1 it pins; torch 2.6's custom_op cannot read our annotations.
    install_requires=["torch>=2.7", "torchvision>=0.22"],
    extras_require={
        "test": [
            "pytest",
            "numpy",
            "hypothesis",
            "onnx",
            "onnxscript",
            "onnxruntime",
        ],
        "bench": [
            "matplotlib",
            "numpy",
            "onnx",
            "onnxscript",
            "onnxruntime",
            "openvino",
        ],
        "dev": ["ruff>=0.6"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
