"""The training adapter: the cheaper LoRA dropout behaves as nn.Dropout, and the bf16 compute context trains the
same adapters as float32 (gradients within bf16 tolerance, adapter weights and their gradients kept float32)."""

import warnings

import pytest
import torch

from erc_llm.config import TrainConfig
from erc_llm.heads import first_token_ids, slot_logits
from erc_llm.prompting import PromptBuilder
from erc_llm.training.lora import LoraDropout, compute_context, enable_activation_checkpointing, wrap_lora
from erc_llm.training.losses import label_loss
from tests.conftest import LABELS, make_model, toy_dialogue


@pytest.mark.parametrize("p", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_rate_scale_and_gradient(p, dtype):
    torch.manual_seed(0)
    drop = LoraDropout(p).train()
    x = torch.ones(400_000, dtype=dtype, requires_grad=True)
    y = drop(x)
    assert y.dtype == dtype
    zeroed = (y == 0).float().mean().item()
    assert abs(zeroed - p) < 0.003  # Bernoulli(p) per element
    kept = y[y != 0].float()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-2, atol=0)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad.float(), y.detach().float())  # d(mask * x * s)/dx = mask * s


def test_dropout_is_identity_in_eval_and_repeats_under_a_seed():
    drop = LoraDropout(0.1)
    x = torch.randn(64, 32)
    assert drop.eval()(x) is x
    drop.train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    b = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, drop(x))
    with pytest.raises(ValueError, match="outside"):
        LoraDropout(1.0)


def test_wrap_lora_replaces_every_dropout(tiny_tokenizer):
    model = wrap_lora(make_model(len(tiny_tokenizer), "gemma3"), TrainConfig(data_dir=".", lora_r=4, lora_dropout=0.1).lora_options())
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert adapted and all(isinstance(m.lora_dropout["default"], LoraDropout) for m in adapted)
    assert all(m.lora_dropout["default"].p == 0.1 for m in adapted)


def _grads(model, tok, context):
    b = PromptBuilder(tok, LABELS)
    d = toy_dialogue(6)
    tr = b.build(d, [u.emotion for u in d.utterances])
    targets = torch.tensor([LABELS.index(u.emotion) for u in d.utterances])
    with context:
        logits = slot_logits(model, tr, first_token_ids(b))
    loss = label_loss(logits.float(), targets, None, 0.0)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_backbone_trains_adapters_as_float32_does(tiny_tokenizer):
    """A bfloat16 backbone under the compute context: loss and adapter gradients match the float32 backbone's
    within bf16 precision; the adapter weights and gradients stay float32; no float32 copies of inputs."""
    cfg = TrainConfig(data_dir=".", lora_r=4, lora_dropout=0.0).lora_options()
    ref = wrap_lora(make_model(len(tiny_tokenizer), "gemma3"), cfg).train()
    bf = wrap_lora(make_model(len(tiny_tokenizer), "gemma3").to(torch.bfloat16), cfg).train()
    for n, p in bf.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    bf.load_state_dict({k: v.to(bf.state_dict()[k].dtype) for k, v in ref.state_dict().items()})
    for module in bf.modules():  # LoRA B starts at zero; give it weights so gradients reach A too
        if hasattr(module, "lora_B") and len(module.lora_B):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    ref.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    seen = []
    first = next(m for m in bf.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    first.lora_A["default"].register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    ref_loss, ref_g = _grads(ref, tiny_tokenizer, compute_context(ref, torch.float32, "cpu"))
    loss, got = _grads(bf, tiny_tokenizer, compute_context(bf, torch.bfloat16, "cpu"))
    assert seen == [(torch.bfloat16, torch.bfloat16)]  # the adapter ran in bf16, on the uncast bf16 input
    assert ref_g.keys() == got.keys() and all("lora_" in n for n in got)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert all(p.dtype == torch.float32 for n, p in bf.named_parameters() if "lora_" in n)
    assert abs(loss - ref_loss) < 0.05 * abs(ref_loss)
    for n in ref_g:
        cos = torch.nn.functional.cosine_similarity(got[n].flatten(), ref_g[n].flatten(), dim=0)
        assert cos > 0.98, (n, float(cos))


def test_activation_checkpointing_gives_the_same_gradients(tiny_tokenizer):
    """Recomputing layers in the backward (dropout masks included: the RNG state is replayed) changes no gradient."""
    cfg = TrainConfig(data_dir=".", lora_r=4, lora_dropout=0.1).lora_options()
    results = []
    for checkpointing in (False, True):
        model = wrap_lora(make_model(len(tiny_tokenizer), "gemma3"), cfg).train()
        for module in model.modules():
            if hasattr(module, "lora_B") and len(module.lora_B):
                torch.manual_seed(1)
                torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # no deprecated entry point on any transformers
                enable_activation_checkpointing(model)
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        torch.manual_seed(7)
        results.append(_grads(model, tiny_tokenizer, compute_context(model, torch.float32, "cpu")))
    (ref_loss, ref), (loss, got) = results
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
