"""A training run's resumable state: the ``checkpoint/`` folder and the step log ``log.jsonl``.

``erc_llm/train.py`` saves a checkpoint every ``save_every`` optimizer steps and at the last step and, with
``--resume true``, continues from it: the trained weights (LoRA adapter, or every trained tensor after
``--finetune full``), the audio projector, the weight average and the contrastive slot bank when there are any, optimizer, scheduler,
every random generator, and ``state.json`` (step, epoch, position in the epoch, best dev so far, counters).
Each checkpoint replaces the previous one in a single rename, so an interrupted save leaves the last
complete checkpoint in place. Log rows written after the checkpoint are dropped on resume; the resumed
run writes them again.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from erc_llm.constants import CHECKPOINT_DIR
from erc_llm.io import atomic_dir, atomic_write_json, atomic_write_text
from erc_llm.training.averaging import WeightAverage, restore_average
from erc_llm.training.finetune import load_trainable_state, trainable_state
from erc_llm.training.losses import SlotBank

LOG_FILE = "log.jsonl"


def save_checkpoint(run: Path, model, finetune: str, optimizer, scheduler, state: dict, projector=None,
                    average: WeightAverage | None = None, bank: SlotBank | None = None) -> None:
    with atomic_dir(run / CHECKPOINT_DIR) as tmp:
        torch.save(trainable_state(model, finetune), tmp / "adapter.pt")
        if projector is not None:
            torch.save(projector.state_dict(), tmp / "projector.pt")
        if average is not None:
            torch.save(average.state_dict(), tmp / "average.pt")
        if bank is not None:
            torch.save(bank.state_dict(), tmp / "bank.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                   tmp / "rng.pt")
        atomic_write_json(tmp / "state.json", state)


def load_checkpoint(run: Path, model, finetune: str, optimizer, scheduler, projector=None,
                    average: WeightAverage | None = None, bank: SlotBank | None = None) -> dict:
    """Restore everything :func:`save_checkpoint` wrote into the given objects; returns the training state."""
    ck = run / CHECKPOINT_DIR
    load_trainable_state(model, torch.load(ck / "adapter.pt", weights_only=False), finetune, str(ck / "adapter.pt"))
    if projector is not None:
        projector.load_state_dict(torch.load(ck / "projector.pt", weights_only=True))
    restore_average(average, ck / "average.pt")
    if (bank is not None) != (ck / "bank.pt").is_file():
        raise ValueError(f"{ck}: the run was trained {'without' if bank is not None else 'with'} a contrastive term "
                         f"(contrastive_weight {'0' if bank is not None else '> 0'}); resume it with the "
                         "contrastive_weight of its config.yaml")
    if bank is not None:
        bank.load_state_dict(torch.load(ck / "bank.pt", weights_only=True))
    optimizer.load_state_dict(torch.load(ck / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=False))
    rng = torch.load(ck / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return json.loads((ck / "state.json").read_text())


def append_log(run: Path, row: dict) -> None:
    with open(run / LOG_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_log(run: Path, step: int) -> None:
    """Drop the log rows written after the checkpoint of ``step`` (a resumed run writes them again)."""
    path = run / LOG_FILE
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= step]
        atomic_write_text(path, "".join(r + "\n" for r in rows))
