"""Names that configs and run files are checked against, with no dependency beyond the standard library: the
config schema (``erc_llm.config``) imports these instead of the modules that use them, so reading and checking a
YAML file never loads torch or the model stack."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL = "gemma-3-270m"  # the packaged backbone used when a config names none
DATASETS = ("meld", "iemocap", "jsonl")  # the loaders of erc_llm.data
FINETUNE_MODES = ("lora", "full")  # erc_llm.training.finetune: a PEFT adapter, or every weight
FULL_WEIGHTS = "finetuned.safetensors"  # a fully fine-tuned run's weights, in its adapter/ folder
HISTORY_MODES = ("predicted", "gold")  # what a decoder writes into earlier turns' slots
DECODE_BATCH = 16  # dialogues in flight in batch decoding (evaluate's --batch default, dev passes, stages)
SERVE_MAX_BATCH = 64  # turns per batched forward in serve: a full round of 50 concurrent dialogues fits one
CHECKPOINT_DIR = "checkpoint"  # a training run's resumable state (erc_llm.training.checkpoint)


def has_checkpoint(run: str | Path) -> bool:
    """Whether ``run`` holds a complete checkpoint to resume from (``state.json`` is written last)."""
    return (Path(run) / CHECKPOINT_DIR / "state.json").is_file()
