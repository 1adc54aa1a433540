"""eval/record_run.py: a finished run's record copied into a results folder, nothing else, all or nothing."""

import json
from pathlib import Path

import pytest

from eval import record_run

ROOT = Path(__file__).resolve().parent.parent


LOG = ('{"step": 1, "epoch": 0, "loss": 2.0, "lr": 1e-05}\n{"step": 2, "epoch": 0, "loss": 1.5, "lr": 2e-05}\n'
       '{"step": 2, "dev_predicted": {"weighted_f1": 50.0}, "eval_seconds": 9.0}\n')


def finished_run(run: Path, finished: bool = True, tested: bool = True) -> Path:
    for name in ("run.json", "best.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"{name}\n")
    (run / "log.jsonl").write_text(LOG)
    (run / "config.yaml").write_text("dataset: jsonl\ndata_dir: data/iemocap\naudio_dir: data/prosody\ntest_eval: true\n")
    if finished:
        (run / "train_summary.json").write_text(json.dumps({"steps": 10}))
    for name in ("adapter/adapter_model.safetensors", "checkpoint/state.json"):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("weights")
    for split in ("test_predicted", "test_gold") if tested else ():
        d = run / "eval" / split
        d.mkdir(parents=True)
        for name in ("metrics.json", "confusion.png", "reliability.png", "predictions.jsonl"):
            (d / name).write_text(f"{split}/{name}")
        (d / "report.md").write_text(f"# {split}\n\nECE 3.1% ([reliability diagram](reliability.png))\n\n"
                                     "![confusion](confusion.png)\n\nCommand: `x`\n")
    (run / "eval" / "dev_predicted").mkdir(parents=True)  # an evaluation killed before its metrics: not a record
    (run / "eval" / "dev_predicted" / "predictions.partial.jsonl").write_text("{}")
    return run


def test_the_record_is_the_spec_log_selection_and_metrics_of_each_finished_evaluation(tmp_path):
    run, out = finished_run(tmp_path / "runs" / "r"), tmp_path / "results" / "r_seed0"
    assert record_run.main([str(run), str(out)]) == 0
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == sorted(["best.json", "config.yaml", "log.jsonl", "run.json", "train_summary.json",
                          *(f"{s}/{n}" for s in ("test_gold", "test_predicted") for n in ("metrics.json", "report.md"))])
    assert (out / "test_gold" / "metrics.json").read_text() == "test_gold/metrics.json"
    assert (out / "config.yaml").read_text() == (run / "config.yaml").read_text()
    assert (out / "log.jsonl").read_text() == LOG.splitlines()[-1] + "\n"  # the dev curve, not every step
    assert (out / "test_gold" / "report.md").read_text() == "# test_gold\n\nECE 3.1%\n\nCommand: `x`\n"  # no dead links
    full = tmp_path / "results" / "r_full"
    assert record_run.main([str(run), str(full), "--full-log"]) == 0 and (full / "log.jsonl").read_text() == LOG
    assert sorted(p.name for p in out.parent.iterdir()) == ["r_full", "r_seed0"]  # no temporary folder left


def test_an_unfinished_run_is_refused_with_how_to_finish_it(tmp_path):
    run, out = finished_run(tmp_path / "r", finished=False), tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--resume true[\s\S]*train_summary.json: missing"):
        record_run.main([str(run), str(out)])
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["r"]


def test_a_run_whose_test_evaluation_has_not_finished_is_refused_with_the_command_that_finishes_it(tmp_path):
    # training writes train_summary.json before it evaluates the selected adapter on test
    run, out = finished_run(tmp_path / "r", tested=False), tmp_path / "out"
    with pytest.raises(SystemExit, match=r"test evaluation .* not finished[\s\S]*erc-llm evaluate --dataset jsonl "
                                         r"--split test --data-dir data/iemocap --audio-dir data/prosody --dtype float32 "
                                         rf"--run {run} --out {run}/eval/test_predicted"):
        record_run.main([str(run), str(out)])
    assert not out.exists()
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text() + "labels: [neu, ang]\non_bad_row: skip\n")  # as training's test evaluation ran
    with pytest.raises(SystemExit, match=r"--data-dir data/iemocap --labels neu,ang --on-bad-row skip "
                                         r"--audio-dir data/prosody --dtype float32 --run"):
        record_run.main([str(run), str(out)])
    cfg.write_text(cfg.read_text().replace("test_eval: true", "test_eval: false"))  # no test asked: nothing owed
    assert record_run.main([str(run), str(out)]) == 0 and (out / "train_summary.json").is_file()


def test_an_existing_results_folder_is_never_overwritten(tmp_path):
    run, out = finished_run(tmp_path / "r"), tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("committed")
    with pytest.raises(SystemExit, match="exists"):
        record_run.main([str(run), str(out)])
    assert (out / "metrics.json").read_text() == "committed"
