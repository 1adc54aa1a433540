"""eval/knn.py: a nearest-neighbour memory of the run's own training slot states, mixed with its evaluations."""

import importlib.util
import json

import faiss
import numpy as np
import pytest

from erc_llm.config import EvalConfig, build
from erc_llm.evaluate import evaluate
from erc_llm.run import RunSpec, load
from tests.conftest import REPO, write_jsonl_dataset, write_lora_run

spec = importlib.util.spec_from_file_location("knn_script", REPO / "eval" / "knn.py")
knn_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(knn_script)


def test_neighbours_vote_by_similarity_and_temperature():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8)
    train = knn_script.unit(np.stack([a + 0.05 * rng.normal(size=8) for _ in range(3)] +
                                     [b + 0.05 * rng.normal(size=8) for _ in range(9)]))
    labels = np.array([0] * 3 + [1] * 9)
    index = faiss.IndexFlatIP(8)
    index.add(train)
    query = knn_script.unit(a[None])
    sharp = knn_script.knn_probabilities(index, labels, query, k=12, temperature=0.01, n_labels=3)
    flat = knn_script.knn_probabilities(index, labels, query, k=12, temperature=100.0, n_labels=3)
    assert sharp[0, 0] > 0.99  # the three near neighbours decide, although label 1 has three times the votes
    assert flat[0] == pytest.approx([0.25, 0.75, 0.0], abs=0.01)  # a flat kernel counts votes
    assert sharp.sum(axis=1) == pytest.approx([1.0])


def evaluated_run(tmp_path, tiny_model, tiny_model_dir, seed=0, label_history=False, max_tokens=0):
    data = write_jsonl_dataset(tmp_path / "data", n_dialogues=4)
    run = write_lora_run(tmp_path / f"run{seed}_{label_history}", tiny_model, tiny_model_dir, seed, label_history)
    if max_tokens:
        RunSpec.read(run).__class__(**{**RunSpec.read(run).__dict__, "max_tokens": max_tokens}).write(run)
    for split in ("dev", "test"):
        evaluate(build(EvalConfig, None, {"dataset": "jsonl", "split": split, "data_dir": str(data), "run": str(run),
                                          "out": str(run / "eval" / split)}))
    return data, run


def knn_args(data, run, out, evals=None):
    evals = evals or run
    return ["--dataset", "jsonl", "--data-dir", str(data), "--run", str(run), "--dev", str(evals / "eval" / "dev"),
            "--test", str(evals / "eval" / "test"), "--out", str(out)]


def test_mixes_on_dev_then_writes_both_evaluations(tmp_path, tiny_model, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data, run = evaluated_run(tmp_path, tiny_model, tiny_model_dir)
    knn_script.main(knn_args(data, run, tmp_path / "out") + ["--neighbours", "2", "4", "--lambdas", "0", "0.5", "1"])
    dev = json.loads((tmp_path / "out" / "dev" / "metrics.json").read_text())
    test = json.loads((tmp_path / "out" / "test" / "metrics.json").read_text())
    memory = test["knn_memory"]
    assert len(memory["dev_grid"]) == 2 * 3 * 3 and memory["train_slots"] == 3 + 4 + 5 + 6
    assert dev["weighted_f1"] == pytest.approx(max(g["dev_weighted_f1"] for g in memory["dev_grid"]))
    alone = [g["dev_weighted_f1"] for g in memory["dev_grid"] if g["lambda"] == 0]
    assert alone == pytest.approx([json.loads((run / "eval" / "dev" / "metrics.json").read_text())["weighted_f1"]] * 6)
    assert memory["max_probability_gap"]["dev"] < 1e-3  # the slot states reproduce the decoder's probabilities
    assert test["history"] == "none" and test["split"] == "test" and test["members"][0]["model"] == str(run)
    rows = [json.loads(line) for line in (tmp_path / "out" / "test" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 4 + 5 + 6
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert len(list((tmp_path / "cache" / "features").glob("slots-*"))) == 3  # train, dev, test states cached


def test_dialogues_longer_than_the_budget_get_the_states_their_streaming_decoder_used(tmp_path, tiny_model,
                                                                                       tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data, run = evaluated_run(tmp_path, tiny_model, tiny_model_dir, max_tokens=80)
    p = load(run)
    from erc_llm.data import load_split

    dialogues = load_split("jsonl", "test", data)[0]
    enc = p.builder.encode(dialogues[-1])
    assert p.builder.assemble(enc["header"], enc["turns"], [0] * len(enc["turns"])).first_turn > 0  # really cut
    knn_script.main(knn_args(data, run, tmp_path / "out"))  # refused if a state differs from the evaluated one
    memory = json.loads((tmp_path / "out" / "test" / "metrics.json").read_text())["knn_memory"]
    assert memory["max_probability_gap"]["test"] < 1e-4 and memory["max_probability_gap"]["dev"] < 1e-4


def test_refuses_runs_with_labels_in_history_and_evaluations_of_another_run(tmp_path, tiny_model, tiny_model_dir, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data, run = evaluated_run(tmp_path, tiny_model, tiny_model_dir)
    _, other = evaluated_run(tmp_path, tiny_model, tiny_model_dir, seed=1)
    with pytest.raises(SystemExit, match=r"differ from --run's by up to"):
        knn_script.main(knn_args(data, run, tmp_path / "o1", evals=other))
    _, labelled = evaluated_run(tmp_path, tiny_model, tiny_model_dir, seed=2, label_history=True)
    with pytest.raises(SystemExit, match=r"history is 'predicted'"):  # its evaluations are refused first
        knn_script.main(knn_args(data, labelled, tmp_path / "o2"))
    with pytest.raises(SystemExit, match=r"needs a text-only online run; it writes labels into the transcript"):
        knn_script.main(knn_args(data, labelled, tmp_path / "o3", evals=run))
    with pytest.raises(SystemExit):
        knn_script.main(knn_args(data, run, tmp_path / "o4") + ["--neighbours", "0"])
    assert "--neighbours 0: expected k ≥ 1" in capsys.readouterr().err
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o4"))
