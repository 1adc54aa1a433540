"""Copy a finished training run's record into a results folder: what the run was (``run.json``,
``config.yaml``), how it went (``log.jsonl``: its dev evaluations, the dev curve; every step's line with
``--full-log``, for headline rows; ``train_summary.json``), what dev selected (``best.json``) and each of its
evaluations (``metrics.json`` with the confusion counts, ``report.md``), without the weights, the checkpoint, the
plots or the per-utterance ``predictions.jsonl`` (re-run the command to get them).

    python eval/record_run.py runs/iemocap_init_pros_s1 \
        eval/results/iemocap_lora_gemma-3-270m_textonly_init-meld_prosody_speaker_seed1

With ``--pack`` the folder holds one ``record.json`` (``eval/records.py``), as every row but the headline ones
is kept. The folder it writes is what ``eval/seeds.py`` summarises and what each per-seed link of the README's tables
points to. It refuses a run that has not finished (no ``train_summary.json``: resume it with ``--resume true``), one
whose test evaluation has not finished (training writes ``train_summary.json`` before it evaluates the selected
adapter on test) and an existing results folder (a committed record is replaced only on purpose: delete it first).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from erc_llm.config import eval_flags
from erc_llm.io import current_umask

try:  # imported as eval.record_run (tests, python -m eval.record_run)
    from eval import records
except ModuleNotFoundError:  # python eval/record_run.py: the script's own folder is first on sys.path
    import records

RUN_FILES = ("run.json", "config.yaml", "best.json", "train_summary.json", "log.jsonl")
EVAL_FILES = ("metrics.json", "report.md")  # plots are not kept: metrics.json holds their numbers
OPTIONAL_RUN_FILES = ("stages.json",)  # a run with memory / fusion / calibration: each stage on dev and test


def record_files(run: Path) -> dict[Path, Path]:
    """The files of ``run`` that make up its record, as {path in the results folder: source}; every problem
    named at once."""
    problems = [f"{run / name}: missing" for name in RUN_FILES if not (run / name).is_file()]
    if problems:
        hint = (" (the run has not finished: resume it with --resume true)"
                if not (run / "train_summary.json").is_file() and (run / "run.json").is_file() else "")
        raise SystemExit(f"{run} is not a finished training run folder{hint}:\n  " + "\n  ".join(problems))
    missing_test = unfinished_test(run)
    if missing_test:
        raise SystemExit(missing_test)
    evaluations = sorted(d for d in (run / "eval").glob("*")  # a finished evaluation has its metrics.json
                         if not d.name.startswith(".") and (d / "metrics.json").is_file())
    files = {Path(name): run / name for name in RUN_FILES + OPTIONAL_RUN_FILES if (run / name).is_file()}
    files.update({p.relative_to(run / "eval"): p for d in evaluations for p in (d / name for name in EVAL_FILES)
                  if p.is_file()})
    return files


def unfinished_test(run: Path) -> str | None:
    """Why the record of ``run`` would lack its test evaluation, or None: a run trained with ``test_eval`` (the
    default) is recorded only once ``eval/test_predicted`` is finished."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    if not isinstance(cfg, dict):
        return f"{run / 'config.yaml'}: expected the run's config (a mapping), got {type(cfg).__name__}"
    if not cfg.get("test_eval", True) or (run / "eval" / "test_predicted" / "metrics.json").is_file():
        return None
    # the options training's own test evaluation (erc_llm/train.py test_evaluation) takes from the config
    extra = eval_flags(cfg.get("labels") or [], cfg.get("on_bad_row", "error"), cfg.get("audio_dir") or "")
    return (f"{run}: the test evaluation of the selected adapter has not finished ({run}/eval/test_predicted/"
            f"metrics.json missing); wait for training to end, or if it was stopped, run `erc-llm evaluate --dataset "
            f"{cfg.get('dataset')} --split test --data-dir {cfg.get('data_dir')}{extra} --dtype float32 --run {run} --out "
            f"{run}/eval/test_predicted`")


def dev_curve(log_text: str) -> str:
    """The lines of a training log that hold an evaluation (the dev curve), without the per-step lines."""
    return "".join(line + "\n" for line in log_text.splitlines() if line.strip() and '"loss"' not in line)


def without_plots(report: str) -> str:
    """A report without its links to the plots a record does not keep (the numbers are in metrics.json)."""
    report = re.sub(r"!\[[^\]]*\]\((confusion|reliability)\.png\)\n\n?", "", report)
    return report.replace(" ([reliability diagram](reliability.png))", "")


def record(run: Path, out: Path, full_log: bool = False) -> dict[Path, Path]:
    """Write the record of ``run`` as ``out`` (evaluations at its top level: ``out/test_predicted/...``); the
    folder appears whole or not at all."""
    if out.exists():
        raise SystemExit(f"{out} exists; a results folder is written once (delete it first to replace it)")
    files = record_files(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if rel.name == "log.jsonl" and not full_log:
                (tmp / rel).write_text(dev_curve(src.read_text()))
            elif rel.name == "report.md":
                (tmp / rel).write_text(without_plots(src.read_text()))
            else:
                shutil.copy2(src, tmp / rel)
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp creates 0700; give the folder ordinary permissions
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a training run folder (the --out of erc_llm/train.py)")
    p.add_argument("out", type=Path, help="the results folder to write (must not exist)")
    p.add_argument("--full-log", action="store_true", help="keep every step's line of log.jsonl (headline rows); "
                   "default: the dev evaluations only")
    p.add_argument("--pack", action="store_true", help="fold the record into one record.json (eval/records.py), as "
                   "every row but the headline ones is kept")
    args = p.parse_args(argv)
    if args.pack and args.full_log:
        p.error("--pack and --full-log: a packed record is a row that is not a headline one and keeps the dev curve "
                "only; choose one")
    files = record(args.run, args.out, args.full_log)
    if args.pack:
        records.pack(args.out)
    print(f"{args.out}: {len(files)} files from {args.run}{' in record.json' if args.pack else ''}")
    for rel in files:
        print(f"  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
