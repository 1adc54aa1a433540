"""erc_llm/stages.py: memory, fusion and calibration fitted on a run, applied the same way in batch and live."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from erc_llm import stages as S
from erc_llm.config import EvalConfig, StageOptions, TrainConfig
from erc_llm.data import load_split
from erc_llm.evaluate import evaluate
from erc_llm.options import build
from erc_llm.run import RunSpec, fit_run, load
from erc_llm.session import ERCSession
from tests.conftest import write_jsonl_dataset, write_lora_run

FEATURES = ("duration", "avg_pitch", "avg_intensity")


def test_memory_votes_by_similarity_and_temperature():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    states = np.stack([a + 0.05 * rng.normal(size=8) for _ in range(3)] + [b + 0.05 * rng.normal(size=8) for _ in range(9)])
    memory = S.Memory.fit(states, np.array([0] * 3 + [1] * 9), 3)
    sharp = memory.distribution(a[None], k=12, temperature=0.01)
    flat = memory.distribution(a[None], k=12, temperature=100.0)
    assert sharp[0, 0] > 0.99  # the three near neighbours decide, although label 1 has three times the votes
    assert flat[0] == pytest.approx([0.25, 0.75, 0.0], abs=0.01)  # a flat kernel counts votes


def test_pq_memory_is_compact_and_agrees_with_fp16(tmp_path):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 64))
    labels = rng.integers(0, 4, size=2000)
    states = centres[labels] + 0.3 * rng.normal(size=(2000, 64))
    fp16, pq = S.Memory.fit(states, labels, 4, "fp16"), S.Memory.fit(states, labels, 4, "pq")
    for m, name in ((fp16, "fp16"), (pq, "pq")):
        (tmp_path / name).mkdir()
        m.save(tmp_path / name)
    assert pq.index.code_size * 10 < fp16.index.code_size  # bytes per stored slot (the codebooks are shared)
    query = centres + 0.3 * rng.normal(size=(4, 64))
    loaded = S.Memory.load(tmp_path / "pq", 4, "pq")
    assert (loaded.distribution(query, 32, 0.1).argmax(1) == fp16.distribution(query, 32, 0.1).argmax(1)).all()


def test_calibration_error_and_temperature():
    gold = np.array([0, 0, 0, 1])
    confident = np.array([[0.99, 0.01]] * 4)  # 75% right at 99% confidence
    cal = S.calibration(gold, confident)
    assert cal["ece"] == pytest.approx(24.0, abs=1e-6)
    assert cal["nll"] == pytest.approx(-(3 * np.log(0.99) + np.log(0.01)) / 4)
    t = S.choose_temperature(gold, confident)
    assert t > 1  # an over-confident model is softened
    softened = S.softmax(S.log_clip(confident) / t)
    assert S.calibration(gold, softened)["ece"] < 1.0 and (softened.argmax(1) == confident.argmax(1)).all()


def test_combine_mixes_memory_then_fuses_then_calibrates():
    llm, mem, clf = np.array([[0.6, 0.4]]), np.array([[0.0, 1.0]]), np.array([[0.2, 0.8]])
    settings = {"memory": {"lambda": 0.5}, "fusion": {"weight": 1.0}, "temperature": 2.0}
    steps = S.combine(llm, mem, clf, settings)
    assert list(steps) == list(S.STEPS)
    assert steps["memory"][0] == pytest.approx([0.3, 0.7])
    assert steps["fusion"][0] == pytest.approx(np.array([0.06, 0.56]) / 0.62)
    assert steps["calibrated"][0] == pytest.approx(S.softmax(np.log(steps["fusion"][0]) / 2))
    assert S.combine(llm, None, None, {})["calibrated"][0] == pytest.approx(llm[0])


def test_listener_uses_only_turns_heard_so_far():
    from erc_llm.projector import AudioSpec

    spec = AudioSpec("csv", 1, 2, 1, False, ["f"], [0.0], [1.0], "speaker")
    listener = S.Listener(S.Classifier(np.zeros((2, 6)), np.zeros(2), spec, 1, ""))
    xs = [listener.turn("A", np.array([v], np.float32), None) for v in (10.0, 12.0, 14.0, 16.0)]
    assert xs[0][0] == pytest.approx(6.0)  # fewer than 5 turns heard: the corpus statistics (clipped at 6)
    assert xs[1][2] == pytest.approx(xs[0][0])  # the speaker's previous turn is context
    x5 = listener.turn("A", np.array([18.0], np.float32), None)
    assert x5[0] == pytest.approx((18 - 14) / np.std([10, 12, 14, 16, 18]))  # running statistics, this turn included
    listener.start_dialogue()
    assert listener.turn("B", np.array([1.0], np.float32), None)[2:4] == pytest.approx([0, 0])  # context restarts


def test_config_refuses_stages_on_offline_runs_and_unused_stage_options(tmp_path):
    data = write_jsonl_dataset(tmp_path / "data")
    with pytest.raises(ValueError) as e:
        build(TrainConfig, None, {"data_dir": str(data), "dataset": "jsonl", "memory": True, "lookahead": 2,
                                  "label_history": False, "out": str(tmp_path / "run")})
    assert "online run without speaker notes" in str(e.value)
    with pytest.raises(ValueError) as e:
        build(TrainConfig, None, {"data_dir": str(data), "dataset": "jsonl", "memory_codec": "pq", "out": str(tmp_path / "r")})
    assert "memory_codec" in str(e.value)


def write_audio(directory, data_dir, seed=0):
    """Random prosody-like features for every utterance of every split (some missing)."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for split in ("train", "dev", "test"):
        dialogues, _, _ = load_split("jsonl", split, data_dir)
        with open(directory / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["utterance_id", *FEATURES])
            for i, u in enumerate(x for d in dialogues for x in d.utterances):
                if i % 7 != 3:
                    w.writerow([u.utterance_id, *rng.normal(size=len(FEATURES)).round(4)])
    return directory


def fitted_run(tmp_path, tiny_model, tiny_model_dir, label_history=False):
    data = write_jsonl_dataset(tmp_path / "data", n_dialogues=5)
    audio = write_audio(tmp_path / "audio", data)
    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir, label_history=label_history)
    splits = {s: load_split("jsonl", s, data)[0] for s in ("train", "dev", "test")}
    opts = StageOptions(memory=True, fusion=True, fusion_audio_source="csv", fusion_audio_dir=str(audio),
                        fusion_audio_context=2, fusion_text_encoder="")
    p = load(run, labels=load_split("jsonl", "train", data)[1])
    fitted, report = S.fit(p, splits, opts)
    fitted.save(run)
    dataclasses.replace(RunSpec.read(run), stages=report["settings"]).write(run)
    return data, audio, run, report


@pytest.mark.parametrize("label_history", [False, True])
def test_batch_evaluation_and_a_live_session_give_the_same_probabilities(tmp_path, tiny_model, tiny_model_dir,
                                                                          label_history):
    """Also for a run that writes earlier turns' labels: both write the adapter's own label, whatever the stages say."""
    data, audio, run, report = fitted_run(tmp_path, tiny_model, tiny_model_dir, label_history)
    assert set(report["steps"]["dev"]) == set(S.STEPS) and report["settings"]["chosen_on"] == "dev"
    assert (run / "stages" / "memory.faiss").is_file() and (run / "stages" / "fusion.npz").is_file()
    cfg = build(EvalConfig, None, {"dataset": "jsonl", "split": "test", "data_dir": str(data), "run": str(run),
                                   "audio_dir": str(audio), "out": str(tmp_path / "eval")})
    m = evaluate(cfg)
    assert m["stages"]["applied"][:2] == ["memory", "fusion"] and m["stages"]["stage_stats"] == "online"
    assert "ece" in m and (tmp_path / "eval" / "reliability.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    table = S.audio_table("csv", audio, "test").values
    session = ERCSession.from_run(str(run))
    live = []
    for d in load_split("jsonl", "test", data)[0]:
        session.reset(participants=d.speakers)  # as the batch transcript's header lists them
        for u in d.utterances:
            live.append(session.add_turn(u.speaker, u.text, table.get(u.utterance_id)))
    assert len(live) == len(rows)
    for r, t in zip(rows, live):
        assert t.probs == pytest.approx(r["probabilities"], abs=2e-4)
        assert t.label == r["predicted"]
    assert "memory" in live[0].used and any("no audio" in t.used for t in live)
    off = evaluate(build(EvalConfig, None, {**cfg.__dict__, "stages": False, "out": str(tmp_path / "alone")}))
    assert off["stages"] is None
    alone = [json.loads(x) for x in (tmp_path / "alone" / "predictions.jsonl").read_text().splitlines()]
    assert [r["probabilities"] for r in alone] == [r["adapter_probabilities"] for r in rows]


def test_offline_statistics_are_named_and_differ(tmp_path, tiny_model, tiny_model_dir):
    data, audio, run, _ = fitted_run(tmp_path, tiny_model, tiny_model_dir)
    spec = RunSpec.read(run)
    spec.stages["fusion"]["weight"] = 1.0  # whatever dev chose for the random model, let the classifier count
    spec.write(run)
    base = {"dataset": "jsonl", "split": "dev", "data_dir": str(data), "run": str(run), "audio_dir": str(audio)}
    online = evaluate(build(EvalConfig, None, {**base, "out": str(tmp_path / "on")}))
    offline = evaluate(build(EvalConfig, None, {**base, "stage_stats": "split", "out": str(tmp_path / "off")}))
    assert online["stages"]["stage_stats"] == "online"
    assert offline["stages"]["stage_stats"] == "split"
    assert "OFFLINE" in (tmp_path / "off" / "report.md").read_text()
    assert "OFFLINE" not in (tmp_path / "on" / "report.md").read_text()
    on = [json.loads(x)["probabilities"] for x in (tmp_path / "on" / "predictions.jsonl").read_text().splitlines()]
    off = [json.loads(x)["probabilities"] for x in (tmp_path / "off" / "predictions.jsonl").read_text().splitlines()]
    assert on != off


def test_missing_audio_gives_every_turn_the_no_audio_input_as_a_session_does(tmp_path, tiny_model, tiny_model_dir):
    data, audio, run, _ = fitted_run(tmp_path, tiny_model, tiny_model_dir)
    spec = RunSpec.read(run)
    spec.stages["fusion"]["audio_dir"] = str(tmp_path / "gone")
    spec.write(run)
    m = evaluate(build(EvalConfig, None, {"dataset": "jsonl", "split": "dev", "data_dir": str(data), "run": str(run),
                                          "out": str(tmp_path / "e")}))
    assert "fusion" in m["stages"]["applied"] and "'no audio' input for every turn" in m["stages"]["note"]
    rows = [json.loads(x) for x in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    session = ERCSession.from_run(str(run))
    for d in load_split("jsonl", "dev", data)[0]:
        session.reset(participants=d.speakers)
        for u in d.utterances:
            t = session.add_turn(u.speaker, u.text)  # no audio
            assert t.probs == pytest.approx(rows.pop(0)["probabilities"], abs=2e-4)


def test_export_carries_the_stages_and_reproduces_evaluation(tmp_path, tiny_model, tiny_model_dir):
    from erc_llm.export import export

    data, audio, run, _ = fitted_run(tmp_path, tiny_model, tiny_model_dir)
    out = export(run, tmp_path / "exported")
    assert "Stages after the adapter: memory of" in (out / "README.md").read_text()
    base = {"dataset": "jsonl", "split": "test", "data_dir": str(data), "audio_dir": str(audio)}
    a = evaluate(build(EvalConfig, None, {**base, "run": str(run), "out": str(tmp_path / "a")}))
    b = evaluate(build(EvalConfig, None, {**base, "run": str(out), "out": str(tmp_path / "b")}))
    pa = [json.loads(x)["probabilities"] for x in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()]
    pb = [json.loads(x)["probabilities"] for x in (tmp_path / "b" / "predictions.jsonl").read_text().splitlines()]
    assert pa == pb and a["stages"]["settings"] == b["stages"]["settings"]


def test_training_fits_the_stages_and_a_finished_run_refits_them_on_resume(tmp_path, tiny_model_dir, monkeypatch):
    from erc_llm.train import main

    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data = write_jsonl_dataset(tmp_path / "data", n_dialogues=5)
    audio = write_audio(tmp_path / "audio", data)
    run = tmp_path / "run"
    args = ["--dataset", "jsonl", "--data-dir", str(data), "--model", str(tiny_model_dir), "--out", str(run),
            "--max-steps", "2", "--eval-every", "2", "--save-every", "1", "--batch-dialogues", "2",
            "--label-history", "false", "--memory", "true", "--fusion", "true", "--fusion-audio-source", "csv",
            "--fusion-audio-dir", str(audio), "--fusion-text-encoder", ""]
    assert main(args) == 0
    spec = RunSpec.read(run)
    assert spec.stages["memory"]["slots"] > 0 and spec.stages["fusion"]["audio_source"] == "csv"
    report = json.loads((run / "stages.json").read_text())
    assert set(report["steps"]) == {"dev"} and set(report["steps"]["dev"]) == set(S.STEPS)
    test = json.loads((run / "eval" / "test_predicted" / "metrics.json").read_text())
    assert test["stages"]["applied"][:2] == ["memory", "fusion"] and set(test["stages"]["steps"]) == set(S.STEPS)
    assert test["weighted_f1"] == pytest.approx(test["stages"]["steps"]["calibrated"]["weighted_f1"])
    assert main(args[:-8] + ["--memory", "true", "--memory-codec", "pq", "--resume", "true"]) == 0
    spec = RunSpec.read(run)
    assert spec.stages["memory"]["codec"] == "pq" and "fusion" not in spec.stages
    assert not (run / "stages" / "fusion.npz").exists()


def test_stages_command_fits_a_run_and_refuses_one_with_speaker_notes(tmp_path, tiny_model, tiny_model_dir,
                                                                      monkeypatch, capsys):
    from erc_llm.cli import main

    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data = write_jsonl_dataset(tmp_path / "data", n_dialogues=5)
    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir)
    assert main(["stages", "--run", str(run), "--dataset", "jsonl", "--data-dir", str(data), "--memory", "true"]) in (0, None)
    out = capsys.readouterr().out
    assert "dev: adapter" in out and "memory of" in out
    assert RunSpec.read(run).stages["memory"]["codec"] == "fp16"
    noted = write_lora_run(tmp_path / "noted", tiny_model, tiny_model_dir)
    spec = RunSpec.read(noted)
    dataclasses.replace(spec, speakers={"bios": False, "history": 2, "top_k": 2, "note_tokens": 64}).write(noted)
    assert main(["stages", "--run", str(noted), "--dataset", "jsonl", "--data-dir", str(data), "--memory", "true"]) == 2
    assert "speaker-memory notes" in capsys.readouterr().err


def test_stages_fitted_on_an_exported_model_reseal_it(tmp_path, tiny_model, tiny_model_dir, monkeypatch):
    from erc_llm.export import export

    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data = write_jsonl_dataset(tmp_path / "data", n_dialogues=5)
    out = export(write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir), tmp_path / "exported")
    fit_run(out, "jsonl", str(data), [], "error", StageOptions(memory=True), test=False)
    p = load(out)  # checksums cover the new stage files and run.json
    assert p.stages is not None and "stages/memory.faiss" in json.loads((out / "checksums.json").read_text())
