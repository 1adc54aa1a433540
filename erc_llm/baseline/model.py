"""The fused text+audio classifier (after the "enhanced multimodal SER" design):

per-modality projection to k tokens -> self-attention -> VAD-guided cross-attention (attention logits
+ lambda * M_VAD, M_VAD = agreement of per-token valence/arousal/dominance estimates) -> constrained
adaptive fusion (text / audio / interaction gates that sum to 1) -> speaker-aware context GRU over the
same speaker's earlier utterances in the dialogue (causal) -> classifier.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class VADGuidedCrossAttention(nn.Module):
    """Single-head cross-attention whose logits add ``lam * M_VAD``; M_VAD[i, j] = -||vad_q_i - vad_k_j||."""

    def __init__(self, hidden: int, lam: float):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.lam = lam

    def forward(self, x, ctx, vad_x, vad_ctx):
        logits = self.q(x) @ self.k(ctx).transpose(-1, -2) / math.sqrt(x.shape[-1])
        if self.lam:
            logits = logits + self.lam * -torch.cdist(vad_x, vad_ctx)
        return torch.softmax(logits, dim=-1) @ self.v(ctx)


class ModalityEncoder(nn.Module):
    """Vector -> k tokens of size ``hidden`` -> self-attention (+ residual, norm) -> per-token VAD in [0, 1]."""

    def __init__(self, dim_in: int, hidden: int, k_tokens: int, heads: int, dropout: float):
        super().__init__()
        self.k, self.hidden = k_tokens, hidden
        self.proj = nn.Linear(dim_in, k_tokens * hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.vad = nn.Linear(hidden, 3)

    def forward(self, x):
        t = self.proj(x).view(-1, self.k, self.hidden)
        t = self.norm(t + self.attn(t, t, t, need_weights=False)[0])
        return t, torch.sigmoid(self.vad(t))


class FusedERC(nn.Module):
    def __init__(self, text_dim: int, audio_dim: int, n_labels: int, hidden: int = 384, k_tokens: int = 4,
                 heads: int = 4, lam: float = 0.5, fusion: str = "gates", context: bool = True, dropout: float = 0.3):
        super().__init__()
        self.has_audio, self.fusion, self.use_context = audio_dim > 0, fusion, context
        self.text = ModalityEncoder(text_dim, hidden, k_tokens, heads, dropout)
        if self.has_audio:
            self.audio = ModalityEncoder(audio_dim, hidden, k_tokens, heads, dropout)
            self.t2a = VADGuidedCrossAttention(hidden, lam)
            self.a2t = VADGuidedCrossAttention(hidden, lam)
            self.gate = nn.Linear(3 * hidden, 3)
            self.concat = nn.Linear(3 * hidden, hidden)
        if context:
            self.gru = nn.GRUCell(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(hidden * (2 if context else 1), hidden), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_labels))

    def fuse(self, text, audio=None):
        """Per-utterance fused vectors (N, H), gate weights (N, 3) or None, VAD estimates (N, tokens, 3)."""
        t, vt = self.text(text)
        if not self.has_audio:
            return t.mean(1), None, vt
        a, va = self.audio(audio)
        inter = 0.5 * (self.t2a(t, a, vt, va) + self.a2t(a, t, va, vt)).mean(1)
        parts = torch.stack([t.mean(1), a.mean(1), inter], dim=1)  # (N, 3, H)
        if self.fusion == "concat":
            return self.concat(parts.flatten(1)), None, torch.cat([vt, va], 1)
        gates = torch.softmax(self.gate(parts.flatten(1)), dim=-1)
        return (gates[:, :, None] * parts).sum(1), gates, torch.cat([vt, va], 1)

    def context(self, fused, speaker, mask):
        """Speaker state before each turn: a GRU over that speaker's earlier fused vectors (causal).

        fused (B, T, H), speaker (B, T) indices, mask (B, T) -> (B, T, H).
        """
        b, t, h = fused.shape
        n_spk = int(speaker.max()) + 1 if speaker.numel() else 1
        states = fused.new_zeros(b, n_spk, h)
        rows = torch.arange(b, device=fused.device)
        out = []
        for i in range(t):
            prev = states[rows, speaker[:, i]]
            out.append(prev)
            new = self.gru(fused[:, i], prev)
            keep = mask[:, i, None]
            states = states.clone()
            states[rows, speaker[:, i]] = torch.where(keep, new, prev)
        return torch.stack(out, 1)

    def forward(self, batch: dict, mixup: tuple | None = None):
        """Logits (B, T, K), representation (B, T, D), gates (N, 3) or None and VAD estimates (N, tokens, 3)
        for the N real (unpadded) utterances in mask order. Padding never goes through the encoders."""
        b, t = batch["speaker"].shape
        mask = batch["mask"].flatten()
        text = batch["text"].flatten(0, 1)[mask]
        audio = batch["audio"].flatten(0, 1)[mask] if self.has_audio else None
        real, gates, vad = self.fuse(text, audio)
        fused = real.new_zeros(b * t, real.shape[-1])
        fused[mask] = real
        fused = fused.view(b, t, -1)
        rep = self.drop(fused)
        if self.use_context:
            rep = torch.cat([rep, self.context(fused, batch["speaker"], batch["mask"])], -1)
        if mixup is not None:  # (lambda, permutation over the flattened utterances)
            lam, perm = mixup
            flat = rep.flatten(0, 1)
            rep = (lam * flat + (1 - lam) * flat[perm]).view_as(rep)
        return self.head(rep), rep, gates, vad
