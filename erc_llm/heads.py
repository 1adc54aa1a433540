"""What training and inference both compute from a model at the emotion slots: the label head restricted to the
labels' token columns, the decoder's last hidden states, the slot logits of one transcript or of several packed
into one forward, and the packing of items into groups. Pure tensor code; no model loading, no I/O.

Training (``erc_llm.training.objective``, ``erc_llm.train``) and the decoders (``erc_llm.decoding``) import these from here,
so inference never imports training code."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erc_llm.attention import layer_masks, lookahead_masks
from erc_llm.projector import embed_ids
from erc_llm.prompting import PromptBuilder, Transcript


def first_token_ids(builder: PromptBuilder) -> list[int]:
    """First token of every label; training scores the label set by these, so they must differ."""
    firsts = [ids[0] for ids in builder.label_ids]
    if len(set(firsts)) != len(firsts):
        clash = [lab for lab, t in zip(builder.labels.labels, firsts) if firsts.count(t) > 1]
        raise ValueError(
            f"labels {clash} start with the same token under this tokenizer; training scores labels by their "
            "first token, so rename them (e.g. 'happiness' vs 'happy') or use another backbone"
        )
    return firsts


def label_head(model, hidden: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """The LM head restricted to ``token_ids``: ``hidden (..., H) -> (..., len(token_ids))``, exactly the
    corresponding columns of the full logits (Gemma's final soft-capping included), without computing the
    other ~262k vocabulary rows."""
    head = model.get_output_embeddings()
    idx = torch.tensor(token_ids, device=hidden.device)
    logits = hidden @ head.weight[idx].T.to(hidden.dtype)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[idx]
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def decoder_hidden(model, input_ids: torch.Tensor, soft: torch.Tensor | None = None, **kw):
    """Last hidden states of the transformer body (no LM head); ``soft`` fills audio placeholders."""
    body = model.get_decoder()
    if soft is None:
        return body(input_ids=input_ids, **kw)
    return body(inputs_embeds=embed_ids(model, input_ids, soft), **kw)


def slot_logits(model, transcript: Transcript, label_token_ids: list[int], soft: torch.Tensor | None = None) -> torch.Tensor:
    """One forward over the whole transcript; vocabulary logits only at the slots, label columns only.

    Returns (n_slots, K). ``logits_to_keep`` with the slot indices keeps the LM head (262k rows for
    Gemma) off every other position. Goes through ``model(...)`` so a DDP wrapper sees the forward.
    ``soft``: the audio soft tokens of the kept turns, in order.
    """
    device = next(model.parameters()).device
    x = torch.tensor([transcript.input_ids], dtype=torch.long, device=device)
    keep = torch.tensor(transcript.slots, dtype=torch.long, device=device)
    if soft is None:
        out = model(input_ids=x, logits_to_keep=keep, use_cache=False)
    else:
        bare = getattr(model, "module", model)  # embeddings of the wrapped model; the forward stays wrapped
        out = model(inputs_embeds=embed_ids(bare, x, soft), logits_to_keep=keep, use_cache=False)
    return out.logits[0][:, label_token_ids]


@dataclass
class SlotOutputs:
    """Per transcript of a packed forward: label logits (n_slots, K) and, when asked for, the last decoder
    layer's output at the slots (n_slots, H), the representation the contrastive term shapes."""

    logits: list[torch.Tensor]
    states: list[torch.Tensor] | None = None


def packed_slot_logits(model, transcripts: list[Transcript], label_token_ids: list[int],
                       soft: torch.Tensor | None = None, lookahead: int = 0) -> list[torch.Tensor]:
    """Several transcripts in one forward (:func:`packed_slot_outputs`); one (n_slots, K) tensor per transcript."""
    if len(transcripts) == 1 and not lookahead:
        return [slot_logits(model, transcripts[0], label_token_ids, soft)]
    return packed_slot_outputs(model, transcripts, label_token_ids, soft, lookahead).logits


def packed_slot_outputs(model, transcripts: list[Transcript], label_token_ids: list[int],
                        soft: torch.Tensor | None = None, lookahead: int = 0, states: bool = False) -> SlotOutputs:
    """Several transcripts in one forward: concatenated, with position ids restarting at each transcript.

    transformers turns restarting position ids into a block-diagonal causal mask (each transcript sees only
    its own earlier tokens; sliding windows within it), so every transcript gets the logits it would get
    alone, while the weights are read once for all of them. ``soft``: the audio soft tokens of all kept turns,
    in transcript order. ``lookahead`` > 0: each slot also sees the next ``lookahead`` turns of its transcript
    (:func:`erc_llm.attention.lookahead_masks`). ``states``: also return the slots' last-layer states.
    """
    device = next(model.parameters()).device
    bare = getattr(model, "module", model)  # embeddings and config of the wrapped model; the forward stays wrapped
    ids, keep, sizes = [], [], []
    for tr in transcripts:
        keep.extend(len(ids) + s for s in tr.slots)
        ids.extend(tr.input_ids)
        sizes.append(len(tr.slots))
    pos = torch.cat([torch.arange(len(tr.input_ids)) for tr in transcripts]).to(device)
    keep = torch.tensor(keep, dtype=torch.long, device=device)
    kw = {"position_ids": pos[None], "logits_to_keep": keep, "use_cache": False}
    if states:
        kw["output_hidden_states"] = True
    if lookahead:  # otherwise transformers builds the causal block-diagonal mask from the position ids
        allowed = lookahead_masks([len(tr.input_ids) for tr in transcripts], [tr.slots for tr in transcripts], lookahead)
        kw["attention_mask"] = layer_masks(bare.config, allowed.to(device), pos, bare.dtype)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if soft is None:
        out = model(input_ids=x, **kw)
    else:
        out = model(inputs_embeds=embed_ids(bare, x, soft), **kw)
    logits = list(out.logits[0][:, label_token_ids].split(sizes))
    return SlotOutputs(logits, list(out.hidden_states[-1][0, keep].split(sizes)) if states else None)


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so each group's total length stays within ``budget`` (a longer item goes
    alone); ``budget <= 0`` puts every item alone."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if groups and budget > 0 and total + n <= budget:
            groups[-1].append(i)
            total += n
        else:
            groups.append([i])
            total = n
    return groups
