import pytest

from erc_llm.config import ConfigError, EvalConfig, build


def test_unknown_keys_and_all_problems_reported_at_once(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("dataset: friends\nsplit: test\nbatch_size: 3\nmax_tokens: lots\n")
    with pytest.raises(ConfigError) as e:
        build(EvalConfig, str(y))
    msg = str(e.value)
    assert "batch_size: unknown key; available keys" in msg and "max_tokens: expected int, got 'lots'" in msg
    assert "c.yaml" in msg


def test_validation_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as e:
        build(EvalConfig, None, {"dataset": "friends", "data_dir": str(tmp_path / "nope"), "history": "oracle",
                                 "max_utterance_tokens": "4"})
    msg = str(e.value)
    for needle in ["dataset: 'friends' is not valid; expected one of ['meld', 'iemocap', 'jsonl']",
                   "history: 'oracle'", "does not exist", "max_utterance_tokens: 4 is out of range; expected 0 (the run's) or >= 8"]:
        assert needle in msg
    assert msg.startswith("4 config problem")


def test_overrides_beat_yaml_and_lists_parse(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"dataset: jsonl\ndata_dir: {tmp_path}\nlimit: 3\n")
    cfg = build(EvalConfig, str(y), {"limit": "5", "labels": "a, b"})
    assert cfg.limit == 5 and cfg.labels == ["a", "b"] and cfg.history == "predicted"


def test_shipped_configs_are_valid(meld_dir):
    from pathlib import Path

    cfg = build(EvalConfig, str(Path(__file__).parent.parent / "configs" / "eval_meld.yaml"), {"data_dir": str(meld_dir)})
    assert cfg.dataset == "meld" and cfg.history == "predicted"


def test_speaker_and_audio_options_are_validated_together(tmp_path):
    from erc_llm.config import ConfigError, TrainConfig, build

    with pytest.raises(ConfigError) as e:
        build(TrainConfig, None, {"data_dir": str(tmp_path), "speaker_bios": True, "speaker_top_k": 0,
                                  "audio_source": "npy", "audio_dir": str(tmp_path / "missing"), "dataset": "jsonl"})
    msg = str(e.value)
    assert "3 config problem(s)" in msg
    assert "speaker_bios/speaker_history: need speaker_store" in msg
    assert "speaker_top_k: 0 is out of range; expected >= 1" in msg
    assert "audio_dir: " in msg and "is not a directory (needed for audio_source: npy)" in msg
    with pytest.raises(ConfigError, match="has no manifest.json; build one with `erc-llm speakers build"):
        build(TrainConfig, None, {"data_dir": str(tmp_path), "speaker_store": str(tmp_path), "speaker_bios": True})
    with pytest.raises(ConfigError, match="audio_source: 'wav' is not valid; expected one of"):
        build(TrainConfig, None, {"data_dir": str(tmp_path), "audio_source": "wav"})
