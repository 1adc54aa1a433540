"""Probability ensemble of several models' evaluations of one split: each utterance's label probabilities are
averaged over the members and the label with the highest mean is the prediction. Writes ``predictions.jsonl``,
``metrics.json``, ``report.md`` and ``confusion.png`` like ``erc-llm evaluate``.

    python eval/ensemble.py runs/meld_s0/eval/dev runs/meld_s1/eval/dev runs/meld_s2/eval/dev \
        --out eval/results/meld_lora_gemma-3-270m_textonly_ensemble/dev

Each input is a folder written by ``erc-llm evaluate`` (``metrics.json`` + ``predictions.jsonl``). Averaging
finished predictions equals decoding with the ensemble only when no member wrote its labels into the
transcript (``history: none``, the text-only recipe): with predicted labels in the history each member would
have read the ensemble's labels, not its own, so such evaluations are refused. The members must cover the
same dataset, split, context, label set and utterances. Where a member's model is a training run folder, its
``config.yaml`` is recorded with it, so ``eval/seeds.py`` can summarise ensembles of one seed each over seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from erc_llm.data.schema import DataError, LabelSet
from erc_llm.metrics import read_evaluation, write_evaluation

MUST_MATCH = ("dataset", "split", "context", "labels")


def read_member(folder: Path) -> tuple[dict, list[dict]]:
    try:
        metrics, rows = read_evaluation(folder)
    except DataError as e:
        raise SystemExit(str(e)) from None
    if metrics.get("history") != "none":
        raise SystemExit(f"{folder}: history is {metrics.get('history')!r}; averaging finished predictions is an "
                         "ensemble only for models that write no labels into the transcript (history 'none')")
    return metrics, rows


def run_config(model: str | None) -> dict | None:
    """The training config of a member's run folder (``config.yaml``), or None for a shipped or hub model."""
    path = Path(model) / "config.yaml" if model else None
    return yaml.safe_load(path.read_text()) if path is not None and path.is_file() else None


def member_record(folder: Path, metrics: dict) -> dict:
    """What an ensemble's (or a fusion's) ``metrics.json`` records of one member evaluation."""
    model = metrics.get("model")
    return {"folder": str(folder), "model": model, "weighted_f1": metrics.get("weighted_f1"), "config": run_config(model)}


def check_members(members: list[tuple[Path, dict, list[dict]]]) -> None:
    """Report every mismatch between the first member and the others at once."""
    (first, ref, ref_rows), problems = members[0], []
    ids = [r["utterance_id"] for r in ref_rows]
    for folder, metrics, rows in members[1:]:
        problems += [f"{folder}: {k} = {metrics.get(k)!r}, but {first} has {ref.get(k)!r}"
                     for k in MUST_MATCH if metrics.get(k) != ref.get(k)]
        if [r["utterance_id"] for r in rows] != ids:
            problems.append(f"{folder}: its {len(rows)} utterances are not the {len(ids)} of {first} in the same order")
        else:
            differ = [r["utterance_id"] for r, g in zip(rows, ref_rows) if r.get("gold") != g.get("gold")]
            if differ:
                problems.append(f"{folder}: gold labels of {len(differ)} utterances (e.g. {differ[:3]}) differ from "
                                f"{first}'s; evaluate every member on the same data")
    for folder, metrics, rows in members:
        labels = metrics.get("labels") or []
        bad = [n for n, r in enumerate(rows, 1) if not isinstance(r.get("probabilities"), dict)
               or any(lab not in r["probabilities"] for lab in labels)]
        if bad:
            problems.append(f"{folder}/predictions.jsonl, line {bad[0]}: probabilities lack labels of {labels} "
                            f"({len(bad)} rows); write the evaluation again with erc-llm evaluate")
    if problems:
        raise SystemExit("cannot ensemble these evaluations:\n  " + "\n  ".join(problems))


def probability_matrix(rows: list[dict], labels) -> np.ndarray:
    """The rows' label probabilities as an (utterances, labels) array, columns in ``labels`` order."""
    return np.array([[r["probabilities"][n] for n in labels] for r in rows])


def with_probabilities(rows: list[dict], probs: np.ndarray, labels) -> list[dict]:
    """The rows with new label probabilities (rounded to 6 places) and their argmax as the prediction (ties: the
    label set's order); shared by ensembles, audio fusion and the kNN memory."""
    return [{**r, "predicted": labels[int(np.argmax(p))], "probabilities": {n: round(float(v), 6) for n, v in zip(labels, p)}}
            for r, p in zip(rows, probs)]


def average(members: list[list[dict]], labels: list[str]) -> list[dict]:
    """Mean probabilities per utterance; the prediction is their argmax (ties: the label set's order)."""
    return with_probabilities(members[0], np.mean([probability_matrix(rows, labels) for rows in members], axis=0), labels)


def ensemble(folders: list[Path], out: Path, command: str = "") -> dict:
    members = [(f, *read_member(f)) for f in folders]
    check_members(members)
    ref = members[0][1]
    labels = LabelSet(name=ref["dataset"], labels=tuple(ref["labels"]))
    rows = average([m[2] for m in members], list(labels.labels))
    name = f"ensemble of {len(folders)}"
    seconds = sum(m.get("seconds", 0.0) for _, m, _ in members)
    info = {**{k: ref[k] for k in MUST_MATCH}, "history": "none",
            "dialogues": ref["dialogues"], "utterances": len(rows),
            "scored_utterances": sum(r["gold"] is not None for r in rows),
            "model": name, "members": [member_record(f, m) for f, m, _ in members],
            "seconds": seconds, "utterances_per_second": len(rows) / max(seconds, 1e-9), "command": command}
    return write_evaluation(out, rows, labels, info, f"{ref['dataset']}/{ref['split']} {name} (history=none, {ref['context']})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("members", nargs="+", type=Path, help="evaluation folders (metrics.json + predictions.jsonl)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the ensemble's predictions and metrics")
    args = ap.parse_args(argv)
    if len(args.members) < 2:
        ap.error(f"an ensemble needs at least 2 evaluation folders; got {len(args.members)}")
    from erc_llm.io import claim_output

    claim_output(args.out, "evaluation", inputs=args.members)
    m = ensemble(args.members, args.out, "python eval/ensemble.py " + " ".join(sys.argv[1:] if argv is None else argv))
    members = " · ".join(f"{x['weighted_f1']:.2f}" for x in m["members"])
    print(f"{m['dataset']}/{m['split']} ensemble of {len(args.members)} ({members}): weighted F1 {m['weighted_f1']:.2f}, "
          f"WA {m['accuracy']:.2f}, UA {m['unweighted_accuracy']:.2f}, macro F1 {m['macro_f1']:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
