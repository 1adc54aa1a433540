"""float32 beside ``--dtype auto`` (bfloat16 where the CPU has native bf16 matmuls) on whole test splits, in one run:
utterances/s, weighted F1, peak RSS, the mean absolute difference of the probabilities and the share of turns
whose label changes.

    python eval/dtype_compare.py --meld-dir ../shared/data/meld \
        --iemocap-dir ../shared/data/iemocap --iemocap-run runs/iemocap_s0

Each evaluation is `erc-llm evaluate` in a child process (``erc_llm.bench.full_test``), one after another on the
same cores. MELD uses the shipped model (or ``--meld-run``); IEMOCAP needs a run trained on it. Writes
eval/results/dtype/{results.json,table.md} (the evaluations' own folders go to a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

from erc_llm.bench.harness import machine, matmul_peaks, write_results
from erc_llm.bench.inference import full_test
from erc_llm.io import claim_output


def predictions(folder: Path) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line.strip()]
    labels = list(rows[0]["probabilities"])
    return [r["predicted"] for r in rows], np.array([[r["probabilities"][k] for k in labels] for r in rows])


def compare(name: str, dataset: str, data_dir: str, run: str, work: Path) -> dict:
    args = SimpleNamespace(data_dir=data_dir, run=run, zero_shot=False, model="")
    rows = {dt: full_test(args, dt, work / f"{name}_{dt}", dataset) for dt in ("float32", "auto")}
    (l32, p32), (lau, pau) = predictions(work / f"{name}_float32"), predictions(work / f"{name}_auto")
    return {"corpus": name, "run": run or "meld-gemma3-270m (shipped)", "rows": list(rows.values()),
            "probability_mean_abs_diff": float(np.abs(p32 - pau).mean()),
            "changed_labels": float(np.mean([a != b for a, b in zip(l32, lau)])),
            "speedup": rows["auto"]["utterances_per_second"] / rows["float32"]["utterances_per_second"]}


def table(res: dict) -> str:
    lines = ["| corpus | dtype (ran as) | utterances | wall s | utt/s | weighted F1 | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for c in res["corpora"]:
        for r in c["rows"]:
            lines.append(f"| {c['corpus']} | {r['dtype']} ({r['ran_as']}) | {r['utterances']} | {r['wall_seconds']:.0f} | "
                         f"{r['utterances_per_second']:.2f} | {r['weighted_f1']:.2f} | {r['peak_rss_gb']:.2f} |")
    lines += ["", "| corpus | speed-up | mean abs. probability difference | labels changed |", "|---|---|---|---|"]
    for c in res["corpora"]:
        lines.append(f"| {c['corpus']} | {c['speedup']:.2f}x | {c['probability_mean_abs_diff']:.4f} | "
                     f"{100 * c['changed_labels']:.2f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--meld-dir", required=True)
    p.add_argument("--meld-run", default="", help="default: the shipped model")
    p.add_argument("--iemocap-dir", default="", help="IEMOCAP JSONL folder (with --iemocap-run)")
    p.add_argument("--iemocap-run", default="", help="a run trained on IEMOCAP")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "dtype"))
    args = p.parse_args()
    if bool(args.iemocap_dir) != bool(args.iemocap_run):
        p.error("--iemocap-dir and --iemocap-run go together")
    out = claim_output(args.out, "results", inputs=[args.meld_dir, args.iemocap_dir, args.iemocap_run])
    with tempfile.TemporaryDirectory(prefix="dtype-compare-") as tmp:  # the evaluations' own folders are not kept
        work = Path(tmp)
        corpora = [compare("MELD", "meld", args.meld_dir, args.meld_run, work)]
        if args.iemocap_run:
            corpora.append(compare("IEMOCAP", "jsonl", args.iemocap_dir, args.iemocap_run, work))
    for c in corpora:
        for r in c["rows"]:
            r["command"] = r["command"].replace(str(work), "OUT")
    peaks = matmul_peaks()
    res = {"command": "python eval/dtype_compare.py " + " ".join(sys.argv[1:]), "corpora": corpora,
           "machine": machine(), "hardware": peaks}
    return write_results(out, res, "float32 and --dtype auto, whole test splits",
                         f"Machine: {res['machine']}; one evaluation after another in one run; measured matmul peak "
                         f"fp32 {peaks['matmul_fp32_gflops']:.0f} / bf16 {peaks['matmul_bf16_gflops']:.0f} GFLOP/s "
                         "(the bound on the bf16 speed-up).", table(res))


if __name__ == "__main__":
    sys.exit(main())
