"""eval/audio_fusion.py: an acoustic classifier fused with finished LLM evaluations, the weight chosen on dev."""

import csv
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.test_ensemble import LABELS, p, write_eval

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("audio_fusion_script", ROOT / "eval" / "audio_fusion.py")
audio_fusion = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = audio_fusion  # its dataclass looks its module up
spec.loader.exec_module(audio_fusion)

LOUDNESS = {"neutral": 0.0, "joy": 1.0, "anger": 3.0}  # what the voice says about each label


def gold_of(split: str) -> list[str]:
    return [LABELS[i % 3] for i in range(30 if split == "train" else 12)]


def write_corpus(root: Path, informative: bool = True) -> tuple[Path, Path]:
    """One dialogue per split (ids d0_u{i}, as tests.test_ensemble.write_eval writes them), two speakers whose
    voices differ by a constant (per-speaker statistics remove it), and a loudness feature that tells anger
    apart when ``informative``."""
    data, audio, rng = root / "data", root / "audio", np.random.default_rng(0)
    data.mkdir()
    audio.mkdir()
    for split in ("train", "dev", "test"):
        gold = gold_of(split)
        turns = [{"speaker": "AB"[i % 2], "text": f"t{i}", "emotion": g, "utterance_id": f"d0_u{i}"}
                 for i, g in enumerate(gold)]
        (data / f"{split}.jsonl").write_text(json.dumps({"dialogue_id": "d0", "utterances": turns}) + "\n")
        with open(audio / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["utterance_id", "loudness", "pitch"])
            for i, g in enumerate(gold):
                loud = LOUDNESS[g] if informative else rng.normal()
                w.writerow([f"d0_u{i}", loud + 10.0 * (i % 2) + 0.1 * rng.normal(), "" if i == 3 else rng.normal()])
    return data, audio


def llm_eval(folder: Path, split: str, model: str = "runs/m") -> Path:
    """``model``'s evaluation of ``split``: an LLM that hesitates on anger (neutral 0.45 over anger 0.35) and is
    right on the other labels."""
    probs = {"neutral": p(0.7, 0.1, 0.2), "joy": p(0.2, 0.7, 0.1), "anger": p(0.45, 0.2, 0.35)}
    gold = gold_of(split)
    write_eval(folder, [probs[g] for g in gold], gold, split=split)
    metrics = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").write_text(json.dumps({**metrics, "model": model}))
    return folder


def run(tmp_path, data, audio, dev, test, *extra):
    out = tmp_path / "fused"
    audio_fusion.main(["--dataset", "jsonl", "--data-dir", str(data), "--audio-source", "csv", "--audio-dir",
                       str(audio), "--dev", *map(str, dev), "--test", *map(str, test), "--out", str(out), *extra])
    return out


def test_the_voice_fixes_what_the_text_model_hesitates_on(tmp_path):
    data, audio = write_corpus(tmp_path)
    out = run(tmp_path, data, audio, [llm_eval(tmp_path / "dev", "dev")], [llm_eval(tmp_path / "test", "test")])
    test = json.loads((out / "test" / "metrics.json").read_text())
    fusion = test["audio_fusion"]
    assert fusion["dev_curve"][0] == {"weight": 0.0, "dev_weighted_f1": pytest.approx(500 / 9)}  # LLM alone: anger F1 0
    assert fusion["weight_chosen_on_dev"] > 0
    assert test["weighted_f1"] == pytest.approx(100.0) and test["per_class"]["anger"]["f1"] == pytest.approx(100.0)
    assert fusion["acoustic_classifier"]["test"]["weighted_f1"] > 90  # speaker offsets normalised away
    assert fusion["acoustic_classifier"]["train_without_audio"] == 0
    rows = [json.loads(line) for line in (out / "test" / "predictions.jsonl").read_text().splitlines()]
    assert sum(rows[2]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert (test["split"], test["history"], test["members"][0]["folder"]) == ("test", "none", str(tmp_path / "test"))
    assert json.loads((out / "dev" / "metrics.json").read_text())["split"] == "dev"


def test_uninformative_audio_leaves_the_llm_alone(tmp_path):
    data, audio = write_corpus(tmp_path, informative=False)
    out = run(tmp_path, data, audio, [llm_eval(tmp_path / "dev", "dev")], [llm_eval(tmp_path / "test", "test")],
              "--weights", "0", "0.05")
    fusion = json.loads((out / "test" / "metrics.json").read_text())["audio_fusion"]
    assert fusion["weight_chosen_on_dev"] == 0.0  # ties go to the smaller weight
    rows = [json.loads(line) for line in (out / "test" / "predictions.jsonl").read_text().splitlines()]
    assert [r["predicted"] for r in rows] == ["neutral", "joy", "neutral"] * 4


def test_members_are_averaged_before_fusion(tmp_path):
    data, audio = write_corpus(tmp_path)
    dev = [llm_eval(tmp_path / "dev_a", "dev", "runs/a"), llm_eval(tmp_path / "dev_b", "dev", "runs/b")]
    test = [llm_eval(tmp_path / "test_a", "test", "runs/a"), llm_eval(tmp_path / "test_b", "test", "runs/b")]
    out = run(tmp_path, data, audio, dev, test)
    m = json.loads((out / "test" / "metrics.json").read_text())
    assert [x["folder"] for x in m["members"]] == [str(t) for t in test]
    assert m["seconds"] == pytest.approx(4.0)  # the members' decoding time


def test_refuses_swapped_splits_other_models_and_evaluations_of_another_corpus(tmp_path):
    data, audio = write_corpus(tmp_path)
    dev, test = llm_eval(tmp_path / "dev", "dev"), llm_eval(tmp_path / "test", "test")
    with pytest.raises(SystemExit, match=r"split 'test'; --dev expects dev evaluations"):
        run(tmp_path, data, audio, [test], [test])
    with pytest.raises(SystemExit, match=r"--dev evaluates \['runs/m'\] but --test \['runs/other'\]"):
        run(tmp_path, data, audio, [dev], [llm_eval(tmp_path / "elsewhere", "test", "runs/other")])
    other = tmp_path / "other"
    other.mkdir()
    (other / "dev.jsonl").write_text(json.dumps({"dialogue_id": "x", "utterances": [
        {"speaker": "A", "text": "t", "emotion": "joy", "utterance_id": "x_u0"}]}) + "\n")
    for split in ("train", "test"):
        (other / f"{split}.jsonl").write_text((data / f"{split}.jsonl").read_text())
    with pytest.raises(SystemExit, match=r"12 evaluated utterances \(e.g. \['d0_u0', 'd0_u1', 'd0_u2'\]\) are not"):
        run(tmp_path, other, audio, [dev], [test])


def test_audio_context_hears_only_earlier_turns():
    turns = [SimpleNamespace(speaker=s) for s in "ABAAB"]
    x = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]])
    ctx = audio_fusion.audio_context([SimpleNamespace(utterances=turns[:4]), SimpleNamespace(utterances=turns[4:])], x, 1)
    # columns: the speaker's previous utterance(s), another speaker's last; a new dialogue starts from silence
    assert ctx.tolist() == [[0, 0], [0, 1], [1, 2], [3, 2], [0, 0]]
    assert audio_fusion.audio_context([SimpleNamespace(utterances=turns[:4])], x[:4], 2)[3].tolist() == [2, 2]


def test_voice_of_earlier_turns_and_text_embeddings_join_the_classifier(tmp_path, monkeypatch):
    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data, audio = write_corpus(tmp_path, informative=False)
    said = {"neutral": "The meeting is at noon.", "joy": "I love this, it is wonderful!", "anger": "I am furious with you!"}
    for split in ("train", "dev", "test"):
        path = data / f"{split}.jsonl"
        d = json.loads(path.read_text())
        d["utterances"] = [{**u, "text": said[u["emotion"]]} for u in d["utterances"]]
        path.write_text(json.dumps(d) + "\n")
    dev, test = llm_eval(tmp_path / "dev", "dev"), llm_eval(tmp_path / "test", "test")
    out = run(tmp_path, data, audio, [dev], [test], "--audio-context", "2", "--text-encoder", "all-MiniLM-L6-v2")
    m = json.loads((out / "test" / "metrics.json").read_text())
    fusion = m["audio_fusion"]
    assert (fusion["audio_context"], fusion["text_encoder"]) == (2, "all-MiniLM-L6-v2")
    assert fusion["acoustic_classifier"]["test"]["weighted_f1"] == pytest.approx(100.0)  # the text tells them apart
    assert fusion["weight_chosen_on_dev"] > 0 and m["weighted_f1"] == pytest.approx(100.0)
    with pytest.raises(SystemExit):
        run(tmp_path, data, audio, [dev], [test], "--audio-context", "-1")
