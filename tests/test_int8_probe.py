"""eval/int8_probe.py: which linear layers become dynamic int8, and that the float32 model stays as it was."""

import torch

from eval import int8_probe
from tests.conftest import make_model


def _linear_kinds(model) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) or "Quantized" in type(m).__name__}


def test_only_the_named_layers_become_int8_and_the_original_is_untouched(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer), "llama").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = int8_probe.quantized(model, ("mlp",), "per channel")
    kinds = _linear_kinds(q)
    assert all(k == "DynamicQuantizedLinear" for n, k in kinds.items() if "self_attn" in n)
    assert all(k == "Linear" for n, k in kinds.items() if ".mlp." in n)
    assert kinds["lm_head"] == "Linear"  # the label head reads its float32 rows
    assert set(_linear_kinds(model).values()) == {"Linear"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    with torch.no_grad():
        ref, got = model(ids).logits, q(ids).logits
    assert not torch.equal(ref, got)  # the int8 layers are the ones that run
    assert torch.allclose(ref, got, atol=0.1 * ref.abs().max().item())
