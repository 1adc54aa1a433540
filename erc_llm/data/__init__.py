"""Dialogue data: one schema, loaders for MELD, IEMOCAP and the generic JSONL format.

Knows nothing of models or tokenizers.
"""

from __future__ import annotations

from pathlib import Path

from erc_llm.constants import DATASETS
from erc_llm.data.iemocap import load_iemocap
from erc_llm.data.jsonl import infer_labels, load_jsonl
from erc_llm.data.meld import load_meld
from erc_llm.data.schema import (
    BAD_ROW_MODES,
    IEMOCAP_LABELS,
    MELD_LABELS,
    DataError,
    Dialogue,
    LabelSet,
    LoadReport,
    Utterance,
    label_counts,
)


def load_split(
    dataset: str, split: str, data_dir: str | Path, labels: tuple[str, ...] | None = None, on_bad_row: str = "error"
) -> tuple[list[Dialogue], LabelSet, LoadReport]:
    """Load one split of a dataset; returns dialogues, the label set and what was read/skipped.

    For ``jsonl`` the label set is ``labels`` when given, else inferred from the train split
    (the caller should print ``label_set.labels`` so users see what was inferred). ``on_bad_row``:
    ``error`` (default) reports every bad row of a file at once; ``skip`` leaves them out, counted in the report.
    """
    if dataset == "meld":
        dialogues, report = load_meld(data_dir, split, on_bad_row)
        return dialogues, MELD_LABELS, report
    if dataset == "iemocap":
        dialogues, report = load_iemocap(data_dir, split)
        return dialogues, IEMOCAP_LABELS, report
    if dataset == "jsonl":
        # one canonical form per label: lower case, as every loader reads the data's emotions
        label_set = (LabelSet("jsonl", tuple(str(lab).strip().lower() for lab in labels)) if labels
                     else infer_labels(load_jsonl(data_dir, "train", None, on_bad_row)[0]))
        dialogues, report = load_jsonl(data_dir, split, label_set, on_bad_row)
        return dialogues, label_set, report
    raise DataError(f"dataset {dataset!r} not found; available datasets = {list(DATASETS)}")


def to_hf_dataset(dialogues: list[Dialogue]):
    """Export dialogues as a ``datasets.Dataset``, one row per dialogue (nested turns)."""
    import datasets  # heavy; only for the tokenized cache

    rows = [
        {
            "dialogue_id": d.id,
            "utterances": [
                {"speaker": u.speaker, "text": u.text, "emotion": u.emotion, "utterance_id": u.utterance_id, "audio": u.audio}
                for u in d.utterances
            ],
        }
        for d in dialogues
    ]
    return datasets.Dataset.from_list(rows)


__all__ = [
    "BAD_ROW_MODES", "DATASETS", "DataError", "Dialogue", "IEMOCAP_LABELS", "LabelSet", "LoadReport", "MELD_LABELS", "Utterance",
    "label_counts", "load_split", "to_hf_dataset",
]
