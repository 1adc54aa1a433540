"""The benchmark harness and the equivalence of the fast paths it measures."""

import json

import pytest
import torch

from erc_llm.bench import main
from erc_llm.bench.harness import forward_flops
from erc_llm.bench.inference import naive_tag, parse_label
from erc_llm.decoding import StreamingTagger
from erc_llm.prompting import PromptBuilder
from tests.conftest import LABELS, REPO, make_model, toy_dialogue


def test_parse_label_takes_the_first_label_named():
    labels = ("neutral", "joy", "anger")
    assert parse_label(" Joy, maybe anger", labels) == "joy"
    assert parse_label("anger\nEmotion: joy", labels) == "anger"
    assert parse_label("enjoyment", labels) is None  # whole words only


def test_forward_flops_counts_linear_layers_and_attention(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), "llama")
    cfg = model.config
    linear = sum(m.in_features * m.out_features for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    t = 10
    attn = 4 * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * cfg.num_hidden_layers * t * t / 2
    assert forward_flops(model, t) == pytest.approx(2 * linear * t + attn)


def test_merged_lora_predicts_exactly_like_the_unmerged_adapter(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(make_model(len(tiny_tokenizer)), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.eval()
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    d = toy_dialogue(6)
    unmerged = StreamingTagger(model, builder).tag(d)
    merged = StreamingTagger(model.merge_and_unload(), builder).tag(d)
    for a, b in zip(unmerged, merged):
        assert a.label == b.label and a.probs == pytest.approx(b.probs, abs=1e-5)


def test_bf16_weights_agree_with_fp32(tiny_tokenizer):
    torch.manual_seed(0)
    m32 = make_model(len(tiny_tokenizer))
    m16 = make_model(len(tiny_tokenizer)).to(torch.bfloat16)  # same seed: same weights, rounded
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    d = toy_dialogue(8)
    a = StreamingTagger(m32, builder, "gold").tag(d)
    b = StreamingTagger(m16, builder, "gold").tag(d)
    for x, y in zip(a, b):
        assert x.probs == pytest.approx(y.probs, abs=0.03)


def test_naive_baseline_labels_every_utterance(tiny_tokenizer, tiny_model):
    builder = PromptBuilder(tiny_tokenizer, LABELS)
    labels, tokens, failures = naive_tag(tiny_model, tiny_tokenizer, builder, toy_dialogue(5))
    assert len(labels) == 5 and set(labels) <= set(LABELS.labels) and tokens > 0 and 0 <= failures <= 5


def test_bench_end_to_end_writes_json_and_table(tiny_model_dir, meld_dir, tmp_path):
    assert main(["--data-dir", str(meld_dir), "--zero-shot", "--model", str(tiny_model_dir), "--dialogues", "2",
                 "--train-dialogues", "1", "--lengths", "3,6", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "bench.json").read_text())
    assert set(r["eval"]) == {"naive", "ours_fp32", "ours_bf16", "ours_bf16_packed"}
    assert r["eval"]["naive"]["utterances"] == r["eval"]["ours_bf16"]["utterances"] > 0
    assert r["train"]["ratio"] > 0 and r["hardware"]["matmul_fp32_gflops"] > 0
    assert [row["utterances"] for row in r["scaling"]] == [3, 6]
    assert "speed-up vs naive" in (tmp_path / "bench.md").read_text()


def test_long_dialogue_folder_is_one_loadable_dialogue_of_n_turns(tmp_path):
    """The decoding bench's synthetic long dialogue: real training utterances repeated in order up to N turns, one
    dialogue in test.jsonl that the JSONL loader accepts with the run's labels."""
    from erc_llm.bench.training import long_dialogue_dir
    from erc_llm.data import load_split
    from tests.conftest import write_jsonl_dataset

    data = write_jsonl_dataset(tmp_path / "data", 3)  # 3 + 4 + 5 = 12 training utterances
    folder = long_dialogue_dir(str(data), 30, tmp_path / "work")
    (d,), _, _ = load_split("jsonl", "test", folder, tuple(LABELS.labels))
    train, _, _ = load_split("jsonl", "train", data)
    texts = [u.text for t in train for u in t.utterances]
    assert len(d.utterances) == 30
    assert [u.text for u in d.utterances] == (texts * 3)[:30]
    assert len({u.utterance_id for u in d.utterances}) == 30


def test_stages_bench_times_the_adapter_alone_and_the_stages_on_the_same_split(tmp_path, tiny_model, tiny_model_dir,
                                                                               monkeypatch):
    from erc_llm.bench.inference import stages_main
    from tests.test_stages import fitted_run

    data, audio, run, _ = fitted_run(tmp_path, tiny_model, tiny_model_dir)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    out = tmp_path / "bench"
    assert stages_main(["--run", str(run), "--dataset", "jsonl", "--split", "dev", "--data-dir", str(data),
                        "--audio-dir", str(audio), "--dtype", "float32", "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    (alone,), (staged,) = result["runs"]["adapter alone"], result["runs"]["with stages"]
    assert alone["stages"] is None and staged["stages"]["applied"][:2] == ["memory", "fusion"]
    assert "--stages false" in alone["command"] and "--stages true" in staged["command"]
    assert result["median"]["with stages"]["weighted_f1"] == staged["weighted_f1"]
    assert result["speed_ratio"] == pytest.approx(staged["utterances_per_second"] / alone["utterances_per_second"])
    assert sorted(p.name for p in out.iterdir()) == [".erc-llm-output.json", "results.json", "table.md"]
    assert "of the adapter's utterances/s" in (out / "table.md").read_text()


def test_training_bench_table_has_a_row_per_backbone_recipe_and_path():
    """Several backbones in one run share the machine's measured peak: each gets its own rows and % of peak."""
    from erc_llm.bench.training import main as training_main
    from erc_llm.bench.training import render

    row = {"dtype": "bfloat16", "tokens_per_second": 300.0, "labels_per_second": 10.0, "gflop_per_second": 420.0,
           "peak_rss_gb": 3.0}
    recipes = {"meld": {"after": row, "peak_rss_gb": 3.0, "train_gflop_per_token": 1.4}}
    r = {"models": ["small", "large"], "paths": ["after"], "command": "c", "machine": "m", "threads": 2,
         "hardware": {"matmul_fp32_gflops": 210.0, "matmul_bf16_gflops": 840.0},
         "training": {"small": recipes, "large": recipes}, "length_scaling": []}
    rows = [line for line in render(r).splitlines() if line.startswith("| small") or line.startswith("| large")]
    assert len(rows) == 2 and all("| 50% |" in line and "| 200% |" in line for line in rows)
    r["hardware"] = {"matmul_fp32_gflops": 210.0, "matmul_bf16_gflops": 2.5, "bf16_native": False}  # AVX2 only
    emulated = [line for line in render(r).splitlines() if line.startswith("| small")][0]
    assert "| 200% |" in emulated and "| - (no native bf16) |" in emulated
    with pytest.raises(SystemExit):
        training_main(["--meld-dir", ".", "--iemocap-dir", ".", "--paths", "during"])


def test_matmul_peaks_measure_emulated_bf16_on_a_small_product(monkeypatch):
    from erc_llm.bench import harness

    calls = []
    monkeypatch.setattr(harness, "matmul_peak", lambda dtype, n=2048, reps=8: calls.append((dtype, n)) or 1.0)
    for native in (None, "avx512_bf16"):
        monkeypatch.setattr(harness, "native_bf16_cpu", lambda native=native: native)
        harness.matmul_peaks()
    assert calls == [(torch.float32, 2048), (torch.bfloat16, 512), (torch.float32, 2048), (torch.bfloat16, 2048)]
