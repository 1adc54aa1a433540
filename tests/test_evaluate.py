import json

import peft
import pytest
import transformers

from erc_llm.config import EvalConfig
from erc_llm.data.schema import LabelSet
from erc_llm.evaluate import evaluate
from erc_llm.metrics import compute_metrics
from erc_llm.options import build
from erc_llm.run import RunSpec
from tests.conftest import write_jsonl_dataset

TOY = LabelSet("toy", ("a", "b", "c"))


def test_metrics_hand_computed():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = compute_metrics(gold, pred, TOY)
    # per class: a P=1 R=2/3 F=.8 ; b P=.5 R=.5 F=.5 ; c P=.5 R=1 F=2/3
    assert m["accuracy"] == pytest.approx(100 * 4 / 6)
    assert m["unweighted_accuracy"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 0.5 + 2 / 3) / 3)
    assert m["weighted_f1"] == pytest.approx(100 * (3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m["per_class"]["c"] == pytest.approx({"precision": 50.0, "recall": 100.0, "f1": 100 * 2 / 3, "support": 1})
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows gold a, b, c; columns predicted


def test_metrics_include_classes_never_seen():
    m = compute_metrics(["a", "a"], ["a", "b"], TOY)
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def _cfg(tmp_path, model_dir, **kw):
    data = write_jsonl_dataset(tmp_path / "data")
    kw.setdefault("zero_shot", "run" not in kw)
    return build(EvalConfig, None, {"dataset": "jsonl", "split": "test", "data_dir": str(data), "model": str(model_dir),
                                    "out": str(tmp_path / "out"), **kw})


def test_evaluate_end_to_end_writes_artifacts(tmp_path, tiny_model_dir):
    m = evaluate(_cfg(tmp_path, tiny_model_dir), command="erc-llm evaluate ...")
    out = tmp_path / "out"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["weighted_f1"] == pytest.approx(m["weighted_f1"])
    assert saved["dialogues"] == 3 and saved["utterances"] == 3 + 4 + 5 and saved["history"] == "predicted"
    assert set(saved["per_class"]) == set(saved["labels"])
    assert saved["software"]["transformers"] == transformers.__version__ and saved["software"]["peft"] == peft.__version__
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    for r in rows:
        assert r["predicted"] in saved["labels"] and set(r["probabilities"]) == set(saved["labels"])
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert "weighted F1" in (out / "report.md").read_text()
    assert not (out / "predictions.partial.jsonl").exists()


def test_evaluate_resumes_after_interruption(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model_dir, batch=1)
    full = evaluate(cfg)
    rows_full = (tmp_path / "out" / "predictions.jsonl").read_text()
    # simulate a kill after the first dialogue: partial file with a header and one finished dialogue
    import erc_llm.evaluate as ev

    calls = []
    real_tag = ev.predict

    def crash_after_one(tagger, dialogues, partial, fingerprint, batch, stages=None):
        original = tagger.tag

        def tag(d, **kw):
            if calls:
                raise KeyboardInterrupt
            calls.append(d.id)
            return original(d, **kw)

        tagger.tag = tag
        return real_tag(tagger, dialogues, partial, fingerprint, batch, stages)

    monkeypatch.setattr(ev, "predict", crash_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    partial = tmp_path / "out" / "predictions.partial.jsonl"
    rows = [json.loads(x) for x in partial.read_text().splitlines()]
    assert "fingerprint" in rows[0] and [r["dialogue_id"] for r in rows if "predictions" in r] == ["test0"]
    monkeypatch.setattr(ev, "predict", real_tag)
    seen = []
    from erc_llm.decoding import StreamingTagger

    orig = StreamingTagger.tag
    monkeypatch.setattr(StreamingTagger, "tag", lambda self, d, **kw: seen.append(d.id) or orig(self, d, **kw))
    resumed = evaluate(cfg)
    assert seen == ["test1", "test2"]  # the finished dialogue was not redone
    assert resumed["weighted_f1"] == pytest.approx(full["weighted_f1"])
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == rows_full


def test_evaluate_with_run_dir_merges_adapter(tmp_path, tiny_model_dir, tiny_model):
    """A run dir (adapter/ + run.json) is loaded and merged; a non-zero LoRA changes the predictions."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    torch.manual_seed(1)
    run = tmp_path / "run"
    peft_model.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dir), "prompt_version": "x",
                                              "labels": ["surprise", "joy", "neutral", "anger"]}))
    base = evaluate(_cfg(tmp_path, tiny_model_dir, out=str(tmp_path / "o1")))
    tuned = evaluate(_cfg(tmp_path, tiny_model_dir, out=str(tmp_path / "o2"), run=str(run)))
    p1 = (tmp_path / "o1" / "predictions.jsonl").read_text()
    p2 = (tmp_path / "o2" / "predictions.jsonl").read_text()
    assert p1 != p2 and tuned["run"] == str(run) and base["run"] is None
    assert base["model"].endswith("(zero-shot)") and tuned["model"] == str(run)
    (run / "run.json").write_text(json.dumps({"model": str(tiny_model_dir), "labels": ["joy", "fear"]}))
    with pytest.raises(ValueError, match=r"(?s)differ from those of model .*--run with a model trained on this label set, "
                                         r"or --zero-shot"):
        evaluate(_cfg(tmp_path, tiny_model_dir, out=str(tmp_path / "o4"), run=str(run)))
    (run / "run.json").unlink()
    with pytest.raises(ValueError, match="run.json not found"):
        evaluate(_cfg(tmp_path, tiny_model_dir, out=str(tmp_path / "o3"), run=str(run)))


def test_unlabelled_set_gets_predictions_without_metrics(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    (tmp_path / "data" / "test.jsonl").write_text(json.dumps({"dialogue_id": "u", "utterances": [
        {"speaker": "A", "text": "Hello there."}, {"speaker": "B", "text": "Go away!"}]}) + "\n")
    m = evaluate(cfg)
    assert "weighted_f1" not in m and m["utterances"] == 2 and m["scored_utterances"] == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == [None, None] and all(r["predicted"] in m["labels"] for r in rows)


def test_packed_batch_evaluation_writes_the_same_predictions(tmp_path, tiny_model_dir):
    a = evaluate(_cfg(tmp_path / "a", tiny_model_dir, batch=1, out=str(tmp_path / "a" / "out")))
    b = evaluate(_cfg(tmp_path / "b", tiny_model_dir, batch=3, out=str(tmp_path / "b" / "out")))
    ra = [json.loads(x) for x in (tmp_path / "a" / "out" / "predictions.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "b" / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in ra] == [r["predicted"] for r in rb] and a["weighted_f1"] == b["weighted_f1"]
    for x, y in zip(ra, rb):
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-4)


def test_batched_evaluation_killed_midway_resumes_without_redoing_finished_dialogues(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """Batched decoding writes each dialogue when it finishes: after a kill, the finished ones are kept and only
    the others are decoded again, and the result equals an uninterrupted run."""
    from erc_llm.decoding import PackedTagger

    cfg = _cfg(tmp_path, tiny_model_dir, batch=2)
    full = evaluate(cfg)
    rows_full = (tmp_path / "out" / "predictions.jsonl").read_text()
    (tmp_path / "out" / "predictions.jsonl").unlink()
    real = PackedTagger.tag_stream

    def killed_after_one(self, dialogues):
        for n, item in enumerate(real(self, dialogues)):
            if n == 1:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(PackedTagger, "tag_stream", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg)
    partial = [json.loads(x) for x in (tmp_path / "out" / "predictions.partial.jsonl").read_text().splitlines()]
    kept = [r["dialogue_id"] for r in partial if "predictions" in r]
    assert len(kept) == 1
    seen = []
    monkeypatch.setattr(PackedTagger, "tag_stream", lambda self, ds: seen.extend(d.id for d in ds) or real(self, ds))
    resumed = evaluate(cfg)
    assert kept[0] not in seen and len(seen) == full["dialogues"] - 1
    assert resumed["weighted_f1"] == pytest.approx(full["weighted_f1"])
    a = [json.loads(x) for x in rows_full.splitlines()]
    b = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["utterance_id"] for r in a] == [r["utterance_id"] for r in b]
    assert [r["predicted"] for r in a] == [r["predicted"] for r in b]
    for x, y in zip(a, b):  # other dialogues share the forwards now: equal up to float rounding
        assert x["probabilities"] == pytest.approx(y["probabilities"], abs=1e-4)


def test_a_folder_with_only_a_test_split_takes_the_label_set_from_the_model(tmp_path, tiny_model, tiny_model_dir):
    from tests.conftest import toy_dialogue, write_dialogues, write_lora_run

    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir)
    (tmp_path / "mine").mkdir()
    write_dialogues(tmp_path / "mine" / "test.jsonl", [toy_dialogue(3, "a")])
    m = evaluate(build(EvalConfig, None, {"dataset": "jsonl", "split": "test", "data_dir": str(tmp_path / "mine"),
                                          "run": str(run), "out": str(tmp_path / "out")}))
    assert m["utterances"] == 3 and tuple(m["labels"]) == RunSpec.read(run).labels


def test_resume_fingerprint_follows_the_content_of_the_speaker_store_and_audio_not_their_paths(tmp_path):
    from types import SimpleNamespace

    import torch

    from erc_llm.evaluate import _fingerprint
    from tests.conftest import toy_dialogue

    data = write_jsonl_dataset(tmp_path / "data")
    cfg = build(EvalConfig, None, {"dataset": "jsonl", "data_dir": str(data), "out": str(tmp_path / "o")})

    def predictor(store_sha):
        store = SimpleNamespace(manifest={"sha256": store_sha})
        return SimpleNamespace(manifest={}, run_dir=None, builder=SimpleNamespace(templates=SimpleNamespace(version="v")),
                               speakers=SimpleNamespace(store=store))

    d = [toy_dialogue(3)]
    same_path = [_fingerprint(cfg, predictor({"profiles.json": h}), d) for h in ("a", "b")]
    assert same_path[0] != same_path[1]  # the store at the same path was rebuilt: start over
    audio = [SimpleNamespace(inputs={"d1_0": torch.tensor([x])}) for x in (1.0, 2.0)]
    assert _fingerprint(cfg, predictor({}), d, None, audio[0]) != _fingerprint(cfg, predictor({}), d, None, audio[1])


def test_a_torn_partial_file_is_read_up_to_the_tear_or_started_over(tmp_path):
    from erc_llm.evaluate import _load_partial

    path = tmp_path / "predictions.partial.jsonl"
    good = json.dumps({"dialogue_id": "a", "predictions": [{"utterance_id": "a_0"}]})
    path.write_text(json.dumps({"fingerprint": "f"}) + "\n" + good + "\n" + '{"dialogue_id": "b", "predi' + "\n")
    done, started = _load_partial(path, "f")
    assert list(done) == ["a"] and not started
    path.write_text('{"fingerp' + "\n" + good + "\n")
    assert _load_partial(path, "f") == ({}, {}) and not path.exists()


def test_the_report_names_the_rows_skipped_on_load(tmp_path):
    from erc_llm.metrics import render_report

    m = {"dataset": "jsonl", "split": "test", "model": "m", "history": "none", "dialogues": 1, "utterances": 2,
         "seconds": 1.0, "utterances_per_second": 2.0, "weighted_f1": 50.0, "accuracy": 50.0,
         "unweighted_accuracy": 50.0, "macro_f1": 50.0, "per_class": {}, "command": "",
         "skipped_on_load": {"empty text": 3}}
    assert "skipped on load: 3 (empty text)" in render_report(m)
