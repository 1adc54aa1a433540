"""Print the README's baseline table from eval/results/baseline_*/summary.json (mean +- std over seeds).

    python eval/baseline_table.py
"""

from pathlib import Path

import numpy as np

try:  # imported as eval.baseline_table (tests, python -m eval.baseline_table)
    from eval import records
except ModuleNotFoundError:  # python eval/baseline_table.py: the script's own folder is first on sys.path
    import records

ROWS = [
    ("baseline_meld_text", "text only (MiniLM) + context GRU, focal"),
    ("baseline_meld_text_prosody", "**text + prosody**: VGA (λ=0.5), gates, context GRU, focal"),
    ("baseline_meld_text_prosody_mpnet", "text + prosody with all-mpnet-base-v2 instead of MiniLM"),
    ("baseline_ablation_no_vga", "ablation: no VGA (λ=0)"),
    ("baseline_ablation_concat", "ablation: no gates (plain concat)"),
    ("baseline_ablation_no_context", "ablation: no context GRU"),
    ("baseline_ablation_ce", "ablation: weighted cross-entropy instead of focal"),
]


def main() -> None:
    root = Path(__file__).resolve().parent / "results"
    print("| system (MELD test) | seeds | weighted F1 | WA | UA | macro F1 | gates text / audio / interaction |")
    print("|---|---|---|---|---|---|---|")
    for name, label in ROWS:
        if not records.exists(root / name, "summary.json"):
            continue
        s = records.read_json(root / name, "summary.json")
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1")]
        gates = " / ".join(f"{v:.3f}" for v in s["gates"].values()) if "gates" in s else "—"
        print(f"| {label} | {len(s['seeds'])} | " + " | ".join(cells) + f" | {gates} |")
        if name == "baseline_meld_text_prosody":
            same_seeds_row(root, name, [0, 1, 2], "text + prosody, full model, seeds 0–2 (reference for the ablations)")


def same_seeds_row(root: Path, name: str, seeds: list[int], label: str) -> None:
    """The full model restricted to the ablations' seeds, so every ablation compares like with like."""
    ms = [records.read_json(root / name, f"seed{k}/metrics.json") for k in seeds
          if records.exists(root / name, f"seed{k}/metrics.json")]
    if len(ms) != len(seeds):
        return
    cells = []
    for k in ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1"):
        v = np.array([m[k] for m in ms])
        cells.append(f"{v.mean():.2f} ± {v.std():.2f}")
    print(f"| {label} | {len(ms)} | " + " | ".join(cells) + " | |")


if __name__ == "__main__":
    main()
