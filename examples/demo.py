"""make demo: every GoogLeNet Inception configuration, reference vs fused, same weights.

Real 28/14/7 feature maps, max abs difference and time of each: on a GPU the Triton
kernels (bfloat16, batch 32); without one the C++ CPU backend (float32, batch 8) against
eager PyTorch on the same cores.
"""

import time

import torch

ON_GPU = torch.cuda.is_available()

from inception_fused import FusedInceptionModule, InceptionModule
from inception_fused.configs import GOOGLENET_CONFIGS


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        if ON_GPU:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if ON_GPU:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    batch = 32 if ON_GPU else 8
    where = (
        torch.cuda.get_device_name()
        if ON_GPU
        else f"CPU ({torch.get_num_threads()} threads), C++ backend"
    )
    print(f"inception_fused demo on {where}; dtype {dtype}, batch {batch}")
    print(
        f"{'config':>6} {'shape':>16} {'max|diff|':>10} {'eager ms':>9} {'fused ms':>9}"
        f" {'speedup':>8}"
    )
    for name, cfg in GOOGLENET_CONFIGS.items():
        torch.manual_seed(0)
        ref = InceptionModule(*cfg.channels).to(device, dtype).eval()
        ref = ref.to(memory_format=torch.channels_last)
        fused = FusedInceptionModule.from_module(ref).eval()
        side = cfg.spatial
        x = torch.randn(batch, cfg.in_channels, side, side, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            diff = (fused(x).float() - ref(x).float()).abs().max().item()
            reps = 50 if ON_GPU else 10
            for _ in range(2):  # warm up: oneDNN primitives, the fold cache
                ref(x), fused(x)
            t_ref = median_ms(lambda m=ref, x=x: m(x), reps)
            t_fused = median_ms(lambda m=fused, x=x: m(x), reps)
        shape = "x".join(map(str, x.shape))
        print(
            f"{name:>6} {shape:>16} {diff:>10.2e} {t_ref:>9.3f} {t_fused:>9.3f}"
            f" {t_ref / t_fused:>7.2f}x"
        )
    print("eager: the reference module in channels_last; times are medians (ms).")


if __name__ == "__main__":
    main()
