"""What training updates: LoRA adapters on a frozen backbone (the default, and the shipped model), or the
backbone's own weights (full fine-tuning) — and how those weights are checkpointed, saved and put back.

Full fine-tuning trains every weight of the transformer layers (attention, MLP, norms) and keeps the token
embeddings frozen; on models that tie the output head to them (Gemma 3) the head stays frozen too, and an
untied head is frozen as well. On Gemma 3 270M the embeddings are 168M of the 268M parameters: training them
would triple the optimizer state for rows of a 262k vocabulary that the constrained decoder never reads
beyond the label tokens. The trained weights are float32 master weights; where bf16 matmuls are native the
forward runs under bf16 autocast (the usual mixed-precision recipe) — bfloat16 weights themselves would
round away most AdamW updates at fine-tuning learning rates.

A full run's best weights are ``adapter/finetuned.safetensors`` (only the trained tensors, float32: ~400 MB
for Gemma 3 270M), read back by :func:`erc_llm.run.load`; LoRA runs keep peft's ``adapter_model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file

from erc_llm.backbone import resolve_dtype
from erc_llm.config import LoraOptions, PrecisionOptions
from erc_llm.constants import FULL_WEIGHTS
from erc_llm.run import RunSpec, assign_full_weights, resolve, trained_weights
from erc_llm.training.lora import load_init, wrap_lora


def training_precision(opts: PrecisionOptions) -> tuple[str, bool]:
    """(dtype of the backbone's weights, bf16 autocast): LoRA keeps the configured dtype; full fine-tuning keeps
    float32 master weights under bf16 autocast where bf16 is native (``dtype`` auto/bfloat16)."""
    dtype = resolve_dtype(opts.dtype)
    if opts.finetune == "full":
        return "float32", dtype == "bfloat16" or opts.autocast_bf16
    return dtype, opts.autocast_bf16


def frozen_parameters(model) -> set[int]:
    """ids of the token embeddings and the output head (the same tensor when tied)."""
    frozen = {id(p) for p in model.get_input_embeddings().parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        frozen |= {id(p) for p in head.parameters()}
    return frozen


def make_trainable(model, finetune: str, lora: LoraOptions, init_adapter: str = ""):
    """``model`` ready to train per ``finetune``: peft-wrapped with LoRA of shape ``lora``, or with every parameter
    but the embeddings and output head set to require gradients — started from ``init_adapter``'s trained weights
    when one is given (a resumed run passes none: its weights are in its checkpoint)."""
    if finetune == "lora":
        model = wrap_lora(model, lora)
        if init_adapter:
            load_init(model, init_adapter)
        return model
    if init_adapter:
        model = merge_init(model, init_adapter)
    frozen = frozen_parameters(model)
    for p in model.parameters():
        p.requires_grad_(id(p) not in frozen)
    return model


def merge_init(model, init_adapter: str):
    """``model`` with the trained weights of run ``init_adapter`` (folder or shipped name) in its own weights: a
    LoRA run's adapter merged in, or a full run's tensors copied — where full fine-tuning starts from a trained
    ERC model (e.g. the shipped MELD adapter before training on another corpus)."""
    run = resolve(init_adapter)
    return trained_weights(model, run, RunSpec.read(run).finetune)


def trainable_state(model, finetune: str) -> dict[str, torch.Tensor]:
    """The tensors training changes, by name (what a checkpoint holds)."""
    if finetune == "lora":
        return get_peft_model_state_dict(model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor], finetune: str, source: str) -> None:
    """Put a :func:`trainable_state` back (resume); ``source`` names the file for errors."""
    if finetune == "lora":
        set_peft_model_state_dict(model, state)
        return
    assign_full_weights(model, state, source)


def save_weights(model, finetune: str, folder: Path) -> None:
    """The trained weights into ``folder`` (an adapter folder being written atomically)."""
    if finetune == "lora":
        model.save_pretrained(folder)
        return
    save_file({n: t.float().contiguous() for n, t in trainable_state(model, finetune).items()},
              str(Path(folder) / FULL_WEIGHTS))
