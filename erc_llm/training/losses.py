"""Classification losses shared by the LLM objective and the classical baseline."""

from __future__ import annotations

import torch

CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse")


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


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 0.0,
                     smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy per example, or focal loss (Lin et al. 2017) when ``gamma > 0``; with ``smoothing`` = e,
    (1 - e) of it plus e times the cross-entropy against the uniform distribution over the K labels
    (label smoothing, Szegedy et al. 2016)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(1, targets[:, None])[:, 0]
    loss = -lp if gamma == 0 else -((1 - lp.exp()) ** gamma) * lp
    return loss if smoothing == 0 else (1 - smoothing) * loss - smoothing * logp.mean(dim=-1)


def label_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None, gamma: float,
               smoothing: float = 0.0) -> torch.Tensor:
    """Weighted cross-entropy over the label set; focal (Lin et al. 2017) when ``gamma > 0``; label-smoothed
    when ``smoothing > 0``.

    ``logits``: (n, K) label logits at n slots; ``targets``: (n,) label indices. Mean over slots
    (weighted mean when class weights are given, as in ``F.cross_entropy``; the class weight of a slot's
    target weighs its whole loss, smoothing term included).
    """
    return _weighted_mean(per_example_loss(logits, targets, gamma, smoothing), targets, weights)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, share: float,
                      weights: torch.Tensor | None, gamma: float = 0.0, smoothing: float = 0.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): per slot, ``(1 - share)`` times the loss of
    :func:`label_loss` against the gold label plus ``share`` times KL(teacher || model) against ``teacher``
    (n, K), the teacher's probabilities; the same (class-weighted) mean over slots. A teacher that puts all its
    mass on the gold label gives plain cross-entropy back."""
    hard = per_example_loss(logits, targets, gamma, smoothing)
    logp = torch.log_softmax(logits.float(), dim=-1)
    q = teacher.to(logp.device, logp.dtype)
    soft = (q * (torch.log(q.clamp_min(1e-12)) - logp)).sum(dim=-1)
    return _weighted_mean((1 - share) * hard + share * soft, targets, weights)


def _weighted_mean(loss: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return loss.mean()
    w = weights.to(loss.device)[targets]
    return (w * loss).sum() / w.sum()


def supervised_contrastive(z: torch.Tensor, labels: torch.Tensor, bank_z: torch.Tensor, bank_labels: torch.Tensor,
                           temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) of slot representations ``z`` (n, H) with labels (n,):
    each anchor is pulled towards the other slots of its label — in the batch and in ``bank_z`` (m, H), detached
    representations of earlier steps (:class:`SlotBank`) — and pushed from the rest, by cosine similarity over
    ``temperature``. Mean over anchors that have a positive; 0 (in the graph) when none has."""
    z = torch.nn.functional.normalize(z.float(), dim=-1)
    keys = torch.cat([z, torch.nn.functional.normalize(bank_z.float().to(z.device), dim=-1)])
    key_labels = torch.cat([labels, bank_labels.to(labels.device)])
    sim = z @ keys.T / temperature
    self_mask = torch.zeros_like(sim, dtype=torch.bool)
    self_mask[:, : len(z)] = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    logp = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == key_labels[None, :]) & ~self_mask
    has = pos.any(dim=1)
    if not has.any():
        return z.sum() * 0.0
    mean_pos = logp.masked_fill(~pos, 0.0).sum(dim=1)[has] / pos.sum(dim=1)[has]
    return -mean_pos.mean()


class SlotBank:
    """The last ``size`` slot representations seen in training (detached) and their labels: the contrastive
    term's negatives and extra positives, so rare labels find partners beyond the few dialogues of one step.
    Checkpoints carry it (:meth:`state_dict`), so a resumed run compares with the same slots."""

    def __init__(self, size: int):
        self.size = size
        self.z: torch.Tensor | None = None
        self.labels = torch.zeros(0, dtype=torch.long)

    def view(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.z if self.z is not None else torch.zeros(0, dim)), self.labels

    def push(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        z = z.detach().float().cpu()
        self.z = z[-self.size:] if self.z is None else torch.cat([self.z, z])[-self.size:]
        self.labels = torch.cat([self.labels, labels.detach().cpu()])[-self.size:]

    def state_dict(self) -> dict:
        return {"size": self.size, "z": self.z, "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.z, self.labels = state["size"], state["z"], state["labels"]
