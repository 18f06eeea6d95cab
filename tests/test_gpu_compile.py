"""Compile the train-mode forward and the backward kernels for an sm_90 GPU, without one.

The interpreter runs the kernels' Python, not Triton's compiler, so errors only the
compiler sees (bf16 promotion, constexpr branches) would first show on a GPU. This builds
PTX and cubin ahead of time with the ptxas bundled in the Triton wheel, in a subprocess
because the test session imports the kernels in interpreter mode. Where a GPU is present
the other tests compile every kernel for real, so this file is skipped there.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

from inception_fused.kernels.launch import tile_config

# Pointers to activations, weights and their gradients (the compute dtype); every other
# pointer is a vector or a partials matrix in the accumulator dtype.
DATA_POINTERS = {
    "x_ptr",
    "stem_w_ptr",
    "pool_w_ptr",
    "out_ptr",
    "scratch_ptr",
    "red_ptr",
    "w3_ptr",
    "w5_ptr",
    "z_ptr",
    "dy_ptr",
    "dz_ptr",
    "g_ptr",
    "w3t_ptr",
    "w5t_ptr",
    "z_red_ptr",
    "stem_wt_ptr",
    "pool_wt_ptr",
    "gx_ptr",
}
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
DTYPES = (torch.bfloat16, torch.float64)  # fp32 shares the bf16 code path


def compile_for_sm90(kernel, dtype: torch.dtype, **constexprs) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    acc = "fp64" if dtype == torch.float64 else "fp32"
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = f"*{TRITON_TYPE[dtype] if name in DATA_POINTERS else acc}"
        else:
            signature[name] = "i32"
    source = ASTSource(kernel, signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["ptx"]
    print(kernel.fn.__name__, dtype, "compiled", flush=True)


def compile_forward() -> int:
    """Train variants of the forward kernels, and bf16 eval pointwise; returns the count."""
    from inception_fused.kernels.batch_norm import (
        bn_relu_pass_kernel,
        finalize_stats_kernel,
    )
    from inception_fused.kernels.pointwise import inception_pointwise_kernel
    from inception_fused.kernels.spatial import inception_spatial_kernel

    for dtype in DTYPES:
        acc = tl.float64 if dtype == torch.float64 else tl.float32
        train = {"TRAIN": True, "STATS": True, **conv_constexprs(dtype)}
        compile_for_sm90(inception_pointwise_kernel, dtype, **train)
        compile_for_sm90(inception_spatial_kernel, dtype, IN_BN=True, **train)
        compile_for_sm90(
            finalize_stats_kernel, dtype, BLOCK_M=64, BLOCK_T=64, BLOCK_C=64, ACC=acc
        )
        compile_for_sm90(
            bn_relu_pass_kernel, dtype, BN=True, BLOCK_M=32, BLOCK_C=128, ACC=acc
        )
    evaluation = {"TRAIN": False, "STATS": False, **conv_constexprs(torch.bfloat16)}
    compile_for_sm90(inception_pointwise_kernel, torch.bfloat16, **evaluation)
    return 4 * 2 + 1


def compile_backward() -> int:
    """Every backward kernel in bf16 and fp64; returns the count."""
    from inception_fused.kernels import train_backward as tb

    for dtype in DTYPES:
        conv = conv_constexprs(dtype)
        pointwise = {"BLOCK_M": 64, "BLOCK_N": 64}
        compile_for_sm90(tb.relu_bn_partials_kernel, dtype, HAS_BN=True, **pointwise)
        compile_for_sm90(tb.partials_finalize_kernel, dtype, BLOCK_T=64, BLOCK_N=64)
        for has_bn in (True, False):
            compile_for_sm90(
                tb.relu_bn_apply_kernel,
                dtype,
                HAS_BN=has_bn,
                BATCH_STATS=has_bn,
                **pointwise,
            )
        compile_for_sm90(tb.reduce_grad_kernel, dtype, HAS_BN=True, **conv)
        compile_for_sm90(tb.input_grad_kernel, dtype, **conv)
    return 6 * len(DTYPES)


def conv_constexprs(dtype: torch.dtype) -> dict:
    """Conv tile constexprs as launch.tile_config picks them on the GPU."""
    cfg = tile_config(dtype, 4096, 64, 256, on_gpu=True)
    return {
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "USE_DOT": cfg.use_dot,
        "INPUT_PRECISION": "ieee",
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
    }


STAGES = {"forward": compile_forward, "backward": compile_backward}


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels compile on the GPU")
@pytest.mark.parametrize("stage", STAGES)
def test_kernels_compile_for_sm90(stage):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__), stage],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    expected = run.stdout.strip().splitlines()[-1]
    assert expected.startswith("expected ")
    assert run.stdout.count(" compiled") == int(expected.split()[1])


if __name__ == "__main__":
    print(f"expected {STAGES[sys.argv[1]]()}")
