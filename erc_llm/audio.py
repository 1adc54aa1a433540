"""Audio features keyed by utterance id.

Implemented source: precomputed per-utterance features in a CSV keyed by file name, e.g. the 8 Praat
prosody features of every MELD utterance (``meld_{split}_prosody.csv``, column ``filename`` =
``dia{D}_utt{U}.wav``). Missing values and missing utterances are explicit: every feature vector comes
with a per-feature "missing" mask, and utterances without a row are reported and get the documented
"no audio" vector (all values 0 after normalisation, all masks 1).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from erc_llm.data.schema import DataError

PROSODY_FEATURES = ("duration", "avg_intensity", "intensity_variation", "avg_pitch", "pitch_std", "pitch_range",
                    "articulation_rate", "mean_hnr")


@dataclass
class FeatureTable:
    """Raw features (NaN where missing) by utterance id, with the names of the columns."""

    names: tuple[str, ...]
    values: dict[str, np.ndarray]
    source: str
    report: dict = field(default_factory=dict)


def _key(filename: str) -> str:
    return Path(filename.strip()).stem


def load_feature_csv(path: str | Path, key_column: str = "filename") -> FeatureTable:
    """Read a CSV of numeric features; the key column holds utterance ids or file names (stem = id)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio feature file {path} not found; expected a CSV with a {key_column!r} column")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or key_column not in reader.fieldnames:
            raise DataError(f"{path}: missing key column {key_column!r}; found columns {reader.fieldnames}")
        names = tuple(c for c in reader.fieldnames if c != key_column)
        values: dict[str, np.ndarray] = {}
        missing_cells = 0
        for row in reader:
            vec = []
            for c in names:
                raw = (row[c] or "").strip()
                try:
                    v = float(raw) if raw else math.nan
                except ValueError:
                    raise DataError(f"{path}, line {reader.line_num}, field {c}: expected a number, got {raw!r}") from None
                missing_cells += math.isnan(v)
                vec.append(v)
            k = _key(row[key_column])
            if k in values:
                raise DataError(f"{path}, line {reader.line_num}: duplicate key {row[key_column]!r}")
            values[k] = np.array(vec, dtype=np.float32)
    return FeatureTable(names, values, str(path), {"rows": len(values), "missing_cells": missing_cells})


def load_meld_prosody(directory: str | Path, split: str) -> FeatureTable:
    table = load_feature_csv(Path(directory) / f"meld_{split}_prosody.csv")
    if table.names != PROSODY_FEATURES:
        raise DataError(f"{table.source}: expected prosody columns {list(PROSODY_FEATURES)}, found {list(table.names)}")
    return table


@dataclass
class Normalizer:
    """Per-feature standardisation fitted on train only (NaNs ignored); saved with a model as JSON."""

    mean: list[float]
    std: list[float]

    @classmethod
    def fit(cls, rows: np.ndarray) -> "Normalizer":
        mean = np.nanmean(rows, axis=0)
        std = np.nanstd(rows, axis=0)
        return cls(np.nan_to_num(mean).tolist(), np.where(np.nan_to_num(std) > 1e-8, np.nan_to_num(std), 1.0).tolist())

    def features(self, raw: np.ndarray | None, dim: int) -> np.ndarray:
        """[z-scores with NaN -> 0 | per-feature missing mask]; ``raw=None`` is the "no audio" vector."""
        if raw is None:
            return np.concatenate([np.zeros(dim, np.float32), np.ones(dim, np.float32)])
        z = (raw - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        miss = np.isnan(z)
        return np.concatenate([np.where(miss, 0.0, np.clip(z, -6, 6)), miss]).astype(np.float32)
