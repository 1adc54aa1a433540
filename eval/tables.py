"""The results tables of the README and docs/results.md, generated from the committed seed summaries.

    python eval/tables.py            # rewrite the tables between their markers
    python eval/tables.py --check    # exit 1 if a table is stale (tests run this)

Rows are listed in ``eval/rows.yaml`` (corpus, system, the training command of one seed, the results folders);
every number comes from ``summary.json`` (``eval/seeds.py``) of each row. The earlier results rows of
docs/results.md and the lever table of docs/levers.md are hand-kept in ``eval/recorded.yaml`` (each row's cells and
its results folders): every ``{value}`` cell is filled from the row's results (:func:`figures`). The README gets the headline table
(mean ± std test weighted F1, WA, UA, macro F1, ECE); docs/results.md the full rows: the command, per-seed dev
and test figures and each stage's dev and test scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

try:  # imported as eval.tables (tests, python -m eval.tables)
    from eval import records, seeds
except ModuleNotFoundError:  # python eval/tables.py: the script's own folder is first on sys.path
    import records
    import seeds

ROOT = Path(__file__).resolve().parent.parent
ROWS = ROOT / "eval" / "rows.yaml"
RECORDED = ROOT / "eval" / "recorded.yaml"
TARGETS = {"headline": ROOT / "README.md", "package": ROOT / "docs" / "results.md", "results": ROOT / "docs" / "results.md",
           "levers": ROOT / "docs" / "levers.md"}


def pm(stat: dict, digits: int = 2) -> str:
    """mean ± sample std over seeds; a single seed's value alone (no spread to show)."""
    if len(stat.get("values", [])) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def load_rows() -> list[dict]:
    rows = yaml.safe_load(ROWS.read_text(encoding="utf-8"))
    for r in rows:
        summary = ROOT / r["summary"]
        r["summary_json"] = records.read_json(summary.parent, summary.name)
    return rows


def headline(rows: list[dict]) -> str:
    lines = ["| corpus | model | seeds | test weighted F1 | WA | UA | macro F1 | test ECE % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary_json"]
        ece = pm(s["ece"]) if "ece" in s else "—"
        name = f"[{r['system']}](docs/results.md#{r['anchor']})"
        lines.append(f"| {r['corpus']} | {name} | {len(s['seeds'])} | **{pm(s['weighted_f1'])}** | {pm(s['accuracy'])} | "
                     f"{pm(s['unweighted_accuracy'])} | {pm(s['macro_f1'])} | {ece} |")
    return "\n".join(lines)


def package(rows: list[dict]) -> str:
    out = []
    for r in rows:
        s = r["summary_json"]
        seeds = " · ".join(f"{v:.2f}" for v in s["weighted_f1"]["values"])
        dev = " · ".join(f"{v:.2f}" for v in s["dev_weighted_f1"]["values"])
        out += [f'<a id="{r["anchor"]}"></a>', "", f"### {r['corpus']}: {r['system']}", "", r["description"].strip(), "",
                f"- Command (seed N = {', '.join(map(str, s['seeds']))}): `{r['command'].strip()}`, then "
                f"`python eval/record_run.py RUN {r['results'].replace('{N}', 'N')}` and `{s['command']}`",
                f"- Test weighted F1 **{pm(s['weighted_f1'])}** (seeds {seeds}); dev (selection) "
                f"{pm(s['dev_weighted_f1'])} ({dev}); WA {pm(s['accuracy'])}, UA {pm(s['unweighted_accuracy'])}, "
                f"macro F1 {pm(s['macro_f1'])}"
                + (f"; test ECE {pm(s['ece'])}%, NLL {pm(s['nll'], 3)}" if "ece" in s else ""),
                "- Per class F1: " + ", ".join(f"{c} {v['mean']:.1f}" for c, v in s["per_class_f1"].items()),
                f"- [summary]({Path('..') / r['summary']}); seeds: "
                + ", ".join(f"[{n}](../{f})" for n, f in zip(s["seeds"], s["runs"]))]
        if "stages" in s:
            st = s["stages"]
            steps = [k.split(" ")[1] for k in st if k.startswith("dev ") and k.endswith(" weighted_f1")]
            out += ["", "| stage | dev weighted F1 | test weighted F1 | test ECE % | test NLL |", "|---|---|---|---|---|"]
            out += [f"| {step} | {pm(st[f'dev {step} weighted_f1'])} | {pm(st[f'test {step} weighted_f1'])} | "
                    f"{pm(st[f'test {step} ece'])} | {pm(st[f'test {step} nll'], 3)} |" for step in steps]
        out.append("")
    return "\n".join(out).rstrip()


FIGURES = {"dev": "dev_weighted_f1", "test": "weighted_f1", "wa": "accuracy", "ua": "unweighted_accuracy",
           "macro": "macro_f1"}


def _runs(folder: Path) -> list[dict]:
    """The seed rows of one results folder: a seed summary, a training run, an ensemble or one evaluation."""
    if records.exists(folder, "summary.json"):
        s = records.read_json(folder, "summary.json")
        return [{k: s[k]["values"][i] for k in FIGURES.values() if k in s} for i in range(len(s["weighted_f1"]["values"]))]
    if records.exists(folder, "best.json"):
        return [seeds.read_run(folder)]
    if records.exists(folder, "dev/metrics.json") and records.exists(folder, "test/metrics.json"):
        dev, test = (records.read_json(folder, f"{split}/metrics.json") for split in ("dev", "test"))
        return [{"dev_weighted_f1": dev["weighted_f1"], **{k: test[k] for k in seeds.KEYS}}]
    for rel in ("metrics.json", "test/metrics.json", "test_predicted/metrics.json"):
        if records.exists(folder, rel):
            m = records.read_json(folder, rel)
            return [{k: m[k] for k in seeds.KEYS if k in m}]
    return []


def figures(results: str | list[str]) -> dict[str, str]:
    """The figures of a recorded row, formatted as its table shows them: ``seeds`` and, where recorded, dev and
    test weighted F1, WA, UA and macro F1 (mean ± sample std over seeds)."""
    runs = [r for folder in ([results] if isinstance(results, str) else results) for r in _runs(ROOT / folder)]
    if not runs:
        return {}
    out = {"seeds": str(len(runs))}
    for kind, key in FIGURES.items():
        if all(key in r for r in runs):
            out[kind] = pm(seeds.stat([r[key] for r in runs]))
    return out


def recorded(section: dict) -> str:
    """A hand-kept table (``eval/recorded.yaml``) with every ``{value}`` cell filled from the row's results."""
    kinds = section["figures"]
    lines = [section["header"], "|" + "---|" * len(kinds)]
    for row in section["rows"]:
        figs = figures(row["results"]) if row.get("results") else {}
        cells = []
        for cell, kind in zip(row["cells"], kinds):
            if "{value}" in cell:
                if kind not in figs:
                    raise SystemExit(f"eval/recorded.yaml: a {kind} cell of the row {' | '.join(row['cells'][:2])[:70]!r} asks for "
                                     f"a figure its results ({row.get('results')}) do not hold")
                cell = cell.replace("{value}", figs[kind])
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start (eval/tables.py) -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"markers {start} ... {end} not found")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated table differs from what is committed")
    args = ap.parse_args(argv)
    rows, hand_kept = load_rows(), yaml.safe_load(RECORDED.read_text(encoding="utf-8"))
    stale = []
    for name, body in (("headline", headline(rows)), ("package", package(rows)),
                       ("results", recorded(hand_kept["results"])), ("levers", recorded(hand_kept["levers"]))):
        path = TARGETS[name]
        old = path.read_text(encoding="utf-8")
        new = replace(old, name, body)
        if new != old:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"stale: {', '.join(stale)}; run python eval/tables.py", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale and not args.check else "tables are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
