"""Hostile-but-fair input: every case once broke (stale resume, silent overwrite, text from non-strings,
tracebacks); each test states the behaviour a user must get instead. `python eval/robustness.py` runs this
file and writes its table to eval/results/robustness/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from erc_llm.config import EvalConfig, TrainConfig
from erc_llm.data import DataError, load_split
from erc_llm.options import ConfigError, build
from tests.conftest import LABELS, toy_dialogue, write_jsonl_dataset

BIN = Path(sys.executable).parent


def _cli(*args, env=None):
    return subprocess.run([str(BIN / "erc-llm"), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def _eval_cfg(tmp_path, model_dir, data, **kw):
    return build(EvalConfig, None, {"dataset": "jsonl", "split": "test", "data_dir": str(data), "model": str(model_dir),
                                    "out": str(tmp_path / "out"), "batch": 1, "zero_shot": True, **kw})


def _interrupt_after(monkeypatch, n_calls: int):
    """Make StreamState.score raise KeyboardInterrupt (a kill) on call ``n_calls + 1``; returns the call log."""
    from erc_llm.decoding import StreamState

    calls = []
    real = StreamState.score

    def score(self, *a, **kw):
        if len(calls) >= n_calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(StreamState, "score", score)
    return calls


# 1 ----------------------------------------------------------------------------------------------------------
def test_resume_after_the_data_changed_starts_over(tmp_path, tiny_model_dir, monkeypatch):
    from erc_llm.evaluate import evaluate

    data = write_jsonl_dataset(tmp_path / "data")
    cfg = _eval_cfg(tmp_path, tiny_model_dir, data, labels=list(LABELS.labels))
    _interrupt_after(monkeypatch, 5)  # test dialogues have 3, 4, 5 turns: killed inside the second
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    monkeypatch.undo()
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    for u in rows[0]["utterances"]:
        u["emotion"] = "anger"  # edit dialogue 0's labels after the kill
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = evaluate(cfg)
    assert m["per_class"]["anger"]["support"] == 3 + 2  # the edited labels, not the stale ones (2)
    saved = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in saved[:3]] == ["anger"] * 3


# 2 ----------------------------------------------------------------------------------------------------------
def test_training_refuses_an_existing_run_dir_without_resume_or_overwrite(tmp_path):
    run, data = tmp_path / "run", tmp_path / "data"
    run.mkdir()
    data.mkdir()
    (run / "log.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match=r"already holds files \(log.jsonl\).*--resume true.*--overwrite true"):
        build(TrainConfig, None, {"data_dir": str(data), "out": str(run)})
    with pytest.raises(ConfigError, match="did not write as a run"):  # --overwrite replaces only a run it wrote
        build(TrainConfig, None, {"data_dir": str(data), "out": str(run), "overwrite": True})
    (run / "run.json").write_text("{}")
    (run / "config.yaml").write_text("{}")
    assert build(TrainConfig, None, {"data_dir": str(data), "out": str(run), "overwrite": True}).overwrite
    with pytest.raises(ConfigError, match="choose one"):
        build(TrainConfig, None, {"data_dir": str(data), "out": str(run), "overwrite": True, "resume": True})
    with pytest.raises(ConfigError, match=r"resume: no checkpoint in .*run/checkpoint to resume from"):
        build(TrainConfig, None, {"data_dir": str(data), "out": str(run), "resume": True})


# 3 ----------------------------------------------------------------------------------------------------------
def test_http_body_limit_counts_chunked_bytes(tiny_model_dir):
    from fastapi.testclient import TestClient

    from erc_llm.server import Limits, create_app
    from erc_llm.session import Engine

    client = TestClient(create_app(Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True),
                                   Limits(max_body_bytes=2000)), raise_server_exceptions=False)

    def chunks(total):
        body = json.dumps({"participants": ["x" * total]}).encode()
        for i in range(0, len(body), 512):
            yield body[i:i + 512]

    r = client.post("/dialogues", content=chunks(5_000_000), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]
    ok = client.post("/dialogues", content=chunks(10), headers={"content-type": "application/json"})
    assert ok.status_code == 201


# 4 ----------------------------------------------------------------------------------------------------------
def _write(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_jsonl_rejects_non_string_fields_listing_every_bad_line(tmp_path):
    good = {"dialogue_id": "ok", "utterances": [{"speaker": "A", "text": "hi", "emotion": "joy"}]}
    _write(tmp_path / "test.jsonl", [
        {"dialogue_id": "d1", "utterances": [{"speaker": 123, "text": "hi"}]},
        {"dialogue_id": "d2", "utterances": [{"speaker": "A", "text": None}]},
        {"dialogue_id": {"name": "A"}, "utterances": [{"speaker": "A", "text": "x"}]},
        "{not json",
        good,
    ])
    with pytest.raises(DataError) as e:
        load_split("jsonl", "test", tmp_path, ("joy", "anger"))
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "line 1, utterances[0], field speaker: expected a string, got int 123" in msg
    assert "line 2, utterances[0], field text: expected a string, got null" in msg
    assert "line 3, field dialogue_id: expected a string or an integer, got dict" in msg
    assert "line 4: invalid JSON" in msg and "--on-bad-row skip" in msg


# 5 ----------------------------------------------------------------------------------------------------------
def test_repl_survives_every_file_mistake_and_keeps_the_dialogue(tmp_path, tiny_model_dir):
    from erc_llm.chat import Repl
    from erc_llm.session import Engine, ERCSession

    repl = Repl(ERCSession(Engine.load(None, model=str(tiny_model_dir), labels=LABELS, zero_shot=True)))
    repl.handle("Ross: We were on a break!")
    empty = _write(tmp_path / "empty_text.jsonl", [{"dialogue_id": "d", "utterances": [
        {"speaker": "A", "text": "fine"}, {"speaker": "B", "text": "  "}]}])
    nulls = _write(tmp_path / "nulls.jsonl", [{"dialogue_id": "d", "utterances": [{"speaker": None, "text": None}]}])
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    answers = {
        "empty text": repl.handle(f"/load {empty}"),
        "nulls": repl.handle(f"/load {nulls}"),
        "binary": repl.handle(f"/load {binary}"),
        "load dir": repl.handle(f"/load {tmp_path}"),
        "save dir": repl.handle(f"/save {tmp_path}"),
        "missing": repl.handle(f"/load {tmp_path / 'nope.jsonl'}"),
    }
    if os.geteuid() != 0:  # root writes anywhere
        answers["save unwritable"] = repl.handle(f"/save {readonly / 'x.jsonl'}")
    for case, text in answers.items():
        assert text.startswith("error: "), (case, text)
    assert "field text: empty text" in answers["empty text"] and "nothing was added" in answers["empty text"]
    assert "field speaker: expected a string, got null" in answers["nulls"]
    assert str(binary) in answers["binary"] and "UTF-8" in answers["binary"]
    assert "is a folder" in answers["load dir"] and "is a folder" in answers["save dir"]
    assert not repl.done and [t.speaker for t in repl.session.turns] == ["Ross"]  # session and dialogue kept
    saved = tmp_path / "kept.jsonl"
    assert repl.handle(f"/save {saved}").startswith("saved 1 turns")


# 6 ----------------------------------------------------------------------------------------------------------
def test_config_rejects_non_finite_and_negative_numbers_all_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, None, {"data_dir": str(tmp_path), "lr": "inf", "epochs": "inf", "threads": "-2",
                                  "limit_train": "-1", "eval_dialogues": "-3", "max_grad_norm": "-1",
                                  "weight_decay": "-0.1", "lora_dropout": "nan"})
    msg = str(e.value)
    assert "8 config problem(s)" in msg
    for needle in ("lr: inf is not a finite number", "epochs: inf is not a finite number",
                   "threads: -2 is out of range; expected >= 0", "limit_train: -1 is out of range",
                   "eval_dialogues: -3", "max_grad_norm: -1.0 is out of range; expected > 0",
                   "weight_decay: -0.1", "lora_dropout: nan is not a finite number"):
        assert needle in msg
    with pytest.raises(ConfigError, match="batch: 0 is out of range"):
        build(EvalConfig, None, {"data_dir": str(tmp_path), "batch": 0})


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_cli_threads_must_be_a_count(command):
    r = _cli(command, "--threads", "-2")
    assert r.returncode == 2 and "expected a whole number >= 0, got -2" in r.stderr and "Traceback" not in r.stderr


def test_training_stops_on_a_diverging_loss_without_saving_it(tmp_path, tiny_model_dir):
    from erc_llm.train import train
    from erc_llm.training.select import TrainingDiverged

    data = write_jsonl_dataset(tmp_path / "data", 4)
    cfg = build(TrainConfig, None, {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir),
                                    "out": str(tmp_path / "run"), "lr": 1e30, "max_steps": 4, "batch_dialogues": 1,
                                    "eval_every": 100, "save_every": 100, "test_eval": False, "dtype": "float32",
                                    "warmup_ratio": 0})
    with pytest.raises(TrainingDiverged, match=r"(NaN|nan|inf).*Lower lr"):
        train(cfg)
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / "best.json").exists()


# 7 ----------------------------------------------------------------------------------------------------------
def _fake_cache(tmp_path, monkeypatch):
    import erc_llm.backbone as bb

    converted = []

    def fake_convert(name, spec, target):
        converted.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "model.safetensors").write_bytes(b"w" * 100)
        manifest = {"name": name, "files": {"model.safetensors": {"bytes": 100, "sha256": "0" * 64}}}
        (target / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    monkeypatch.setattr(bb, "_convert", fake_convert)
    return converted


def test_model_cache_checks_its_files(tmp_path, monkeypatch):
    from erc_llm.backbone import ModelNotFound, prepare_model, verify_cache

    converted = _fake_cache(tmp_path, monkeypatch)
    path, manifest = prepare_model("gemma-3-270m", tmp_path)
    target = Path(path)
    (target / "model.safetensors").write_bytes(b"w" * 50)  # truncated
    prepare_model("gemma-3-270m", tmp_path)
    assert len(converted) == 2  # noticed and rebuilt, not loaded
    (target / "manifest.json").write_text("[1, 2]")  # valid JSON, not an object
    prepare_model("gemma-3-270m", tmp_path)
    assert len(converted) == 3
    with pytest.raises(ModelNotFound, match="does not match its recorded sha256"):
        verify_cache(target, json.loads((target / "manifest.json").read_text()))


def test_unwritable_cache_fails_before_converting(tmp_path, monkeypatch):
    from erc_llm.backbone import ModelNotFound, prepare_model

    converted = _fake_cache(tmp_path, monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ModelNotFound, match="not writable.*ERC_LLM_CACHE"):
        prepare_model("gemma-3-270m", blocker)
    assert converted == []


def test_killed_conversion_work_folders_are_removed(tmp_path):
    from erc_llm.backbone import clean_stale_work

    models = tmp_path / "models"
    dead = models / ".work-999999999-abc"  # no such pid
    alive = models / f".work-{os.getpid()}-abc"
    for d in (dead, alive):
        d.mkdir(parents=True)
        (d / "gemma.gguf").write_bytes(b"x" * 1000)
    clean_stale_work(models)
    assert not dead.exists() and alive.exists()


def test_killed_atomic_dir_versions_are_removed(tmp_path):
    from erc_llm.io import atomic_dir

    with atomic_dir(tmp_path / "adapter") as d:
        (d / "a").write_text("1")
    orphan = tmp_path / ".adapter.999999999.xyz"  # a version a killed process was writing
    orphan.mkdir()
    with atomic_dir(tmp_path / "adapter") as d:
        (d / "a").write_text("2")
    assert not orphan.exists() and (tmp_path / "adapter" / "a").read_text() == "2"


def test_prepare_model_of_an_unreachable_hub_id_is_an_error(tmp_path):
    r = _cli("prepare-model", "no-such-org/no-such-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2 and "could not be fetched" in r.stderr and "ready" not in r.stdout


# 8 ----------------------------------------------------------------------------------------------------------
def test_out_naming_a_file_is_refused_before_loading(tmp_path):
    f = tmp_path / "metrics.txt"
    f.write_text("x")
    for cls in (EvalConfig, TrainConfig):
        with pytest.raises(ConfigError, match="is a file; expected a folder"):
            build(cls, None, {"data_dir": str(tmp_path), "out": str(f)})
    r = _cli("evaluate", "--dataset", "jsonl", "--data-dir", str(tmp_path), "--out", str(f))
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr


# 9 ----------------------------------------------------------------------------------------------------------
def test_long_dialogue_resumes_inside_the_dialogue(tmp_path, tiny_model_dir, monkeypatch):
    from erc_llm.evaluate import evaluate

    d = toy_dialogue(60, "long")
    (tmp_path / "data").mkdir()
    row = {"dialogue_id": d.id, "utterances": [{"speaker": u.speaker, "text": u.text, "emotion": u.emotion}
                                               for u in d.utterances]}
    for split in ("train", "test"):
        _write(tmp_path / "data" / f"{split}.jsonl", [row])
    cfg = _eval_cfg(tmp_path, tiny_model_dir, tmp_path / "data", max_tokens=512)  # also exercises truncation
    full = evaluate(build(EvalConfig, None, {**cfg.__dict__, "out": str(tmp_path / "full")}))
    _interrupt_after(monkeypatch, 40)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    monkeypatch.undo()
    partial = [json.loads(x) for x in (tmp_path / "out" / "predictions.partial.jsonl").read_text().splitlines()]
    assert sum("turn" in r for r in partial) == 40  # every labelled turn was kept
    calls = _interrupt_after(monkeypatch, 10_000)
    resumed = evaluate(cfg)
    assert len(calls) == 20  # only the remaining turns were scored
    assert resumed["weighted_f1"] == pytest.approx(full["weighted_f1"])
    same = [json.loads(x) for x in (tmp_path / "full" / "predictions.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in got] == [r["predicted"] for r in same]
    for a, b in zip(got, same):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


# 10 ---------------------------------------------------------------------------------------------------------
def test_on_bad_row_skip_counts_what_it_left_out(tmp_path, tiny_model_dir):
    from erc_llm.evaluate import evaluate

    data = write_jsonl_dataset(tmp_path / "data")
    rows = [json.loads(x) for x in (data / "test.jsonl").read_text().splitlines()]
    rows[1]["utterances"][0]["text"] = ""
    rows[2]["utterances"][1]["text"] = "   "
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="2 problem"):
        load_split("jsonl", "test", data, LABELS.labels)
    m = evaluate(_eval_cfg(tmp_path, tiny_model_dir, data, on_bad_row="skip", labels=list(LABELS.labels)))
    assert m["skipped_on_load"] == {"text: empty text": 2}
    assert m["utterances"] == 3 + 4 + 5 - 2
    meld = tmp_path / "meld"
    meld.mkdir()
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (meld / "test_sent_emo.csv").write_text(header + "1,Hi,Ross,joy,positive,0,0,1,1,a,b\n"
                                            "2,,Ross,joy,positive,0,1,1,1,a,b\n3,Yo,Joey,sadness,negative,0,2,1,1,a,b\n")
    with pytest.raises(DataError, match="field Utterance: empty text"):
        load_split("meld", "test", meld)
    dialogues, _, report = load_split("meld", "test", meld, on_bad_row="skip")
    assert len(dialogues[0]) == 2 and report.skipped == {"Utterance: empty text": 1}


def test_labels_match_case_insensitively_and_a_one_label_set_or_an_empty_split_is_an_error(tmp_path, tiny_model_dir):
    from erc_llm.data import load_split
    from erc_llm.evaluate import evaluate
    from tests.conftest import write_jsonl_dataset

    data = write_jsonl_dataset(tmp_path / "data")
    dialogues, labels, _ = load_split("jsonl", "test", data, ("Neutral", "JOY", "anger", "Surprise"))
    assert labels.labels == ("neutral", "joy", "anger", "surprise") and dialogues
    with pytest.raises(ConfigError, match="at least two"):
        build(EvalConfig, None, {"dataset": "jsonl", "data_dir": str(data), "labels": ["Joy", "joy"],
                                 "out": str(tmp_path / "o")})
    (data / "test.jsonl").write_text('{"dialogue_id": "x", "utterances": [{"speaker": "A", "text": "hi", "emotion": "zz"}]}\n')
    cfg = build(EvalConfig, None, {"dataset": "jsonl", "data_dir": str(data), "zero_shot": True, "model": str(tiny_model_dir),
                                   "labels": ["neutral", "joy"], "on_bad_row": "skip", "out": str(tmp_path / "o2")})
    with pytest.raises(DataError, match="nothing to evaluate .*1 rows skipped"):
        evaluate(cfg)
