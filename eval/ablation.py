"""Equal-budget ablations on MELD test (one command per study; finished variants are skipped, an interrupted
one resumes from its checkpoint):

    python eval/ablation.py speakers --data-dir ../shared/data/meld
    python eval/ablation.py audio --data-dir ../shared/data/meld --audio-dir ../shared/data/meld_prosody

Every variant is ``erc_llm/train.py --config configs/meld_ablation.yaml`` plus its overrides (same seed,
same 400 dialogues, same 100 steps, last-step model, predicted history). Runs go to ``runs/ablation/``;
the table (weighted F1 and per-class F1) goes to ``eval/results/ablation_<study>/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from erc_llm.constants import has_checkpoint
from erc_llm.io import atomic_write_json, atomic_write_text

CONFIG = "configs/meld_ablation.yaml"
STUDIES = {
    "speakers": {
        "base": {},
        "bios": {"speaker_bios": "true"},
        "history": {"speaker_history": "8"},
        "both": {"speaker_bios": "true", "speaker_history": "8"},
    },
    "audio": {
        "base": {},
        "prosody": {"audio_source": "meld_prosody", "audio_dir": "{audio_dir}"},
    },
}


def run_variant(name: str, overrides: dict, args) -> dict:
    out = ROOT / "runs" / "ablation" / name
    summary = out / "train_summary.json"
    if summary.is_file() and "test" in json.loads(summary.read_text()):
        print(f"[{name}] done already: {summary}")
        return json.loads(summary.read_text())
    cmd = [sys.executable, "erc_llm/train.py", "--config", CONFIG, "--data-dir", args.data_dir, "--out", str(out)]
    for k, v in overrides.items():
        cmd += [f"--{k.replace('_', '-')}", v.format(audio_dir=args.audio_dir)]
    if has_checkpoint(out):
        cmd += ["--resume", "true"]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"[{name}] finished in {time.time() - t0:.0f}s", flush=True)
    return json.loads(summary.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--audio-dir", default="", help="MELD prosody csv folder (audio study)")
    p.add_argument("--speaker-store", default="speaker_store/meld", help="built from train if missing")
    args = p.parse_args()
    variants = STUDIES[args.study]
    if args.study == "speakers":
        if not (ROOT / args.speaker_store / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "erc_llm.cli", "speakers", "build", "--dataset", "meld",
                            "--data-dir", args.data_dir, "--out", args.speaker_store], cwd=ROOT, check=True)
        variants = {k: ({**v, "speaker_store": args.speaker_store} if v else v) for k, v in variants.items()}
    if args.study == "audio" and not args.audio_dir:
        p.error("the audio study needs --audio-dir (the folder with meld_{split}_prosody.csv)")
    rows = {}
    for name, overrides in variants.items():
        run_dir = ROOT / "runs" / "ablation" / name
        s = run_variant(name, overrides, args)
        m = json.loads((run_dir / "eval" / "test_predicted" / "metrics.json").read_text())
        rows[name] = {"overrides": overrides, "weighted_f1": m["weighted_f1"], "accuracy": m["accuracy"],
                      "unweighted_accuracy": m["unweighted_accuracy"], "macro_f1": m["macro_f1"],
                      "per_class_f1": {k: v["f1"] for k, v in m["per_class"].items()},
                      "train_seconds": s["train_seconds"], "tokens_per_second": s["tokens_per_second"]}
    out = ROOT / "eval" / "results" / f"ablation_{args.study}"
    command = f"python eval/ablation.py {args.study} --data-dir {args.data_dir}" + (
        f" --audio-dir {args.audio_dir}" if args.audio_dir else "")
    atomic_write_json(out / "results.json", {"config": CONFIG, "command": command, "variants": rows})
    classes = list(next(iter(rows.values()))["per_class_f1"])
    lines = [f"# MELD test ablation: {args.study} (equal budget, seed 0, predicted history)", "",
             f"Command: `{command}` (base config `{CONFIG}`)", "",
             "| variant | weighted F1 | WA | UA | " + " | ".join(classes) + " | train s |",
             "|---|---|---|---|" + "---|" * len(classes) + "---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['weighted_f1']:.2f} | {r['accuracy']:.2f} | {r['unweighted_accuracy']:.2f} | "
                     + " | ".join(f"{r['per_class_f1'][c]:.1f}" for c in classes) + f" | {r['train_seconds']:.0f} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
