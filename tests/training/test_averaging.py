"""The moving average of trained weights: the update rule, swapping it in and out, and restoring it."""

import pytest
import torch

from erc_llm.training.averaging import WeightAverage


def test_average_follows_the_warmed_up_decay():
    w = torch.nn.Parameter(torch.zeros(3))
    avg = WeightAverage([w], decay=0.3)
    expected = torch.zeros(3)
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            w.fill_(value)
        avg.update()
        keep = min(0.3, (1 + step) / (10 + step))  # 2/11, 3/12, then capped at 0.3
        expected = keep * expected + (1 - keep) * value
        assert torch.allclose(avg.shadow[0], expected), step
    assert avg.current_decay() == 0.3


def test_bf16_weights_are_averaged_in_float32():
    """A bf16 weight cannot hold the small moves an average makes; the shadow is float32."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    avg = WeightAverage([w], decay=0.999)
    avg.steps = 10_000  # past the warm-up
    with torch.no_grad():
        w.fill_(1.0078125)  # the next bf16 value above 1
    avg.update()
    assert avg.shadow[0].dtype == torch.float32
    assert torch.allclose(avg.shadow[0], torch.full((4,), 1 + 0.001 * 0.0078125))


def test_applied_swaps_the_average_in_and_the_live_weights_back_also_on_error():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    avg = WeightAverage([w], decay=0.9)
    with torch.no_grad():
        w.copy_(torch.tensor([5.0, 6.0]))
    with avg.applied():
        assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    assert torch.equal(w.detach(), torch.tensor([5.0, 6.0]))
    with pytest.raises(RuntimeError, match="dev failed"), avg.applied():
        raise RuntimeError("dev failed")
    assert torch.equal(w.detach(), torch.tensor([5.0, 6.0]))


def test_state_round_trips_and_a_foreign_state_is_refused():
    w = torch.nn.Parameter(torch.randn(2, 3))
    avg = WeightAverage([w], decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            w.add_(1.0)
        avg.update()
    other = WeightAverage([torch.nn.Parameter(torch.zeros(2, 3))], decay=0.9)
    other.load_state_dict(avg.state_dict(), "average.pt")
    assert other.steps == 3 and torch.equal(other.shadow[0], avg.shadow[0])
    with pytest.raises(ValueError, match=r"average.pt: the saved average holds 1 tensors that do not match the 2"):
        WeightAverage([w, torch.nn.Parameter(torch.zeros(1))], 0.9).load_state_dict(avg.state_dict(), "average.pt")
    with pytest.raises(ValueError, match=r"averaged with ema_decay 0.9, this config has 0.99; resume with --ema-decay 0.9"):
        WeightAverage([w], 0.99).load_state_dict(avg.state_dict(), "average.pt")
    with pytest.raises(ValueError, match=r"ema decay 1.0 is outside \(0, 1\)"):
        WeightAverage([w], 1.0)
