"""Conversations a person brings as a file, and labelled conversations handed back: what the web page uploads and
downloads (``erc-llm serve``), with the same errors the command line gives (file, line, field, what to do).

Accepted: the generic JSONL format (the first dialogue of the file), a MELD-style CSV (``Speaker`` and
``Utterance`` columns; the first dialogue when ``Dialogue_ID`` is present) and a plain transcript, one
``Speaker: text`` turn per line. Labels in the file are ignored: the model labels every turn.
"""

from __future__ import annotations

import csv
import io
import json
import re

from erc_llm.data.jsonl import parse_dialogue
from erc_llm.data.schema import DataError
from erc_llm.data.text import normalize_speaker, normalize_text

FORMATS = ("jsonl", "csv", "transcript")
TURN = re.compile(r"^\s*(?P<speaker>[^:]{1,80}?)\s*:\s*(?P<text>\S.*)$")


def detect(name: str, content: str) -> str:
    """The format of an uploaded file, from its name, else from its first non-blank line."""
    lower = name.lower()
    if lower.endswith((".jsonl", ".json")):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    first = next((ln for ln in content.splitlines() if ln.strip()), "")
    return "jsonl" if first.lstrip().startswith("{") else "transcript"


def parse(name: str, content: str, max_turns: int) -> list[tuple[str, str]]:
    """(speaker, text) turns of the file's first dialogue; every problem found is named at once."""
    content = content.lstrip("\ufeff")
    if not content.strip():
        raise DataError(f"{name}: the file is empty; expected {', '.join(FORMATS)} (one turn per line)")
    fmt = detect(name, content)
    turns = {"jsonl": _jsonl, "csv": _csv, "transcript": _transcript}[fmt](name, content)
    if not turns:
        raise DataError(f"{name}: no turns found ({fmt}); expected lines like 'Ann: I got the job!'")
    if len(turns) > max_turns:
        raise DataError(f"{name}: {len(turns)} turns; a dialogue holds at most {max_turns}: split the file")
    return turns


def _jsonl(name: str, content: str) -> list[tuple[str, str]]:
    n, line = next((i, ln) for i, ln in enumerate(content.splitlines(), 1) if ln.strip())
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{name}, line {n}: invalid JSON ({e.msg} at column {e.colno}); expected one dialogue "
                        "object per line") from None
    if isinstance(obj, dict):  # the labels in the file are not needed: the model labels the turns
        obj = {**obj, "utterances": [{k: v for k, v in u.items() if k != "emotion"} if isinstance(u, dict) else u
                                     for u in obj.get("utterances", [])]}
    problems: list[str] = []
    d = parse_dialogue(obj, f"{name}, line {n}", None, problems)
    if problems:
        raise DataError("\n".join(problems[:10]))
    return [(u.speaker, u.text) for u in d.utterances]


def _csv(name: str, content: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    header = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("Speaker", "Utterance") if c not in header]
    if missing:
        raise DataError(f"{name}, line 1: missing column(s) {missing}; found {header}; expected a MELD-style CSV "
                        "with Speaker and Utterance columns")
    twice = [c for c in ("Speaker", "Utterance", "Dialogue_ID") if header.count(c) > 1]
    if twice:
        raise DataError(f"{name}, line 1: column(s) {twice} appear more than once; expected each once")
    turns, problems, first = [], [], None
    for n, row in enumerate(reader, 2):
        row = {(k or "").strip(): v for k, v in row.items()}
        if "Dialogue_ID" in row:
            first = row["Dialogue_ID"] if first is None else first
            if row["Dialogue_ID"] != first:
                break
        speaker, text = normalize_speaker(row.get("Speaker") or ""), normalize_text(row.get("Utterance") or "")
        if not speaker or not text:
            problems.append(f"{name}, line {n}, field {'Speaker' if not speaker else 'Utterance'}: empty; every "
                            "turn needs a speaker and text")
        turns.append((speaker, text))
    if problems:
        raise DataError("\n".join(problems[:10]))
    return turns


def _transcript(name: str, content: str) -> list[tuple[str, str]]:
    turns, problems = [], []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        m = TURN.match(line)
        if m is None:
            problems.append(f"{name}, line {n}: {line[:40]!r} is not a turn; expected 'Speaker: text'")
            continue
        turns.append((normalize_speaker(m["speaker"]), normalize_text(m["text"])))
    if problems:
        raise DataError("\n".join(problems[:10]))
    return turns


def to_jsonl(dialogue_id: str, turns) -> str:
    """A labelled dialogue (``TurnResult`` s) in the generic JSONL format, every label's probability included."""
    return json.dumps({"dialogue_id": dialogue_id, "utterances": [
        {"speaker": t.speaker, "text": t.text, "emotion": t.label, "probabilities": t.probs} for t in turns]},
        ensure_ascii=False) + "\n"


def to_csv(dialogue_id: str, turns, labels: tuple[str, ...]) -> str:
    """A labelled dialogue as CSV: one row per turn, a column per label's probability."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["Dialogue_ID", "Utterance_ID", "Speaker", "Utterance", "Emotion", *[f"p_{lab}" for lab in labels]])
    for t in turns:
        w.writerow([dialogue_id, t.index, t.speaker, t.text, t.label, *[f"{t.probs[lab]:.6f}" for lab in labels]])
    return out.getvalue()
