"""Block attention for training on long transcripts: linear cost in length on sliding-window layers.

``sdpa`` with a sliding-window mask still computes every query x key pair of a 2,000-token transcript and
then masks most of them away; on Gemma 3 five of every six layers are sliding (window 512), so attention
cost grows with the square of the dialogue's length. Here the queries go in blocks of ``BLOCK`` tokens and
each block attends only to the keys it can see: ``[start - window + 1, end)`` on a sliding layer,
``[0, end)`` on a full layer (causal: later keys are never needed). The mask handed over by transformers
(causal, sliding, or block-diagonal for packed dialogues) is sliced to each block, so the result is the
same attention, only without the work outside the band.

Registered with transformers as ``"erc_block"`` (attention and mask interfaces; the masks are sdpa's),
used by training (``TrainConfig.attention``). Any call this cannot speed up (decoding with a KV cache,
short sequences, dropout) goes to transformers' own ``sdpa`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "erc_block"
BLOCK = 256


def _causal_block(q0: int, q1: int, k0: int, k1: int, window: int | None, device) -> torch.Tensor:
    q = torch.arange(q0, q1, device=device)[:, None]
    k = torch.arange(k0, k1, device=device)[None, :]
    allowed = k <= q
    if window:
        allowed &= k > q - window
    return allowed[None, None]


def block_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    sliding_window: int | None = None, **kwargs):
    """transformers attention interface: query (B, H, T, D), key/value (B, Hkv, S, D) -> ((B, T, H, D), None)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    t, s = query.shape[2], key.shape[2]
    plain = t != s or t <= BLOCK or dropout > 0 or kwargs.get("position_bias") is not None
    plain = plain or (sliding_window is None and attention_mask is None)  # full causal: sdpa's is_causal kernel
    if plain or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = []
    for q0 in range(0, t, BLOCK):
        q1 = min(q0 + BLOCK, t)
        k0 = max(0, q0 - sliding_window + 1) if sliding_window else 0
        if attention_mask is None:
            mask = _causal_block(q0, q1, k0, q1, sliding_window, query.device)
        else:
            mask = attention_mask[:, :, q0:q1, k0:q1]
        out.append(F.scaled_dot_product_attention(query[:, :, q0:q1], key[:, :, k0:q1], value[:, :, k0:q1],
                                                  attn_mask=mask, scale=scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``"erc_block"`` a transformers attention implementation (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, block_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
