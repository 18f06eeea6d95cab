"""torch.save / torch.load of fused models and state dicts; no folded weights in pickles."""

import copy
import io
import pickle

import torch
from conftest import TOLERANCES, assert_sees_input, googlenet_that_sees_input

from inception_fused import FusedInceptionModule, fuse_googlenet

X = torch.randn(1, 3, 64, 64)


def fused_googlenet(seed=0):
    """Checked to see its input (torchvision's forward, before fusing): the logits of a
    model that lost a tensor in a round trip must differ, as those of another input do."""
    model = googlenet_that_sees_input(seed, aux_logits=True)
    assert_sees_input(model, X, *TOLERANCES[torch.float32])
    return fuse_googlenet(model, backend="cpu")


def blocks(model):
    return [m for m in model.modules() if isinstance(m, FusedInceptionModule)]


def run(model):
    with torch.no_grad():
        return model(X)


def round_trip(obj, **load_kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, **load_kwargs)


def test_state_dict_round_trip_weights_only():
    model = fused_googlenet()
    expected = run(model)  # fills every block's fold cache
    state = round_trip(model.state_dict(), weights_only=True)
    other = fused_googlenet(seed=1)
    run(other)  # a stale cache that the load must invalidate
    other.load_state_dict(state)
    torch.testing.assert_close(run(other), expected, atol=0, rtol=0)


def test_whole_model_round_trip_drops_fold_caches():
    model = fused_googlenet()
    expected = run(model)
    assert all(b._fold_cache.value is not None for b in blocks(model))
    loaded = round_trip(model, weights_only=False)
    assert all(b._fold_cache.value is None for b in blocks(loaded))
    assert all(b.backend == "cpu" and not b.training for b in blocks(loaded))
    torch.testing.assert_close(run(loaded), expected, atol=0, rtol=0)
    # The loaded model folds its own tensors: edits after loading take effect.
    with torch.no_grad():
        for m in (model, loaded):
            m.inception4c.branch3[1].bn.running_var.mul_(9.0)
    torch.testing.assert_close(run(loaded), run(model), atol=0, rtol=0)


def test_pickle_and_deepcopy_carry_no_folded_weights():
    block = blocks(fused_googlenet())[0]
    size_without_cache = len(pickle.dumps(block))
    with torch.no_grad():
        block(torch.randn(1, block.in_channels, 4, 4))
    assert block._fold_cache.value is not None
    assert len(pickle.dumps(block)) == size_without_cache
    assert copy.deepcopy(block)._fold_cache.value is None
