"""The KV cache of a dialogue being labelled turn by turn: transformers' ``DynamicCache`` whose layers append in place.

A ``DynamicLayer`` stores a turn's new keys and values with ``torch.cat``, which copies everything the layer already
holds: over a dialogue that is quadratic copying, and in a batched server forward over 40 dialogues the copies were
12% of the time (one ``cat`` per dialogue, layer and keys/values). The layers here keep keys and values in buffers
with spare room along the sequence axis and write the new tokens after the last ones; a full buffer is doubled
(full-attention layers) or its last ``window - 1`` tokens move to the front of a new one (sliding-window layers),
so each token is copied a constant number of times on average. ``keys`` / ``values`` are views of the filled part
and everything else (``get_seq_length``, masks, ``crop``, deep copies) is transformers' own: assigning ``keys`` or
``values`` (as ``crop`` does) starts the buffer from that tensor.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

MIN_ROOM = 64  # tokens a buffer holds at least when it is (re)allocated


class _Filled:
    """The ``keys`` or ``values`` attribute of a growing layer: the filled part ``[start, end)`` of its buffer."""

    def __set_name__(self, owner, name: str):
        self.slot = f"_{name}_buffer"

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        buf, start, end = layer.__dict__.get(self.slot, (None, 0, 0))
        return buf if buf is None or buf.dim() != 4 else buf[:, :, start:end]

    def __set__(self, layer, value) -> None:
        layer.__dict__[self.slot] = (value, 0, value.shape[-2] if value is not None and value.dim() == 4 else 0)


def _append(layer, slot: str, new: torch.Tensor, keep: int | None) -> torch.Tensor:
    """Write ``new`` after the filled part of ``layer``'s buffer ``slot``; returns the filled part with it. ``keep``:
    how many of the last tokens stay filled afterwards (a sliding window), or None for all of them."""
    buf, start, end = layer.__dict__[slot]
    if buf is None or buf.dim() != 4:
        buf, start, end = None, 0, 0
    n = new.shape[-2]
    if buf is None or buf.shape[-2] < end + n:
        held = end - start
        room = max(MIN_ROOM, 2 * (held + n))
        grown = new.new_empty(*new.shape[:2], room, new.shape[-1])
        if held:
            grown[:, :, :held] = buf[:, :, start:end]
        buf, start, end = grown, 0, held
    buf[:, :, end:end + n] = new
    seen = buf[:, :, start:end + n]
    end += n
    if keep is not None:
        start = max(start, end - keep)
    layer.__dict__[slot] = (buf, start, end)
    return seen


class GrowingLayer(DynamicLayer):
    """A full-attention layer: every token stays; ``update`` returns all of them."""

    keys = _Filled()
    values = _Filled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return (_append(self, "_keys_buffer", key_states, None),
                _append(self, "_values_buffer", value_states, None))


class GrowingSlidingLayer(DynamicSlidingWindowLayer):
    """A sliding-window layer: ``update`` returns the kept tokens and the new ones (what the new queries may
    see), then keeps the last ``sliding_window - 1``, as ``DynamicSlidingWindowLayer`` does."""

    keys = _Filled()
    values = _Filled()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.record_past:  # speculative decoding's rollback: transformers' own bookkeeping
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keep = self.sliding_window - 1
        return (_append(self, "_keys_buffer", key_states, keep),
                _append(self, "_values_buffer", value_states, keep))


def new_cache(config) -> DynamicCache:
    """An empty ``DynamicCache`` for ``config``'s model whose attention layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingSlidingLayer(sliding_window=x.sliding_window) if type(x) is DynamicSlidingWindowLayer
                    else GrowingLayer() if type(x) is DynamicLayer else x for x in cache.layers]
    return cache
