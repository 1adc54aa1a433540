"""The own-data path as a new user takes it from the README and ``configs/jsonl.yaml``, on a corpus the project
has never seen: label a folder that holds only ``test.jsonl`` with a trained model, then train on one's own
corpus from that model with the config's recipe; the history is named the same way on the console, in the
folders and in the files."""

import json
import subprocess
import sys

import yaml

from erc_llm.cli import main as cli
from tests.conftest import LABELS, REPO, toy_dialogue, write_dialogues, write_jsonl_dataset, write_lora_run
from tests.training.test_train import _env


def test_label_a_test_only_folder_then_train_from_the_model_with_the_jsonl_recipe(tmp_path, tiny_model,
                                                                                  tiny_model_dir, capsys):
    start = write_lora_run(tmp_path / "start", tiny_model, tiny_model_dir)  # stands in for the shipped model
    only_test = tmp_path / "mine"
    only_test.mkdir()
    write_dialogues(only_test / "test.jsonl", [toy_dialogue(4, "t0"), toy_dialogue(6, "t1")])

    labelled = tmp_path / "labelled"
    assert cli(["evaluate", "--dataset", "jsonl", "--split", "test", "--data-dir", str(only_test), "--run", str(start),
                "--dtype", "float32", "--out", str(labelled)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((labelled / "metrics.json").read_text())
    assert metrics["labels"] == list(LABELS.labels)  # from the model: there is no train.jsonl to infer them from
    assert metrics["history"] == "none" and "(no labels in the history, online)" in printed
    assert "History: **none**" in (labelled / "report.md").read_text()
    rows = [json.loads(x) for x in (labelled / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and {r["predicted"] for r in rows} <= set(LABELS.labels)

    corpus, run = write_jsonl_dataset(tmp_path / "corpus", 4), tmp_path / "runs" / "mine"
    recipe = yaml.safe_load((REPO / "configs" / "jsonl.yaml").read_text())
    assert recipe["init_adapter"] and recipe["label_history"] is False  # the documented start: a trained model
    args = ["--config", str(REPO / "configs" / "jsonl.yaml"), "--data-dir", str(corpus), "--model", str(tiny_model_dir),
            "--init-adapter", str(start), "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj",
            "--max-steps", "2", "--eval-every", "1", "--save-every", "1", "--batch-dialogues", "2",
            "--dtype", "float32", "--out", str(run)]
    r = subprocess.run([sys.executable, str(REPO / "erc_llm" / "train.py"), *args], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(no labels in the history)" in r.stdout and "predicted history" not in r.stdout
    test = json.loads((run / "eval" / "test_predicted" / "metrics.json").read_text())
    assert test["history"] == "none" and test["context"] == "online"
    assert "History: **none**" in (run / "eval" / "test_predicted" / "report.md").read_text()
    assert not (run / "eval" / "test_gold").exists()  # no labels in the history: a gold one would be the same run
    assert "test_gold: no gold-history evaluation" in r.stderr  # said, not silently skipped
    assert json.loads((run / "run.json").read_text())["label_history"] is False
    assert yaml.safe_load((run / "config.yaml").read_text())["init_adapter"] == str(start)
    assert "\r" not in r.stderr  # a log file of the run holds lines, not carriage-return progress bars
