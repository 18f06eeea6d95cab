"""FoldCache: rebuilt on every way a watched tensor can change that PyTorch lets us see."""

import copy
import pickle

import pytest
import torch
from torch import nn

from inception_fused.fold_cache import FoldCache, invalidate_all, module_tensors


class Counter:
    """A build function that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        return self.calls


def watched() -> tuple[FoldCache, Counter, list[torch.Tensor | None]]:
    cache, build = FoldCache(), Counter()
    tensors = [nn.Parameter(torch.randn(4)), None, torch.zeros(4)]
    cache.get(tensors, build)
    return cache, build, tensors


def test_reused_while_nothing_changes():
    cache, build, tensors = watched()
    assert cache.get(tensors, build) == 1
    assert cache.get(list(tensors), build) == 1


@pytest.mark.parametrize(
    "change",
    ["inplace", "replaced", "extra_key", "invalidate_all", "clear", "none_to_tensor"],
)
def test_rebuilt_on_change(change):
    cache, build, tensors = watched()
    extra_key = ()
    if change == "inplace":
        tensors[2].add_(1)
    elif change == "replaced":
        tensors[0] = nn.Parameter(tensors[0].detach().clone())
    elif change == "extra_key":
        extra_key = (torch.float64,)
    elif change == "invalidate_all":
        invalidate_all()
    elif change == "clear":
        cache.clear()
    elif change == "none_to_tensor":
        tensors[1] = torch.zeros(1)
    assert cache.get(tensors, build, extra_key) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.Adam(ps, fused=True),
        lambda ps: torch.optim.AdamW(ps, fused=True),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, fused=True),
        lambda ps: torch.optim.Adagrad(ps, fused=True),
        lambda ps: torch.optim.Adam(ps, foreach=True),
    ],
    ids=["adam_fused", "adamw_fused", "sgd_fused", "adagrad_fused", "adam_foreach"],
)
def test_rebuilt_after_optimizer_step(make):
    cache, build, tensors = watched()
    p = tensors[0]
    p.grad = torch.ones_like(p)
    make([p]).step()
    assert cache.get(tensors, build) == 2


def test_fused_optimizer_step_leaves_version_alone():
    # Why the step hook exists: a check on _version alone would miss this step.
    p = nn.Parameter(torch.randn(4))
    p.grad = torch.ones_like(p)
    version = p._version
    torch.optim.Adam([p], fused=True).step()
    assert p._version == version


def test_other_optimizers_steps_do_not_rebuild():
    cache, build, tensors = watched()
    other = nn.Parameter(torch.randn(3))
    other.grad = torch.ones_like(other)
    torch.optim.SGD([other], lr=0.1).step()
    assert cache.get(tensors, build) == 1


def test_rebuilt_after_falling_behind_the_event_log():
    cache, build, tensors = watched()
    other = nn.Parameter(torch.randn(3))
    other.grad = torch.ones_like(other)
    opt = torch.optim.SGD([other], lr=0.1)
    for _ in range(100):  # more events than the log keeps: assume the worst
        opt.step()
    assert cache.get(tensors, build) == 2


def test_batch_norm_train_forward_seen_through_num_batches_tracked():
    bn = nn.BatchNorm2d(3)
    cache, build = FoldCache(), Counter()
    cache.get(module_tensors([bn]), build)
    mean_version = bn.running_mean._version
    bn(torch.randn(2, 3, 4, 4))
    assert bn.running_mean._version == mean_version  # why nbt is watched
    assert cache.get(module_tensors([bn]), build) == 2


def test_inference_tensors_compared_by_identity():
    with torch.inference_mode():
        conv = nn.Conv2d(2, 2, 1)
    cache, build = FoldCache(), Counter()
    assert cache.get(module_tensors([conv]), build) == 1
    assert cache.get(module_tensors([conv]), build) == 1
    with torch.inference_mode():
        conv.weight = nn.Parameter(torch.randn(2, 2, 1, 1))
    assert cache.get(module_tensors([conv]), build) == 2


@pytest.mark.parametrize(
    "copier", [copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))]
)
def test_copies_start_empty(copier):
    cache, build, tensors = watched()
    clone = copier(cache)
    assert clone.get(tensors, build) == 2
