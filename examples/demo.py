"""make demo: every GoogLeNet Inception configuration, then whole networks swapped.

1. Each configuration at its real 28/14/7 feature map, reference vs fused with the same
   weights: max abs difference and time. On a GPU the Triton kernels (bfloat16, batch 32);
   without one the C++ CPU backend (float32, batch 8) against eager PyTorch on the same
   cores.
2. The main job: torchvision's GoogLeNet (fuse_googlenet, 224x224) and Inception-v3
   (fuse_inception_v3, 299x299) classifying a batch; logits against the original's, and
   the speedup.
"""

import os
import time

import torch
import torchvision
from torchvision.models import GoogLeNet_Weights, Inception_V3_Weights

ON_GPU = torch.cuda.is_available()

from inception_fused import (
    FusedInceptionModule,
    InceptionModule,
    cpu,
    fuse_googlenet,
    fuse_inception_v3,
)
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
        else f"CPU ({torch.get_num_threads()} threads), C++ backend build "
        f"{cpu.loaded_build()}"
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


# Logits of the swapped model vs the original, relative to max(|logit|, 1): float32 sums
# in another order; bfloat16 rounds every layer's output to 8 bits in both models.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


# name: (builder, ImageNet weights, the swap, image side)
NETWORKS = {
    "GoogLeNet": (torchvision.models.googlenet, GoogLeNet_Weights.IMAGENET1K_V1,
                  fuse_googlenet, 224),
    "Inception-v3": (torchvision.models.inception_v3, Inception_V3_Weights.IMAGENET1K_V1,
                     fuse_inception_v3, 299),
}  # fmt: skip


def cached(weights):
    """The weights if already downloaded (the demo never downloads), else None."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", weights.url.split("/")[-1])
    return weights if os.path.exists(path) else None


def network_swap(name: str) -> None:
    """A torchvision network, swapped onto fused layers, classifying a batch."""
    build, imagenet, swap, side = NETWORKS[name]
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    batch = 32 if ON_GPU else 4
    weights = cached(imagenet)
    torch.manual_seed(0)
    model = build(weights=weights, init_weights=False)
    if weights is None:  # He-initialised convs, BN statistics as trained weights have
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                elif isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    model = model.to(device, dtype, memory_format=torch.channels_last).eval()
    fused = swap(model, inplace=False)  # the swap

    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (torch.rand(batch, 3, side, side) - mean) / std  # normalised like ImageNet
    images = images.to(device, dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected, logits = model(images).float(), fused(images).float()
        reps = 30 if ON_GPU else 7
        for _ in range(2):  # warm up: oneDNN primitives, the fold caches
            model(images), fused(images)
        # Interleaved, so that load from other processes hits both alike.
        times = [
            (median_ms(lambda: model(images), 1), median_ms(lambda: fused(images), 1))
            for _ in range(reps)
        ]
    t_eager, t_fused = (sorted(t)[reps // 2] for t in zip(*times, strict=True))

    diff = (logits - expected).abs().max().item()
    scale = expected.abs().max().item()
    tolerance = LOGIT_TOLERANCE[dtype] * max(scale, 1.0)
    same_top1 = (logits.argmax(1) == expected.argmax(1)).float().mean().item()
    source = (
        "ImageNet weights" if weights else "random weights (no cached ImageNet weights)"
    )
    print(f"\ntorchvision {name}, {source}, {dtype}, batch {batch}x3x{side}x{side}")
    verdict = "equal within" if diff <= tolerance else "NOT equal within"
    print(
        f"  logits max|diff| {diff:.2e}: {verdict} {tolerance:.0e} "
        f"(max|logit| {scale:.2e}); same top-1 class for {same_top1:.0%} of the batch"
    )
    if diff > tolerance:
        raise SystemExit("the swapped model's logits differ from torchvision's")
    if weights is not None:
        names = weights.meta["categories"]
        top = [names[i] for i in logits.argmax(1)[:4].tolist()]
        print(f"  fused top-1 of the first images: {top}")
    # The whole network as one plan (GoogLeNet's, Inception-v3's program): one C++ call
    # on CPU, Triton launches on a GPU; else fused layers under torchvision's forward.
    plan = fused.__dict__.get("_network_plan") or getattr(
        fused.__dict__.get("_program_cache"), "value", None
    )
    how = "whole network, " + ("Triton launches" if ON_GPU else "one C++ call")
    how = how if plan is not None else "fused layers"
    print(
        f"  eager {t_eager:.2f} ms, fused ({how}) {t_fused:.2f} ms per batch: "
        f"{t_eager / t_fused:.2f}x speedup (channels_last, medians of {reps})"
    )


if __name__ == "__main__":
    main()
    for network in NETWORKS:
        network_swap(network)
