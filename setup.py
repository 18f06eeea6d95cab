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

    # One kernel source built per x86-64 ISA (csrc/gemm.h takes its vector width and
    # register blocking from these flags): baseline (SSE2, runs on every x86-64 CPU),
    # AVX2 + FMA and AVX-512; inception_fused/cpu.py loads the best one the CPU runs.
    variants = {"_C": []}
    if os.uname().machine == "x86_64":
        variants["_C_avx2"] = ["-mavx2", "-mfma"]
        variants["_C_avx512"] = [
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
        ]
    for name, flags in variants.items():
        ext_modules.append(
            CppExtension(
                f"inception_fused.{name}",
                sources,
                # Hidden symbols: a process imports the baseline build and another,
                # whose kernels share C++ names but not instructions.
                extra_compile_args=["-O3", "-fopenmp", "-fvisibility=hidden", *flags],
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
            # Inception-v3's FID networks (tests/test_inception_v3.py)
            "pytorch-fid",
            "torch-fidelity",
            "torchmetrics",
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
