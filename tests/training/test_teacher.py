"""Soft targets from a teacher's evaluation of the train split, and the distillation loss they feed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import LABELS, write_jsonl_dataset


def _teacher(folder: Path, dialogues, probs, split: str = "train", labels=LABELS.labels) -> Path:
    """An evaluation folder as erc-llm evaluate writes it: ``probs(turn_label) -> {label: p}`` per utterance."""
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"split": split, "labels": list(labels), "history": "none"}))
    rows = [{"utterance_id": u.utterance_id, "gold": u.emotion, "probabilities": probs(u.emotion)}
            for d in dialogues for u in d.utterances]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _train_dialogues(tmp_path):
    from erc_llm.data import load_split

    data = write_jsonl_dataset(tmp_path / "data", 3)
    return data, load_split("jsonl", "train", str(data), LABELS.labels)[0]


def test_targets_are_the_teachers_probabilities_turn_by_turn_in_label_set_order(tmp_path):
    from erc_llm.training.teacher import Teacher

    _, dialogues = _train_dialogues(tmp_path)
    onehot = lambda gold: {lab: float(lab == gold) for lab in reversed(LABELS.labels)}  # noqa: E731
    t = Teacher.load(_teacher(tmp_path / "t", dialogues, onehot), LABELS)
    targets = t.targets(dialogues)
    assert [a.shape for a in targets] == [(len(d.utterances), len(LABELS.labels)) for d in dialogues]
    for d, a in zip(dialogues, targets):
        assert [LABELS.labels[i] for i in a.argmax(1)] == [u.emotion for u in d.utterances]
    assert len(t.digest) == 64


def test_a_teacher_that_does_not_cover_the_training_split_is_refused_naming_what_is_missing(tmp_path):
    from erc_llm.data.schema import DataError
    from erc_llm.training.teacher import Teacher

    _, dialogues = _train_dialogues(tmp_path)
    uniform = lambda gold: {lab: 1 / len(LABELS.labels) for lab in LABELS.labels}  # noqa: E731
    t = Teacher.load(_teacher(tmp_path / "short", dialogues[:2], uniform), LABELS)
    total = sum(len(d.utterances) for d in dialogues)
    with pytest.raises(DataError, match=rf"{len(dialogues[2].utterances)} of {total} labelled training utterances.*"
                                        rf"{dialogues[2].utterances[0].utterance_id}.*--split train"):
        t.targets(dialogues)
    with pytest.raises(DataError, match="an evaluation of the 'dev' split.*--split train"):
        Teacher.load(_teacher(tmp_path / "dev", dialogues, uniform, split="dev"), LABELS)
    with pytest.raises(DataError, match="label set .*the teacher must score the same labels"):
        Teacher.load(_teacher(tmp_path / "other", dialogues, uniform, labels=("a", "b")), LABELS)
    bad = lambda gold: {lab: 0.5 for lab in LABELS.labels}  # noqa: E731
    with pytest.raises(DataError, match=r"bad row\(s\):\n  line 1 .*not a distribution"):
        Teacher.load(_teacher(tmp_path / "bad", dialogues, bad), LABELS)


def test_distillation_with_a_one_hot_teacher_is_cross_entropy_and_a_soft_teacher_pulls_towards_it():
    from erc_llm.training.losses import class_weights, distillation_loss, label_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])
    w = class_weights([5, 1, 2, 3], "sqrt_inverse")
    onehot = torch.nn.functional.one_hot(targets, 4).float()
    for share in (0.3, 1.0):
        assert distillation_loss(logits, targets, onehot, share, w).item() == pytest.approx(
            label_loss(logits, targets, w, 0.0).item(), rel=1e-6)
    teacher = torch.softmax(torch.randn(6, 4), -1)
    assert distillation_loss(logits, targets, teacher, 1.0, None).item() > 0
    assert distillation_loss(torch.log(teacher), targets, teacher, 1.0, None).item() == pytest.approx(0, abs=1e-6)
    x = logits.clone().requires_grad_()
    distillation_loss(x, targets, teacher, 1.0, None).backward()
    assert torch.allclose(x.grad, (torch.softmax(logits, -1) - teacher) / 6, atol=1e-6)


def test_training_with_a_teacher_that_agrees_with_gold_matches_training_without(tmp_path, tiny_model_dir):
    """The teacher's wiring: one-hot soft targets give the same losses as gold labels; a uniform teacher
    gives other losses; a teacher of another split stops training before the model is loaded."""
    from erc_llm.config import TrainConfig
    from erc_llm.data.schema import DataError
    from erc_llm.options import build
    from erc_llm.training.loop import fit
    from erc_llm.training.recipe import setup

    data, dialogues = _train_dialogues(tmp_path)
    base = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
            "batch_dialogues": 1, "max_steps": 2, "eval_every": 100, "save_every": 100, "test_eval": False,
            "dtype": "float32", "lr": 0.01}
    onehot = _teacher(tmp_path / "onehot", dialogues, lambda g: {lab: float(lab == g) for lab in LABELS.labels})
    uniform = _teacher(tmp_path / "uniform", dialogues, lambda g: {lab: 0.25 for lab in LABELS.labels})

    def losses(name, **kw):
        fit(setup(build(TrainConfig, None, {**base, **kw, "out": str(tmp_path / "runs" / name)})))
        lines = (tmp_path / "runs" / name / "log.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in lines if '"loss"' in x]

    gold = losses("gold")
    assert losses("onehot", teacher=str(onehot), teacher_weight=0.7) == pytest.approx(gold, rel=1e-5)
    assert not np.allclose(losses("uniform", teacher=str(uniform), teacher_weight=0.7), gold, rtol=1e-3)
    dev = _teacher(tmp_path / "dev", dialogues, lambda g: {lab: 0.25 for lab in LABELS.labels}, split="dev")
    with pytest.raises(DataError, match="'dev' split"):
        setup(build(TrainConfig, None, {**base, "teacher": str(dev), "out": str(tmp_path / "refused")}))
    assert not (tmp_path / "refused").exists()
