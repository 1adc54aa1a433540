"""Per-utterance inputs of the baseline, cached once per dataset: text embeddings and audio features."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erc_llm.audio import Normalizer, load_meld_prosody
from erc_llm.data import Dialogue, LabelSet
from erc_llm.data.schema import DataError
from erc_llm.io import atomic_dir
from erc_llm.speakers import encoder_path as resolve

log = logging.getLogger(__name__)
AUDIO_SOURCES = ("none", "meld_prosody")

# Class-level valence/arousal/dominance targets on a [0, 1] scale for datasets without VAD annotations:
# approximate values of the label words after the NRC VAD Lexicon (Mohammad, 2018). They are coarse
# targets for the auxiliary VAD heads, not checked here against the lexicon file (not on this machine).
CLASS_VAD = {
    "neutral": (0.469, 0.184, 0.357), "joy": (0.980, 0.824, 0.794), "sadness": (0.052, 0.288, 0.164),
    "anger": (0.167, 0.865, 0.657), "fear": (0.073, 0.840, 0.293), "disgust": (0.052, 0.775, 0.317),
    "surprise": (0.875, 0.875, 0.562), "happy": (0.960, 0.732, 0.850), "sad": (0.052, 0.288, 0.164),
    "angry": (0.122, 0.830, 0.604), "excited": (0.908, 0.931, 0.709), "frustrated": (0.060, 0.730, 0.280),
}


def encoder_path(given: str) -> str:
    """The sentence encoder: ``given`` (a dir or hub id), else the packaged all-MiniLM-L6-v2."""
    return resolve(given)


def text_embeddings(dialogues: list[Dialogue], encoder: str, cache: Path) -> dict[str, np.ndarray]:
    """Sentence embeddings of the utterances of ONE split (ids repeat across splits), cached by content."""
    texts = [(u.utterance_id, u.text) for d in dialogues for u in d.utterances]
    key = hashlib.sha256(json.dumps([encoder, texts]).encode()).hexdigest()[:16]
    path = cache / "features" / f"text-{key}"
    if not (path / "emb.npy").is_file():
        from sentence_transformers import SentenceTransformer  # heavy; only where sentences are encoded

        model = SentenceTransformer(encoder, device="cpu")
        emb = model.encode([t for _, t in texts], batch_size=64, normalize_embeddings=True,
                           show_progress_bar=sys.stderr.isatty())  # a log gets no carriage-return bar
        with atomic_dir(path) as tmp:
            np.save(tmp / "emb.npy", emb.astype(np.float32))
    emb = np.load(path / "emb.npy")
    return {uid: emb[i] for i, (uid, _) in enumerate(texts)}


@dataclass
class AudioFeatures:
    dim: int  # raw feature count; the model input is 2 * dim (values + missing mask)
    normalizer: Normalizer | None
    by_split: dict[str, dict]


def audio_features(source: str, audio_dir: str, splits: dict[str, list[Dialogue]]) -> tuple[AudioFeatures, dict]:
    """Load raw features for every split, fit normalisation on train only; report missing counts."""
    if source == "none":
        return AudioFeatures(0, None, {s: {} for s in splits}), {}
    tables = {s: load_meld_prosody(audio_dir, s) for s in splits}
    dim = len(next(iter(tables.values())).names)
    train_ids = [u.utterance_id for d in splits["train"] for u in d.utterances]
    rows = np.stack([tables["train"].values[i] for i in train_ids if i in tables["train"].values])
    norm = Normalizer.fit(rows)
    report = {}
    for s, ds in splits.items():
        ids = [u.utterance_id for d in ds for u in d.utterances]
        missing = [i for i in ids if i not in tables[s].values]
        report[s] = {"utterances": len(ids), "without_audio": len(missing),
                     "missing_cells": tables[s].report["missing_cells"],
                     "rows_without_utterance": len(set(tables[s].values) - set(ids))}
        if missing:
            log.info("%s: %d of %d utterances have no audio row (%s...) -> 'no audio' vector",
                     s, len(missing), len(ids), missing[:3])
    return AudioFeatures(dim, norm, {s: tables[s].values for s in splits}), report


def dialogue_arrays(d: Dialogue, text: dict, audio: AudioFeatures, split: str, labels: LabelSet,
                    vad: bool) -> dict:
    """Arrays of one dialogue: text (T, Dt), audio (T, 2Da), speaker index (T,), label (T,), vad (T, 3)."""
    speakers = {s: i for i, s in enumerate(d.speakers)}
    out = {
        "text": np.stack([text[u.utterance_id] for u in d.utterances]),
        "speaker": np.array([speakers[u.speaker] for u in d.utterances], np.int64),
        "label": np.array([labels.index(u.emotion) if u.emotion else -1 for u in d.utterances], np.int64),
    }
    if audio.dim:
        table = audio.by_split[split]
        out["audio"] = np.stack([audio.normalizer.features(table.get(u.utterance_id), audio.dim) for u in d.utterances])
    if vad:
        out["vad"] = np.array([_vad(u, labels) for u in d.utterances], np.float32)
    return out


def _vad(u, labels: LabelSet) -> tuple[float, float, float]:
    if "vad" in u.meta:  # IEMOCAP annotations on a 1-5 scale -> [0, 1]
        return tuple((x - 1) / 4 for x in u.meta["vad"])
    if u.emotion is None:
        return (float("nan"),) * 3
    if u.emotion not in CLASS_VAD:
        raise DataError(f"no VAD values for label {u.emotion!r}; known: {sorted(CLASS_VAD)}; set vad_weight: 0")
    return CLASS_VAD[u.emotion]
