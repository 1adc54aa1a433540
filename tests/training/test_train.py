"""The training entry point: LoRA mechanics, accelerate launch, 2-process torchrun, kill -9 and resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import LABELS, REPO, fit_toy_dialogue, write_jsonl_dataset, write_lora_run

BIN = Path(sys.executable).parent


def _args(data, model_dir, out, **kw):
    base = {"dataset": "jsonl", "data-dir": str(data), "model": str(model_dir), "out": str(out), "batch-dialogues": "2",
            "eval-every": "2", "save-every": "1", "lr": "0.01", "epochs": "1", "label-history": "true", "history-noise": "0.3",
            "test-eval": "false"}
    base.update({k.replace("_", "-"): str(v) for k, v in kw.items()})
    return [a for k, v in base.items() for a in (f"--{k}", v)]


def _env(tmp_path):
    env = dict(os.environ, ERC_LLM_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def _adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint" / "adapter.pt", weights_only=False)


def test_lora_changes_adapter_only(tiny_model_dir):
    """A few optimizer steps: base weights bit-identical, LoRA weights moved."""
    from erc_llm.backbone import load_for_training
    from erc_llm.config import TrainConfig
    from erc_llm.training.lora import wrap_lora

    model, tok, _ = load_for_training(str(tiny_model_dir))
    model = wrap_lora(model, TrainConfig(data_dir=".", lora_r=4).lora_options())
    base0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora0 and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert any(".mlp." in n for n in lora0) and any("self_attn" in n for n in lora0)  # all linear layers
    losses = fit_toy_dialogue(model, tok, steps=10)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in base0:
            assert torch.equal(p, base0[n]), n
    assert any(not torch.equal(p, lora0[n]) for n, p in model.named_parameters() if n in lora0)


def test_accelerate_launch_two_steps_writes_run_dir(tmp_path, tiny_model_dir):
    data = write_jsonl_dataset(tmp_path / "data", 4)
    run = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(REPO / "configs/accelerate/cpu.yaml"),
           str(REPO / "erc_llm/train.py"), *_args(data, tiny_model_dir, run, max_steps=2, test_eval="true")]
    r = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test weighted F1" in r.stdout
    shown = json.loads((run / "eval" / "test_predicted" / "metrics.json").read_text())["history"]
    named = "no labels in the history" if shown == "none" else f"{shown} history"  # console, metrics, report agree
    assert f"({named})" in r.stdout and f"History: **{shown}**" in (run / "eval" / "test_predicted" / "report.md").read_text()
    meta = json.loads((run / "run.json").read_text())
    assert meta["labels"] and meta["prompt_version"] and meta["model"] == str(tiny_model_dir)
    assert meta["software"]["transformers"] == transformers.__version__ and meta["software"]["torch"] == torch.__version__
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2]
    assert any("dev_predicted" in x for x in log) and json.loads((run / "best.json").read_text())["step"] == 2
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "prompts" / "turn.txt").is_file()
    for h in ("predicted", "gold"):
        m = json.loads((run / "eval" / f"test_{h}" / "metrics.json").read_text())
        assert m["history"] == h and m["run"] == str(run)
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_per_second"] > 0


def test_torchrun_two_processes(tmp_path, tiny_model_dir):
    data = write_jsonl_dataset(tmp_path / "data", 8)
    run = tmp_path / "run"
    env = dict(_env(tmp_path), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29517", str(REPO / "erc_llm/train.py"),
           *_args(data, tiny_model_dir, run, max_steps=2)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    # 2 steps x 2 processes x 2 dialogues: each step consumed 4 distinct dialogues, position counts per rank
    assert state["step"] == 2 and state["position"] == 4
    single = tmp_path / "single"
    r1 = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *_args(data, tiny_model_dir, single, max_steps=2)],
                        env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert json.loads((single / "checkpoint" / "state.json").read_text())["tokens"] < state["tokens"]


def test_resume_after_kill_9_ends_where_uninterrupted_run_ends(tmp_path, tiny_model_dir):
    data = write_jsonl_dataset(tmp_path / "data", 40)
    args = dict(epochs=2, eval_every=1000, save_every=1, batch_dialogues=1)
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *_args(data, tiny_model_dir, ref, **args)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(REPO / "erc_llm/train.py"), *_args(data, tiny_model_dir, run, **args)],
                         env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = run / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.is_file() and json.loads(state.read_text())["step"] >= 5:
            break
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 5 <= killed_at < 80, "the run should have been killed mid-way"
    r = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *_args(data, tiny_model_dir, run, resume="true", **args)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _checkpoint(ref), _checkpoint(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines() if "loss" in json.loads(x)]
    assert steps == list(range(1, 81))  # no step lost, none logged twice


def test_resume_without_checkpoint_is_a_config_error(tmp_path, tiny_model_dir):
    from erc_llm.train import main

    data = write_jsonl_dataset(tmp_path / "data", 2)
    assert main(_args(data, tiny_model_dir, tmp_path / "nothing", resume="true")) == 2


def test_qlora_4bit_loads_or_falls_back_with_warning(tiny_model_dir, caplog):
    from erc_llm.backbone import load_for_training

    model, _, manifest = load_for_training(str(tiny_model_dir), quant="4bit")
    if manifest["quant"] == "4bit":
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    else:
        assert "quant=4bit unavailable here" in caplog.text


def _write_features(data: Path, feats: Path) -> Path:
    """csv audio features of every split's utterances but its last (two columns values, two always empty)."""
    import numpy as np

    from erc_llm.data import load_split

    feats.mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "dev", "test"):
        dialogues, _, _ = load_split("jsonl", split, data, LABELS.labels)
        ids = [u.utterance_id for d in dialogues for u in d.utterances][:-1]  # one utterance without audio
        rows = "\n".join(f"{i},{rng.normal():.3f},{rng.normal():.3f},," for i in ids)
        (feats / f"{split}.csv").write_text("utterance_id,pitch,energy,hnr,jitter\n" + rows + "\n")
    return feats


def test_train_with_audio_and_speakers_writes_a_self_contained_run(tmp_path, tiny_model_dir):
    """Audio soft tokens (csv features, a few utterances missing) + speaker notes, through train and test eval."""
    from erc_llm.data import load_split
    from erc_llm.speakers import SpeakerTemplates, build_store

    data = write_jsonl_dataset(tmp_path / "data", 4)
    feats = _write_features(data, tmp_path / "feats")
    train_d, _, _ = load_split("jsonl", "train", data, LABELS.labels)
    build_store(train_d, LABELS, SpeakerTemplates.load(), min_utterances=1)[0].save(tmp_path / "store")
    run = tmp_path / "run"
    args = _args(data, tiny_model_dir, run, max_steps=2, test_eval="true", test_gold="false", labels=",".join(LABELS.labels),
                 audio_source="csv", audio_dir=feats, audio_k_tokens=2, speaker_store=tmp_path / "store",
                 speaker_bios="true", speaker_history=3)
    r = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *args], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "speaker memory: train " in r.stderr and "describe a stored speaker" in r.stderr
    meta = json.loads((run / "run.json").read_text())
    assert meta["audio"]["source"] == "csv" and meta["audio"]["k_tokens"] == 2
    assert meta["speakers"] == {"bios": True, "history": 3, "top_k": 2, "note_tokens": 64}
    for f in ("adapter/projector.pt", "adapter/audio.json", "checkpoint/projector.pt", "speaker_store/manifest.json",
              "prompts/audio.txt", "prompts/speaker_known.txt"):
        assert (run / f).is_file(), f
    spec = json.loads((run / "adapter" / "audio.json").read_text())
    assert spec["feature_dim"] == 4 and spec["in_dim"] == 8  # values + missing mask (two columns all empty)
    m = json.loads((run / "eval" / "test_predicted" / "metrics.json").read_text())
    assert m["audio"] == {"source": "csv", "missing": 1} and m["speakers"]["history"] == 3
    assert f"--labels {','.join(LABELS.labels)} " in m["command"]  # the recorded command scores the same label set
    assert not (run / "eval" / "test_gold").exists()


def test_lookahead_run_trains_evaluates_offline_and_is_refused_by_live_sessions(tmp_path, tiny_model_dir):
    """A look-ahead run records its mode; every loader gives it the whole-dialogue tagger; chat refuses it."""
    import pytest

    from erc_llm.decoding import LookaheadTagger
    from erc_llm.run import load
    from erc_llm.session import Engine

    data = write_jsonl_dataset(tmp_path / "data", 4)
    run = tmp_path / "run"
    args = _args(data, tiny_model_dir, run, max_steps=2, test_eval="true", label_history="false", history_noise=0,
                 lookahead=2, labels=",".join(LABELS.labels))
    r = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *args], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["lookahead"] == 2
    assert json.loads((run / "best.json").read_text())["dev_predicted"]["weighted_f1"] >= 0
    m = json.loads((run / "eval" / "test_predicted" / "metrics.json").read_text())
    assert (m["context"], m["lookahead"], m["history"]) == ("offline", 2, "none")
    assert m["utterances"] == 3 + 4 + 5 + 6
    p = load(str(run))
    assert isinstance(p.tagger("predicted", batch=4), LookaheadTagger) and p.tagger().turns == 2
    with pytest.raises(ValueError, match="the next 2 turns at every slot"):
        Engine.load(str(run))


def test_on_policy_history_writes_the_labels_the_model_itself_would_write(tmp_path, tiny_model_dir):
    """on_policy: 1 writes what the model writes at test time (turn-by-turn decoding with predicted history,
    current weights), not gold, and leaves the model training; on_policy: 0 writes gold; a run logs how often
    the written labels were right."""
    from erc_llm.config import TrainConfig
    from erc_llm.data import load_split
    from erc_llm.decoding import StreamingTagger
    from erc_llm.options import build
    from erc_llm.training.loop import fit, history_labels
    from erc_llm.training.recipe import setup

    data = write_jsonl_dataset(tmp_path / "data", 4)
    base = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
            "label_history": True, "batch_dialogues": 1, "max_steps": 2, "eval_every": 100, "save_every": 100,
            "test_eval": False, "dtype": "float32"}
    r = setup(build(TrainConfig, None, {**base, "on_policy": 1.0, "out": str(tmp_path / "run")}))
    dialogues, _, _ = load_split("jsonl", "train", str(data), LABELS.labels)
    tagger = StreamingTagger(r.unwrapped, r.builder, "predicted")
    rows = [r.data[i] for i in range(len(dialogues))]
    own = history_labels(r, list(range(len(dialogues))), rows)  # one step's dialogues, packed
    assert r.unwrapped.training
    assert own == [[LABELS.index(p.label) for p in tagger.tag(d)] for d in dialogues]
    assert own != [row["labels"] for row in rows], "a random tiny model should miss some gold labels"
    fit(r)
    rows = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if "loss" in x]
    assert len(rows) == 2 and all(0 <= x["history_agreement"] <= 1 for x in rows)

    gold = setup(build(TrainConfig, None, {**base, "on_policy": 0.0, "out": str(tmp_path / "gold")}))
    assert history_labels(gold, [1, 0], [gold.data[1], gold.data[0]]) == [gold.data[1]["labels"], gold.data[0]["labels"]]


def test_on_policy_history_with_audio_writes_what_each_dialogue_alone_writes(tmp_path, tiny_model_dir):
    """With audio soft tokens, a step's on-policy rollouts are packed: the labels of each dialogue rolled out
    alone with its own turns' soft tokens."""
    from erc_llm.config import TrainConfig
    from erc_llm.decoding import rollout
    from erc_llm.options import build
    from erc_llm.training.loop import history_labels
    from erc_llm.training.recipe import setup
    from erc_llm.training.select import eval_mode

    data = write_jsonl_dataset(tmp_path / "data", 4)
    r = setup(build(TrainConfig, None, {
        "dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
        "label_history": True, "on_policy": 1.0, "audio_source": "csv", "audio_dir": str(_write_features(data, tmp_path / "f")),
        "audio_k_tokens": 2, "batch_dialogues": 4, "max_steps": 1, "test_eval": False, "dtype": "float32",
        "out": str(tmp_path / "run")}))
    rows = [r.data[i] for i in range(4)]
    proj = r.audio.projector
    with eval_mode(r.unwrapped, proj), torch.inference_mode():
        alone = [rollout(r.unwrapped, r.builder, row["header"], row["turns"],
                         lambda t, row=row: r.train_audio.soft_tokens(proj, [row["utterance_ids"][t]])) for row in rows]
    assert history_labels(r, [2, 0, 3, 1], [rows[2], rows[0], rows[3], rows[1]]) == [alone[2], alone[0], alone[3], alone[1]]


def test_epoch_order_short_first_sorts_only_the_first_epoch():
    """Curriculum short_first: epoch 0 shortest first over the same randomly cut subset as without it; later
    epochs are the plain shuffle; every order is a whole number of steps."""
    from erc_llm.training.recipe import epoch_order

    lengths = [50, 10, 40, 10, 30, 20, 60, 5, 25, 35, 45]
    plain = epoch_order(len(lengths), 3, 0, 1, 2)
    short = epoch_order(len(lengths), 3, 0, 1, 2, lengths)
    assert len(short) == 10 and sorted(short) == sorted(plain)
    assert [lengths[i] for i in short] == sorted(lengths[i] for i in plain)
    assert epoch_order(len(lengths), 3, 1, 1, 2, lengths) == epoch_order(len(lengths), 3, 1, 1, 2)
    assert epoch_order(len(lengths), 3, 1, 1, 2) != sorted(epoch_order(len(lengths), 3, 1, 1, 2), key=lengths.__getitem__)


def test_curriculum_short_first_trains_on_the_shortest_dialogues_first(tmp_path, tiny_model_dir, monkeypatch):
    """The first step of a short_first run sees the shortest transcripts; an unknown curriculum is a config error."""
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError, build
    from erc_llm.training import loop, recipe

    data = write_jsonl_dataset(tmp_path / "data", 6)
    cfg = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
           "batch_dialogues": 2, "max_steps": 1, "eval_every": 100, "save_every": 100, "test_eval": False,
           "dtype": "float32", "curriculum": "short_first", "out": str(tmp_path / "run")}
    r = recipe.setup(build(TrainConfig, None, cfg))
    seen = []
    real = loop.history_labels
    monkeypatch.setattr(loop, "history_labels", lambda r_, batch, rows: seen.append(batch) or real(r_, batch, rows))
    loop.fit(r)
    usable = set(recipe.epoch_order(6, 0, 0, 1, 2))
    assert sorted(r.lengths[i] for i in seen[0]) == sorted(r.lengths[i] for i in usable)[:2]
    with pytest.raises(ConfigError, match="curriculum.*short_first"):
        build(TrainConfig, None, {**cfg, "curriculum": "longest"})


def test_contrastive_term_enters_the_loss_and_fills_the_bank(tmp_path, tiny_model_dir):
    """With contrastive_weight the first step's loss grows by the weighted term (same data, same start), the
    bank holds every labelled slot seen and a resumed run gets it back from the checkpoint; a temperature without
    the term, or resuming without it, is an error."""
    from erc_llm.config import TrainConfig
    from erc_llm.options import ConfigError, build
    from erc_llm.training import loop, recipe

    data = write_jsonl_dataset(tmp_path / "data", 4)
    cfg = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
           "batch_dialogues": 2, "max_steps": 1, "eval_every": 100, "save_every": 100, "test_eval": False,
           "dtype": "float32", "lr": 0.01}
    losses = {}
    for weight in (0.0, 1.0):
        r = recipe.setup(build(TrainConfig, None, {**cfg, "contrastive_weight": weight, "out": str(tmp_path / f"r{weight}")}))
        loop.fit(r)
        losses[weight] = json.loads((tmp_path / f"r{weight}" / "log.jsonl").read_text().splitlines()[0])["loss"]
        if weight:
            slots = sum(len(r.data[i]["labels"]) for i in recipe.epoch_order(len(r.data), 0, 0, 1, 2)[:2])
            assert len(r.bank.labels) == slots
            resumed = recipe.setup(build(TrainConfig, None, {**cfg, "contrastive_weight": weight, "resume": True,
                                                                "out": str(tmp_path / f"r{weight}")}))
            assert torch.equal(resumed.bank.z, r.bank.z) and torch.equal(resumed.bank.labels, r.bank.labels)
            with pytest.raises(ValueError, match="trained with a contrastive term"):
                recipe.setup(build(TrainConfig, None, {**cfg, "resume": True, "out": str(tmp_path / f"r{weight}")}))
        else:
            assert r.bank is None
    assert losses[1.0] > losses[0.0] + 0.1
    with pytest.raises(ConfigError, match="contrastive_temperature: 0.5 shapes a contrastive term that is off"):
        build(TrainConfig, None, {**cfg, "contrastive_temperature": 0.5, "out": str(tmp_path / "r")})


def test_eval_mode_restores_each_modules_previous_mode_also_on_error():
    """Dev decoding and on-policy rollouts run in eval mode; afterwards each module is back in the mode it
    was in (a module that was in eval mode stays there), even when decoding raises."""
    from erc_llm.training.select import eval_mode

    training, frozen = torch.nn.Dropout(), torch.nn.Dropout().eval()
    with eval_mode(training, None, frozen):
        assert not training.training and not frozen.training
    assert training.training and not frozen.training
    with pytest.raises(RuntimeError, match="decoding failed"), eval_mode(training):
        raise RuntimeError("decoding failed")
    assert training.training


def test_lr_schedule_shapes_the_learning_rate_after_warm_up(tmp_path, tiny_model_dir):
    """Warm-up to the peak, then linear or cosine decay to 0, or a constant peak: the schedule the optimizer
    actually gets from the config."""
    from erc_llm.config import TrainConfig
    from erc_llm.options import build
    from erc_llm.training.recipe import setup

    data = write_jsonl_dataset(tmp_path / "data", 4)
    curves = {}
    for name in ("linear", "cosine", "constant_with_warmup"):
        r = setup(build(TrainConfig, None, {
            "dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
            "batch_dialogues": 1, "max_steps": 10, "warmup_ratio": 0.2, "lr": 1e-3, "lr_schedule": name,
            "test_eval": False, "dtype": "float32", "out": str(tmp_path / name)}))
        curve = []
        for _ in range(10):
            curve.append(r.scheduler.get_last_lr()[0])
            r.optimizer.step()
            r.scheduler.step()
        curves[name] = curve
    for curve in curves.values():
        assert curve[:3] == pytest.approx([0, 5e-4, 1e-3])  # 2 warm-up steps
    assert curves["constant_with_warmup"][2:] == pytest.approx([1e-3] * 8)
    assert curves["linear"][4] == pytest.approx(1e-3 * 6 / 8)  # 2 of 8 decay steps done
    assert curves["cosine"][4] == pytest.approx(1e-3 * (1 + math.cos(math.pi * 2 / 8)) / 2)
    assert curves["cosine"][4] > curves["linear"][4]


def test_unknown_lr_schedule_is_a_config_error_naming_the_choices():
    from erc_llm.config import TrainConfig
    from erc_llm.options import build

    with pytest.raises(ValueError, match=r"lr_schedule: 'step' is not valid; expected one of \['linear', 'cosine'"):
        build(TrainConfig, None, {"lr_schedule": "step"})


def test_run_prompts_are_the_custom_folder_completed_by_the_packaged_support_templates(tmp_path):
    """A prompt folder with only header.txt and turn.txt (label descriptions) gives a run whose prompts/ also has
    the speaker-note and audio templates, so the run can take speaker notes or audio at inference."""
    from erc_llm.config import TrainConfig
    from erc_llm.prompting import PROMPTS_DIR, Templates
    from erc_llm.training.recipe import write_run_files

    custom = REPO / "configs" / "prompts" / "meld_described"
    cfg = TrainConfig(prompts=str(custom), out=str(tmp_path / "run"))
    write_run_files(tmp_path / "run", cfg, LABELS, Templates.load(custom), {"dtype": "float32"})
    got = tmp_path / "run" / "prompts"
    for name in ("header.txt", "turn.txt"):
        assert (got / name).read_text() == (custom / name).read_text()
    for path in [*PROMPTS_DIR.glob("speaker_*.txt"), PROMPTS_DIR / "audio.txt"]:
        assert (got / path.name).read_text() == path.read_text(), path.name
    assert Templates.load(got).version == Templates.load(custom).version


def _init_config(tmp_path, tiny_model_dir, init: Path, **kw):
    from erc_llm.config import TrainConfig
    from erc_llm.options import build

    data = tmp_path / "data" if (tmp_path / "data").is_dir() else write_jsonl_dataset(tmp_path / "data", 4)
    return build(TrainConfig, None, {
        "dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
        "batch_dialogues": 1, "max_steps": 2, "test_eval": False, "dtype": "float32", "init_adapter": str(init),
        "lora_r": 4, "lora_alpha": 8, "lora_targets": ["q_proj", "v_proj"], "out": str(tmp_path / "out"), **kw})


def test_init_adapter_starts_training_from_the_trained_runs_weights(tmp_path, tiny_model, tiny_model_dir):
    """Every LoRA tensor of the new run starts as the trained run saved it (not peft's fresh B = 0), and the
    run records where it started."""
    import yaml

    from erc_llm.training.recipe import setup

    init = write_lora_run(tmp_path / "trained", tiny_model, tiny_model_dir)
    saved = _adapter(init)
    r = setup(_init_config(tmp_path, tiny_model_dir, init))
    ours = {n: p for n, p in r.unwrapped.named_parameters() if "lora_" in n}
    assert len(ours) == len(saved) > 0
    for name, tensor in saved.items():
        key = name.replace(".weight", ".default.weight")
        assert torch.equal(ours[key].detach(), tensor.to(ours[key].dtype)), name
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in ours.items())
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["init_adapter"] == str(init)


def test_init_adapter_of_another_shape_is_refused_up_front_or_at_load(tmp_path, tiny_model, tiny_model_dir):
    from erc_llm.training.recipe import setup

    init = write_lora_run(tmp_path / "trained", tiny_model, tiny_model_dir)
    with pytest.raises(ValueError, match=r"init_adapter: .* was trained with lora_r 4, this config has 8; set lora_r: 4"):
        setup(_init_config(tmp_path, tiny_model_dir, init, lora_r=8))
    with pytest.raises(ValueError, match=r"init_adapter: 'runs/nowhere': run 'runs/nowhere' not found; .*shipped models"):
        setup(_init_config(tmp_path, tiny_model_dir, Path("runs/nowhere")))
    (init / "reference.json").write_text(json.dumps({"adapter_sha256": "0" * 64}))  # a packaged model, altered
    with pytest.raises(ValueError, match=r"init_adapter: .*does not match the sha256 recorded when the model was packaged"):
        setup(_init_config(tmp_path, tiny_model_dir, init))
    (init / "reference.json").unlink()
    # all-linear cannot be compared before the model exists: the load names the tensors without saved weights
    cfg = _init_config(tmp_path, tiny_model_dir, init, lora_targets=["all-linear"])
    with pytest.raises(ValueError, match=r"does not fit this model's adapters \(\d+ adapted tensors without saved"):
        setup(cfg)


def test_full_finetuning_from_a_lora_run_starts_from_its_merged_weights(tmp_path, tiny_model, tiny_model_dir):
    """finetune: full with init_adapter trains the backbone with the run's LoRA update merged in (W + B A ·
    scale on every adapted projection, the rest untouched); any adapter shape is accepted, another backbone is
    refused up front."""
    from erc_llm.backbone import load_backbone
    from erc_llm.run import RunSpec, trained_weights
    from erc_llm.training.recipe import setup

    init = write_lora_run(tmp_path / "trained", tiny_model, tiny_model_dir)
    cfg = _init_config(tmp_path, tiny_model_dir, init, finetune="full", lora_r=8)  # the adapter's r is 4
    r = setup(cfg)
    plain, _, _ = load_backbone(str(tiny_model_dir), "float32")
    plain_weights = {n: p.detach().clone() for n, p in plain.named_parameters()}
    merged = dict(trained_weights(plain, init, "lora").named_parameters())
    ours = dict(r.unwrapped.named_parameters())
    changed = [n for n in ours if not torch.equal(ours[n].detach(), plain_weights[n])]
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)
    for name in changed:
        assert torch.allclose(ours[name].detach(), merged[name].detach()), name
    assert ours[changed[0]].requires_grad
    RunSpec(model=str(tmp_path / "another"), labels=LABELS.labels).write(init)
    with pytest.raises(ValueError, match=r"init_adapter: .* was trained on model .*another.*, this config has"):
        setup(_init_config(tmp_path, tiny_model_dir, init, finetune="full", out=str(tmp_path / "out2")))


def test_ema_run_saves_the_averaged_weights_and_a_resumed_run_continues_the_average(tmp_path, tiny_model_dir,
                                                                                    monkeypatch):
    """ema_decay: dev evaluates, and run/adapter holds, the moving average, while the optimizer goes on with the
    live weights; a run stopped after a checkpoint and resumed ends with the same average as an uninterrupted one."""
    from erc_llm.config import TrainConfig
    from erc_llm.options import build
    from erc_llm.training import loop
    from erc_llm.training.loop import fit
    from erc_llm.training.recipe import setup

    data = write_jsonl_dataset(tmp_path / "data", 4)
    base = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
            "batch_dialogues": 1, "max_steps": 4, "eval_every": 4, "save_every": 1, "lr": 0.01, "ema_decay": 0.9,
            "test_eval": False, "dtype": "float32"}
    ref = tmp_path / "ref"
    r = setup(build(TrainConfig, None, {**base, "out": str(ref)}))
    fit(r)
    names = [n for n, p in r.unwrapped.named_parameters() if p.requires_grad]
    average = torch.load(ref / "checkpoint" / "average.pt", weights_only=True)
    live, saved = _checkpoint(ref), _adapter(ref)
    assert average["steps"] == 4 and len(average["shadow"]) == len(names) == len(saved) > 0
    for name, shadow, p in zip(names, average["shadow"], (p for p in r.unwrapped.parameters() if p.requires_grad)):
        key = name.replace(".default.weight", ".weight")
        assert torch.equal(saved[key], shadow), name
        assert torch.equal(p.detach(), live[key]), f"{name}: the live weights must come back after dev selection"
    assert any(not torch.equal(saved[k], live[k]) for k in saved)

    class Stop(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_stop(run, model, finetune, optimizer, scheduler, state, *rest):
        real_save(run, model, finetune, optimizer, scheduler, state, *rest)
        if state["step"] == 2:
            raise Stop

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        fit(setup(build(TrainConfig, None, {**base, "out": str(tmp_path / "run")})))
    monkeypatch.undo()
    fit(setup(build(TrainConfig, None, {**base, "out": str(tmp_path / "run"), "resume": True})))
    resumed = torch.load(tmp_path / "run" / "checkpoint" / "average.pt", weights_only=True)
    assert resumed["steps"] == 4 and all(torch.equal(a, b) for a, b in zip(resumed["shadow"], average["shadow"]))
    with pytest.raises(ValueError, match=r"trained with a weight average \(ema_decay 0.9\), this config has none; "
                                         r"resume with --ema-decay 0.9"):
        setup(build(TrainConfig, None, {**base, "out": str(tmp_path / "run"), "resume": True, "ema_decay": 0.0}))
    (tmp_path / "run" / "checkpoint" / "average.pt").unlink()
    with pytest.raises(ValueError, match=r"trained without a weight average \(no average.pt\); resume it with --ema-decay 0"):
        setup(build(TrainConfig, None, {**base, "out": str(tmp_path / "run"), "resume": True}))


def test_a_dialogue_longer_than_max_tokens_is_trained_on_every_turn(tmp_path, tiny_model_dir, caplog):
    """A 30-turn dialogue with a 128-token budget is trained as several transcripts: one step over it and a
    3-turn dialogue trains all 33 labelled turns (not only the last window), and the log says so."""
    from erc_llm.config import TrainConfig
    from erc_llm.options import build
    from erc_llm.training import loop, recipe
    from tests.conftest import toy_dialogue, write_dialogues

    data = write_jsonl_dataset(tmp_path / "data", 2)
    write_dialogues(data / "train.jsonl", [toy_dialogue(30, "long"), toy_dialogue(3, "short")])
    cfg = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
           "batch_dialogues": 2, "max_steps": 1, "eval_every": 100, "save_every": 100, "test_eval": False,
           "dtype": "float32", "max_tokens": 128, "max_utterance_tokens": 16, "out": str(tmp_path / "run")}
    with caplog.at_level("INFO", logger="erc_llm.train"):
        r = recipe.setup(build(TrainConfig, None, cfg))
    assert "1 of 2 training dialogues exceed max_tokens 128" in caplog.text
    loop.fit(r)
    assert r.state["labels_seen"] == 33
    assert math.isfinite(json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])["loss"])


def test_parameter_sharding_setups_are_refused_with_the_supported_ones_named():
    from accelerate.utils import DistributedType

    from erc_llm.training.recipe import sharding_problem

    for kind, stage in ((DistributedType.FSDP, None), (DistributedType.DEEPSPEED, 3)):
        problem = sharding_problem(kind, stage)
        assert problem and "shards parameters" in problem
        assert "multi_gpu.yaml" in problem and "zero2.yaml" in problem
    for kind, stage in ((DistributedType.NO, None), (DistributedType.MULTI_GPU, None), (DistributedType.MULTI_CPU, None),
                        (DistributedType.DEEPSPEED, 1), (DistributedType.DEEPSPEED, 2)):
        assert sharding_problem(kind, stage) is None


def test_training_under_fsdp_stops_before_loading_data(tmp_path, monkeypatch):
    from accelerate.utils import DistributedType

    from erc_llm.config import TrainConfig
    from erc_llm.training import recipe

    class ShardingAccelerator:
        distributed_type = DistributedType.FSDP
        state = type("State", (), {"deepspeed_plugin": None})()

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(recipe, "Accelerator", ShardingAccelerator)
    with pytest.raises(ValueError, match="FSDP, which shards parameters"):
        recipe.setup(TrainConfig(data_dir=str(tmp_path / "no-data"), out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_epoch_order_draws_a_fraction_of_the_joint_corpus_afresh_every_epoch():
    """Without a joint corpus the order is the plain shuffle; with one, every dialogue of the dataset and a seeded
    draw of `fraction` of the joint corpus's are in each epoch, a different draw each epoch."""
    from erc_llm.training.recipe import epoch_order

    assert epoch_order(10, 3, 0, 1, 1, joint=0, fraction=0.5) == epoch_order(10, 3, 0, 1, 1)
    epochs = [epoch_order(30, 3, e, 1, 1, joint=20, fraction=0.25) for e in range(3)]
    for order in epochs:
        assert len(order) == 15 and len(set(order)) == 15
        assert set(range(10)) <= set(order) and len([i for i in order if i >= 10]) == 5
    assert len({frozenset(order) for order in epochs}) == 3
    assert epochs[1] == epoch_order(30, 3, 1, 1, 1, joint=20, fraction=0.25)
    assert len(epoch_order(30, 3, 0, 2, 2, joint=20, fraction=0.25)) == 12  # 15 cut to whole steps of 2 x 2


def test_joint_training_scores_each_corpus_over_its_own_label_set(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A joint corpus with another label set: its dialogues are prompted with their own labels and their loss is
    over those labels' columns with their own class weights; dev, the run's label set and test stay the dataset's."""
    from erc_llm.config import TrainConfig
    from erc_llm.data.schema import Dialogue, Utterance
    from erc_llm.options import ConfigError, build
    from erc_llm.training import loop, recipe
    from tests.conftest import write_dialogues

    data = write_jsonl_dataset(tmp_path / "data", 4)
    joint_dir = tmp_path / "joint"
    joint_dir.mkdir()
    lines = [("A", "I got the job!", "happy"), ("B", "My dog died.", "sad"), ("A", "Okay.", "neutral")]
    write_dialogues(joint_dir / "train.jsonl", [
        Dialogue(f"j{k}", [Utterance(s, t, e, f"j{k}_{i}") for i, (s, t, e) in enumerate(lines[: 2 + k % 2])])
        for k in range(6)])
    cfg = {"dataset": "jsonl", "data_dir": str(data), "model": str(tiny_model_dir), "labels": list(LABELS.labels),
           "batch_dialogues": 2, "epochs": 2, "eval_every": 100, "save_every": 100, "test_eval": False,
           "dtype": "float32", "joint_dataset": "jsonl", "joint_data_dir": str(joint_dir), "joint_fraction": 0.5,
           "out": str(tmp_path / "run")}
    with caplog.at_level("INFO", logger="erc_llm"):
        r = recipe.setup(build(TrainConfig, None, cfg))
    assert "joint corpus: every training dialogue fits max_tokens 2048" in caplog.text  # reported per corpus
    target, joint = r.corpora
    assert joint.builder.labels.labels == ("happy", "sad", "neutral") and r.joint == 6 and len(r.data) == 10
    assert len(r.label_tokens) == 7 and joint.columns == slice(4, 7)
    header = joint.builder.tokenizer.decode(r.data[4]["header"])
    assert "happy" in header and "anger" not in header
    seen = []
    real = loop.piece_loss
    monkeypatch.setattr(loop, "piece_loss", lambda r_, lg, t, keep, d, piece, w: seen.append(
        (d >= 4, lg.shape[1], w is joint.weights, int(t[keep].max()))) or real(r_, lg, t, keep, d, piece, w))
    loop.fit(r)
    assert len(seen) == r.total * 2 and r.state["epoch"] == 1  # whole steps of 2 dialogues, 3 per epoch
    assert r.total == 2 * ((4 + 3) // 2)  # 4 dialogues and 3 of the 6 joint ones, cut to whole steps of 2
    assert {(j, k, w) for j, k, w, _ in seen} == {(False, 4, False), (True, 3, True)}
    assert max(top for j, _, _, top in seen if j) <= 2
    spec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert tuple(spec["labels"]) == LABELS.labels and (tmp_path / "run" / "adapter").is_dir()
    with pytest.raises(ConfigError) as e:
        build(TrainConfig, None, {**cfg, "joint_dataset": "friends", "label_history": True, "overwrite": True})
    assert "joint_dataset: 'friends' is not a dataset format; available: meld, iemocap, jsonl" in str(e.value)
    assert "label_history" in str(e.value)
    with pytest.raises(ConfigError, match="joint_data_dir: .* joint_dataset is empty"):
        build(TrainConfig, None, {**cfg, "joint_dataset": "", "joint_fraction": 1.0, "overwrite": True})
