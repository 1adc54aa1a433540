"""eval/prior_shift.py: logit adjustment by the training prior, with tau chosen on dev."""

import json
from pathlib import Path

import numpy as np
import pytest

from eval import prior_shift
from tests.test_ensemble import LABELS, p, write_eval

ROOT = Path(__file__).resolve().parent.parent


def write_train(data_dir: Path, counts: dict[str, int]) -> Path:
    data_dir.mkdir()
    turns = [{"speaker": "A", "text": f"t{i}", "emotion": e} for e, n in counts.items() for i in range(n)]
    (data_dir / "train.jsonl").write_text(json.dumps({"dialogue_id": "d0", "utterances": turns}) + "\n")
    return data_dir


def test_rare_label_wins_once_tau_outweighs_its_prior(tmp_path):
    # prior 0.8 / 0.1 / 0.1: a 0.45-vs-0.35 neutral-over-anger call flips to anger at tau > log(45/35)/log(8) ≈ 0.12
    data = write_train(tmp_path / "data", {"neutral": 8, "joy": 1, "anger": 1})
    log_prior = np.log(prior_shift.train_prior("jsonl", data, tuple(LABELS)))
    rows = [{"gold": "anger", "probabilities": p(0.45, 0.20, 0.35)}, {"gold": "neutral", "probabilities": p(0.9, 0.05, 0.05)}]
    assert prior_shift.shifted(rows, tuple(LABELS), log_prior, 0.0)[1] == ["neutral", "neutral"]
    assert prior_shift.shifted(rows, tuple(LABELS), log_prior, 0.2)[1] == ["anger", "neutral"]


def test_tau_is_chosen_on_dev_and_every_tau_is_written(tmp_path, capsys):
    data = write_train(tmp_path / "data", {"neutral": 8, "joy": 1, "anger": 1})
    gold = ["anger", "neutral"]
    dev = write_eval(tmp_path / "dev", [p(0.45, 0.20, 0.35), p(0.9, 0.05, 0.05)], gold)
    # on test the shift hurts: the 0.45/0.35 utterance is neutral there
    test = write_eval(tmp_path / "test", [p(0.45, 0.20, 0.35), p(0.9, 0.05, 0.05)], ["neutral", "neutral"], split="test")
    out = tmp_path / "shift.json"
    prior_shift.main(["--dataset", "jsonl", "--data-dir", str(data), "--dev", str(dev), "--test", str(test),
                      "--taus", "0", "0.2", "0.5", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["tau_chosen_on_dev"] == 0.2  # the smallest tau reaching dev's best
    assert [c["tau"] for c in r["test"]] == [0.0, 0.2, 0.5]
    assert r["dev"][1]["mean_weighted_f1"] == pytest.approx(100.0)
    assert r["test"][0]["mean_weighted_f1"] == pytest.approx(100.0) and r["test"][1]["mean_weighted_f1"] < 100.0
    assert "chosen on dev" in capsys.readouterr().out


def test_refuses_a_test_folder_given_as_dev_and_labels_absent_from_train(tmp_path):
    data = write_train(tmp_path / "data", {"neutral": 8, "joy": 1, "anger": 1})
    test = write_eval(tmp_path / "test", [p(0.5, 0.3, 0.2)], ["neutral"], split="test")
    with pytest.raises(SystemExit, match=r"expected dev evaluations:\n  .*test: split 'test'"):
        prior_shift.main(["--dataset", "jsonl", "--data-dir", str(data), "--dev", str(test), "--test", str(test),
                          "--out", str(tmp_path / "x.json")])
    sparse = write_train(tmp_path / "sparse", {"neutral": 8, "joy": 1})
    with pytest.raises(SystemExit, match=r"labels \['anger'\] never occur in the train split"):
        prior_shift.train_prior("jsonl", sparse, tuple(LABELS))
