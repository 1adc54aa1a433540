"""Streaming-transcript prompts: a dialogue -> token ids + emotion-slot positions. Pure; runs no model.

A dialogue is one transcript: the header, then per turn ``prefix(turn) + label + suffix``. The
builder tokenizes these segments separately and concatenates them, so the full-transcript view
(used for training) and the turn-by-turn view (used by the KV-cached decoder) are the same token
sequence by construction. A label at turn *i* can only see turns ``<= i`` (causal).

Truncation: when a transcript exceeds ``max_tokens``, the header is kept and the oldest turns are
dropped first; the turn being labelled is never dropped (its text is capped at
``max_utterance_tokens``). Training covers the dropped turns too: :meth:`PromptBuilder.pieces` cuts a long
dialogue into transcripts that each fit, every turn scored in exactly one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from erc_llm.data.schema import Dialogue, LabelSet, Utterance

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
LABEL_FIELD = "{label}"
AUDIO_FIELD = "{audio}"
CONVERSATION_FIELD = "{conversation}"
CONTEXTS = ("online", "offline")
AUDIO_TOKEN = -1  # placeholder id of a soft audio token (filled by erc_llm.projector)
_TEXT_END = "\x00"


@dataclass(frozen=True)
class Templates:
    header: str
    turn_prefix: str
    turn_suffix: str
    version: str
    audio: str = ""  # audio.txt: wraps a turn's soft audio tokens ({audio}); written right after the text

    @classmethod
    def load(cls, directory: str | Path = PROMPTS_DIR, context: str = "online") -> "Templates":
        """``context="offline"`` takes ``header_offline.txt``: the header also holds the whole conversation's
        text (``{conversation}``), so every slot sees what follows it (batch evaluation of finished dialogues)."""
        if context not in CONTEXTS:
            raise ValueError(f"context {context!r} not supported; available = {list(CONTEXTS)}")
        directory = Path(directory)
        files = {"header": directory / ("header.txt" if context == "online" else "header_offline.txt"),
                 "turn": directory / "turn.txt"}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"prompt template(s) {missing} not found; expected {files['header'].name} and "
                                    f"turn.txt in {directory}")
        header = files["header"].read_text(encoding="utf-8")
        if (CONVERSATION_FIELD in header) != (context == "offline"):
            raise ValueError(f"{files['header']}: an {context} header must {'' if context == 'offline' else 'not '}"
                             f"contain {CONVERSATION_FIELD}")
        turn = files["turn"].read_text(encoding="utf-8")
        if turn.count(LABEL_FIELD) != 1:
            raise ValueError(f"{files['turn']}: must contain exactly one {LABEL_FIELD} slot, found {turn.count(LABEL_FIELD)}")
        prefix, suffix = turn.split(LABEL_FIELD)
        audio_path = directory / "audio.txt"
        audio = audio_path.read_text(encoding="utf-8").rstrip("\n") if audio_path.is_file() else ""
        if audio and audio.count(AUDIO_FIELD) != 1:
            raise ValueError(f"{audio_path}: must contain exactly one {AUDIO_FIELD}, found {audio.count(AUDIO_FIELD)}")
        version = hashlib.sha256((header + "\0" + turn).encode()).hexdigest()[:12]
        return cls(header, prefix, suffix, version, audio)


@dataclass
class Transcript:
    """A whole dialogue as one token sequence.

    ``slots[i]`` is the position whose next-token distribution predicts turn *i*'s label;
    ``label_positions[i]`` are the positions of turn *i*'s label tokens (teacher forcing targets).
    ``first_turn`` is the index of the first turn kept after truncation.
    """

    input_ids: list[int]
    slots: list[int] = field(default_factory=list)
    label_positions: list[list[int]] = field(default_factory=list)
    turn_index: list[int] = field(default_factory=list)
    first_turn: int = 0


@dataclass
class Piece:
    """One transcript of a dialogue cut into pieces (:meth:`PromptBuilder.pieces`): turns ``first`` to ``end``
    (exclusive) are scored here; the transcript may also hold turns after ``end`` (look-ahead only)."""

    transcript: Transcript
    first: int
    end: int

    def scored(self) -> list[bool]:
        """Per slot of the transcript: whether its turn is scored in this piece."""
        return [self.first <= t < self.end for t in self.transcript.turn_index]

    def targets(self, labels: list[int]) -> list[int]:
        """Per slot: the label index its turn is trained towards (``labels`` per turn of the dialogue), -1 where
        the turn is unlabelled or scored in another piece."""
        return [labels[t] if ok else -1 for t, ok in zip(self.transcript.turn_index, self.scored())]


def fit_window(header_len: int, seg_lens: list[int], budget: int) -> int:
    """Smallest ``k`` such that ``header_len + sum(seg_lens[k:]) <= budget``; the last segment always stays."""
    total = header_len + sum(seg_lens)
    k = 0
    while total > budget and k < len(seg_lens) - 1:
        total -= seg_lens[k]
        k += 1
    return k


class PromptBuilder:
    """Renders templates and tokenizes segments; caches the label token ids."""

    def __init__(self, tokenizer, labels: LabelSet, templates: Templates | None = None,
                 max_tokens: int = 2048, max_utterance_tokens: int = 96, max_note_tokens: int = 64,
                 audio_tokens: int = 0, write_labels: bool = True):
        """``write_labels=False``: earlier turns carry no label in the transcript (the slot stays as a query
        point, only the turn suffix follows it), so training and decoding see the same text-only history."""
        self.tokenizer = tokenizer
        self.labels = labels
        self.templates = templates or Templates.load()
        self.max_tokens = max_tokens
        self.max_utterance_tokens = max_utterance_tokens
        self.max_note_tokens = max_note_tokens
        self.audio_tokens = audio_tokens
        self.write_labels = write_labels
        if audio_tokens and not self.templates.audio:
            raise FileNotFoundError("audio soft tokens need an audio.txt prompt template with one {audio} field")
        space = self.templates.turn_prefix.endswith(" ")
        self._prefix = self.templates.turn_prefix[:-1] if space else self.templates.turn_prefix
        self.label_ids: list[list[int]] = [self._encode((" " if space else "") + lab) for lab in labels.labels]
        empty = [lab for lab, ids in zip(labels.labels, self.label_ids) if not ids]
        if empty:
            raise ValueError(f"labels {empty} tokenize to nothing with this tokenizer")
        self.suffix_ids = self._encode(self.templates.turn_suffix)
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos = [bos] if bos is not None else []
        longest_label = max(len(ids) for ids in self.label_ids)
        self.max_turn_tokens = max_utterance_tokens + max_note_tokens + 40 + longest_label + len(self.suffix_ids)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def header_ids(self, dialogue: Dialogue) -> list[int]:
        conversation = ""
        if CONVERSATION_FIELD in self.templates.header:
            conversation = "\n".join(f"{u.speaker}: {self._cap(u.text, self.max_utterance_tokens)}"
                                      for u in dialogue.utterances)
        text = self.templates.header.format(labels=", ".join(self.labels.labels), speakers=", ".join(dialogue.speakers),
                                            conversation=conversation)
        return self.bos + self._encode(text)

    def shared_header_ids(self) -> list[int]:
        """The tokens every dialogue's header starts with: BOS and the header text before its first per-dialogue
        field (the task line and the label list). A tokenizer may merge the last of them with what follows, so a
        user of this prefix keeps only the tokens a header really shares (``decoding.SharedPrefix``)."""
        text = self.templates.header.format(labels=", ".join(self.labels.labels), speakers="\0", conversation="\0")
        return self.bos + self._encode(text.split("\0")[0])

    def _cap(self, text: str, limit: int) -> str:
        ids = self._encode(text)
        return self.tokenizer.decode(ids[:limit]) + " ..." if len(ids) > limit else text

    def turn_ids(self, utt: Utterance, note: str = "") -> list[int]:
        """Tokens of a turn up to (not including) its label: the last one is the emotion slot.

        ``note`` (speaker memory, see ``speakers.py``) is written on its own line before the turn.
        """
        text = self._prefix.format(speaker=utt.speaker, text=self._cap(utt.text, self.max_utterance_tokens) + _TEXT_END)
        if note:
            text = self._cap(note, self.max_note_tokens) + "\n" + text
        before, _, after = text.rpartition(_TEXT_END)
        if not self.audio_tokens:
            return self._encode(before + after)
        a_before, a_after = self.templates.audio.split(AUDIO_FIELD)
        return self._encode(before + a_before) + [AUDIO_TOKEN] * self.audio_tokens + self._encode(a_after + after)

    def answer_ids(self, label: str) -> list[int]:
        """Label tokens (unless labels are not written) plus the turn suffix: what follows a turn's slot."""
        return self._answer(self.labels.index(label))

    def _answer(self, index: int) -> list[int]:
        return (self.label_ids[index] if self.write_labels else []) + self.suffix_ids

    def encode(self, dialogue: Dialogue, notes: list[str] | None = None) -> dict:
        """Tokenized segments of a dialogue (cacheable): header, per-turn prefixes, gold label indices (-1 = none)."""
        notes = notes or [""] * len(dialogue.utterances)
        return {
            "dialogue_id": dialogue.id,
            "header": self.header_ids(dialogue),
            "turns": [self.turn_ids(u, n) for u, n in zip(dialogue.utterances, notes)],
            "labels": [self.labels.index(u.emotion) if u.emotion is not None else -1 for u in dialogue.utterances],
            "utterance_ids": [u.utterance_id for u in dialogue.utterances],
        }

    def assemble(self, header: list[int], turns: list[list[int]], written: list[int]) -> Transcript:
        """Concatenate segments with label ``written[i]`` (an index) in turn *i*'s slot.

        Transcripts longer than ``max_tokens`` keep the header and the most recent turns.
        """
        if len(written) != len(turns):
            raise ValueError(f"{len(turns)} turns but {len(written)} labels")
        answers = [self._answer(w) for w in written]
        k = fit_window(len(header), [len(t) + len(a) for t, a in zip(turns, answers)], self.max_tokens)
        ids = list(header)
        out = Transcript(ids, first_turn=k)
        for i in range(k, len(turns)):
            ids.extend(turns[i])
            out.slots.append(len(ids) - 1)
            out.label_positions.append(list(range(len(ids), len(ids) + len(answers[i]) - len(self.suffix_ids))))
            out.turn_index.append(i)
            ids.extend(answers[i])
        return out

    def pieces(self, header: list[int], turns: list[list[int]], written: list[int], lookahead: int = 0) -> list[Piece]:
        """Transcripts that give every turn exactly one scored slot, latest first: the longest run of turns that
        fits ``max_tokens`` (the header kept), then the same for the turns before it, and so on. A dialogue that
        fits is one piece, :meth:`assemble`'s transcript. Each earlier piece ends where the later one starts,
        plus the ``lookahead`` turns after it (text its slots may attend to, scored in the later piece); so
        the first turns of a long dialogue are scored with the start of the dialogue as their context, as a
        streaming decoder sees them, instead of being cut off."""
        n = len(turns)
        out, end, scored_to = [], n, n
        while scored_to > 0:
            tr = self.assemble(header, turns[:end], written[:end])
            if tr.first_turn >= scored_to:  # the look-ahead turns alone fill the budget: score without them
                end = scored_to
                continue
            out.append(Piece(tr, tr.first_turn, scored_to))
            scored_to = tr.first_turn
            end = min(n, scored_to + lookahead)
        return out

    def build(self, dialogue: Dialogue, history: list[str], notes: list[str] | None = None) -> Transcript:
        """Full transcript with ``history[i]`` written in turn *i*'s slot (gold labels in training)."""
        if len(history) != len(dialogue.utterances):
            raise ValueError(f"dialogue {dialogue.id}: {len(dialogue.utterances)} turns but {len(history)} labels")
        enc = self.encode(dialogue, notes)
        return self.assemble(enc["header"], enc["turns"], [self.labels.index(h) for h in history])
