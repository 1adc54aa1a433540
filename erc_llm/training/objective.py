"""The LLM training objective: the training batch of transcript pieces, how much each piece weighs, and history
corruption against exposure bias (the slot logits are ``erc_llm.heads``, shared with the decoders; the losses
live in ``erc_llm.training.losses``). Pure tensor code; no model loading, no I/O."""

from __future__ import annotations

import numpy as np
import torch

from erc_llm.prompting import Piece, PromptBuilder


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


def piece_shares(pieces: list[Piece], labels: list[int], weights: torch.Tensor | None) -> list[float]:
    """Each piece's part of its dialogue's loss: the class-weighted count of labelled turns it scores over the
    dialogue's. Multiplying each piece's weighted-mean loss by its share keeps a dialogue's loss the weighted
    mean over all its labelled turns however it is cut (one piece: share 1, the loss unchanged)."""
    def weight(t: int) -> float:
        return 0.0 if labels[t] < 0 else 1.0 if weights is None else float(weights[labels[t]])

    per_piece = [sum(weight(t) for t in range(p.first, p.end)) for p in pieces]
    total = sum(per_piece)
    return [w / total if total else 0.0 for w in per_piece]


def batch_pieces(builder: PromptBuilder, rows: list[dict], written: list[list[int]], weights: torch.Tensor | None,
                 lookahead: int = 0) -> list[tuple[int, Piece, float]]:
    """The transcripts of a training step's dialogues (tokenized ``rows``, ``written[k]`` in row *k*'s
    slots): (row index, piece, its share of that row's loss) for every piece of every row, in order."""
    out = []
    for k, (row, w) in enumerate(zip(rows, written)):
        pieces = builder.pieces(row["header"], row["turns"], w, lookahead)
        out.extend((k, p, share) for p, share in zip(pieces, piece_shares(pieces, row["labels"], weights)))
    return out


def long_dialogue_report(builder: PromptBuilder, data, lookahead: int = 0) -> str:
    """How many training dialogues are longer than ``max_tokens`` and so trained as several pieces (with gold
    labels written where the transcript carries labels: the cut points move a little with other labels)."""
    long, extra, turns = 0, 0, 0
    for row in data:
        gold = [max(label, 0) for label in row["labels"]]
        pieces = builder.pieces(row["header"], row["turns"], gold, lookahead)
        turns += len(gold)
        if len(pieces) > 1:
            long += 1
            extra += len(gold) - (pieces[0].end - pieces[0].first)
    return (f"{long} of {len(data)} training dialogues exceed max_tokens {builder.max_tokens}: each is trained as "
            f"several transcripts, {extra} of {turns} turns in pieces before the last window (their context "
            "starts at the dialogue's start)" if long else
            f"every training dialogue fits max_tokens {builder.max_tokens}: one transcript each")


