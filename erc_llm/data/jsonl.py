"""Generic dialogue format: one JSON object per line, ``{train,dev,test}.jsonl`` in a folder.

    {"dialogue_id": "d1", "utterances": [{"speaker": "A", "text": "hi", "emotion": "joy",
                                          "utterance_id": "d1_0", "audio": "a.wav"}]}

``emotion``, ``utterance_id`` and ``audio`` are optional (unlabelled turns are tagged, not scored).
``dialogue_id``, ``speaker``, ``text``, ``emotion`` and ``utterance_id`` must be JSON strings
(a number is accepted for ``dialogue_id`` and ``utterance_id``); nothing is silently turned into text.

Every bad row of a file is reported at once. ``on_bad_row="skip"`` drops bad turns (and dialogues
left with no turn) instead, counting each reason in the load report.
"""

from __future__ import annotations

import json
from pathlib import Path

from erc_llm.data.schema import (
    BAD_ROW_MODES,
    DataError,
    Dialogue,
    LabelSet,
    LoadReport,
    Utterance,
    check_unique_ids,
    label_counts,
    problem_reason,
    raise_problems,
)
from erc_llm.data.text import normalize_speaker, normalize_text


def split_file(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        found = sorted(p.name for p in Path(data_dir).glob("*.jsonl")) if Path(data_dir).is_dir() else []
        raise DataError(f"jsonl split {split!r}: expected file {path}; found {found or 'no .jsonl files'} in {data_dir}")
    return path


def _string(value, field: str, where: str, problems: list[str], ids: bool = False) -> str | None:
    """``value`` as a string, or None with a problem recorded (numbers allowed for ids only)."""
    if isinstance(value, str):
        return value
    if ids and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    kind = "null" if value is None else type(value).__name__
    problems.append(f"{where}, field {field}: expected a string{' or an integer' if ids else ''}, got {kind} "
                    f"{json.dumps(value)[:40]}")
    return None


def _turn(t, i: int, did: str, f: str, labels: LabelSet | None, problems: list[str]) -> Utterance | None:
    if not isinstance(t, dict) or "speaker" not in t or "text" not in t:
        problems.append(f"{f}: expected an object with 'speaker' and 'text'")
        return None
    before = len(problems)
    text, speaker = _string(t["text"], "text", f, problems), _string(t["speaker"], "speaker", f, problems)
    text, speaker = normalize_text(text or ""), normalize_speaker(speaker or "")
    if len(problems) == before and not text:
        problems.append(f"{f}, field text: empty text")
    if len(problems) == before and not speaker:
        problems.append(f"{f}, field speaker: empty speaker")
    emotion = t.get("emotion")
    if emotion is not None:
        emotion = _string(emotion, "emotion", f, problems)
        emotion = emotion.strip().lower() if emotion is not None else None
        if emotion is not None and labels is not None and emotion not in labels:
            problems.append(f"{f}, field emotion: unknown label {t['emotion']!r}; valid labels = {list(labels.labels)}")
    uid = _string(t["utterance_id"], "utterance_id", f, problems, ids=True) if "utterance_id" in t else f"{did}_{i}"
    audio = t.get("audio")
    if audio is not None and not isinstance(audio, str):
        problems.append(f"{f}, field audio: expected a file path string, got {type(audio).__name__}")
    if len(problems) > before:
        return None
    return Utterance(speaker, text, emotion, uid, audio)


def parse_dialogue(obj, where: str, labels: LabelSet | None, problems: list[str] | None = None) -> Dialogue | None:
    """Validate one decoded JSON object; ``where`` names the file and line for error messages.

    With ``problems`` given, every problem is appended there and the dialogue is returned with its good
    turns only (None if none is left); without it, the first problem raises :class:`DataError`."""
    found: list[str] = [] if problems is None else problems
    start = len(found)
    if not isinstance(obj, dict):
        found.append(f"{where}: expected a JSON object with 'dialogue_id' and 'utterances', got {type(obj).__name__}")
    elif "dialogue_id" not in obj or "utterances" not in obj:
        found.append(f"{where}: missing field(s) {[k for k in ('dialogue_id', 'utterances') if k not in obj]}")
    elif not isinstance(obj["utterances"], list) or not obj["utterances"]:
        found.append(f"{where}, field utterances: expected a non-empty list of turns")
    did = _string(obj["dialogue_id"], "dialogue_id", where, found, ids=True) if len(found) == start else None
    out = []
    if did is not None:
        for i, t in enumerate(obj["utterances"]):
            u = _turn(t, i, did, f"{where}, utterances[{i}]", labels, found)
            if u is not None:
                out.append(u)
    if problems is None and len(found) > start:
        raise DataError(found[start])
    return Dialogue(did, out) if did is not None and out else None


def load_jsonl(data_dir: str | Path, split: str, labels: LabelSet | None,
               on_bad_row: str = "error") -> tuple[list[Dialogue], LoadReport]:
    if on_bad_row not in BAD_ROW_MODES:
        raise ValueError(f"on_bad_row {on_bad_row!r} not supported; available = {list(BAD_ROW_MODES)}")
    path = split_file(data_dir, split)
    report = LoadReport(source=f"jsonl/{split} ({path})")
    dialogues, problems = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is accepted, as in csv
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; save the file as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            report.skip("blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno})")
            report.skip("dialogue: invalid JSON")
            continue
        found: list[str] = []
        d = parse_dialogue(obj, f"{path}, line {n}", labels, found)
        problems.extend(found)
        for p in found:
            report.skip(problem_reason(p))
        if d is not None:
            dialogues.append(d)
    if problems and on_bad_row == "error":
        raise_problems(problems, path)
    check_unique_ids(dialogues, str(path))
    report.dialogues, report.utterances = len(dialogues), sum(len(d) for d in dialogues)
    return dialogues, report


def infer_labels(train: list[Dialogue], name: str = "jsonl") -> LabelSet:
    """Label set from the train split: labels by descending frequency, ties alphabetical."""
    counts = label_counts(train)
    if not counts:
        raise DataError("cannot infer a label set: the train split has no 'emotion' fields; give labels in the config")
    if len(counts) < 2:
        raise DataError(f"the train split has one label only ({list(counts)}); emotion recognition needs at least two: "
                        "check the emotion fields, or give the label set with --labels")
    return LabelSet(name, tuple(sorted(counts, key=lambda k: (-counts[k], k))))
