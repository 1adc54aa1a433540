"""MELD loader: the official ``{train,dev,test}_sent_emo.csv`` files of declare-lab/MELD."""

from __future__ import annotations

import csv
import io
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

from erc_llm.data.schema import (
    MELD_LABELS,
    DataError,
    Dialogue,
    LoadReport,
    Utterance,
    check_unique_ids,
    problem_reason,
    raise_problems,
)
from erc_llm.data.text import normalize_speaker, normalize_text
from erc_llm.io import atomic_write_text

SPLITS = ("train", "dev", "test")
REQUIRED_COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID")
META_COLUMNS = ("Sentiment", "Season", "Episode", "StartTime", "EndTime")
DOWNLOAD_URL = "https://raw.githubusercontent.com/declare-lab/MELD/master/data/MELD/{split}_sent_emo.csv"


def split_path(data_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise DataError(f"MELD split {split!r} not found; available splits = {list(SPLITS)}")
    path = Path(data_dir) / f"{split}_sent_emo.csv"
    if not path.is_file():
        found = sorted(p.name for p in Path(data_dir).glob("*.csv")) if Path(data_dir).is_dir() else []
        raise DataError(
            f"MELD split {split!r}: expected file {path} (found {found or 'no csv files'} in {data_dir}). "
            "Pass --data-dir pointing at the folder with train_sent_emo.csv, dev_sent_emo.csv and "
            "test_sent_emo.csv, or fetch them with `erc-llm data download meld --out DIR`."
        )
    return path


def read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}, line {line}: byte 0x{raw[e.start]:02x} is not valid UTF-8. The file must be UTF-8 "
            "(re-save it as UTF-8; mojibake inside valid UTF-8 text is repaired automatically)."
        ) from None


def load_meld(data_dir: str | Path, split: str, on_bad_row: str = "error") -> tuple[list[Dialogue], LoadReport]:
    """Load one MELD split as dialogues in dataset order (Dialogue_ID), turns by Utterance_ID.

    Utterance ids are ``dia{D}_utt{U}``, the key MELD's audio files and feature sets use. Every bad row is
    reported at once; ``on_bad_row="skip"`` leaves them out instead, counted by reason in the report.
    """
    path = split_path(data_dir, split)
    reader = csv.DictReader(io.StringIO(read_utf8(path), newline=""))
    names = [c.strip() for c in (reader.fieldnames or [])]
    twice = {c: [i + 1 for i, n in enumerate(names) if n == c] for c in REQUIRED_COLUMNS if names.count(c) > 1}
    if twice:  # csv would silently keep the last one: every label or text replaced
        raise DataError(f"{path}: header names " + "; ".join(f"column {c!r} {len(p)} times (columns {p})"
                                                             for c, p in twice.items())
                        + "; expected each once: remove or rename the duplicates")
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}, "
            f"found {reader.fieldnames}"
        )
    report = LoadReport(source=f"meld/{split} ({path})")
    rows: dict[int, list[tuple[int, Utterance]]] = defaultdict(list)
    problems: list[str] = []
    for row in reader:
        where = f"{path}, line {reader.line_num}"
        try:
            d_id, u_id = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
        except (TypeError, ValueError):
            problems.append(f"{where}: Dialogue_ID/Utterance_ID must be integers, got "
                            f"{row['Dialogue_ID']!r}/{row['Utterance_ID']!r}")
            continue
        emotion = (row["Emotion"] or "").strip().lower()
        if emotion not in MELD_LABELS:
            problems.append(f"{where}, field Emotion: unknown label {row['Emotion']!r}; "
                            f"valid labels = {list(MELD_LABELS.labels)}")
            continue
        text = normalize_text(row["Utterance"] or "")
        if not text:
            problems.append(f"{where}, field Utterance: empty text (dialogue {d_id}, utterance {u_id})")
            continue
        speaker = normalize_speaker(row["Speaker"] or "")
        if not speaker:
            problems.append(f"{where}, field Speaker: empty speaker name")
            continue
        meta = {c: row[c] for c in META_COLUMNS if c in row}
        meta["line"] = reader.line_num
        rows[d_id].append((u_id, Utterance(speaker, text, emotion, f"dia{d_id}_utt{u_id}", None, meta)))
    if problems and on_bad_row == "error":
        raise_problems(problems, path)
    for p in problems:
        report.skip(problem_reason(p))
    dialogues = []
    for d_id in sorted(rows):
        turns = [u for _, u in sorted(rows[d_id], key=lambda t: t[0])]
        dialogues.append(Dialogue(f"dia{d_id}", turns, {"split": split, **_season_episode(turns[0])}))
    check_unique_ids(dialogues, str(path))
    report.dialogues, report.utterances = len(dialogues), sum(len(d) for d in dialogues)
    return dialogues, report


def _season_episode(u: Utterance) -> dict:
    try:
        return {"season": int(u.meta.get("Season", "")), "episode": int(u.meta.get("Episode", ""))}
    except ValueError:
        return {}


def download_meld(out_dir: str | Path, timeout: float = 30.0) -> list[Path]:
    """Fetch the three official CSVs into ``out_dir`` (atomic per file)."""
    written = []
    for split in SPLITS:
        url = DOWNLOAD_URL.format(split=split)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                text = r.read().decode("utf-8")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise DataError(
                f"could not download MELD {split} from {url} ({e}). This machine seems to be offline: copy "
                "train_sent_emo.csv, dev_sent_emo.csv and test_sent_emo.csv from declare-lab/MELD "
                "(data/MELD) into a folder and pass it as --data-dir."
            ) from None
        written.append(atomic_write_text(Path(out_dir) / f"{split}_sent_emo.csv", text))
    return written
