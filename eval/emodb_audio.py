"""The waveform path end to end on real speech: EmoDB (535 German utterances, 10 speakers, 7 emotions).

    python eval/emodb_audio.py --emodb ../shared/data/emodb

Extracts the 8 Praat prosody features and the 88 eGeMAPSv02 functionals from every wav with
``erc-llm audio extract`` code (resumable, cached under ``--features``), then trains an audio-only
classifier (standardisation + logistic regression, balanced class weights) with leave-one-speaker-out
folds (speaker independent) and reports unweighted accuracy (UA = balanced accuracy) per feature set, with
global standardisation and with per-speaker standardisation (each speaker's features z-scored with that
speaker's own unlabelled statistics, as in the eGeMAPS paper, Eyben et al. 2016).
Writes ``eval/results/emodb_audio/{results.json,table.md}``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from erc_llm.audio import extract_dir, load_feature_csv
from erc_llm.io import atomic_write_json, atomic_write_text


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def per_speaker(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """z-score every speaker's features with that speaker's mean/std (no labels used); NaNs stay NaN."""
    out = x.copy()
    for g in np.unique(groups):
        m = groups == g
        out[m] = (x[m] - np.nanmean(x[m], 0)) / (np.nanstd(x[m], 0) + 1e-8)
    return out


def classify(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> dict:
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.model_selection import LeaveOneGroupOut
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pred = np.empty_like(y)
    folds = []
    for tr, te in LeaveOneGroupOut().split(x, y, groups):
        clf = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(),
                            LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000, random_state=seed))
        clf.fit(x[tr], y[tr])
        pred[te] = clf.predict(x[te])
        folds.append(100 * balanced_accuracy_score(y[te], pred[te]))
    return {"ua_pooled": 100 * balanced_accuracy_score(y, pred), "ua_fold_mean": float(np.mean(folds)),
            "ua_fold_std": float(np.std(folds)), "wa": 100 * float(np.mean(pred == y)),
            "macro_f1": 100 * f1_score(y, pred, average="macro"), "folds": len(folds)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emodb", required=True, help="folder with labels.csv and wav/")
    p.add_argument("--features", default=str(ROOT / "eval" / "out" / "emodb_features"))
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "emodb_audio"))
    args = p.parse_args()
    emodb = Path(args.emodb)
    with open(emodb / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ids = [Path(r["path"]).stem for r in rows]
    y = np.array([r["emotion"] for r in rows])
    groups = np.array([r["speaker"] for r in rows])
    tables, seconds = {}, {}
    for source in ("praat", "egemaps"):
        t0 = time.time()
        report = extract_dir(source, emodb / "wav", Path(args.features) / source)
        seconds[source] = time.time() - t0
        if report["failed"]:
            print(f"{source}: {len(report['failed'])} files failed: {list(report['failed'].items())[:3]}")
        tables[source] = load_feature_csv(Path(args.features) / source / "features.csv")
    missing = {s: sum(i not in t.values for i in ids) for s, t in tables.items()}
    mats = {s: np.stack([t.values.get(i, np.full(len(t.names), np.nan, np.float32)) for i in ids]) for s, t in tables.items()}
    mats["praat+egemaps"] = np.concatenate([mats["praat"], mats["egemaps"]], axis=1)
    results = {}
    for name, m in mats.items():
        results[name] = {"features": m.shape[1], **classify(m, y, groups)}
        results[name + " (per-speaker norm)"] = {"features": m.shape[1], **classify(per_speaker(m, groups), y, groups)}
    command = f"python eval/emodb_audio.py --emodb {args.emodb}"
    classes = sorted(set(y))
    atomic_write_json(Path(args.out) / "results.json", {
        "command": command, "utterances": len(ids), "speakers": len(set(groups)), "classes": classes,
        "chance_ua": 100 / len(classes), "missing_features": missing, "extract_seconds": seconds,
        "classifier": "median impute + standardise + logistic regression (C=0.1, balanced), leave-one-speaker-out",
        "results": results})
    lines = [f"# EmoDB audio-only emotion classification (speaker independent, {len(set(groups))} folds)", "",
             f"Command: `{command}`; {len(ids)} utterances, {len(classes)} classes (chance UA {100 / len(classes):.1f}).", "",
             "| features | dims | UA (pooled) | UA per fold (mean ± std) | WA | macro F1 |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['features']} | {r['ua_pooled']:.2f} | {r['ua_fold_mean']:.2f} ± {r['ua_fold_std']:.2f} "
                     f"| {r['wa']:.2f} | {r['macro_f1']:.2f} |")
    lines += ["", f"Extraction wall time this run (2-core Xeon; files already in `{_rel(args.features)}` are not redone): "
              f"praat {seconds['praat']:.0f} s, egemaps {seconds['egemaps']:.0f} s for {len(ids)} files."]
    atomic_write_text(Path(args.out) / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
