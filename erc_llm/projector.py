"""Audio in the LLM: features -> ``k`` soft tokens in the LLM's input-embedding space.

Each turn of the transcript carries ``k`` placeholder positions (id ``AUDIO_TOKEN`` = -1, written by the
prompt builder from ``prompts/audio.txt``) before its emotion slot. At every forward the placeholders'
embeddings are replaced by the projector's output for that turn's audio features, in order; so the
same code serves the whole-transcript training forward and the KV-cached streaming decoder.

- utterance vectors ``(D,)``: an MLP to ``k`` tokens;
- frame sequences ``(T, D)``: a linear map, then attention pooling with ``k`` learned queries.

The input to the projector is ``[normalised features | missing mask]`` (utterance level) or normalised
frames plus a "missing" column; a turn without audio gets the documented "no audio" input.

Normalisation (``AudioSpec.normalize``): ``corpus`` z-scores every feature with the training split's mean
and std; ``speaker`` with the statistics of the same speaker's utterances in the same split (features only,
never labels), for speakers with at least ``SPEAKER_MIN_UTTERANCES`` utterances with audio (others get the
corpus statistics). Prosody says much about who speaks and how they were recorded (IEMOCAP's speakers differ in
mean intensity about as much as one speaker's neutral and angry turns), and test speakers are often
unseen; per-speaker z-scores are the usual remedy in speech emotion recognition.
A live session uses the speaker's turns heard so far.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from erc_llm.audio import FeatureTable, Normalizer
from erc_llm.data.schema import DataError
from erc_llm.io import atomic_write_json
from erc_llm.prompting import AUDIO_TOKEN


class AudioProjector(nn.Module):
    def __init__(self, in_dim: int, hidden_size: int, k_tokens: int, frames: bool, width: int = 256,
                 target_rms: float = 1.0):
        super().__init__()
        self.in_dim, self.hidden_size, self.k, self.frames = in_dim, hidden_size, k_tokens, frames
        if frames:
            self.inp = nn.Linear(in_dim, width)
            self.queries = nn.Parameter(torch.randn(k_tokens, width) * 0.02)
            self.attn = nn.MultiheadAttention(width, num_heads=4, batch_first=True)
            self.out = nn.Linear(width, hidden_size)
        else:
            self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, k_tokens * hidden_size))
        # outputs are normalised, then scaled to the RMS of the LLM's own input embeddings
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.gain = nn.Parameter(torch.tensor(float(target_rms)))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """``feats``: one tensor per turn, ``(in_dim,)`` or ``(T, in_dim)``. Returns ``(n_turns, k, hidden)``."""
        if not self.frames:
            x = torch.stack(feats)
            y = self.mlp(x).view(len(feats), self.k, self.hidden_size)
        else:
            lens = [f.shape[0] for f in feats]
            x = nn.utils.rnn.pad_sequence(feats, batch_first=True)
            pad = torch.arange(max(lens), device=x.device)[None] >= torch.tensor(lens, device=x.device)[:, None]
            h = self.inp(x)
            q = self.queries[None].expand(len(feats), -1, -1)
            pooled, _ = self.attn(q, h, h, key_padding_mask=pad, need_weights=False)
            y = self.out(pooled)
        return self.norm(y) * self.gain


def embedding_rms(model) -> float:
    """RMS of the model's input embeddings (Gemma scales them by sqrt(hidden) inside the layer)."""
    emb = model.get_input_embeddings()
    ids = torch.arange(0, min(emb.num_embeddings, 4096), 7, device=emb.weight.device)
    with torch.no_grad():
        return float(emb(ids).float().pow(2).mean().sqrt())


def embed_ids(model, ids: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
    """Input embeddings of ``ids`` (1, L) with the ``AUDIO_TOKEN`` positions filled by ``soft`` (n, H) in order."""
    mask = ids == AUDIO_TOKEN
    emb = model.get_input_embeddings()(ids.clamp(min=0))
    n = int(mask.sum())
    if n == 0:
        return emb
    if soft is None or soft.shape[0] != n:
        raise ValueError(f"{n} audio positions but {0 if soft is None else soft.shape[0]} soft tokens to fill them")
    return emb.masked_scatter(mask[..., None], soft.to(emb.dtype))


@dataclass
class AudioSpec:
    """What a run needs to rebuild its audio inputs: saved as ``audio.json`` next to ``projector.pt``."""

    source: str
    k_tokens: int
    in_dim: int
    feature_dim: int
    frames: bool
    names: list
    mean: list
    std: list
    normalize: str = "corpus"

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: Path) -> "AudioSpec":
        return cls(**json.loads(Path(path).read_text()))

    @property
    def normalizer(self) -> Normalizer:
        return Normalizer(self.mean, self.std)


NORMALIZE = ("corpus", "speaker")
SPEAKER_MIN_UTTERANCES = 5


def fit_spec(source: str, k_tokens: int, train: FeatureTable, ids: list[str], normalize: str = "corpus") -> AudioSpec:
    """Corpus normalisation fitted on the training utterances only (frames pooled for frame-level features);
    ``normalize`` = how inputs are standardised (``NORMALIZE``)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"audio normalize {normalize!r} not supported; available = {list(NORMALIZE)}")
    rows = [train.values[i] for i in ids if i in train.values]
    if not rows:
        raise DataError(f"audio source {train.source}: none of the {len(ids)} training utterances has features; "
                        "check that the feature keys are utterance ids of this dataset")
    frames = rows[0].ndim == 2
    stacked = np.concatenate(rows) if frames else np.stack(rows)
    norm = Normalizer.fit(stacked)
    d = stacked.shape[-1]
    return AudioSpec(source, k_tokens, d + 1 if frames else 2 * d, d, frames, list(train.names), norm.mean, norm.std,
                     normalize)


def speaker_normalizer(spec: AudioSpec, rows: list[np.ndarray]) -> Normalizer | None:
    """Statistics of one speaker's feature rows (frames pooled); None below ``SPEAKER_MIN_UTTERANCES`` rows
    or when the spec normalises by corpus. A feature the speaker never has (all NaN) or never varies keeps
    the corpus mean / std."""
    if spec.normalize != "speaker" or len(rows) < SPEAKER_MIN_UTTERANCES:
        return None
    stacked = np.concatenate(rows) if spec.frames else np.stack(rows)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: handled below
        mean, std = np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0)
    mean = np.where(np.isnan(mean), spec.mean, mean)
    std = np.where(np.isnan(std) | (std < 1e-8), spec.std, std)
    return Normalizer(mean.tolist(), std.tolist())


def model_input(spec: AudioSpec, raw: np.ndarray | None, norm: Normalizer | None = None) -> torch.Tensor:
    """The projector input of one utterance; ``raw=None`` = the "no audio" input; ``norm`` = the speaker's
    statistics (default: the corpus statistics of the spec)."""
    norm = norm or spec.normalizer
    if not spec.frames:
        return torch.from_numpy(norm.features(raw, spec.feature_dim))
    if raw is None:
        x = np.zeros((1, spec.feature_dim + 1), np.float32)
        x[0, -1] = 1.0
        return torch.from_numpy(x)
    z = (raw - np.array(norm.mean, np.float32)) / np.array(norm.std, np.float32)
    z = np.clip(np.nan_to_num(z), -6, 6)
    return torch.from_numpy(np.concatenate([z, np.zeros((len(z), 1))], axis=1).astype(np.float32))


class AudioInputs:
    """Projector inputs of one split's utterances (``utterance_id`` -> tensor), with coverage counts.
    ``speakers`` (parallel to ``utterance_ids``) is required when the spec normalises by speaker."""

    def __init__(self, spec: AudioSpec, table: FeatureTable | None, utterance_ids: list[str],
                 speakers: list[str] | None = None):
        self.spec = spec
        values = table.values if table is not None else {}
        if values:
            dim = next(iter(values.values())).shape[-1]
            if dim != spec.feature_dim:
                raise DataError(f"audio features in {table.source} have {dim} values per utterance; the run was "
                                f"trained on {spec.feature_dim} ({spec.source}); use the same feature source")
        norms = self._speaker_norms(spec, values, utterance_ids, speakers)
        who = speakers or [""] * len(utterance_ids)
        self.inputs = {u: model_input(spec, values.get(u), norms.get(s)) for u, s in zip(utterance_ids, who)}
        self.missing = sum(u not in values for u in utterance_ids)
        self.speaker_normalized = len(norms)

    @staticmethod
    def _speaker_norms(spec, values, utterance_ids, speakers) -> dict[str, Normalizer]:
        if spec.normalize != "speaker":
            return {}
        if speakers is None or len(speakers) != len(utterance_ids):
            raise ValueError("a spec with normalize='speaker' needs the speaker of every utterance")
        rows: dict[str, list[np.ndarray]] = {}
        for u, s in zip(utterance_ids, speakers):
            if u in values:
                rows.setdefault(s, []).append(values[u])
        return {s: n for s, r in rows.items() if (n := speaker_normalizer(spec, r)) is not None}

    def soft_tokens(self, projector: AudioProjector, utterance_ids: list[str]) -> torch.Tensor:
        """``(len(ids) * k, hidden)`` soft tokens of these turns, in order."""
        device = next(projector.parameters()).device
        out = projector([self.inputs[u].to(device) for u in utterance_ids])
        return out.reshape(-1, out.shape[-1])


@dataclass
class AudioModel:
    """A trained projector and the spec of the features it reads; a run keeps them as ``adapter/audio.json``
    and ``adapter/projector.pt``."""

    spec: AudioSpec
    projector: AudioProjector

    def save(self, directory: Path) -> None:
        torch.save(self.projector.state_dict(), Path(directory) / "projector.pt")
        self.spec.save(Path(directory) / "audio.json")

    @classmethod
    def load(cls, directory: Path, hidden_size: int, device) -> "AudioModel | None":
        """The audio model saved in ``directory`` (None when the run was trained without audio)."""
        directory = Path(directory)
        if not (directory / "audio.json").is_file():
            return None
        spec = AudioSpec.load(directory / "audio.json")
        projector = AudioProjector(spec.in_dim, hidden_size, spec.k_tokens, spec.frames)
        projector.load_state_dict(torch.load(directory / "projector.pt", weights_only=True))
        return cls(spec, projector.to(device).eval())

    def feed(self, inputs: AudioInputs) -> "AudioFeed":
        return AudioFeed(inputs, self.projector)


@dataclass
class AudioFeed:
    """What a tagger needs to give each turn its soft tokens: one split's inputs and the projector."""

    inputs: AudioInputs
    projector: AudioProjector

    def soft_tokens(self, utterance_ids: list[str]) -> torch.Tensor:
        return self.inputs.soft_tokens(self.projector, utterance_ids)
