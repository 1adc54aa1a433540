"""Full fine-tuning beside LoRA: what is trained, what is saved, resume, and loading a run for inference."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import LABELS, REPO, fit_toy_dialogue, make_model, write_jsonl_dataset
from tests.training.test_train import _args, _env


@pytest.mark.parametrize("arch", ["gemma3", "llama"])  # tied and untied output head
def test_full_finetune_moves_layer_weights_and_keeps_embeddings(arch, tiny_tokenizer):
    from erc_llm.config import TrainConfig
    from erc_llm.training.finetune import make_trainable, trainable_state

    model = make_trainable(make_model(len(tiny_tokenizer), arch).train(), "full", TrainConfig(data_dir=".").lora_options())
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    state0 = {n: t.clone() for n, t in trainable_state(model, "full").items()}
    assert not model.get_input_embeddings().weight.requires_grad and not model.get_output_embeddings().weight.requires_grad
    assert any(".mlp." in n for n in state0) and any("self_attn" in n for n in state0) and any("norm" in n for n in state0)
    assert not any("embed" in n or "lm_head" in n for n in state0)
    losses = fit_toy_dialogue(model, tiny_tokenizer, steps=8)
    assert losses[-1] < losses[0]
    assert torch.equal(model.get_input_embeddings().weight, emb0) and torch.equal(model.get_output_embeddings().weight, head0)
    after = trainable_state(model, "full")
    assert all(not torch.equal(after[n], state0[n]) for n in state0 if n.endswith("proj.weight"))


def test_full_run_saves_and_loads(tmp_path, tiny_model_dir):
    """train.py --finetune full: the run holds finetuned.safetensors (the trained tensors, float32, as in the
    checkpoint), and run.load puts them back: the model's weights are the saved ones, not the base's."""
    from safetensors.torch import load_file

    from erc_llm.constants import FULL_WEIGHTS
    from erc_llm.run import load

    data = write_jsonl_dataset(tmp_path / "data", 6)
    ref = tmp_path / "ref"
    args = _args(data, tiny_model_dir, ref, finetune="full", lr="0.001", eval_every=3, batch_dialogues=1,
                 label_history="false", history_noise=0, max_steps=3, test_eval="true", test_gold="false")
    r = subprocess.run([sys.executable, str(REPO / "erc_llm/train.py"), *args], env=_env(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((ref / "run.json").read_text())["finetune"] == "full"
    assert not (ref / "adapter" / "adapter_config.json").exists()
    saved = load_file(str(ref / "adapter" / FULL_WEIGHTS))
    checkpoint = torch.load(ref / "checkpoint" / "adapter.pt", weights_only=False)
    assert saved.keys() == checkpoint.keys() and all(t.dtype == torch.float32 for t in saved.values())
    assert all(torch.equal(saved[k], checkpoint[k]) for k in saved)  # best = last step here (eval at step 3)
    m = json.loads((ref / "eval" / "test_predicted" / "metrics.json").read_text())
    assert m["history"] == "none" and m["run"] == str(ref)

    p = load(ref)
    params = dict(p.model.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    base = dict(load(None, model=str(tiny_model_dir), labels=p.labels).model.named_parameters())
    assert any(not torch.equal(base[n], t) for n, t in saved.items())


def test_full_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path, tiny_tokenizer):
    """save_checkpoint / load_checkpoint with finetune full: a fresh model and optimizer continue exactly."""
    from transformers import get_linear_schedule_with_warmup

    from erc_llm.config import TrainConfig
    from erc_llm.training.checkpoint import load_checkpoint, save_checkpoint
    from erc_llm.training.finetune import make_trainable, trainable_state

    def fresh():
        m = make_trainable(make_model(len(tiny_tokenizer), "gemma3", seed=1).train(), "full", TrainConfig(data_dir=".").lora_options())
        o = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        return m, o, get_linear_schedule_with_warmup(o, 0, 10)

    def step(m, o, s):
        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
        s.step()
        o.zero_grad()

    model, opt, sched = fresh()
    step(model, opt, sched)
    save_checkpoint(tmp_path, model, "full", opt, sched, {"step": 1})
    step(model, opt, sched)
    model2, opt2, sched2 = fresh()
    assert load_checkpoint(tmp_path, model2, "full", opt2, sched2) == {"step": 1}
    step(model2, opt2, sched2)
    a, b = trainable_state(model, "full"), trainable_state(model2, "full")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_weights_of_another_backbone_are_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    from safetensors.torch import save_file

    from erc_llm.constants import FULL_WEIGHTS
    from erc_llm.run import RunError, RunSpec, load

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    RunSpec(model=str(tiny_model_dir), labels=LABELS.labels, finetune="full").write(run)
    with pytest.raises(RunError, match="finetuned.safetensors"):
        load(run)  # nothing saved yet
    other = make_model(len(tiny_tokenizer), "gemma3")
    save_file({n: p.detach().contiguous() for n, p in other.named_parameters() if "layers.0." in n},
              str(run / "adapter" / FULL_WEIGHTS))
    with pytest.raises(RunError, match="another model"):
        load(run)


def test_full_finetune_config_problems():
    from erc_llm.config import TrainConfig

    p = TrainConfig(data_dir=".", finetune="full", quant="4bit", dtype="bfloat16").problems()
    assert any(x.startswith("finetune: full") and "quant: none" in x for x in p)
    assert any(x.startswith("dtype: bfloat16") for x in p)
    assert not [x for x in TrainConfig(data_dir=".", finetune="full", out=".").problems() if "finetune" in x or "dtype" in x]
