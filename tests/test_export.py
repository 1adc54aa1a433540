"""Export (a standard PEFT folder + prompts + card) and the shipped model."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from erc_llm.data.schema import LabelSet
from erc_llm.export import REFERENCE, export, train_command
from erc_llm.run import PRETRAINED_DIR, SHIPPED, RunError, RunSpec, load
from tests.conftest import LABELS, REPO, toy_dialogue, write_lora_run


def plain_peft_probs(model, tok, folder: Path, labels: tuple, dialogue, write_labels: bool) -> list[list[float]]:
    """The recipe the model card documents, with transformers + peft only (no erc-llm code)."""
    header = (folder / "prompts" / "header.txt").read_text()
    prefix, suffix = (folder / "prompts" / "turn.txt").read_text().split("{label}")
    space = prefix.endswith(" ")
    prefix = prefix[:-1] if space else prefix

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"] if text else []

    firsts = [enc((" " if space else "") + lab)[0] for lab in labels]
    speakers = list(dict.fromkeys(u.speaker for u in dialogue.utterances))
    ids = [tok.bos_token_id] + enc(header.format(labels=", ".join(labels), speakers=", ".join(speakers)))
    out = []
    with torch.no_grad():
        for u in dialogue.utterances:
            ids += enc(prefix.format(speaker=u.speaker, text=u.text))
            p = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1, firsts].float(), -1)
            out.append(p.tolist())
            ids += (enc((" " if space else "") + labels[int(p.argmax())]) if write_labels else []) + enc(suffix)
    return out


def _tiny_run(tmp_path, tiny_model, tiny_model_dir, label_history: bool) -> Path:
    return write_lora_run(tmp_path / f"run_{label_history}", tiny_model, tiny_model_dir, label_history=label_history)


@pytest.mark.parametrize("label_history", [True, False])
def test_exported_folder_loads_with_plain_peft_and_gives_erc_llm_probabilities(tmp_path, tiny_model, tiny_model_dir,
                                                                               label_history):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(_tiny_run(tmp_path, tiny_model, tiny_model_dir, label_history), tmp_path / "exported")
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.json", "prompts/header.txt", "README.md"):
        assert (out / name).is_file(), name
    d = toy_dialogue(5)
    ours = [t.probs for t in load(out).tagger("predicted").tag(d)]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = plain_peft_probs(PeftModel.from_pretrained(base, str(out)).eval(), AutoTokenizer.from_pretrained(tiny_model_dir),
                             out, LABELS.labels, d, label_history)
    for a, b in zip(ours, plain):
        assert a == pytest.approx(b, abs=1e-5)


def test_train_command_rebuilds_the_run_config(tmp_path, monkeypatch):
    """The model card's command, run through the training CLI's parser, gives back the run's configuration
    (apart from where the data and the run live)."""
    import argparse
    import shlex

    import yaml

    from erc_llm.config import TrainConfig
    from erc_llm.options import add_arguments, from_args, to_dict

    monkeypatch.chdir(REPO)
    data = tmp_path / "meld"
    data.mkdir()
    run = yaml.safe_load((REPO / "configs" / "meld.yaml").read_text())
    run.update(data_dir=str(data), out=str(tmp_path / "old_run"), seed=2, prompts="configs/prompts/meld_described",
               label_history=True, history_noise=0.2, lora_targets=["q_proj", "v_proj"], eval_dialogues=7)
    config = to_dict(from_args(TrainConfig, argparse.Namespace(config=None, **run)))
    command = train_command(config, "configs/meld.yaml")
    assert command.startswith("accelerate launch --config_file configs/accelerate/cpu.yaml erc_llm/train.py "
                              "--config configs/meld.yaml --data-dir DATA --out RUN ")
    assert "--data-dir " + str(data) not in command and "old_run" not in command
    argv = shlex.split(command)[shlex.split(command).index("erc_llm/train.py") + 1:]
    argv = [str(data) if a == "DATA" else str(tmp_path / "new_run") if a == "RUN" else a for a in argv]
    parser = argparse.ArgumentParser()
    add_arguments(parser, TrainConfig)
    rebuilt = to_dict(from_args(TrainConfig, parser.parse_args(argv)))
    assert {k: v for k, v in rebuilt.items() if k != "out"} == {k: v for k, v in config.items() if k != "out"}
    assert train_command(to_dict(from_args(TrainConfig, parser.parse_args(
        ["--config", "configs/meld.yaml", "--data-dir", str(data), "--out", str(tmp_path / "r")]))),
        "configs/meld.yaml").endswith("--out RUN")  # the recipe itself needs no flags


def test_cli_export_of_a_missing_run_is_a_clear_error(tmp_path, capsys):
    from erc_llm.cli import main

    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "not found; expected a run folder" in capsys.readouterr().err


needs_shipped = pytest.mark.skipif(not (PRETRAINED_DIR / SHIPPED / REFERENCE).is_file(), reason="no shipped model")


@pytest.mark.slow
@needs_shipped
def test_shipped_model_reproduces_its_packaging_predictions(meld_dir):
    from erc_llm.data import load_split

    ref = json.loads((PRETRAINED_DIR / SHIPPED / REFERENCE).read_text())
    dev, _, _ = load_split("meld", "dev", meld_dir)
    dev = {d.id: d for d in dev}
    tagger = load(SHIPPED, dtype="float32").tagger("predicted")
    for row in ref["dialogues"]:
        preds = tagger.tag(dev[row["dialogue_id"]])
        assert [p.label for p in preds] == row["labels"], row["dialogue_id"]
        for p, q in zip(preds, row["probs"]):
            assert p.probs == pytest.approx(q, abs=1e-5)


@pytest.mark.slow
@needs_shipped
def test_a_corrupted_shipped_adapter_is_refused(tmp_path):
    copy = tmp_path / SHIPPED
    shutil.copytree(PRETRAINED_DIR / SHIPPED, copy)
    f = copy / "adapter" / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RunError, match="adapter_model.safetensors does not match the sha256 recorded"):
        load(copy)


@pytest.mark.slow
@needs_shipped
def test_shipped_model_with_plain_peft_on_three_meld_dialogues(tmp_path, meld_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from erc_llm.backbone import prepare_model
    from erc_llm.data import load_split

    out = export(SHIPPED, tmp_path / "exported")
    spec = RunSpec.read(out)
    path, _ = prepare_model(spec.model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), str(out)).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ours = load(out).tagger("predicted")
    for d in load_split("meld", "dev", meld_dir)[0][:3]:
        plain = plain_peft_probs(model, tok, out, spec.labels, d, spec.label_history)
        for a, b in zip([t.probs for t in ours.tag(d)], plain):
            assert a == pytest.approx(b, abs=1e-4)


def test_label_sets_must_match_the_run(tmp_path, tiny_model, tiny_model_dir):
    run = _tiny_run(tmp_path, tiny_model, tiny_model_dir, True)
    with pytest.raises(RunError, match=r"differ from those of model .* --zero-shot"):
        load(run, labels=LabelSet("other", ("happy", "sad")))


def test_an_exported_folder_refuses_any_changed_file(tmp_path, tiny_model, tiny_model_dir):
    import json

    from erc_llm.export import export
    from erc_llm.run import RunError, load
    from tests.conftest import write_lora_run

    run = write_lora_run(tmp_path / "run", tiny_model, tiny_model_dir)
    out = export(run, tmp_path / "exported")
    load(out)  # as written: loads
    spec = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**spec, "labels": list(reversed(spec["labels"]))}))  # swapped labels
    with pytest.raises(RunError, match="run.json does not match the sha256"):
        load(out)
    export(run, tmp_path / "exported")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 4 * config["lora_alpha"]}))
    with pytest.raises(RunError, match="adapter/adapter_config.json"):
        load(out)


def test_the_shipped_model_lists_every_file_it_consists_of():
    import json

    from erc_llm.run import PRETRAINED_DIR, SHIPPED

    folder = PRETRAINED_DIR / SHIPPED
    listed = set(json.loads((folder / "checksums.json").read_text()))
    assert listed == {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "checksums.json"
                      and "__pycache__" not in p.parts}
