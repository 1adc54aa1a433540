"""The one data schema every loader returns and every model consumes."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from erc_llm.io import content_digest


class DataError(ValueError):
    """Bad input data. The message names the file, the line/row and field, and what was expected."""


BAD_ROW_MODES = ("error", "skip")


def problem_reason(problem: str) -> str:
    """What a problem line counts as in a load report: its field and what was wrong, without file and line."""
    tail = problem.split("field ", 1)[1] if "field " in problem else problem.rsplit(": ", 1)[-1]
    for cut in (";", ", got", " (dialogue"):
        tail = tail.split(cut)[0]
    return tail


def raise_problems(problems: list[str], path) -> None:
    """One DataError listing every problem of a file (the first 20) and the way on."""
    more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise DataError(f"{len(problems)} problem(s) in {path}:\n" + "\n".join(problems[:20]) + more +
                    "\nFix these rows, or pass --on-bad-row skip to leave them out (each is counted in the load report).")


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of emotion labels; the order fixes class indices everywhere."""

    name: str
    labels: tuple[str, ...]

    def __post_init__(self):
        if not self.labels:
            raise ValueError(f"label set {self.name!r} is empty")
        dupes = [lab for lab, n in Counter(self.labels).items() if n > 1]
        if dupes:
            raise ValueError(f"label set {self.name!r} repeats labels {dupes}")
        bad = [lab for lab in self.labels if not lab or lab != lab.strip()]
        if bad:
            raise ValueError(f"label set {self.name!r} has empty or space-padded labels {bad!r}")

    def __len__(self) -> int:
        return len(self.labels)

    def __contains__(self, label: str) -> bool:
        return label in self.labels

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise KeyError(f"label {label!r} is not in label set {self.name!r}; valid labels = {list(self.labels)}") from None


MELD_LABELS = LabelSet("meld", ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise"))
IEMOCAP_LABELS = LabelSet("iemocap", ("happy", "sad", "neutral", "angry", "excited", "frustrated"))


@dataclass
class Utterance:
    speaker: str
    text: str
    emotion: str | None = None
    utterance_id: str = ""
    audio: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Dialogue:
    id: str
    utterances: list[Utterance]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def speakers(self) -> list[str]:
        """Participants in order of first appearance."""
        return list(dict.fromkeys(u.speaker for u in self.utterances))


@dataclass
class LoadReport:
    """What a loader read and what it skipped (and why), so nothing is dropped silently."""

    source: str
    dialogues: int = 0
    utterances: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def summary(self) -> str:
        s = f"{self.source}: {self.dialogues} dialogues, {self.utterances} utterances"
        if self.skipped:
            s += "; skipped " + ", ".join(f"{n} ({why})" for why, n in sorted(self.skipped.items()))
        return s


def label_counts(dialogues: Iterable[Dialogue]) -> Counter:
    return Counter(u.emotion for d in dialogues for u in d.utterances if u.emotion is not None)


def check_unique_ids(dialogues: list[Dialogue], source: str) -> None:
    seen: dict[str, str] = {}
    for d in dialogues:
        if d.id in seen:
            raise DataError(f"{source}: duplicate dialogue id {d.id!r}; every dialogue id must be unique")
        seen[d.id] = d.id
    utt: set[str] = set()
    for d in dialogues:
        for u in d.utterances:
            if u.utterance_id in utt:
                raise DataError(
                    f"{source}: duplicate utterance id {u.utterance_id!r} in dialogue {d.id!r}; "
                    "utterance ids must be unique within a split"
                )
            utt.add(u.utterance_id)


def dialogues_digest(dialogues: Iterable[Dialogue]) -> str:
    """Content fingerprint of dialogues: ids, speakers, texts, gold labels and audio references, in order."""
    return content_digest([[d.id, [[u.utterance_id, u.speaker, u.text, u.emotion, u.audio] for u in d.utterances]]
                           for d in dialogues])
