"""Real packaged backbones (slow: the first run converts the GGUF, ~1 min). Run in CI."""

import json

import pytest

from erc_llm.data import IEMOCAP_LABELS, MELD_LABELS
from erc_llm.run import PRETRAINED_DIR, SHIPPED, RunSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from erc_llm.backbone import load_backbone

    return load_backbone("gemma-3-270m")


def test_gemma_manifest_and_single_token_labels(gemma):
    from erc_llm.prompting import PromptBuilder

    model, tok, manifest = gemma
    assert manifest["sha256"] == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert manifest["model_type"] == "gemma3_text" and manifest["dtype"] == "float32"
    for labels in (MELD_LABELS, IEMOCAP_LABELS):
        b = PromptBuilder(tok, labels)
        assert all(len(ids) == 1 for ids in b.label_ids), "labels should be single tokens: one forward per turn"


def test_gemma_evaluates_meld_dev_dialogues(tmp_path, meld_dir):
    from erc_llm.cli import main

    out = tmp_path / "out"
    assert main(["evaluate", "--dataset", "meld", "--split", "dev", "--data-dir", str(meld_dir), "--limit", "3",
                 "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["model"] == "meld-gemma3-270m" and m["backbone"] == "gemma-3-270m"  # the shipped model by default
    shipped = RunSpec.read(PRETRAINED_DIR / SHIPPED)  # a model that writes its labels is evaluated on its own labels
    assert m["dialogues"] == 3 and m["model_source"].startswith("pypi:")
    assert m["history"] == ("predicted" if shipped.label_history else "none")
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(r["predicted"] in MELD_LABELS.labels for r in rows)


def test_smollm2_tags_a_dialogue(meld_dir):
    from erc_llm.backbone import load_backbone
    from erc_llm.data import load_split
    from erc_llm.decoding import StreamingTagger
    from erc_llm.prompting import PromptBuilder

    model, tok, manifest = load_backbone("smollm2-135m-instruct")
    assert manifest["model_type"] == "llama"
    d = load_split("meld", "dev", meld_dir)[0][0]
    preds = StreamingTagger(model, PromptBuilder(tok, MELD_LABELS)).tag(d)
    assert len(preds) == len(d) and all(abs(sum(p.probs) - 1) < 1e-4 for p in preds)


def test_gemma_streaming_label_head_equals_full_vocabulary_forward(gemma, meld_dir):
    """The decoder's label-columns-only head on the real Gemma 3 == softmax over full-vocabulary log-probs."""
    import torch

    from erc_llm.data import load_split
    from erc_llm.decoding import StreamingTagger
    from erc_llm.prompting import PromptBuilder

    model, tok, _ = gemma
    builder = PromptBuilder(tok, MELD_LABELS)
    d = load_split("meld", "dev", meld_dir)[0][1]
    preds = StreamingTagger(model, builder).tag(d)
    tr = builder.build(d, [p.label for p in preds])
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([tr.input_ids])).logits[0].float()
    cols = [ids[0] for ids in builder.label_ids]
    ref = torch.softmax(torch.log_softmax(logits[tr.slots], -1)[:, cols], -1)
    for p, r in zip(preds, ref):
        assert p.probs == pytest.approx(r.tolist(), abs=2e-4)
