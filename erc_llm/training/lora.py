"""The LoRA adapter as training uses it: wrapping the backbone (peft), starting from a trained run's adapter
(``init_adapter``), a cheaper dropout, the precision its matmuls run in, and activation checkpointing
(:func:`enable_activation_checkpointing`, under either of transformers' names for it).

Two measured costs of peft's defaults on a CPU, removed here without changing what is computed:

* **Dropout masks.** peft gives every adapted module its own ``nn.Dropout`` on the module's input; on CPU
  ``bernoulli_`` draws each mask element by element (~10% of a Gemma 3 270M training step with 126 adapted
  modules). :class:`LoraDropout` draws the same Bernoulli(1 - p) keep-mask four elements per 64-bit draw of
  the global generator (seeded runs and resumes stay reproducible) and keeps a 1-byte mask for the backward
  instead of a full-width copy.
* **Casts.** Over a bfloat16 backbone, peft casts each module's input to float32 (the adapter weights' dtype),
  runs the adapter in float32 and casts the sum back: three full-width copies per module.
  :func:`compute_context` runs the step under bf16 autocast instead (the usual mixed-precision recipe: adapter
  weights, their gradients and the optimizer state stay float32; the matmuls read bf16 copies of them).
"""

from __future__ import annotations

import contextlib

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from peft.helpers import disable_input_dtype_casting
from safetensors.torch import load_file
from torch import nn

from erc_llm.config import LoraOptions
from erc_llm.run import resolve


class _KeepScaled(torch.autograd.Function):
    """``x * keep * scale``; saves only the boolean mask (1 byte an element) for the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep).mul_(ctx.scale), None, None


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # the mask through uint8: a vectorised conversion (bool -> float is an element-by-element loop on CPU);
    # the scale is applied apart, by a float scalar, so a bf16 input is not scaled by a rounded bf16 factor
    return x * keep.view(torch.uint8).to(x.dtype)


class LoraDropout(nn.Module):
    """Inverted dropout, as ``nn.Dropout(p)``: in training each element is zeroed with probability ``p`` (rounded
    to a multiple of 2^-16) and the others scaled by ``1 / (1 - p)``; identity in eval mode.

    The keep-mask comes from 16-bit slices of 64-bit draws of the global torch generator (four mask elements
    a draw instead of one ``bernoulli_`` sample each), so seeded runs and resumed runs repeat exactly.
    """

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} is outside [0, 1)")
        self.p = p
        self.threshold = round(p * 65536)  # drop where the 16-bit draw (as unsigned) is below this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2**63, 2**63 - 1)
        bits = draws.view(torch.int16)[:n].view(x.shape)  # uniform over [-32768, 32767]
        keep = bits >= self.threshold - 32768
        return _KeepScaled.apply(x, keep, 65536 / (65536 - self.threshold))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def wrap_lora(model, opts: LoraOptions):
    """``model`` with LoRA adapters of shape ``opts``; 4-bit (QLoRA) backbones are prepared for k-bit training
    first. Dropout modules are :class:`LoraDropout`."""
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = "all-linear" if opts.targets == ("all-linear",) else list(opts.targets)
    lora = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout, target_modules=targets,
                      layers_to_transform=list(opts.layers) or None, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if opts.dropout > 0:
        for module in model.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict):
                for name in list(drops):
                    drops[name] = LoraDropout(opts.dropout)
    return model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward instead of keeping its activations (non-reentrant, so frozen
    inputs and LoRA dropout replay correctly). transformers 5.24 renamed ``gradient_checkpointing_enable`` to
    ``activation_checkpointing_enable`` (the old name warns and goes in v6); both are served."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_init(model, init_adapter: str) -> None:
    """Copy the LoRA weights of a trained run (``init_adapter``: folder or shipped name) into the freshly wrapped
    ``model``; every adapted module must receive weights and every saved tensor must find its module."""
    folder = resolve(init_adapter) / "adapter"
    result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"init_adapter: {folder} does not fit this model's adapters ({len(missing)} adapted tensors "
                         f"without saved weights, e.g. {missing[:2]}; {len(result.unexpected_keys)} saved tensors "
                         f"without a module, e.g. {result.unexpected_keys[:2]}); it was trained with other "
                         "lora_targets or another backbone: match its adapter_config.json")


def compute_context(model, backbone_dtype: torch.dtype, device_type: str, autocast: bool = False):
    """The context a training forward runs in: bf16 autocast without peft's float32 input casts where the
    backbone is bfloat16 (or ``autocast`` is asked for over a float32 backbone); nothing otherwise."""
    if backbone_dtype != torch.bfloat16 and not autocast:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
    stack.enter_context(disable_input_dtype_casting(model))
    return stack
