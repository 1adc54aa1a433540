"""ERC metrics and their reports (scikit-learn): weighted F1, WA, UA, macro F1, per class; the confusion
plot and a markdown report. Shared by the LLM evaluation and the classical baseline; imports no model code."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from erc_llm.data.schema import DataError, LabelSet
from erc_llm.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from erc_llm.palette import colours
from erc_llm.stages import calibration


def compute_metrics(gold: list[str], pred: list[str], labels: LabelSet) -> dict:
    """Standard ERC metrics (scikit-learn): weighted F1, WA (accuracy), UA (balanced accuracy), macro F1."""
    names = list(labels.labels)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=names, zero_division=0)
    return {
        "weighted_f1": 100 * f1_score(gold, pred, labels=names, average="weighted", zero_division=0),
        "accuracy": 100 * accuracy_score(gold, pred),
        "unweighted_accuracy": 100 * balanced_accuracy_score(gold, pred),
        "macro_f1": 100 * f1_score(gold, pred, labels=names, average="macro", zero_division=0),
        "per_class": {
            n: {"precision": 100 * float(p[i]), "recall": 100 * float(r[i]), "f1": 100 * float(f[i]), "support": int(s[i])}
            for i, n in enumerate(names)
        },
        # counts: row = gold label, column = predicted label, both in the label set's order
        "confusion": confusion_matrix(gold, pred, labels=names).tolist(),
    }


def plot_confusion(gold: list[str], pred: list[str], labels: LabelSet, path: Path, title: str) -> None:
    import matplotlib  # heavy; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy; only when plotting

    names = list(labels.labels)
    cm = confusion_matrix(gold, pred, labels=names, normalize="true")
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(np.nan_to_num(cm), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    palette = colours(names)  # each label's colour of the web page, behind its name
    for tick in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        tick.set_bbox({"facecolor": palette[tick.get_text()], "alpha": 0.35, "edgecolor": "none", "pad": 1.5})
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    for i in range(len(names)):
        for j in range(len(names)):
            v = np.nan_to_num(cm[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def calibration_metrics(rows: list[dict], labels: LabelSet, bins: int = 15) -> dict | None:
    """Expected calibration error (top label, ``bins`` equal-width bins, in %), NLL of the gold label and the
    reliability bins, over the rows that have a gold label and probabilities (None when there are none)."""
    scored = [r for r in rows if r["gold"] is not None and r.get("probabilities")]
    if not scored:
        return None
    probs = np.array([[r["probabilities"][k] for k in labels.labels] for r in scored])
    return calibration(np.array([labels.index(r["gold"]) for r in scored]), probs, bins)


def plot_reliability(cal: dict, path: Path, title: str) -> None:
    import matplotlib  # heavy; only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy; only when plotting

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    mids = [(b["low"] + b["high"]) / 2 for b in cal["bins"]]
    ax.bar(mids, [b["accuracy"] for b in cal["bins"]], width=1 / 15, edgecolor="black", color="#4477AA", alpha=0.8,
           label="accuracy")
    ax.plot(mids, [b["confidence"] for b in cal["bins"]], "o", color="#D55E00", ms=4,
            label="mean confidence (the gap to the bar is the miscalibration)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 60)) + f"\nECE {cal['ece']:.2f}%, NLL {cal['nll']:.3f}", fontsize=7)
    ax.legend(loc="upper left", fontsize=6)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def history_phrase(history: str) -> str:
    """How every output names what the transcript carried for earlier turns: ``none`` (a text-only history),
    ``predicted`` or ``gold``."""
    return "no labels in the history" if history == "none" else f"{history} history"


def render_report(m: dict) -> str:
    lines = [
        f"# Evaluation: {m['dataset']}/{m['split']} — {m['model']}",
        "",
        f"History: **{m['history']}** ({history_phrase(m['history'])}"
        f"{'; DIAGNOSTIC: gold labels of earlier turns are visible' if m['history'] == 'gold' else ''})  ",
        f"Dialogues: {m['dialogues']}, utterances: {m['utterances']}, seconds: {m['seconds']:.1f}, "
        f"utterances/s: {m['utterances_per_second']:.2f}" + (f" ({m['dtype']})" if m.get("dtype") else "")
        + ("; skipped on load: " + ", ".join(f"{n} ({why})" for why, n in m["skipped_on_load"].items())
           if m.get("skipped_on_load") else ""),
        "",
        "| weighted F1 | accuracy (WA) | UA | macro F1 |",
        "|---|---|---|---|",
        f"| {m['weighted_f1']:.2f} | {m['accuracy']:.2f} | {m['unweighted_accuracy']:.2f} | {m['macro_f1']:.2f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.2f} | {c['recall']:.2f} | {c['f1']:.2f} | {c['support']} |")
    if m.get("ece") is not None:
        lines += ["", f"Calibration: expected calibration error {m['ece']:.2f}% (15 bins), NLL {m['nll']:.4f} "
                      "([reliability diagram](reliability.png))"]
    stages = m.get("stages")
    if stages and stages.get("steps"):
        offline = (" — OFFLINE: the classifier's per-speaker audio statistics come from the whole split, later turns "
                   "included" if stages.get("stage_stats") == "split" else "")
        lines += ["", f"Stages: {stages['described']}{offline}" + (f" ({stages['note']})" if stages.get("note") else ""), "",
                  "| stage | weighted F1 | ECE % | NLL |", "|---|---|---|---|"]
        lines += [f"| {n} | {s['weighted_f1']:.2f} | {s['ece']:.2f} | {s['nll']:.4f} |" for n, s in stages["steps"].items()]
    if m.get("confusion"):
        names = list(m["per_class"])
        lines += ["", "Confusion counts (rows: gold, columns: predicted):", "",
                  "| gold \\ predicted | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {n} | " + " | ".join(str(c) for c in row) + " |" for n, row in zip(names, m["confusion"])]
    lines += ["", "![confusion](confusion.png)", "", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def scored_pairs(rows: list[dict]) -> tuple[list[str], list[str]]:
    """Gold and predicted labels of the prediction rows that have a gold label, in order."""
    scored = [r for r in rows if r["gold"] is not None]
    return [r["gold"] for r in scored], [r["predicted"] for r in scored]


def write_evaluation(out: Path, rows: list[dict], labels: LabelSet, info: dict, title: str, note: str = "") -> dict:
    """An evaluation folder as every scorer here writes it: ``predictions.jsonl`` (``rows``, each with ``gold``
    and ``predicted``) and ``metrics.json`` (the metrics of the rows that have a gold label, then ``info``);
    when any row has a gold label also ``confusion.png`` (titled ``title``) and ``report.md`` (``note``
    appended). Returns the metrics."""
    gold, pred = scored_pairs(rows)
    cal = calibration_metrics(rows, labels) if gold else None
    metrics = {**(compute_metrics(gold, pred, labels) if gold else {}),
               **({"ece": cal["ece"], "nll": cal["nll"], "reliability": cal["bins"]} if cal else {}), **info}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    if cal:
        plot_reliability(cal, out / "reliability.png", title)
    if gold:
        plot_confusion(gold, pred, labels, out / "confusion.png", title)
        atomic_write_text(out / "report.md", render_report(metrics) + note)
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def read_evaluation(folder: str | Path) -> tuple[dict, list[dict]]:
    """``metrics.json`` and the rows of ``predictions.jsonl`` of an evaluation folder, with errors that name the
    file and line."""
    folder = Path(folder)
    missing = [n for n in ("metrics.json", "predictions.jsonl") if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(missing)}; expected a folder written by erc-llm evaluate "
                        "(or eval/ensemble.py)")
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{folder / 'metrics.json'}: not valid JSON ({e}); the file is damaged, write it again with "
                        "erc-llm evaluate") from None
    if not isinstance(metrics, dict) or not metrics.get("labels"):
        raise DataError(f"{folder / 'metrics.json'}: expected an evaluation's metrics with its 'labels'; write it again "
                        "with erc-llm evaluate")
    rows = []
    with open(folder / "predictions.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{folder / 'predictions.jsonl'}:{n}: not JSON ({e.msg}); the file is damaged, "
                                    "write it again with erc-llm evaluate") from None
    return metrics, rows
