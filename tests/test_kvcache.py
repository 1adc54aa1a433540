"""Cache layers that append in place behave exactly as transformers' concatenating ones."""

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from erc_llm.kvcache import MIN_ROOM, GrowingLayer, GrowingSlidingLayer, new_cache


@pytest.mark.parametrize("window", [None, 5, 40])
def test_growing_layers_return_and_keep_what_transformers_layers_do(window):
    torch.manual_seed(0)
    ours = GrowingLayer() if window is None else GrowingSlidingLayer(sliding_window=window)
    ref = DynamicLayer() if window is None else DynamicSlidingWindowLayer(sliding_window=window)
    seen = []
    for n in [1, 7, 3, 30, 1, 2, 64, 9, 17, 1, 100]:  # past MIN_ROOM and every window: buffers grow and move
        k, v = torch.randn(1, 2, n, 4), torch.randn(1, 2, n, 4)
        got, want = ours.update(k, v), ref.update(k.clone(), v.clone())
        seen.append((got, [w.clone() for w in want]))
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)
        assert ours.get_seq_length() == ref.get_seq_length()
        assert ours.get_mask_sizes(3) == ref.get_mask_sizes(3)
    for got, want in seen:  # what an update returned is never overwritten by later updates
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert ours.get_seq_length() > MIN_ROOM


def test_a_copy_grows_on_its_own_and_assigning_keys_restarts_the_buffer():
    layer = GrowingLayer()
    layer.update(torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2))
    twin = copy.deepcopy(layer)
    twin.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert layer.get_seq_length() == 3 and twin.get_seq_length() == 5
    assert torch.equal(layer.keys, torch.ones(1, 1, 3, 2))
    twin.crop(-4)  # transformers' crop assigns keys and values
    assert twin.get_seq_length() == 1
    k, _ = twin.update(torch.full((1, 1, 1, 2), 7.0), torch.full((1, 1, 1, 2), 7.0))
    assert k[0, 0, :, 0].tolist() == [1.0, 7.0]


def test_new_cache_has_a_growing_layer_of_the_right_kind_per_model_layer(tiny_model):
    cfg = tiny_model.config
    kinds = [type(x) for x in new_cache(cfg).layers]
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    assert kinds == [GrowingSlidingLayer if t == "sliding_attention" else GrowingLayer for t in types]
