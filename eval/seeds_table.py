"""A Markdown table of several seed rows (each a ``summary.json`` written by ``eval/seeds.py``): dev score,
test metrics and per-class test F1, mean ± sample std over each row's seeds. Writes ``table.md`` and prints it.

    python eval/seeds_table.py --out eval/results/ablation_iemocap \
        "text-only=eval/results/iemocap_lora_gemma-3-270m_textonly_seeds" \
        "+ prosody=eval/results/iemocap_lora_gemma-3-270m_textonly_prosody_seeds"

Every row must be of one dataset's label set (the per-class columns are shared); the seeds of each row are
listed in its own column, so rows over different seeds are visible as such.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from erc_llm.io import atomic_write_text

try:  # imported as eval.seeds_table (tests, python -m eval.seeds_table)
    from eval import records
except ModuleNotFoundError:  # python eval/seeds_table.py: the script's own folder is first on sys.path
    import records

METRICS = (("dev_weighted_f1", "dev wF1"), ("weighted_f1", "test wF1"), ("accuracy", "WA"),
           ("unweighted_accuracy", "UA"))


def parse_row(arg: str) -> tuple[str, Path]:
    label, sep, folder = arg.rpartition("=")
    if not sep or not label.strip():
        raise SystemExit(f"row {arg!r}: expected LABEL=FOLDER, e.g. 'text-only=eval/results/NAME_seeds'")
    if not records.exists(Path(folder), "summary.json"):
        raise SystemExit(f"row {label!r}: {Path(folder) / 'summary.json'} not found; write it with "
                         f"`python eval/seeds.py RUN... --out {folder}`")
    return label.strip(), Path(folder)


def render(rows: list[tuple[str, dict]]) -> str:
    classes = list(rows[0][1]["per_class_f1"])
    problems = [f"row {label!r} has classes {list(s['per_class_f1'])}, the first row {classes}"
                for label, s in rows if list(s["per_class_f1"]) != classes]
    if problems:
        raise SystemExit("\n".join(problems))
    head = ["variant", "seeds", *(name for _, name in METRICS), *classes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in rows:
        cells = [f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k, _ in METRICS]
        per_class = [f"{s['per_class_f1'][c]['mean']:.1f}" for c in classes]
        seeds = " · ".join(str(x) for x in s["seeds"])
        lines.append("| " + " | ".join([label, seeds, *cells, *per_class]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="+", help="LABEL=FOLDER, FOLDER holding a summary.json of eval/seeds.py")
    p.add_argument("--out", type=Path, required=True, help="folder for table.md")
    args = p.parse_args(argv)
    rows = [(label, records.read_json(folder, "summary.json")) for label, folder in map(parse_row, args.rows)]
    table = render(rows)
    command = "python eval/seeds_table.py " + shlex.join(argv or sys.argv[1:])
    atomic_write_text(args.out / "table.md", table + f"\nCommand:\n\n```bash\n{command}\n```\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
