"""Generic dialogue format: one JSON object per line, ``{train,dev,test}.jsonl`` in a folder.

    {"dialogue_id": "d1", "utterances": [{"speaker": "A", "text": "hi", "emotion": "joy",
                                          "utterance_id": "d1_0", "audio": "a.wav"}]}

``emotion``, ``utterance_id`` and ``audio`` are optional (unlabelled turns are tagged, not scored).
"""

from __future__ import annotations

import json
from pathlib import Path

from erc_llm.data.schema import DataError, Dialogue, LabelSet, LoadReport, Utterance, check_unique_ids, label_counts
from erc_llm.data.text import normalize_speaker, normalize_text


def split_file(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        found = sorted(p.name for p in Path(data_dir).glob("*.jsonl")) if Path(data_dir).is_dir() else []
        raise DataError(f"jsonl split {split!r}: expected file {path}; found {found or 'no .jsonl files'} in {data_dir}")
    return path


def parse_dialogue(obj, where: str, labels: LabelSet | None) -> Dialogue:
    """Validate one decoded JSON object; ``where`` names the file and line for error messages."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'dialogue_id' and 'utterances', got {type(obj).__name__}")
    if "dialogue_id" not in obj or "utterances" not in obj:
        raise DataError(f"{where}: missing field(s) {[k for k in ('dialogue_id', 'utterances') if k not in obj]}")
    did = str(obj["dialogue_id"])
    turns = obj["utterances"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}, field utterances: expected a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        f = f"{where}, utterances[{i}]"
        if not isinstance(t, dict) or "speaker" not in t or "text" not in t:
            raise DataError(f"{f}: expected an object with 'speaker' and 'text'")
        text, speaker = normalize_text(str(t["text"])), normalize_speaker(str(t["speaker"]))
        if not text:
            raise DataError(f"{f}, field text: empty text")
        if not speaker:
            raise DataError(f"{f}, field speaker: empty speaker")
        emotion = t.get("emotion")
        if emotion is not None:
            emotion = str(emotion).strip().lower()
            if labels is not None and emotion not in labels:
                raise DataError(f"{f}, field emotion: unknown label {t['emotion']!r}; valid labels = {list(labels.labels)}")
        uid = str(t.get("utterance_id", f"{did}_{i}"))
        out.append(Utterance(speaker, text, emotion, uid, t.get("audio")))
    return Dialogue(did, out)


def load_jsonl(data_dir: str | Path, split: str, labels: LabelSet | None) -> tuple[list[Dialogue], LoadReport]:
    path = split_file(data_dir, split)
    report = LoadReport(source=f"jsonl/{split} ({path})")
    dialogues = []
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; save the file as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            report.skip("blank line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
        dialogues.append(parse_dialogue(obj, f"{path}, line {n}", labels))
    check_unique_ids(dialogues, str(path))
    report.dialogues, report.utterances = len(dialogues), sum(len(d) for d in dialogues)
    return dialogues, report


def infer_labels(train: list[Dialogue], name: str = "jsonl") -> LabelSet:
    """Label set from the train split: labels by descending frequency, ties alphabetical."""
    counts = label_counts(train)
    if not counts:
        raise DataError("cannot infer a label set: the train split has no 'emotion' fields; give labels in the config")
    return LabelSet(name, tuple(sorted(counts, key=lambda k: (-counts[k], k))))
