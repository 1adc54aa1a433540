"""A run's resumable state: the checkpoint restores every random generator, an interrupted save keeps the last
complete checkpoint, and resuming drops the log rows written after it. (Weights and optimizer round trips:
``test_finetune`` for full fine-tuning, ``test_train`` for LoRA through ``--resume``.)"""

import json
import random

import numpy as np
import pytest
import torch

from erc_llm.constants import has_checkpoint
from erc_llm.training.checkpoint import append_log, load_checkpoint, save_checkpoint, truncate_log


def _parts(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _draws():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_load_restores_every_random_generator(tmp_path):
    model, opt, sched = _parts(0)
    _seed_all(5)
    save_checkpoint(tmp_path, model, "full", opt, sched, {"step": 3})
    expected = _draws()
    _seed_all(9)
    fresh, opt2, sched2 = _parts(1)
    assert load_checkpoint(tmp_path, fresh, "full", opt2, sched2) == {"step": 3}
    assert _draws() == expected


def test_interrupted_save_keeps_the_last_complete_checkpoint(tmp_path):
    model, opt, sched = _parts(0)
    assert not has_checkpoint(tmp_path)
    save_checkpoint(tmp_path, model, "full", opt, sched, {"step": 1})
    assert has_checkpoint(tmp_path)
    with torch.no_grad():
        model.weight.add_(1.0)

    class Broken:
        def state_dict(self):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model, "full", opt, Broken(), {"step": 2})
    live = (tmp_path / "checkpoint").resolve().name  # the checkpoint is a link to its current version
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint", live}  # the failed save left nothing behind
    fresh, opt2, sched2 = _parts(1)
    assert load_checkpoint(tmp_path, fresh, "full", opt2, sched2) == {"step": 1}
    assert torch.allclose(fresh.weight, model.weight - 1.0, atol=1e-6)


def test_truncate_log_drops_rows_after_the_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        append_log(tmp_path, {"step": step, "loss": 1.0 / step})
    append_log(tmp_path, {"step": 4, "dev_predicted": {"weighted_f1": 50.0}})
    truncate_log(tmp_path, 2)
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.5
    truncate_log(tmp_path / "missing", 2)  # a run that has not logged yet: nothing to drop, no error
