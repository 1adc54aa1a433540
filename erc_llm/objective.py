"""The training objective: label-set cross-entropy at emotion slots, class weights, focal loss,
and history corruption against exposure bias. Pure tensor code; no model loading, no I/O."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from erc_llm.prompting import PromptBuilder, Transcript

CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse")


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


def class_weights(counts: list[int], mode: str) -> torch.Tensor:
    """Per-class loss weights from training counts, normalised so the mean weight over examples is 1."""
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights {mode!r} not supported; available = {list(CLASS_WEIGHTS)}")
    c = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    if mode == "none":
        w = torch.ones_like(c)
    else:
        w = c.sum() / c if mode == "inverse" else (c.sum() / c).sqrt()
    w = w * c.sum() / (w * c).sum()
    return w.float()


def label_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """Weighted cross-entropy over the label set; focal (Lin et al. 2017) when ``gamma > 0``.

    ``logits``: (n, K) label logits at n slots; ``targets``: (n,) label indices. Mean over slots
    (weighted mean when class weights are given, as in ``F.cross_entropy``).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(1, targets[:, None])[:, 0]
    loss = -lp if gamma == 0 else -((1 - lp.exp()) ** gamma) * lp
    if weights is None:
        return loss.mean()
    w = weights.to(loss.device)[targets]
    return (w * loss).sum() / w.sum()


def corrupt_history(gold: list[int], rate: float, prior: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Labels to write into the transcript: each gold label is replaced, with probability ``rate``, by a
    label drawn from the training prior — so the model learns not to trust earlier labels blindly, as at
    test time where they are its own predictions. Unlabelled turns (-1) get a label from the prior."""
    out = []
    for g in gold:
        if g < 0 or rng.random() < rate:
            out.append(int(rng.choice(len(prior), p=prior)))
        else:
            out.append(g)
    return out


def slot_logits(model, transcript: Transcript, label_token_ids: list[int]) -> torch.Tensor:
    """One forward over the whole transcript; vocabulary logits only at the slots, label columns only.

    Returns (n_slots, K). ``logits_to_keep`` with the slot indices keeps the LM head (262k rows for
    Gemma) off every other position.
    """
    device = next(model.parameters()).device
    x = torch.tensor([transcript.input_ids], dtype=torch.long, device=device)
    keep = torch.tensor(transcript.slots, dtype=torch.long, device=device)
    out = model(input_ids=x, logits_to_keep=keep, use_cache=False)
    return out.logits[0][:, label_token_ids]
