"""Post-hoc prior correction (logit adjustment) of finished evaluations: each utterance's label scores become
``log p(label) - tau * log prior(label)``, with the prior counted on the training split, so rare labels (MELD's
fear and disgust) win more often as tau grows. One tau for all models, chosen on dev (mean weighted F1 of the
members), then read on test; every tau of the grid is written so the whole curve can be inspected.

    python eval/prior_shift.py --dataset meld --data-dir ../shared/data/meld \
        --dev runs/meld_s{0,1,2}/eval/dev_predicted --test runs/meld_s{0,1,2}/eval/test_predicted \
        --out eval/results/meld_lora_gemma-3-270m_textonly_prior_shift.json

``--dev`` and ``--test`` are folders written by ``erc-llm evaluate`` for the same models in the same order.
Like ``eval/ensemble.py``, only evaluations without labels in the history (``history: none``) are accepted:
with predicted labels in the transcript, changing one prediction would change what later turns read.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from erc_llm.data import DATASETS, label_counts, load_split
from erc_llm.data.schema import LabelSet
from erc_llm.io import atomic_write_json
from erc_llm.metrics import compute_metrics

try:  # imported as eval.prior_shift (tests, python -m eval.prior_shift)
    from eval.ensemble import probability_matrix, read_member
except ModuleNotFoundError:  # python eval/prior_shift.py: the script's own folder is first on sys.path
    from ensemble import probability_matrix, read_member

TAUS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


def train_prior(dataset: str, data_dir: Path, labels: tuple[str, ...]) -> np.ndarray:
    train, _, _ = load_split(dataset, "train", data_dir, labels if dataset == "jsonl" else None)
    counts = label_counts(train)
    missing = [n for n in labels if not counts.get(n)]
    if missing:
        raise SystemExit(f"{data_dir}: labels {missing} never occur in the train split; a prior needs every label")
    prior = np.array([counts[n] for n in labels], dtype=float)
    return prior / prior.sum()


def read_split(folders: list[Path], split: str) -> tuple[dict, list[list[dict]]]:
    members = [read_member(f) for f in folders]
    wrong = [f"{f}: split {m.get('split')!r}" for f, (m, _) in zip(folders, members) if m.get("split") != split]
    if wrong:
        raise SystemExit(f"expected {split} evaluations:\n  " + "\n  ".join(wrong))
    return members[0][0], [rows for _, rows in members]


def shifted(rows: list[dict], labels: tuple[str, ...], log_prior: np.ndarray, tau: float) -> tuple[list[str], list[str]]:
    """Gold and adjusted predictions of the scored utterances (ties: the label set's order)."""
    scored = [r for r in rows if r["gold"] is not None]
    probs = probability_matrix(scored, labels)
    pred = np.argmax(np.log(np.clip(probs, 1e-12, None)) - tau * log_prior, axis=1)
    return [r["gold"] for r in scored], [labels[i] for i in pred]


def curve(members: list[list[dict]], label_set: LabelSet, log_prior: np.ndarray, taus) -> list[dict]:
    out = []
    for tau in taus:
        ms = [compute_metrics(*shifted(rows, label_set.labels, log_prior, tau), label_set) for rows in members]
        per_class = {n: float(np.mean([m["per_class"][n]["f1"] for m in ms])) for n in label_set.labels}
        out.append({"tau": tau, "weighted_f1": [m["weighted_f1"] for m in ms],
                    "mean_weighted_f1": float(np.mean([m["weighted_f1"] for m in ms])),
                    "mean_macro_f1": float(np.mean([m["macro_f1"] for m in ms])), "mean_per_class_f1": per_class})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS, help="dataset whose train split gives the prior")
    ap.add_argument("--data-dir", type=Path, required=True, help="the dataset's folder (train split is read)")
    ap.add_argument("--dev", type=Path, nargs="+", required=True, help="dev evaluation folders, one per model")
    ap.add_argument("--test", type=Path, nargs="+", required=True, help="test evaluation folders, same models and order")
    ap.add_argument("--taus", type=float, nargs="+", default=list(TAUS), help="grid of tau values (0 = no change)")
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the curves and the dev-chosen tau")
    args = ap.parse_args(argv)
    if len(args.dev) != len(args.test):
        ap.error(f"--dev has {len(args.dev)} folders and --test {len(args.test)}; give one of each per model")
    if 0.0 not in args.taus:
        ap.error("--taus must include 0 (the unadjusted models) so the change can be read off")
    ref, dev = read_split(args.dev, "dev")
    _, test = read_split(args.test, "test")
    label_set = LabelSet(name=ref["dataset"], labels=tuple(ref["labels"]))
    log_prior = np.log(train_prior(args.dataset, args.data_dir, label_set.labels))
    dev_curve, test_curve = curve(dev, label_set, log_prior, args.taus), curve(test, label_set, log_prior, args.taus)
    best = max(range(len(args.taus)), key=lambda i: (dev_curve[i]["mean_weighted_f1"], -args.taus[i]))
    result = {"dataset": ref["dataset"], "labels": list(label_set.labels), "tau_chosen_on_dev": args.taus[best],
              "dev": dev_curve, "test": test_curve, "dev_folders": [str(f) for f in args.dev],
              "test_folders": [str(f) for f in args.test],
              "command": "python eval/prior_shift.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    atomic_write_json(args.out, result)
    for d, t in zip(dev_curve, test_curve):
        mark = "  <- chosen on dev" if d["tau"] == args.taus[best] else ""
        print(f"tau {d['tau']:.2f}: dev wF1 {d['mean_weighted_f1']:.2f}  test wF1 {t['mean_weighted_f1']:.2f}  "
              f"test macro F1 {t['mean_macro_f1']:.2f}{mark}")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
