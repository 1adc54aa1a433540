"""Audio features keyed by utterance id: utterance-level ``(D,)`` or frame-level ``(T, D)``.

Sources
- precomputed: a CSV keyed by utterance id / file name (e.g. the 8 Praat prosody features of every MELD
  utterance, ``meld_{split}_prosody.csv``), or a directory of ``<utterance_id>.npy`` files (what FunASR
  writes);
- extracted from waveforms, offline: ``praat`` (the same 8 prosody features, with praat-parselmouth),
  ``egemaps`` (88 eGeMAPSv02 functionals, with opensmile), ``emotion2vec`` (FunASR; the model is a local
  directory or a hub id; utterance- or frame-level).

Missing values and missing utterances are explicit: every feature vector comes with a per-feature
"missing" mask, and utterances without features are counted and get the documented "no audio" vector
(all values 0 after normalisation, all masks 1).

    erc-llm audio extract --source praat --wav-dir ../shared/data/emodb/wav --out features/emodb_praat
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from erc_llm.data.schema import DataError
from erc_llm.io import (
    atomic_write_json,
    atomic_write_text,
    claim_output,
    content_digest,
    mark_output,
    progress,
    sha256_file,
)

SAMPLE_RATE = 16_000
EXTRACTORS = ("praat", "egemaps", "emotion2vec")

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


def load_feature_csv(path: str | Path, key_column: str = "") -> FeatureTable:
    """Read a CSV of numeric features; the key column (``utterance_id`` or ``filename``) holds utterance ids
    or file names (stem = id)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"audio feature file {path} not found; expected a CSV with an utterance_id or filename column")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not key_column:
            key_column = "utterance_id" if "utterance_id" in (reader.fieldnames or []) else "filename"
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


def load_npy_dir(directory: str | Path) -> FeatureTable:
    """``<utterance_id>.npy`` files, each ``(D,)`` or ``(T, D)``; all must share D."""
    directory = Path(directory)
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise DataError(f"audio feature folder {directory}: no .npy files; expected <utterance_id>.npy arrays")
    values, dims = {}, set()
    for f in files:
        try:
            a = np.load(f, allow_pickle=False).astype(np.float32)
        except (ValueError, OSError) as e:
            raise DataError(f"{f}: not a readable .npy array ({e})") from None
        if a.ndim not in (1, 2) or a.size == 0:
            raise DataError(f"{f}: expected shape (D,) or (T, D), got {a.shape}")
        dims.add(a.shape[-1])
        values[f.stem] = a
    if len(dims) > 1:
        raise DataError(f"{directory}: .npy files have different feature sizes {sorted(dims)}")
    d = dims.pop()
    return FeatureTable(tuple(f"f{i}" for i in range(d)), values, str(directory),
                        {"rows": len(values), "missing_cells": int(sum(np.isnan(v).sum() for v in values.values()))})


# ---------------------------------------------------------------------------------- waveforms

def read_wav(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at ``sample_rate`` (polyphase resampling); clear errors for unreadable or empty audio."""
    import soundfile as sf  # optional audio back-end; only for wav input
    from scipy.signal import resample_poly  # optional audio back-end; only for wav input

    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, sf.LibsndfileError) as e:
        raise DataError(f"{path}: cannot read audio ({e}); expected a wav/flac/ogg file") from None
    audio = audio.mean(axis=1)
    if audio.size == 0:
        raise DataError(f"{path}: empty audio (0 samples)")
    if sr != sample_rate:
        g = math.gcd(int(sr), sample_rate)
        audio = resample_poly(audio, sample_rate // g, int(sr) // g).astype(np.float32)
    return audio


def praat_prosody(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The 8 MELD prosody features (``PROSODY_FEATURES``) with Praat; NaN where a value is undefined
    (e.g. pitch of an unvoiced clip). Articulation rate counts syllable nuclei as intensity peaks that
    are voiced and at least 2 dB above the median (after de Jong & Wempe, 2009)."""
    import parselmouth  # optional audio back-end; only for wav input

    snd = parselmouth.Sound(audio.astype(np.float64), sampling_frequency=sample_rate)
    duration = snd.get_total_duration()
    intensity = snd.to_intensity(minimum_pitch=75.0).values[0]
    intensity = intensity[np.isfinite(intensity) & (intensity > 0)]  # digital silence (padding) is <= 0 dB
    pitch = snd.to_pitch(pitch_floor=75.0, pitch_ceiling=600.0)
    f0 = pitch.selected_array["frequency"]
    f0 = f0[f0 > 0]
    hnr = snd.to_harmonicity_cc().values[0]
    hnr = hnr[hnr > -200]
    nan = float("nan")
    peaks = 0
    if intensity.size > 2:
        thr = np.median(intensity) + 2.0
        mid = intensity[1:-1]
        peaks = int(np.sum((mid > intensity[:-2]) & (mid >= intensity[2:]) & (mid > thr)))
    return np.array([
        round(duration, 2),
        float(intensity.mean()) if intensity.size else nan,
        float(intensity.std()) if intensity.size else nan,
        float(f0.mean()) if f0.size else nan,
        float(f0.std()) if f0.size else nan,
        float(f0.max() - f0.min()) if f0.size else nan,
        peaks / duration if duration > 0 and f0.size else nan,
        float(hnr.mean()) if hnr.size else nan,
    ], dtype=np.float32)


def egemaps(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, smile=None) -> np.ndarray:
    """The 88 eGeMAPSv02 functionals (openSMILE, binary shipped in the wheel)."""
    if smile is None:
        smile = egemaps_extractor()
    return smile.process_signal(audio, sample_rate).to_numpy(dtype=np.float32)[0]


def egemaps_extractor():
    import opensmile  # optional audio back-end; only for wav input

    return opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.Functionals)


def egemaps_names() -> tuple[str, ...]:
    return tuple(egemaps_extractor().feature_names)


def check_emotion2vec_dir(model: str) -> None:
    """FunASR reports a missing model as "... is not registered"; say what is actually missing instead."""
    path = Path(model)
    if not path.exists():
        if "/" in model and not model.startswith((".", "/")):
            return  # a hub id (iic/emotion2vec_base): FunASR downloads it where there is internet
        raise DataError(f"emotion2vec model {model!r}: no such directory; give the folder holding config.yaml and "
                        "model.pt (e.g. a local copy of iic/emotion2vec_base) or a hub id on a machine with internet")
    missing = [f for f in ("config.yaml", "model.pt") if not (path / f).is_file()]
    if missing:
        raise DataError(f"emotion2vec model {path}: missing {missing}; a FunASR model folder holds config.yaml and "
                        f"model.pt (found {sorted(p.name for p in path.iterdir())})")


def emotion2vec_model(model: str):
    check_emotion2vec_dir(model)
    try:
        from funasr import AutoModel  # optional audio back-end; only for wav input
    except ImportError:
        raise DataError("the emotion2vec source needs FunASR: `pip install funasr`") from None
    return AutoModel(model=model, disable_update=True, disable_pbar=True, log_level="ERROR")


def emotion2vec(audio: np.ndarray, model, granularity: str = "utterance") -> np.ndarray:
    """emotion2vec features of 16 kHz mono audio: ``(D,)`` utterance or ``(T, D)`` frames (50 Hz)."""
    import torch  # loads torch; importing this module must not

    res = model.generate(torch.from_numpy(audio), granularity=granularity, extract_embedding=True,
                         fs=SAMPLE_RATE, disable_pbar=True)
    feats = np.asarray(res[0]["feats"], dtype=np.float32)
    return feats.reshape(-1) if granularity == "utterance" else feats.reshape(-1, feats.shape[-1])


def extract_dir(source: str, wav_dir: str | Path, out: str | Path, model: str = "", granularity: str = "utterance",
                limit: int = 0) -> dict:
    """Extract features of every audio file under ``wav_dir`` into ``out``; resumable, returns the report.

    Utterance-level features go to ``out/features.csv`` (key ``utterance_id`` = file stem); frame-level
    emotion2vec features to ``out/<utterance_id>.npy``. Files that cannot be read are skipped and listed
    (with the reason) in ``out/report.json``; an interrupted run continues where it stopped.
    """
    if source not in EXTRACTORS:
        raise DataError(f"audio source {source!r} not found; available extractors = {list(EXTRACTORS)}")
    wavs = sorted(p for ext in ("*.wav", "*.flac", "*.ogg") for p in Path(wav_dir).rglob(ext))
    if not wavs:
        raise DataError(f"{wav_dir}: no .wav/.flac/.ogg files found")
    stems = [p.stem for p in wavs]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise DataError(f"{wav_dir}: file names must be unique utterance ids; duplicates {dup[:5]}")
    wavs = wavs[:limit] if limit else wavs

    out = claim_output(out, "audio features", inputs=[wav_dir])  # a folder of another kind is never written into
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "audio features")
    frames = source == "emotion2vec" and granularity == "frame"
    fn, names = _extractor(source, model, granularity)
    partial = out / ".features.partial.jsonl"
    # a result is reused only for the same audio bytes and the same extractor
    extractor = content_digest(source, model, granularity if source == "emotion2vec" else "utterance")
    digests = {p.stem: content_digest(extractor, sha256_file(p)) for p in wavs}
    sources_file = out / "sources.json"
    known = json.loads(sources_file.read_text()) if sources_file.is_file() else {}
    done, made = {}, {uid: d for uid, d in known.items() if digests.get(uid) == d}
    if (out / "features.csv").is_file() and not frames:  # cache: files already in the table are not redone
        old = load_feature_csv(out / "features.csv", "utterance_id")
        done = {k: [None if math.isnan(x) else float(x) for x in v] for k, v in old.values.items() if k in made}
    if partial.is_file() and not frames:
        for line in partial.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a kill
            if digests.get(row["id"]) == row.get("d"):
                done[row["id"]], made[row["id"]] = row["v"], row["d"]
    failed = {}
    with open(partial, "a", encoding="utf-8") as f:
        for path in progress(wavs, unit="file", desc=f"extract {source}"):
            uid = path.stem
            if uid in done or (frames and uid in made and (out / f"{uid}.npy").is_file()):
                continue
            try:
                v = fn(read_wav(path))
            except DataError as e:
                failed[uid] = str(e)
                continue
            if frames:
                tmp = out / f".{uid}.tmp.npy"
                np.save(tmp, v)
                tmp.replace(out / f"{uid}.npy")
                made[uid] = digests[uid]
                atomic_write_json(sources_file, made)
            else:
                done[uid] = [None if math.isnan(x) else float(x) for x in v]
                made[uid] = digests[uid]
                f.write(json.dumps({"id": uid, "v": done[uid], "d": digests[uid]}) + "\n")
                f.flush()
    if not frames:
        names = names or tuple(f"f{i}" for i in range(len(next(iter(done.values()), []))))
        rows = ["utterance_id," + ",".join(names)]
        rows += [uid + "," + ",".join("" if x is None else repr(x) for x in v) for uid, v in sorted(done.items())]
        atomic_write_text(out / "features.csv", "\n".join(rows) + "\n")
        atomic_write_json(sources_file, {uid: made[uid] for uid in done})
    extracted = len(list(out.glob("*.npy"))) if frames else len(done)
    report = {"source": source, "granularity": granularity if source == "emotion2vec" else "utterance",
              "model": model or None, "files": len(wavs), "extracted": extracted, "failed": failed,
              "nan_cells": sum(x is None for v in done.values() for x in v)}
    atomic_write_json(out / "report.json", report)
    partial.unlink(missing_ok=True)
    return report


def _extractor(source: str, model: str, granularity: str):
    if source == "praat":
        return praat_prosody, PROSODY_FEATURES
    if source == "egemaps":
        smile = egemaps_extractor()
        return (lambda a: egemaps(a, SAMPLE_RATE, smile)), tuple(smile.feature_names)
    if granularity not in ("utterance", "frame"):
        raise DataError(f"granularity {granularity!r} not supported; available = ['utterance', 'frame']")
    m = emotion2vec_model(model)
    return (lambda a: emotion2vec(a, m, granularity)), None


FEATURE_SOURCES = ("meld_prosody", "csv", "npy")


def load_source(source: str, directory: str | Path, split: str) -> FeatureTable:
    """Features of one split: ``meld_prosody`` (meld_{split}_prosody.csv), ``csv`` ({split}.csv, else
    features.csv as written by ``erc-llm audio extract``), ``npy`` ({split}/ folder, else the folder itself)."""
    d = Path(directory)
    if source == "meld_prosody":
        return load_meld_prosody(d, split)
    if source == "csv":
        return load_feature_csv(d / f"{split}.csv" if (d / f"{split}.csv").is_file() else d / "features.csv")
    if source == "npy":
        return load_npy_dir(d / split if (d / split).is_dir() else d)
    raise DataError(f"audio source {source!r} not found; available = {list(FEATURE_SOURCES)}")
