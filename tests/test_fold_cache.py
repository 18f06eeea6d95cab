"""FoldCache, and the fused module's folded weights: never stale after any of the ways
weights and statistics change (issue 16), on the C++ backend and the Triton interpreter."""

import copy
import pickle

import pytest
import torch
from conftest import assert_close, make_reference
from torch import nn

from inception_fused import FusedInceptionModule, InceptionModule, refold
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


# ------------------------------------------------------------------ the module's cache
# Each case below gave stale eval outputs before the fold cache watched optimizer steps,
# num_batches_tracked, mode switches and moves (issue 16: max |fused - reference| up to
# 19.5); each runs on the C++ backend and the Triton interpreter.

CHANNELS = (16, 4, 6, 8, 2, 4, 4)
BACKENDS = ["cpu", "triton"]


def module_pair(backend: str) -> tuple[FusedInceptionModule, InceptionModule]:
    ref = make_reference(*CHANNELS).eval()
    return FusedInceptionModule.from_module(ref, backend=backend), ref


def assert_eval_matches(fused: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert_close(fused(x), ref(x))


def set_same_grads(fused: nn.Module, ref: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()


OPTIMIZERS = {
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.05, fused=True),
    "sgd_momentum_fused": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, fused=True
    ),
    "adagrad_fused": lambda ps: torch.optim.Adagrad(ps, lr=0.1, fused=True),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=0.05, foreach=True),
    "sgd_momentum_foreach": lambda ps: torch.optim.SGD(
        ps, lr=0.1, momentum=0.9, foreach=True
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_optimizer_steps_in_eval_mode_refold(backend, optimizer):
    # Frozen-BN fine-tuning validates without a mode switch: only the step tells.
    fused, ref = module_pair(backend)
    x = torch.randn(2, 16, 5, 5)
    opts = [OPTIMIZERS[optimizer](list(m.parameters())) for m in (fused, ref)]
    for step in range(2):
        assert_eval_matches(fused, ref, x)
        set_same_grads(fused, ref, seed=step)
        for opt in opts:
            opt.step()
    assert_eval_matches(fused, ref, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_then_validate_over_epochs(backend):
    # The common loop: train-mode forwards (the C++ backend runs F.batch_norm, which
    # updates running stats without a version bump) and fused Adam, then validation.
    fused, ref = module_pair(backend)
    opts = [torch.optim.Adam(m.parameters(), lr=0.05, fused=True) for m in (fused, ref)]
    g = torch.Generator().manual_seed(0)
    val = torch.randn(2, 16, 5, 5, generator=g)
    for _ in range(3):
        for m in (fused, ref):
            m.train()
        for _ in range(1 if backend == "triton" else 2):  # the interpreter is slow
            x = torch.randn(3, 16, 5, 5, generator=g)
            target = torch.randn(3, ref.out_channels, 5, 5, generator=g)
            for m, opt in zip((fused, ref), opts, strict=True):
                opt.zero_grad()
                torch.nn.functional.mse_loss(m(x), target).backward()
                opt.step()
        for m in (fused, ref):
            m.eval()
        assert_eval_matches(fused, ref, val)
    for (name, b), b_ref in zip(fused.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_batch_norm_trained_by_another_module(backend):
    # The reference, sharing its BNs, runs train-mode forwards while the fused block
    # stays in eval mode: num_batches_tracked's version is the only trace.
    ref = make_reference(*CHANNELS).eval()
    fused = FusedInceptionModule.from_module(
        ref, share_parameters=True, backend=backend
    )
    x = torch.randn(2, 16, 5, 5)
    assert_eval_matches(fused, ref, x)
    ref.train()
    with torch.no_grad():
        ref(torch.randn(4, 16, 5, 5) * 3 + 1)
    ref.eval()  # the reference's switch: the fused block is not told
    assert_eval_matches(fused, ref, x)


def _edit(edit: str, fused: nn.Module, ref: nn.Module) -> None:
    """Apply the same change to both modules, the fused one through ``edit``'s route."""
    with torch.no_grad():
        if edit == "inplace_weight":
            for m in (fused, ref):
                m.branch2[1].conv.weight.mul_(-1.5)
        elif edit == "data_weight_then_refold":
            for m in (fused, ref):
                m.branch2[1].conv.weight.data.mul_(-1.5)
            refold(fused)
        elif edit == "data_running_var_then_eval":
            for m in (fused, ref):
                m.branch3[0].bn.running_var.data.fill_(3.0)
            fused.eval()
        elif edit == "data_copy_then_refold_all":
            new = torch.randn_like(ref.branch4[1].conv.weight)
            for m in (fused, ref):
                m.branch4[1].conv.weight.data.copy_(new)
            refold()
        elif edit in ("load_state_dict", "load_state_dict_assign"):
            other = make_reference(*CHANNELS, seed=7)
            for m in (fused, ref):
                m.load_state_dict(other.state_dict(), assign=edit.endswith("assign"))
        elif edit == "replaced_parameter":
            new = torch.randn_like(ref.branch4[1].bn.weight)
            ref.branch4[1].bn.weight.copy_(new)
            fused.branch4[1].bn.weight = nn.Parameter(new.clone())
        elif edit == "replaced_batch_norm":
            new = make_reference(*CHANNELS, seed=3).branch2[0].bn
            ref.branch2[0].bn = copy.deepcopy(new)
            fused.branch2[0].bn = copy.deepcopy(new)
        elif edit == "half_and_back":
            for m in (fused, ref):
                m.half().float()
        else:
            raise AssertionError(edit)


EDITS = [
    "inplace_weight",
    "data_weight_then_refold",
    "data_running_var_then_eval",
    "data_copy_then_refold_all",
    "load_state_dict",
    "load_state_dict_assign",
    "replaced_parameter",
    "replaced_batch_norm",
    "half_and_back",
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edit", EDITS)
def test_edits_refold(backend, edit):
    fused, ref = module_pair(backend)
    x = torch.randn(2, 16, 5, 5)
    assert_eval_matches(fused, ref, x)  # fill the cache
    _edit(edit, fused, ref)
    assert_eval_matches(fused, ref, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_to_double_refolds(backend):
    fused, ref = module_pair(backend)
    x = torch.randn(2, 16, 5, 5)
    assert_eval_matches(fused, ref, x)
    with torch.no_grad():
        for m in (fused, ref):
            m.double()
            m.branch1.conv.weight.data.mul_(2.0)  # .data after the move: still seen
    assert_eval_matches(fused, ref, x.double())


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_uses_the_given_tensors(backend):
    # torch.func.functional_call swaps tensors straight into the modules' dicts.
    fused, ref = module_pair(backend)
    x = torch.randn(2, 16, 5, 5)
    assert_eval_matches(fused, ref, x)
    other = {k: v * 1.5 for k, v in ref.state_dict().items()}
    with torch.no_grad():
        expected = torch.func.functional_call(ref, other, (x,))
        assert_close(torch.func.functional_call(fused, other, (x,)), expected)
    assert_eval_matches(fused, ref, x)  # and back to the module's own


@pytest.mark.parametrize("backend", BACKENDS)
def test_built_and_run_under_inference_mode(backend):
    # Inference tensors have no version counter: reading it used to raise.
    ref = make_reference(*CHANNELS).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        expected = ref(x)
    with torch.inference_mode():
        fused = FusedInceptionModule.from_module(ref, backend=backend).eval()
        assert_close(fused(x), expected)
        assert_close(fused(x), expected)
        fused.double()
        assert_close(fused(x.double()), expected.double(), dtype=torch.float32)
    with torch.no_grad():  # inference tensors read outside inference mode
        assert_close(fused(x.double()), expected.double(), dtype=torch.float32)
