"""eval/ensemble.py: probability averaging of evaluation folders, and the checks that keep it honest."""

import json
from pathlib import Path

import pytest

from eval import ensemble as ensemble_script

ROOT = Path(__file__).resolve().parent.parent

LABELS = ["neutral", "joy", "anger"]


def write_eval(folder: Path, probs: list[dict], gold: list[str], history: str = "none", split: str = "dev") -> Path:
    folder.mkdir(parents=True)
    rows = [{"dialogue_id": "d0", "utterance_id": f"d0_u{i}", "speaker": "A", "text": "hi", "gold": g,
             "predicted": max(p, key=p.get), "probabilities": p} for i, (p, g) in enumerate(zip(probs, gold))]
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {"dataset": "jsonl", "split": split, "context": "online", "labels": LABELS, "history": history,
               "dialogues": 1, "model": folder.name, "weighted_f1": 50.0, "seconds": 2.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def p(n, j, a):
    return {"neutral": n, "joy": j, "anger": a}


def test_mean_probabilities_decide_not_the_majority(tmp_path):
    # two members say neutral narrowly, one says anger strongly: the mean is anger, a vote would be neutral
    gold = ["anger", "joy"]
    a = write_eval(tmp_path / "a", [p(0.40, 0.25, 0.35), p(0.1, 0.8, 0.1)], gold)
    b = write_eval(tmp_path / "b", [p(0.40, 0.25, 0.35), p(0.2, 0.7, 0.1)], gold)
    c = write_eval(tmp_path / "c", [p(0.05, 0.05, 0.90), p(0.6, 0.3, 0.1)], gold)
    m = ensemble_script.ensemble([a, b, c], tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["anger", "joy"]
    assert rows[0]["probabilities"]["anger"] == pytest.approx((0.35 + 0.35 + 0.90) / 3, abs=1e-6)
    assert m["weighted_f1"] == pytest.approx(100.0) and m["accuracy"] == pytest.approx(100.0)
    assert [x["folder"] for x in m["members"]] == [str(a), str(b), str(c)]
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (saved["dataset"], saved["split"], saved["history"], saved["context"]) == ("jsonl", "dev", "none", "online")
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "confusion.png").is_file()


def test_refuses_members_that_wrote_labels_into_the_history(tmp_path):
    a = write_eval(tmp_path / "a", [p(0.5, 0.3, 0.2)], ["neutral"])
    b = write_eval(tmp_path / "b", [p(0.5, 0.3, 0.2)], ["neutral"], history="predicted")
    with pytest.raises(SystemExit, match=r"b: history is 'predicted'"):
        ensemble_script.ensemble([a, b], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reports_every_mismatch_at_once(tmp_path):
    a = write_eval(tmp_path / "a", [p(0.5, 0.3, 0.2), p(0.5, 0.3, 0.2)], ["neutral", "joy"])
    b = write_eval(tmp_path / "b", [p(0.5, 0.3, 0.2), p(0.5, 0.3, 0.2)], ["neutral", "joy"], split="test")
    c = write_eval(tmp_path / "c", [p(0.5, 0.3, 0.2)], ["neutral"])
    with pytest.raises(SystemExit) as e:
        ensemble_script.ensemble([a, b, c], tmp_path / "out")
    msg = str(e.value)
    assert "split = 'test'" in msg and "its 1 utterances are not the 2" in msg


def test_missing_files_name_the_folder(tmp_path):
    a = write_eval(tmp_path / "a", [p(0.5, 0.3, 0.2)], ["neutral"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"empty: missing metrics.json, predictions.jsonl"):
        ensemble_script.ensemble([a, tmp_path / "empty"], tmp_path / "out")


def test_records_the_training_config_of_members_that_are_run_folders(tmp_path):
    a = write_eval(tmp_path / "a", [p(0.5, 0.3, 0.2)], ["neutral"])
    b = write_eval(tmp_path / "b", [p(0.5, 0.3, 0.2)], ["neutral"])
    run = tmp_path / "run_b"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 2\nlr: 0.0001\n")
    metrics = json.loads((b / "metrics.json").read_text())
    (b / "metrics.json").write_text(json.dumps({**metrics, "model": str(run)}))
    m = ensemble_script.ensemble([a, b], tmp_path / "out")
    assert [x["config"] for x in m["members"]] == [None, {"seed": 2, "lr": 0.0001}]


def test_members_with_other_gold_labels_a_missing_label_or_torn_metrics_are_refused(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    def member(name, gold="joy", probs=None, metrics=None):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(metrics if metrics is not None else json.dumps(
            {"dataset": "jsonl", "split": "dev", "context": "online", "labels": ["joy", "anger"], "history": "none",
             "dialogues": 1, "model": name}))
        row = {"dialogue_id": "d", "utterance_id": "u1", "gold": gold, "predicted": "joy",
               "probabilities": probs if probs is not None else {"joy": 0.6, "anger": 0.4}}
        (d / "predictions.jsonl").write_text(json.dumps(row) + "\n")
        return d

    def run(*members):
        r = subprocess.run([sys.executable, str(REPO / "eval" / "ensemble.py"), *map(str, members), "--out",
                            str(tmp_path / f"out{len(list(tmp_path.iterdir()))}")], capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        return r.stderr

    a = member("a")
    assert "gold labels of 1 utterances" in run(a, member("b", gold="anger"))
    assert "predictions.jsonl, line 1: probabilities lack labels" in run(a, member("c", probs={"joy": 1.0}))
    assert "metrics.json: not valid JSON" in run(a, member("d", metrics='{"dataset": "jso'))
