"""Block attention for training on long transcripts: linear cost in length on sliding-window layers.

``sdpa`` with a sliding-window mask still computes every query x key pair of a 2,000-token transcript and
then masks most of them away; on Gemma 3 five of every six layers are sliding (window 512), so attention
cost grows with the square of the dialogue's length. Here the queries go in blocks of ``BLOCK`` tokens and
each block attends only to the keys it can see: ``[start - window + 1, end)`` on a sliding layer,
``[0, end)`` on a full layer (causal: later keys are never needed), narrowed further to the first key the
mask lets any of the block's queries see (packed dialogues never see the dialogues before them). The mask
handed over by transformers (causal, sliding, or block-diagonal for packed dialogues) is sliced to each
block, so the result is the same attention, only without the work outside the band.

Each block is two matmuls and a float32 softmax (:func:`band_attention`, as transformers' eager attention,
restricted to the band): on CPU its forward+backward runs ~2x faster than torch's flash kernel at Gemma's
head size (256), whose backward is slow there; its probabilities are block x band, so they stay small.

Registered with transformers as ``"erc_block"`` (attention and mask interfaces; the masks are sdpa's),
used by training (``TrainConfig.attention``). Any call this cannot speed up (decoding with a KV cache,
short sequences, dropout) goes to transformers' own ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch

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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

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
            mask = _causal_block(q0, q1, k0, q1, sliding_window, query.device)
        else:
            mask = attention_mask[:, :, q0:q1, k0:q1]
            first = _first_visible(mask)  # packed dialogues: keys of earlier dialogues are never visible
            k0, mask = k0 + first, mask[..., first:]
        out.append(band_attention(query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1], mask, scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``"erc_block"`` a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, block_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
