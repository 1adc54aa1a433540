"""Mean ± std over seeds of LLM training runs (their committed results folders): test metrics of the selected
adapter and the dev score it was selected by. Writes ``summary.json`` and prints a Markdown row.

    python eval/seeds.py eval/results/iemocap_lora_gemma-3-270m_textonly_seed0 \
        eval/results/iemocap_lora_gemma-3-270m_textonly_seed1 eval/results/iemocap_lora_gemma-3-270m_textonly_seed2 \
        --out eval/results/iemocap_lora_gemma-3-270m_textonly_seeds

Each folder holds ``best.json`` (dev selection), ``config.yaml`` and ``test_predicted/metrics.json``, as the
training command writes them — or, for a row of ensembles, ``dev/`` and ``test/`` as ``eval/ensemble.py`` writes
them, one ensemble per seed: its members are runs of one seed, and each ensemble has the same recipes as the
others. The std is the sample standard deviation (n - 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from erc_llm.io import atomic_write_json

try:  # imported as eval.seeds (tests, python -m eval.seeds)
    from eval import records
except ModuleNotFoundError:  # python eval/seeds.py: the script's own folder is first on sys.path
    import records

KEYS = ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1")
# where a run was written and how it was run; they do not change the model (resume: tested bit-identical) or its
# test_predicted evaluation (test_gold only adds a gold-history evaluation beside it)
RUNTIME = ("seed", "out", "data_dir", "resume", "overwrite", "threads", "on_bad_row", "activation_checkpointing",
           "test_gold", "fusion_audio_dir")


def recipe(cfg: dict) -> dict:
    """A run's config without the options that do not change the model (RUNTIME)."""
    return {k: v for k, v in cfg.items() if k not in RUNTIME}


def row(folder: Path, seed: int, dev_weighted_f1: float, test: dict, options: dict, stages: dict | None = None) -> dict:
    """One seed's entry of the summary: its dev selection score, test metrics and recipe; for a run with stages
    (``stages.json``) the dev score of its final distribution and every stage's dev and test scores."""
    out = {"folder": str(folder), "seed": seed, "dev_weighted_f1": dev_weighted_f1, **{k: test[k] for k in KEYS},
           "per_class_f1": {c: v["f1"] for c, v in test["per_class"].items()}, "recipe": options}
    if "ece" in test:
        out["ece"], out["nll"] = test["ece"], test["nll"]
    if stages:  # dev from the stages' fit, test from the test evaluation (which reports every stage)
        steps = {"dev": stages["steps"]["dev"], "test": (test.get("stages") or {}).get("steps") or stages["steps"].get("test")}
        out["dev_weighted_f1"] = steps["dev"]["calibrated"]["weighted_f1"]
        out["stages"] = {f"{split} {step} {k}": v for split, by_step in steps.items() if by_step
                         for step, m in by_step.items() for k, v in m.items()}
    return out


def read_run(folder: Path) -> dict:
    missing = [p for p in ("best.json", "config.yaml", "test_predicted/metrics.json") if not records.exists(folder, p)]
    if missing:
        raise SystemExit(f"{folder}: missing {', '.join(missing)}; expected a results folder written by a training run")
    test = records.read_json(folder, "test_predicted/metrics.json")
    best = records.read_json(folder, "best.json")
    cfg = yaml.safe_load(records.read_text(folder, "config.yaml"))
    stages = records.read_json(folder, "stages.json") if records.exists(folder, "stages.json") else None
    return row(folder, cfg["seed"], best["dev_predicted"]["weighted_f1"], test, recipe(cfg), stages)


def read_ensemble(folder: Path) -> dict:
    """One ensemble of ``eval/ensemble.py`` (``dev/`` and ``test/``) as a run of its members' common seed."""
    if not records.exists(folder, "test/metrics.json"):
        raise SystemExit(f"{folder}: missing test/metrics.json beside dev/; expected an ensemble folder written by "
                         "eval/ensemble.py for both splits")
    dev, test = (records.read_json(folder, f"{split}/metrics.json") for split in ("dev", "test"))
    configs = [m.get("config") for m in test.get("members", [])]
    problems = [f"{folder / split}: split is {m.get('split')!r}, expected {split!r}"
                for split, m in (("dev", dev), ("test", test)) if m.get("split") != split]
    if [m["model"] for m in dev.get("members", [])] != [m["model"] for m in test.get("members", [])]:
        problems.append(f"{folder}: dev and test were averaged over different members")
    if not configs or None in configs:
        problems.append(f"{folder / 'test'}: a member has no recorded training config (its model is not a run "
                        "folder with config.yaml); re-run eval/ensemble.py on evaluations of training runs")
    elif len({c["seed"] for c in configs}) != 1:
        problems.append(f"{folder}: members of seeds {[c['seed'] for c in configs]}; each ensemble of a seed row "
                        "holds runs of one seed")
    if problems:
        raise SystemExit("\n".join(problems))
    members = sorted((recipe(c) for c in configs), key=json.dumps)
    return row(folder, configs[0]["seed"], dev["weighted_f1"], test, {"members": members})


def stat(values: list[float]) -> dict:
    """mean, sample std (n - 1; 0 for one value) and the values."""
    v = np.array(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}


def summarize(runs: list[dict]) -> dict:
    common = set.intersection(*(set(r["recipe"]) for r in runs))  # options added later are left at their default
    differ = sorted(k for k in common if len({json.dumps(r["recipe"][k]) for r in runs}) > 1)
    if differ:
        raise SystemExit(f"the runs differ in more than the seed ({', '.join(differ)}): "
                         + "; ".join(r["folder"] for r in runs))
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"duplicate seeds {seeds}")

    out = {"seeds": seeds, "runs": [r["folder"] for r in runs], "recipe": runs[0]["recipe"],
           "dev_weighted_f1": stat([r["dev_weighted_f1"] for r in runs]), **{k: stat([r[k] for r in runs]) for k in KEYS}}
    out["per_class_f1"] = {c: stat([r["per_class_f1"][c] for r in runs]) for c in runs[0]["per_class_f1"]}
    for key in ("ece", "nll"):
        if all(key in r for r in runs):
            out[key] = stat([r[key] for r in runs])
    if all("stages" in r for r in runs):  # "dev memory weighted_f1" -> mean ± std over the seeds
        out["stages"] = {k: stat([r["stages"][k] for r in runs]) for k in runs[0]["stages"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="folder for summary.json")
    args = p.parse_args(argv)
    s = summarize([read_ensemble(f) if records.exists(f, "dev/metrics.json") else read_run(f) for f in args.folders])
    atomic_write_json(args.out / "summary.json", {**s, "command": "python eval/seeds.py " + " ".join(argv or sys.argv[1:])})
    cells = " | ".join(f"{s[k]['mean']:.2f} ± {s[k]['std']:.2f}" for k in ("dev_weighted_f1", *KEYS))
    print(f"| seeds {s['seeds']} | {cells} |")
    print("per class F1: " + ", ".join(f"{c} {v['mean']:.1f}" for c, v in s["per_class_f1"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
