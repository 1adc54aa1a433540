import pytest

from erc_llm.config import EvalConfig, eval_flags
from erc_llm.options import ConfigError, build


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


@pytest.mark.parametrize("name", ["meld", "meld_offline", "iemocap", "iemocap_offline", "iemocap_prosody", "jsonl",
                                  "meld_ablation", "meld_lookahead", "iemocap_lookahead", "iemocap_onpolicy"])
def test_training_configs_are_valid(name, meld_dir, tmp_path):
    """Every training YAML the README names builds with no problems; the offline ones select the offline
    header, the others stay causal."""
    from pathlib import Path

    import yaml

    from erc_llm.config import TrainConfig

    path = Path(__file__).parent.parent / "configs" / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    dataset = raw["dataset"]
    if dataset == "jsonl":
        for split in ("train", "dev", "test"):
            (tmp_path / f"{split}.jsonl").write_text("")
    overrides = {"data_dir": str(meld_dir if dataset == "meld" else tmp_path)}
    if raw.get("audio_source", "none") != "none":
        overrides["audio_dir"] = str(tmp_path)  # the command line gives the feature folder
    cfg = build(TrainConfig, str(path), overrides)
    assert cfg.context == ("offline" if name.endswith("offline") else "online")
    assert cfg.label_history is (name in ("meld_ablation", "iemocap_onpolicy"))
    assert cfg.on_policy == (1.0 if name == "iemocap_onpolicy" else 0.0)
    assert cfg.lookahead == (3 if name.endswith("lookahead") else 0)


def test_speaker_and_audio_options_are_validated_together(tmp_path):
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError, build

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


def test_history_noise_and_on_policy_need_written_labels(tmp_path):
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError

    with pytest.raises(ConfigError, match=r"history_noise: 0.2 corrupts written labels, but label_history is false"):
        build(TrainConfig, None, {"data_dir": str(tmp_path), "dataset": "jsonl", "history_noise": "0.2"})
    cfg = build(TrainConfig, None, {"data_dir": str(tmp_path), "dataset": "jsonl", "history_noise": "0.2",
                                    "label_history": "true"})
    assert cfg.label_history and cfg.history_noise == 0.2
    with pytest.raises(ConfigError, match=r"on_policy: 1.0 writes the model's own labels .* label_history is false"):
        build(TrainConfig, None, {"data_dir": str(tmp_path), "dataset": "jsonl", "on_policy": "1.0"})


def test_lookahead_needs_a_text_only_online_transcript_without_memory_or_audio(tmp_path):
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError

    with pytest.raises(ConfigError) as e:
        build(TrainConfig, None, {"data_dir": str(tmp_path), "dataset": "jsonl", "lookahead": "2",
                                  "label_history": "true", "context": "offline", "speaker_history": "3",
                                  "speaker_store": str(tmp_path)})
    msg = str(e.value)
    assert "lookahead: 2 lets each slot see later turns, and with label_history: true their written labels too" in msg
    assert "lookahead: 2 and context: offline are two kinds of offline context" in msg
    assert "speaker memory and audio soft tokens do not support yet" in msg
    cfg = build(TrainConfig, None, {"data_dir": str(tmp_path), "dataset": "jsonl", "lookahead": "2"})
    assert cfg.lookahead == 2 and not cfg.label_history


def test_a_teacher_must_be_an_evaluation_folder_and_its_weight_needs_it(tmp_path):
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError

    base = {"data_dir": str(tmp_path), "dataset": "jsonl"}
    with pytest.raises(ConfigError, match=r"(?s)2 config problem.*teacher_weight: 0.0 is out of range; expected > 0.*"
                                          r"teacher: '.*nowhere' holds no predictions.jsonl"):
        build(TrainConfig, None, {**base, "teacher": str(tmp_path / "nowhere"), "teacher_weight": "0"})
    with pytest.raises(ConfigError, match="teacher_weight: 0.8 weighs a teacher's soft targets, but no teacher"):
        build(TrainConfig, None, {**base, "teacher_weight": "0.8"})
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "predictions.jsonl").write_text("")
    assert build(TrainConfig, None, {**base, "teacher": str(tmp_path / "t"), "teacher_weight": "1"}).teacher_weight == 1


def test_eval_flags_carry_only_options_that_differ_from_the_defaults():
    assert eval_flags([], "error") == ""
    assert eval_flags(["neutral", "sad"], "skip", "/data/prosody") == (
        " --labels neutral,sad --on-bad-row skip --audio-dir /data/prosody")
