"""Weight averaging ("model soup") of LoRA adapters trained with one recipe and different seeds: the mean of the
members' weight updates (B·A, with their scaling), truncated by SVD to ``--rank`` so the soup is one adapter of
the usual size. Writes a run folder that every command accepts (``--run``):

    python eval/soup.py runs/meld_s0 runs/meld_s1 runs/meld_s2 --rank 16 --out runs/meld_soup_r16
    erc-llm evaluate --dataset meld --split dev --data-dir ../shared/data/meld --run runs/meld_soup_r16 \
        --out runs/meld_soup_r16/eval/dev_predicted

The members must share their ``run.json`` (backbone source, labels, prompts, context, history) apart from
the training dtype; runs with audio projectors are refused (a projector is not a LoRA update). Merging is peft's
``add_weighted_adapter(combination_type="svd")``; ``--rank 0`` keeps every member's update exactly
(concatenation: rank = the sum of the members' ranks).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

from erc_llm.io import atomic_dir, atomic_write_json
from erc_llm.run import RunSpec

IGNORED = ("train_dtype", "backbone")  # how a member was trained, not what it computes
BACKBONE = ("name", "source", "sha256")  # what identifies the backbone (conversion details may differ)


def check_members(runs: list[Path]) -> RunSpec:
    """The members' common RunSpec; every difference and every audio run reported at once."""
    specs = [RunSpec.read(r) for r in runs]
    ref, problems = dataclasses.asdict(specs[0]), []
    for run, spec in zip(runs, specs):
        if spec.audio:
            problems.append(f"{run}: trained with audio soft tokens ({spec.audio.get('source')}); only text and "
                            "speaker runs can be averaged")
        diff = [k for k, v in dataclasses.asdict(spec).items() if k not in IGNORED and v != ref[k]]
        diff += [f"backbone.{k}" for k in BACKBONE if spec.backbone.get(k) != specs[0].backbone.get(k)]
        if diff:
            problems.append(f"{run}: run.json differs from {runs[0]} in {', '.join(diff)}")
    if problems:
        raise SystemExit("cannot average these runs:\n  " + "\n  ".join(problems))
    return specs[0]


def soup(runs: list[Path], out: Path, rank: int) -> Path:
    from peft import PeftModel

    from erc_llm.backbone import load_backbone

    spec = check_members(runs)
    net, _, _ = load_backbone(spec.model, "float32")
    names = [f"member{i}" for i in range(len(runs))]
    model = PeftModel.from_pretrained(net, str(runs[0] / "adapter"), adapter_name=names[0])
    for name, run in zip(names[1:], runs[1:]):
        model.load_adapter(str(run / "adapter"), adapter_name=name)
    model.add_weighted_adapter(names, [1 / len(runs)] * len(runs), "soup",
                               combination_type="svd" if rank else "cat", svd_rank=rank or None)
    from erc_llm.io import claim_output, mark_output

    claim_output(out, "run", inputs=list(runs) if isinstance(runs, (list, tuple)) else [])
    with atomic_dir(out) as tmp:
        mark_output(tmp, "run")
        model.save_pretrained(str(tmp / "saved"), selected_adapters=["soup"])
        (tmp / "saved" / "soup").rename(tmp / "adapter")
        shutil.rmtree(tmp / "saved")
        for extra in ("prompts", "speaker_store"):
            if (runs[0] / extra).is_dir():
                shutil.copytree(runs[0] / extra, tmp / extra)
        spec.write(tmp)
        atomic_write_json(tmp / "soup.json", {"members": [str(r) for r in runs], "rank": rank,
                                              "combination": "svd" if rank else "cat"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="run folders written by erc_llm/train.py (same recipe)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the soup (0 = exact: the members' ranks summed)")
    ap.add_argument("--out", type=Path, required=True, help="run folder to write")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error(f"a soup needs at least 2 runs; got {len(args.runs)}")
    if args.rank < 0:
        ap.error(f"--rank {args.rank}: expected 0 (exact) or a positive rank")
    missing = [str(r) for r in args.runs if not (r / "adapter" / "adapter_config.json").is_file()]
    if missing:
        ap.error(f"no adapter/adapter_config.json in {', '.join(missing)}; expected run folders written by erc_llm/train.py")
    soup(args.runs, args.out, args.rank)
    print(f"soup of {len(args.runs)} runs (rank {args.rank or 'exact'}) -> {args.out}; "
          f"{json.dumps([str(r) for r in args.runs])}")


if __name__ == "__main__":
    main()
