"""Block attention for training on long transcripts: linear cost in length on sliding-window layers.

``sdpa`` with a sliding-window mask still computes every query x key pair of a 2,000-token transcript and
then masks most of them away; on Gemma 3 five of every six layers are sliding (window 512), so attention
cost grows with the square of the dialogue's length. Here the queries go in blocks of ``BLOCK`` tokens and
each block attends only to the keys it can see: ``[start - window + 1, end)`` on a sliding layer,
``[0, end)`` on a full layer (causal: later keys are never needed), narrowed further to the first key the
mask lets any of the block's queries see (packed dialogues never see the dialogues before them), and widened
past the block's end when the mask lets a query see later keys (the look-ahead masks below). The mask
handed over by transformers (causal, sliding, or block-diagonal for packed dialogues) or built by
:func:`lookahead_masks` is sliced to each block, so the result is the same attention, only without the work
outside the band.

Each block is two matmuls and a float32 softmax (:func:`band_attention`, as transformers' eager attention,
restricted to the band): on CPU its forward+backward runs ~2x faster than torch's flash kernel at Gemma's
head size (256), whose backward is slow there; its probabilities are block x band, so they stay small.

:func:`lookahead_masks` builds the masks of offline look-ahead (each emotion slot also attends to the next
turns' tokens) and :func:`layer_masks` turns one "who may see whom" matrix into the per-layer-type masks a
transformers model takes (full and sliding-window layers; additive float masks for eager attention).

Registered with transformers as ``"erc_block"`` (attention and mask interfaces; the masks are sdpa's),
used by training (``TrainConfig.attention``). Any call this cannot speed up (decoding with a KV cache,
short sequences, dropout) goes to transformers' own ``sdpa`` unchanged.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "erc_block"
BLOCK = 256


def _causal_block(q0: int, q1: int, k0: int, k1: int, window: int | None, device) -> torch.Tensor:
    q = torch.arange(q0, q1, device=device)[:, None]
    k = torch.arange(k0, k1, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    return allowed[None, None]


def _first_visible(mask: torch.Tensor) -> int:
    """Index of the first key column any query of the block may see (0 if none can)."""
    seen = mask.any(dim=-2).reshape(-1, mask.shape[-1]).any(dim=0)
    return int(seen.to(torch.uint8).argmax()) if bool(seen.any()) else 0


def _last_visible(mask: torch.Tensor) -> int:
    """Index of the last key column any query of the block may see (-1 if none can)."""
    if mask.shape[-1] == 0:
        return -1
    seen = mask.any(dim=-2).reshape(-1, mask.shape[-1]).any(dim=0)
    if not bool(seen.any()):
        return -1
    return int(seen.shape[0] - 1 - seen.flip(0).to(torch.uint8).argmax())


def band_attention(q, k, v, mask, scaling: float) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, S, D), boolean mask (B|1, 1, T, S) -> (B, H, T, D); grouped-query heads
    share their key/value head by broadcasting (no copies of k and v)."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    scores = torch.matmul(q.reshape(b, hk, h // hk, t, d), k.unsqueeze(2).transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)  # float32 softmax, as transformers' eager attention
    return torch.matmul(probs, v.unsqueeze(2)).reshape(b, h, t, d)


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, **kwargs):
    """transformers attention interface: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None)."""
    if kwargs.get("erc_rows") is not None:  # turns of several dialogues packed over their own caches
        return row_attention(query, module.layer_idx, kwargs["erc_rows"], scaling, sliding_window)
    t, s = query.shape[2], key.shape[2]
    plain = t != s or t <= BLOCK or dropout > 0 or kwargs.get("position_bias") is not None
    if plain or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = []
    for q0 in range(0, t, BLOCK):
        q1 = min(q0 + BLOCK, t)
        k0 = max(0, q0 - sliding_window + 1) if sliding_window else 0
        if attention_mask is None:
            k1, mask = q1, _causal_block(q0, q1, k0, q1, sliding_window, query.device)
        else:
            k1 = q1 + 1 + _last_visible(attention_mask[:, :, q0:q1, q1:])  # look-ahead: keys after the block
            mask = attention_mask[:, :, q0:q1, k0:k1]
            first = _first_visible(mask)  # packed dialogues: keys of earlier dialogues are never visible
            k0, mask = k0 + first, mask[..., first:]
        out.append(band_attention(query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], mask, scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


@dataclass
class Rows:
    """How the turns of several dialogues sit in one packed forward over their own KV caches (``decoding.score_batch``):
    dialogue *b* has ``held[kind][b]`` cached keys on layers of that kind (sliding-window layers hold fewer) and
    ``widths[b]`` new tokens, packed one dialogue after another. ``masks[kind][b]``: which of dialogue *b*'s
    cached and new keys each of its new tokens sees. ``kv[layer]``: each dialogue's cached + new keys and values
    of that layer, put there by :class:`RoutedCache` for the attention that follows."""

    held: dict[str, list[int]]
    widths: list[int]
    masks: dict[str, list[torch.Tensor]]
    kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def build(cls, held: dict[str, list[int]], widths: list[int], starts: list[int], window: int | None, device) -> "Rows":
        """``starts[b]``: the position id of dialogue *b*'s first new token (its cached keys end just before it)."""
        masks: dict[str, list[torch.Tensor]] = {}
        for kind, lengths in held.items():
            masks[kind] = []
            for h, n, start in zip(lengths, widths, starts):
                q = torch.arange(start, start + n, device=device)
                k = torch.arange(start - h, start + n, device=device)
                m = k[None, :] <= q[:, None]
                if kind == "sliding_attention" and window:
                    m &= k[None, :] > q[:, None] - window
                masks[kind].append(m[None, None])
        return cls(held, widths, masks)


class RoutedCache(DynamicCache):
    """The cache a packed forward over several dialogues is given: each layer's new keys and values go straight
    into each dialogue's own cache (split by ``rows.widths``), and what each dialogue's tokens attend to (its
    cached + new keys, as its cache returns them) waits in ``rows.kv`` for :func:`row_attention`. Nothing is
    copied into a shared cache; the model sees an empty one."""

    def __init__(self, caches: list, rows: Rows):
        super().__init__()
        self.caches, self.rows = caches, rows
        self.ends = list(itertools.accumulate(rows.widths))  # where each dialogue's new tokens end in the pack

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        self.rows.kv[layer_idx] = [c.update(key_states[:, :, e - n:e], value_states[:, :, e - n:e], layer_idx)
                                   for c, e, n in zip(self.caches, self.ends, self.rows.widths)]
        return key_states, value_states


def row_attention(query, layer: int, rows: Rows, scaling: float | None, sliding_window: int | None):
    """Attention of packed turns, each over its own dialogue's keys only: query (1, H, sum(widths), D), the keys
    and values of ``rows.kv[layer]``. One small attention per dialogue, so nothing is computed between dialogues
    and no token is padding."""
    kind = "sliding_attention" if sliding_window and "sliding_attention" in rows.held else "full_attention"
    out, q0 = [], 0
    for (k, v), n, mask in zip(rows.kv.pop(layer), rows.widths, rows.masks[kind]):
        out.append(F.scaled_dot_product_attention(query[:, :, q0:q0 + n], k, v, attn_mask=mask, scale=scaling,
                                                  enable_gqa=k.shape[1] != query.shape[1]))
        q0 += n
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def lookahead_masks(lengths: list[int], slots: list[list[int]], turns: int) -> torch.Tensor:
    """Who may see whom in packed transcripts where every emotion slot also sees the next ``turns`` turns.

    ``lengths[j]``: tokens of transcript *j*; ``slots[j]``: its slot positions, one per turn, in order.
    Returns a (T, T) boolean matrix over the concatenated transcripts (position ids restart at each): the
    slot of turn *i* sees the text of its transcript up to the end of turn ``i + turns`` and the slots of
    turns ``<= i``; every other token sees the earlier text of its transcript and no slot. So the text is
    encoded causally, as online, and what a slot learns about later turns cannot reach an earlier slot
    through the text: the slot of turn *i* depends on turns ``<= i + turns`` exactly. (The transcript of a
    look-ahead model carries no labels; training and configs enforce it.)
    """
    pos = torch.cat([torch.arange(n) for n in lengths])
    doc = torch.cat([torch.full((n,), j) for j, n in enumerate(lengths)])
    horizon = pos.clone()
    turn = torch.full_like(pos, -1)  # turn ordinal of a slot position, -1 elsewhere
    start = 0
    for n, s in zip(lengths, slots):
        if s:
            s = torch.tensor(s)
            horizon[start + s] = s[torch.clamp(torch.arange(len(s)) + turns, max=len(s) - 1)]
            turn[start + s] = torch.arange(len(s))
        start += n
    slot = turn >= 0
    sees_slot = slot[:, None] & (turn[None, :] <= turn[:, None])
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= horizon[:, None]) & (~slot[None, :] | sees_slot)


def layer_masks(config, allowed: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """The ``attention_mask`` a transformers decoder takes for a (T, S) "may see" matrix: one (1, 1, T, S)
    mask, or one per layer type (``sliding_attention`` also limited to keys within the sliding window on
    either side; ``positions`` are the queries' and keys' position ids when T == S, else (query, key) pairs).
    Boolean for sdpa and block attention; additive float masks (``dtype``) for eager attention."""
    if getattr(config, "_attn_implementation", "sdpa") in ("sdpa", NAME, None):
        def conv(m):
            return m[None, None]
    else:
        def conv(m):
            return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, torch.finfo(dtype).min)[None, None]
    q_pos, k_pos = positions if isinstance(positions, tuple) else (positions, positions)
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if not types or types == {"full_attention"}:
        return conv(allowed)
    masks = {"full_attention": conv(allowed)}
    if window:
        near = (k_pos[None, :] - q_pos[:, None]).abs() < window
        masks["sliding_attention"] = conv(allowed & near)
    return masks


def register() -> str:
    """Make ``"erc_block"`` a transformers attention implementation (idempotent); returns its name."""
    AttentionInterface.register(NAME, block_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
