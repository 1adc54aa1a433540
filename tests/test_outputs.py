"""No command deletes or renames a file or folder it did not write: every writer of a folder goes through
``erc_llm.io.claim_output``."""

import json
import subprocess
import sys

import pytest

from erc_llm.cli import main as cli
from erc_llm.io import OutputError, claim_output, mark_output
from tests.conftest import REPO, write_jsonl_dataset, write_lora_run


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def precious(tmp_path):
    """A user's folder that no command may touch."""
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "chapter1.tex").write_text("years of work")
    return d


def test_claim_rules(tmp_path, precious):
    data = write_jsonl_dataset(tmp_path / "data")
    with pytest.raises(OutputError, match="did not write"):
        claim_output(precious, "export")
    with pytest.raises(OutputError, match="same folder as the input"):
        claim_output(data, "evaluation", inputs=[data])
    with pytest.raises(OutputError, match="inside the input"):
        claim_output(data / "out", "evaluation", inputs=[data])
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(OutputError, match="existing file"):
        claim_output(tmp_path / "a_file", "export")
    own = tmp_path / "own"
    own.mkdir()
    mark_output(own, "export")
    (own / "README.md").write_text("card")
    assert claim_output(own, "export") == own
    with pytest.raises(OutputError, match="--overwrite"):
        claim_output(own, "export", replace=False)
    with pytest.raises(OutputError, match="did not write as a run"):
        claim_output(own, "run")
    assert claim_output(tmp_path / "new", "run") == tmp_path / "new"


def test_export_refuses_a_foreign_folder_the_run_itself_and_a_file(tmp_path, tiny_model, tiny_model_dir, precious,
                                                                   capsys):
    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir)
    before, run_before = snapshot(precious), snapshot(run)
    assert cli(["export", "--run", str(run), "--out", str(precious)]) == 2
    assert cli(["export", "--run", str(run), "--out", str(run)]) == 2
    (tmp_path / "notes.txt").write_text("mine")
    assert cli(["export", "--run", str(run), "--out", str(tmp_path / "notes.txt")]) == 2
    assert snapshot(precious) == before and snapshot(run) == run_before
    assert (tmp_path / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".notes.txt*"))
    assert "did not write" in capsys.readouterr().err
    out = tmp_path / "exported"
    assert cli(["export", "--run", str(run), "--out", str(out)]) in (0, None)
    assert cli(["export", "--run", str(run), "--out", str(out)]) in (0, None)  # its own earlier output: replaced
    assert (out / "adapter_model.safetensors").is_file()


def test_speakers_build_refuses_a_foreign_folder(tmp_path, precious):
    data = write_jsonl_dataset(tmp_path / "data")
    before = snapshot(precious)
    assert cli(["speakers", "build", "--dataset", "jsonl", "--split", "train", "--data-dir", str(data),
                "--out", str(precious)]) == 2
    assert snapshot(precious) == before


def test_training_overwrite_never_deletes_an_input_or_a_foreign_folder(tmp_path, tiny_model_dir, precious):
    from erc_llm.config import TrainConfig
    from erc_llm.options import build

    out = tmp_path / "work"
    data = write_jsonl_dataset(out / "data")  # the data inside the folder that --overwrite would replace
    (out / "run.json").write_text("{}")
    with pytest.raises(ValueError, match="contains the input"):
        build(TrainConfig, None, {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir),
                                  "out": str(out), "overwrite": True})
    with pytest.raises(ValueError, match="did not write as a run"):
        build(TrainConfig, None, {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir),
                                  "out": str(precious), "overwrite": True})
    assert (data / "train.jsonl").is_file() and (precious / "chapter1.tex").is_file()


def test_evaluation_refuses_a_foreign_folder_and_the_run_folder(tmp_path, tiny_model, tiny_model_dir, precious):
    from erc_llm.config import EvalConfig
    from erc_llm.options import build

    data = write_jsonl_dataset(tmp_path / "data")
    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir)
    base = {"dataset": "jsonl", "data_dir": str(data), "run": str(run)}
    with pytest.raises(ValueError, match="did not write"):
        build(EvalConfig, None, {**base, "out": str(precious)})
    with pytest.raises(ValueError, match="run folder itself"):
        build(EvalConfig, None, {**base, "out": str(run)})
    with pytest.raises(ValueError, match="inside the input"):
        build(EvalConfig, None, {**base, "out": str(data / "predictions")})
    assert build(EvalConfig, None, {**base, "out": str(run / "eval" / "dev")})  # inside the run: fine


def test_ensemble_refuses_to_write_over_a_member(tmp_path):
    member = tmp_path / "member"
    member.mkdir()
    (member / "metrics.json").write_text(json.dumps({"split": "dev"}))
    (member / "predictions.jsonl").write_text("")
    r = subprocess.run([sys.executable, str(REPO / "eval" / "ensemble.py"), str(member), str(member), "--out",
                        str(member)], capture_output=True, text=True)
    assert r.returncode != 0 and "same folder as the input" in r.stderr
    assert (member / "predictions.jsonl").read_text() == ""


def test_progress_in_a_log_is_plain_lines_that_never_share_a_line_with_a_message(capsys):
    """Where stderr is a file or pipe, a bar is whole lines (no carriage returns), the last one the final count, so
    a log message written between updates starts on a line of its own."""
    import sys

    from erc_llm.io import progress

    for i in progress(range(5), desc="work", unit="item"):
        if i == 2:
            sys.stderr.write("INFO a message\n")
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert "INFO a message" in lines and lines[-1].startswith("work: 100%") and "5/5" in lines[-1]
