"""Compile the backward kernels for an sm_90 GPU, without one (see test_gpu_compile.py).

The interpreter never runs Triton's compiler, so type errors it alone would catch (bf16
promotion, tl.dot shapes, constexpr branches) would otherwise first show on a GPU.
"""

import inspect
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

# Pointers to tensors in the compute dtype; all others are accumulator-typed vectors.
DATA_POINTERS = {
    "dy_ptr",
    "z_ptr",
    "dz_ptr",
    "g_ptr",
    "w3t_ptr",
    "w5t_ptr",
    "z_red_ptr",
    "stem_wt_ptr",
    "pool_wt_ptr",
    "x_ptr",
    "gx_ptr",
}
TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}
DTYPES = (torch.bfloat16, torch.float64)  # fp32 shares the bf16 path


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


def compile_all() -> None:
    from inception_fused.kernels import train_backward as tb

    for dtype in DTYPES:
        use_dot = dtype != torch.float64
        conv = {  # as launch.tile_config picks them on the GPU (input grad: 64 rows)
            "BLOCK_M": 64 if use_dot else 32,
            "BLOCK_N": 64 if use_dot else 32,
            "BLOCK_K": (32 if dtype == torch.float32 else 64) if use_dot else 8,
            "USE_DOT": use_dot,
            "INPUT_PRECISION": "tf32" if dtype == torch.float32 else "ieee",
            "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        }
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels compile on the GPU")
def test_backward_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("compiled") == 6 * len(DTYPES)


if __name__ == "__main__":
    compile_all()
