"""IEMOCAP loader for the official ``IEMOCAP_full_release`` layout, standard 6-class ERC protocol.

Protocol (as in DialogueRNN / InstructERC):
- turns are ordered by start time; labels hap, exc, sad, neu, ang, fru are kept as six classes
  (happy, excited, sad, neutral, angry, frustrated); utterances with any other label (xxx, sur, fea,
  dis, oth) are dropped and counted in the load report;
- sessions 1-4 are train/dev, session 5 is test. The dev split is fixed: the session 1-4 dialogues
  sorted by name, every 10th one starting at the first (indices 0, 10, 20, ...); train is the rest;
- speaker = session + gender of the speaking actor, e.g. ``Ses01_F``; VAD values are kept in
  ``Utterance.meta["vad"]`` as (valence, activation, dominance).
"""

from __future__ import annotations

import re
from pathlib import Path

from erc_llm.data.schema import IEMOCAP_LABELS, DataError, Dialogue, LoadReport, Utterance, check_unique_ids
from erc_llm.data.text import normalize_text

SPLITS = ("train", "dev", "test")
LABEL_MAP = {"hap": "happy", "exc": "excited", "sad": "sad", "neu": "neutral", "ang": "angry", "fru": "frustrated"}
DEV_EVERY = 10
_TRANS = re.compile(r"^(?P<id>Ses\d\d[FM]_\S+?_(?P<g>[FM])\S*)\s+\[(?P<s>[\d.]+)-(?P<e>[\d.]+)\]:\s?(?P<text>.*)$")
_EVAL = re.compile(
    r"^\[(?P<s>[\d.]+)\s*-\s*(?P<e>[\d.]+)\]\t(?P<id>\S+)\t(?P<lab>\w+)\t\[(?P<v>[\d.]+),\s*(?P<a>[\d.]+),\s*(?P<d>[\d.]+)\]"
)


def _sessions(split: str) -> list[int]:
    if split not in SPLITS:
        raise DataError(f"IEMOCAP split {split!r} not found; available splits = {list(SPLITS)}")
    return [5] if split == "test" else [1, 2, 3, 4]


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; IEMOCAP text files are ASCII/UTF-8") from None


def _parse_labels(path: Path, report: LoadReport) -> dict[str, tuple[str | None, tuple[float, float, float]]]:
    labels = {}
    for line in _read_lines(path):
        m = _EVAL.match(line)
        if m:
            vad = (float(m["v"]), float(m["a"]), float(m["d"]))
            labels[m["id"]] = (LABEL_MAP.get(m["lab"]), vad)
            if m["lab"] not in LABEL_MAP:
                report.skip(f"label {m['lab']!r} outside the 6 classes")
    return labels


def _parse_dialogue(trans: Path, evaluation: Path, report: LoadReport) -> Dialogue | None:
    if not evaluation.is_file():
        raise DataError(f"{trans}: no matching label file {evaluation}; every transcription needs its EmoEvaluation file")
    labels = _parse_labels(evaluation, report)
    turns = []
    for lineno, line in enumerate(_read_lines(trans), 1):
        m = _TRANS.match(line.strip())
        if not m:
            if line.strip():
                report.skip("transcription line without an utterance id and time span")
            continue
        if m["id"] not in labels:
            report.skip("utterance without an evaluation")
            continue
        emotion, vad = labels[m["id"]]
        if emotion is None:
            continue  # counted in _parse_labels
        text = normalize_text(m["text"])
        if not text:
            raise DataError(f"{trans}, line {lineno}: empty text for utterance {m['id']}")
        session = m["id"][:5]
        meta = {"start": float(m["s"]), "end": float(m["e"]), "vad": vad, "line": lineno}
        turns.append(Utterance(f"{session}_{m['g']}", text, emotion, m["id"], None, meta))
    if not turns:
        report.skip("dialogue with no labelled utterance")
        return None
    turns.sort(key=lambda u: (u.meta["start"], u.utterance_id))
    return Dialogue(trans.stem, turns, {"session": int(trans.stem[3:5])})


def load_iemocap(root: str | Path, split: str) -> tuple[list[Dialogue], LoadReport]:
    root = Path(root)
    report = LoadReport(source=f"iemocap/{split} ({root})")
    dialogues: list[Dialogue] = []
    for s in _sessions(split):
        tdir = root / f"Session{s}" / "dialog" / "transcriptions"
        edir = root / f"Session{s}" / "dialog" / "EmoEvaluation"
        if not tdir.is_dir():
            raise DataError(
                f"IEMOCAP split {split!r}: expected folder {tdir}. Pass --data-dir pointing at "
                "IEMOCAP_full_release (the folder holding Session1 ... Session5)."
            )
        for trans in sorted(tdir.glob("*.txt")):
            if trans.name.startswith("."):
                continue
            d = _parse_dialogue(trans, edir / trans.name, report)
            if d is not None:
                dialogues.append(d)
    if split != "test":
        dialogues.sort(key=lambda d: d.id)
        dev = {d.id for i, d in enumerate(dialogues) if i % DEV_EVERY == 0}
        dialogues = [d for d in dialogues if (d.id in dev) == (split == "dev")]
    check_unique_ids(dialogues, str(root))
    for d in dialogues:
        for u in d.utterances:
            path = root / f"Session{d.meta['session']}" / "sentences" / "wav" / d.id / f"{u.utterance_id}.wav"
            u.audio = str(path) if path.is_file() else None
    report.dialogues, report.utterances = len(dialogues), sum(len(d) for d in dialogues)
    return dialogues, report


__all__ = ["load_iemocap", "IEMOCAP_LABELS", "LABEL_MAP"]
