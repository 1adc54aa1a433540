"""LoRA (or, with ``--finetune full``, full) fine-tuning of a small LLM on whole-dialogue transcripts, selected
on dev.

    accelerate launch --config_file configs/accelerate/cpu.yaml erc_llm/train.py --config configs/meld.yaml \
        --data-dir ../shared/data/meld --out runs/meld
    erc-llm train --config configs/meld.yaml --data-dir ../shared/data/meld       # same, one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 erc_llm/train.py --config ...   # 2 CPU processes (DDP)

Flow: config -> data (tokenized once, cached with `datasets`) -> backbone + LoRA -> loop (one forward
per dialogue, loss at the emotion slots only) -> dev selection -> stages -> run dir -> test evaluation
(``erc_llm.training``: ``recipe.setup``, ``loop.fit``, ``select``).

Run directory: ``adapter/`` (best on dev: the LoRA adapter, or ``finetuned.safetensors``), the run spec
(``erc_llm.run.RunSpec``: backbone, labels, prompt options), ``config.yaml``, ``prompts/``, ``log.jsonl`` (loss,
dev metrics, tokens/s), ``best.json``, ``checkpoint/`` (adapter, optimizer, scheduler, RNG and data position;
``--resume true`` continues from it), ``stages/`` and ``stages.json`` when the config asks for stages, and
``eval/test_predicted``, ``eval/test_gold`` with the final test evaluation.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python erc_llm/train.py` / `accelerate launch erc_llm/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from erc_llm.config import TrainConfig
from erc_llm.errors import run_command
from erc_llm.io import atomic_write_json
from erc_llm.metrics import history_phrase
from erc_llm.options import add_arguments, from_args
from erc_llm.training.loop import fit
from erc_llm.training.recipe import setup
from erc_llm.training.select import fit_stages, test_evaluation


def train(cfg: TrainConfig) -> dict:
    """setup -> fit (dev selection inside) -> stages -> summary and the test evaluation of the selected model."""
    r = setup(cfg)
    fit(r)
    run, state, accelerator, main = r.run, r.state, r.accelerator, r.accelerator.is_main_process
    result = {"best": state["best"], "steps": state["step"], "train_seconds": state["train_seconds"],
              "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
              "labels_per_second": state["labels_seen"] / max(state["train_seconds"], 1e-9)}
    if main:
        atomic_write_json(run / "train_summary.json", result)
    if main and (cfg.memory or cfg.fusion):
        result["stages"] = fit_stages(cfg, run)["steps"]
        atomic_write_json(run / "train_summary.json", result)
    accelerator.wait_for_everyone()
    if main and cfg.test_eval:
        result["test"] = test_evaluation(cfg, run)
        atomic_write_json(run / "train_summary.json", result)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erc_llm/train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TrainConfig)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return run_command(lambda: _train_and_report(from_args(TrainConfig, args)), "train", args.debug)


def _train_and_report(cfg: TrainConfig) -> int:
    result = train(cfg)
    if result.get("best"):
        print(f"best dev weighted F1 {result['best']['dev_predicted']['weighted_f1']:.2f} at step {result['best']['step']}")
    if result.get("test"):
        t = result["test"]
        gold = f", {t['gold']['weighted_f1']:.2f} (gold history, diagnostic)" if "gold" in t else ""
        shown = t["predicted"].get("history", "predicted")  # what evaluation wrote: "none" for a text-only history
        print(f"test weighted F1 {t['predicted']['weighted_f1']:.2f} ({history_phrase(shown)}){gold}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
