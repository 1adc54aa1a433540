"""Soft targets for knowledge distillation: the label probabilities a teacher gave every training utterance.

A teacher is an evaluation folder of the **train** split, as ``erc-llm evaluate`` writes it (one model) or
``eval/ensemble.py`` (the mean of several): ``metrics.json`` plus ``predictions.jsonl`` with ``probabilities``
per utterance. With ``teacher`` set, training's loss at every labelled slot becomes
``(1 - teacher_weight) * cross-entropy(gold) + teacher_weight * KL(teacher || model)`` (Hinton et al., 2015),
so one adapter learns what an ensemble of adapters agrees on::

    erc-llm evaluate --dataset meld --split train --data-dir ../shared/data/meld --run runs/meld_s0 \\
        --out runs/meld_s0/eval/train                                   # likewise for runs/meld_s1, runs/meld_s2
    python eval/ensemble.py runs/meld_s{0,1,2}/eval/train --out runs/teacher_meld
    accelerate launch --config_file configs/accelerate/cpu.yaml erc_llm/train.py --config configs/meld.yaml \\
        --data-dir ../shared/data/meld --teacher runs/teacher_meld --out runs/meld_distilled

The teacher's probabilities are read once, checked against the training split (every labelled utterance needs a
row, over this run's label set) and kept as one (turns, labels) array per training dialogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erc_llm.data.schema import DataError, Dialogue, LabelSet
from erc_llm.io import sha256_file
from erc_llm.metrics import read_evaluation


@dataclass(frozen=True)
class Teacher:
    """Per-utterance label probabilities (in ``labels`` order) from an evaluation of the train split."""

    folder: Path
    digest: str  # sha256 of predictions.jsonl: which soft targets a run trained on
    labels: tuple[str, ...]
    probabilities: dict[str, np.ndarray]

    @classmethod
    def load(cls, folder: str | Path, labels: LabelSet) -> "Teacher":
        folder = Path(folder)
        metrics, rows = read_evaluation(folder)
        if metrics.get("split") != "train":
            raise DataError(f"teacher {folder}: an evaluation of the {metrics.get('split')!r} split; soft targets are "
                            "for training turns, so evaluate the teacher with --split train")
        if sorted(metrics.get("labels") or []) != sorted(labels.labels):
            raise DataError(f"teacher {folder}: label set {metrics.get('labels')}, but this run trains on "
                            f"{list(labels.labels)}; the teacher must score the same labels")
        probs, problems = {}, []
        for n, row in enumerate(rows, 1):
            p = row.get("probabilities") or {}
            vec = np.array([p.get(lab, np.nan) for lab in labels.labels], dtype=np.float64)
            if not np.isfinite(vec).all() or (vec < 0).any() or abs(vec.sum() - 1) > 1e-3:
                problems.append(f"line {n} ({row.get('utterance_id')!r}): probabilities {p} are not a distribution "
                                f"over {list(labels.labels)}")
                continue
            probs[str(row.get("utterance_id"))] = (vec / vec.sum()).astype(np.float32)
        if problems:
            raise DataError(f"teacher {folder / 'predictions.jsonl'}: {len(problems)} bad row(s):\n  "
                            + "\n  ".join(problems[:10]))
        return cls(folder, sha256_file(folder / "predictions.jsonl"), tuple(labels.labels), probs)

    def targets(self, dialogues: list[Dialogue]) -> list[np.ndarray]:
        """One (turns, labels) array per dialogue: the teacher's probabilities of every turn (zeros for unlabelled
        turns, which carry no loss). Raises naming the labelled utterances the teacher has no row for."""
        missing, out = [], []
        for d in dialogues:
            rows = np.zeros((len(d.utterances), len(self.labels)), dtype=np.float32)
            for t, u in enumerate(d.utterances):
                if u.emotion is None:
                    continue
                p = self.probabilities.get(u.utterance_id)
                if p is None:
                    missing.append(u.utterance_id)
                else:
                    rows[t] = p
            out.append(rows)
        if missing:
            total = sum(u.emotion is not None for d in dialogues for u in d.utterances)
            raise DataError(f"teacher {self.folder}: {len(missing)} of {total} labelled training utterances have no "
                            f"probabilities (first: {missing[:5]}); evaluate the teacher on this run's training "
                            "split (same data_dir, --split train)")
        return out
