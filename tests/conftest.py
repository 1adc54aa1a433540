"""Shared fixtures: tiny tokenizers and randomly initialised models we build ourselves, real MELD."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from erc_llm.data.schema import Dialogue, LabelSet, Utterance

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ERC_LLM_SHARED_DATA", REPO.parent / "shared" / "data"))
MELD_DIR = SHARED / "meld"

@pytest.fixture(autouse=True, scope="session")
def float32_for_auto():
    """``dtype: auto`` means float32 in tests on every CPU: tests compare the probabilities of different paths
    (streaming and batch, session and evaluation) at float32 tolerances, and must not depend on whether the
    machine has native bf16. A test of ``auto`` itself patches ``native_bf16_cpu`` again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("erc_llm.backbone.native_bf16_cpu", lambda: None)
        yield


CORPUS = [
    "Task: label the emotion of each turn of this conversation.",
    "After every turn, write the speaker's emotion as exactly one of the labels.",
    "Participants: Ross, Rachel, Monica, Joey. Emotion: neutral joy sadness anger fear disgust surprise",
    "Ross: I can't believe you did that! Rachel: Oh, that's great. Monica: Why?",
    "happy sad angry excited frustrated calm bored",
]


def make_tokenizer(vocab_size: int = 300, corpus: list[str] | None = None):
    """A real BPE tokenizer (SentencePiece-style ▁ spaces) trained on a few lines; small vocab splits words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()\n "))
    tok.train_from_iterator((corpus or CORPUS) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def make_model(vocab_size: int, arch: str = "llama", seed: int = 0):
    """Randomly initialised causal LM of a real architecture, small enough for unit tests."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    torch.manual_seed(seed)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=24,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    else:
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg)
    # random init gives near-uniform outputs; scale the head so label probabilities differ clearly
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model.eval()


def make_sharp_model(vocab_size: int):
    """``make_model`` (llama, seed 2) with every weight matrix scaled by 15: sharper random predictions, so the
    labels a random model writes vary from turn to turn and follow the written history."""
    model = make_model(vocab_size, "llama", seed=2)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.mul_(15)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    return make_model(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_model):
    """A local Hugging Face checkpoint directory (what users pass as --model DIR)."""
    d = tmp_path_factory.mktemp("tiny_llm")
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def meld_dir():
    if not (MELD_DIR / "train_sent_emo.csv").is_file():
        pytest.fail(f"MELD not found at {MELD_DIR}; tests read it from ../shared/data/meld (or $ERC_LLM_SHARED_DATA/meld)")
    return MELD_DIR


LABELS = LabelSet("toy", ("neutral", "joy", "anger", "surprise"))


def toy_dialogue(n: int = 4, did: str = "d1") -> Dialogue:
    lines = [("Ross", "I can't believe you did that!", "surprise"), ("Rachel", "Oh, that's great.", "joy"),
             ("Monica", "Why?", "neutral"), ("Ross", "Because I said so!", "anger")]
    return Dialogue(did, [Utterance(s, t, e, f"{did}_{i}") for i, (s, t, e) in enumerate((lines * 20)[:n])])


def over_budget(builder, dialogue: Dialogue) -> bool:
    """Whether the whole transcript (the longest label after every turn) exceeds the builder's token budget, so
    decoding must shorten it."""
    e = builder.encode(dialogue)
    longest = max(len(ids) for ids in builder.label_ids) + len(builder.suffix_ids)
    return len(e["header"]) + sum(len(t) + longest for t in e["turns"]) > builder.max_tokens


def write_dialogues(path: Path, dialogues) -> Path:
    """``dialogues`` as a file of the generic JSONL format (one dialogue per line)."""
    import json

    with open(path, "w") as f:
        for d in dialogues:
            f.write(json.dumps({"dialogue_id": d.id, "utterances": [
                {"speaker": u.speaker, "text": u.text, "emotion": u.emotion} for u in d.utterances]}) + "\n")
    return path


def write_jsonl_dataset(directory: Path, n_dialogues: int = 3) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        write_dialogues(directory / f"{split}.jsonl", [toy_dialogue(3 + k, f"{split}{k}") for k in range(n_dialogues)])
    return directory


def write_lora_run(run: Path, tiny_model, tiny_model_dir, seed: int = 0, label_history: bool = False) -> Path:
    """A run folder as training writes it: a random (non-zero) LoRA adapter on the tiny model, prompts, run.json."""
    import copy
    import shutil

    from peft import LoraConfig, get_peft_model

    from erc_llm.run import RunSpec

    torch.manual_seed(seed)
    peft = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                init_lora_weights=False))
    peft.save_pretrained(run / "adapter")
    shutil.copytree(REPO / "prompts", run / "prompts")
    RunSpec(model=str(tiny_model_dir), labels=LABELS.labels, label_history=label_history).write(run)
    return run


def fit_toy_dialogue(model, tokenizer, steps: int = 10, lr: float = 1e-3) -> list[float]:
    """``steps`` AdamW steps of the label-slot loss on one 4-turn toy dialogue; the losses."""
    from erc_llm.heads import first_token_ids, slot_logits
    from erc_llm.prompting import PromptBuilder
    from erc_llm.training.losses import label_loss

    b = PromptBuilder(tokenizer, LABELS)
    d = toy_dialogue(4)
    tr = b.build(d, [u.emotion for u in d.utterances])
    targets = torch.tensor([LABELS.index(u.emotion) for u in d.utterances])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = label_loss(slot_logits(model, tr, first_token_ids(b)), targets, None, 0.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
