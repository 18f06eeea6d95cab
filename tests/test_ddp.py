"""DistributedDataParallel: two CPU processes (gloo), fused GoogLeNet vs torchvision's.

Each process trains both models on its own data for a few steps and checks, step by step,
that the fused model's gradients, parameters and BN buffers equal the reference's. On
the C++ backend train mode runs the reference math, so the steps check DDP's wiring of
the fused blocks (gradient hooks, all-reduce, per-process buffers), not our train
kernels (tests/test_googlenet.py trains through them); the eval forward after training
is the fused kernels'. (On GPUs the same training code runs under
init_process_group("nccl"), one device per process; that is not tested here.)
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_sees_input, googlenet_that_sees_input
from torch.nn.parallel import DistributedDataParallel as DDP

from inception_fused import fuse_googlenet, googlenet_loss

WORLD = 2
STEPS = 3
# Gradients pass through ~60 layers and an all-reduce: agree to float32 rounding.
TOL = {"atol": 1e-5, "rtol": 1e-4}

pytestmark = pytest.mark.skipif(
    not dist.is_available(), reason="torch.distributed is not built"
)


def models(sync_bn: bool):
    ref = googlenet_that_sees_input(aux_logits=True).train()
    fused = fuse_googlenet(ref, inplace=False, backend="cpu")
    if sync_bn:
        ref, fused = map(torch.nn.SyncBatchNorm.convert_sync_batchnorm, (ref, fused))
    return ref, fused


def rank_batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)  # different data per process
    return torch.randn(2, 3, 64, 64, generator=g), torch.randint(
        0, 10, (2,), generator=g
    )


def train_and_compare(rank: int) -> None:
    ref, fused = models(sync_bn=False)
    ddp_ref, ddp_fused = DDP(ref), DDP(fused)
    opts = [
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)
    ]
    for step in range(STEPS):
        x, y = rank_batch(rank, step)
        for model, opt in zip((ddp_ref, ddp_fused), opts, strict=True):
            torch.manual_seed(step)  # the same dropout masks in both models
            opt.zero_grad()
            googlenet_loss(model(x), y).backward()
        named = list(fused.named_parameters())
        for (name, p), q in zip(named, ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, **TOL, msg=f"step {step} {name}")
        for opt in opts:
            opt.step()
        for (name, p), q in zip(named, ref.parameters(), strict=True):
            torch.testing.assert_close(p, q, **TOL, msg=f"step {step} {name}")
        for (name, a), b in zip(fused.named_buffers(), ref.buffers(), strict=True):
            torch.testing.assert_close(a, b, **TOL, msg=f"step {step} {name}")
    # Parameters stay in sync across processes; BN statistics stay per process.
    mean = fused.inception4a.branch2[0].bn.running_mean
    weight = fused.inception4a.branch2[0].conv.weight.detach()
    means = [torch.empty_like(mean) for _ in range(WORLD)]
    dist.all_gather(means, mean)
    weights = [torch.empty_like(weight) for _ in range(WORLD)]
    dist.all_gather(weights, weight)
    assert torch.equal(weights[0], weights[1])
    assert not torch.allclose(means[0], means[1])
    # The trained model's eval forward (the fused kernels) still matches.
    x, _ = rank_batch(rank, STEPS)
    assert_sees_input(ref.eval(), x, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), **TOL)


def sync_batchnorm_is_honoured(rank: int) -> None:
    """SyncBatchNorm in fused blocks runs PyTorch's SyncBatchNorm (the reference math).

    On CPU PyTorch's SyncBatchNorm refuses to sync (DDP refuses it outright); a fused block
    must reach that same refusal, proof that it takes the synced path rather than computing
    per-process statistics. On GPUs that path trains. Eval folds the BNs as usual.
    """
    ref, fused = models(sync_bn=True)
    assert isinstance(fused.inception3a.branch1.bn, torch.nn.SyncBatchNorm)
    x = torch.randn(2, 192, 8, 8)
    for block in (ref.inception3a, fused.inception3a):
        with pytest.raises(ValueError, match="SyncBatchNorm expected input"):
            block.train()(x)
    x, _ = rank_batch(rank, 0)
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), ref.eval()(x), **TOL)


def worker(rank: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD
    )
    try:
        torch.set_num_threads(1)  # two processes on a small machine
        train_and_compare(rank)
        sync_batchnorm_is_honoured(rank)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_dispatch_and_sync(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "rendezvous"),), nprocs=WORLD, join=True)
