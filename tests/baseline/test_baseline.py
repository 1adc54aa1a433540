import json

import numpy as np
import pytest
import torch

from erc_llm.baseline.model import FusedERC
from erc_llm.baseline.train import Prepared, collate, train_seed
from erc_llm.config import BaselineConfig
from erc_llm.data.schema import LabelSet
from tests.conftest import write_jsonl_dataset

LABELS = LabelSet("toy", ("a", "b", "c"))


def _arrays(n_dialogues: int, seed: int, audio: int = 16) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_dialogues):
        t = int(rng.integers(2, 7))
        label = rng.integers(0, 3, t)
        text = rng.normal(size=(t, 12)).astype(np.float32)
        text[:, 0] += label  # learnable signal
        out.append({"text": text, "audio": rng.normal(size=(t, audio)).astype(np.float32),
                    "speaker": rng.integers(0, 2, t), "label": label, "vad": rng.random((t, 3)).astype(np.float32)})
    return out


def _prepared(seed=0) -> Prepared:
    arrays = {s: _arrays(10, seed + i) for i, s in enumerate(("train", "dev", "test"))}
    return Prepared(LABELS, {}, arrays, 12, 16, None, torch.ones(3), {})


def _model(**kw):
    torch.manual_seed(0)
    return FusedERC(12, 16, 3, hidden=16, k_tokens=2, heads=2, **kw).eval()


def test_gates_sum_to_one_and_are_reported():
    m = _model()
    batch = collate(_arrays(4, 1))
    logits, _, gates, vad = m(batch)
    assert gates.shape == (int(batch["mask"].sum()), 3)
    assert torch.allclose(gates.sum(-1), torch.ones(len(gates)), atol=1e-6) and (gates >= 0).all()
    assert logits.shape == (*batch["label"].shape, 3) and ((vad >= 0) & (vad <= 1)).all()
    assert len(vad) == int(batch["mask"].sum())  # padding is never encoded


def test_context_is_causal():
    """Changing turn t (features or speaker) never changes the outputs of earlier turns."""
    m = _model()
    items = _arrays(1, 3)
    t = len(items[0]["label"])
    base, _, _, _ = m(collate(items))
    for cut in range(1, t):
        changed = {k: v.copy() for k, v in items[0].items()}
        changed["text"][cut:] += 5.0
        changed["audio"][cut:] -= 3.0
        changed["speaker"][cut:] = 1 - changed["speaker"][cut:]
        out, _, _, _ = m(collate([changed]))
        assert torch.allclose(out[0, :cut], base[0, :cut], atol=1e-5)
        assert not torch.allclose(out[0, cut], base[0, cut])


def test_context_uses_same_speaker_history():
    m = _model()
    x = _arrays(1, 4)[0]
    x["speaker"] = np.array([0, 1, 0, 1, 0, 1])[: len(x["label"])]
    ctx = m.context(torch.randn(1, len(x["label"]), 16), torch.from_numpy(x["speaker"])[None], torch.ones(1, len(x["label"]), dtype=torch.bool))
    assert torch.equal(ctx[0, 0], torch.zeros(16)) and torch.equal(ctx[0, 1], torch.zeros(16))  # first turn of each speaker


@pytest.mark.parametrize("kw", [{}, {"fusion": "concat", "context": False, "loss": "ce", "vga_lambda": 0.0}])
def test_seeded_run_reproduces_its_losses(kw):
    cfg = BaselineConfig(data_dir=".", hidden=16, k_tokens=2, heads=2, max_epochs=3, patience=3, batch_dialogues=4, **kw)
    _, h1 = train_seed(cfg, _prepared(), seed=7)
    _, h2 = train_seed(cfg, _prepared(), seed=7)
    _, h3 = train_seed(cfg, _prepared(), seed=8)
    assert [h["train_loss"] for h in h1] == [h["train_loss"] for h in h2]
    assert [h["train_loss"] for h in h1] != [h["train_loss"] for h in h3]
    assert h1[-1]["train_loss"] < h1[0]["train_loss"]


def test_baseline_cli_end_to_end(tmp_path, monkeypatch, capsys):
    """`erc-llm baseline train` then `baseline evaluate` on a JSONL set with the packaged MiniLM encoder."""
    from erc_llm.cli import main

    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data = write_jsonl_dataset(tmp_path / "data", 6)
    out = tmp_path / "out"
    assert main(["baseline", "train", "--dataset", "jsonl", "--data-dir", str(data), "--out", str(out), "--seeds", "0,1",
                 "--max-epochs", "2", "--hidden", "32", "--heads", "2", "--vad-weight", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and "std" in summary["weighted_f1"] and "gates" not in summary  # text only
    for name in ("metrics.json", "predictions.jsonl", "confusion.png", "report.md", "model.pt", "baseline.json"):
        assert (out / "seed0" / name).is_file()
    assert main(["baseline", "evaluate", "--run", str(out / "seed0"), "--split", "test", "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    first = json.loads((out / "seed0" / "metrics.json").read_text())
    assert again["weighted_f1"] == pytest.approx(first["weighted_f1"])


def test_same_utterance_ids_in_different_splits_keep_their_own_text(tmp_path, monkeypatch):
    """MELD reuses ids (dia0_utt0) in train, dev and test: each split must embed its own text."""
    from erc_llm.baseline.train import prepare
    from erc_llm.options import build

    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    data = write_jsonl_dataset(tmp_path / "data", 2)
    for split, text in (("train", "I love this so much."), ("dev", "Get out of my house!"), ("test", "What? Really?")):
        (data / f"{split}.jsonl").write_text(json.dumps({"dialogue_id": "d", "utterances": [
            {"speaker": "A", "text": text, "emotion": "joy", "utterance_id": "same_id"}]}) + "\n")
    cfg = build(BaselineConfig, None, {"dataset": "jsonl", "data_dir": str(data), "vad_weight": 0,
                                       "labels": ["joy", "anger"]})  # one label in the data: the set is given
    prep = prepare(cfg)
    embs = [prep.arrays[s][0]["text"][0] for s in ("train", "dev", "test")]
    assert not np.allclose(embs[0], embs[1]) and not np.allclose(embs[1], embs[2])
