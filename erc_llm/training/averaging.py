"""An exponential moving average of the trained weights (Polyak averaging), for dev selection and saving.

With ``ema_decay`` d > 0, training keeps a float32 shadow copy of every trained tensor (the LoRA matrices, or
the transformer weights of a full fine-tune, and an audio projector's) and after each optimizer step moves it
towards the live weights: ``shadow = d_t * shadow + (1 - d_t) * weights`` with ``d_t = min(d, (1 + t) / (10 + t))``
at step t, the usual warm-up that keeps the first steps from being dominated by the starting weights. Dev
evaluation, the saved best adapter and so the test figure use the averaged weights; the optimizer keeps
training the live ones. The average over the last ~1 / (1 - d) steps is what a checkpoint of a noisy run
looks like with the step-to-step noise removed, which is what dev selection on a small dev split picks among.

The shadow is saved in the checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


class WeightAverage:
    """The moving average of ``params`` (the tensors the optimizer updates) at decay ``decay``."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay {decay} is outside (0, 1); use e.g. 0.9 (about the last 10 steps)")
        self.params = list(params)
        self.decay = decay
        self.steps = 0
        self.shadow = [p.detach().float().clone() for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the weights after an optimizer step."""
        self.steps += 1
        keep = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - keep)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the block; the live ones come back afterwards, also when the
        block raises."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.params, live):
                    p.copy_(w)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Restore a :meth:`state_dict` (resume); ``source`` names the file for errors."""
        shadow = state["shadow"]
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(s.shape) for s in shadow] != shapes:
            raise ValueError(f"{source}: the saved average holds {len(shadow)} tensors that do not match the "
                             f"{len(shapes)} trained tensors of this run; resume with the config the run was "
                             "started with (config.yaml in the run folder)")
        if state["decay"] != self.decay:
            raise ValueError(f"{source}: the run averaged with ema_decay {state['decay']}, this config has "
                             f"{self.decay}; resume with --ema-decay {state['decay']}")
        self.steps = int(state["steps"])
        self.shadow = [s.float().clone() for s in shadow]


def restore_average(average: WeightAverage | None, path: Path) -> None:
    """Resume ``average`` (None: the config has no ema_decay) from a checkpoint's ``path``; a run trained with an
    average cannot resume without one, nor the other way round."""
    if average is not None and not path.is_file():
        raise ValueError(f"{path.parent}: the run was trained without a weight average (no {path.name}); resume it "
                         "with --ema-decay 0 (its config.yaml), or start a new run with --ema-decay")
    if average is None and path.is_file():
        decay = torch.load(path, weights_only=True)["decay"]
        raise ValueError(f"{path.parent}: the run was trained with a weight average (ema_decay {decay}), this config "
                         f"has none; resume with --ema-decay {decay}")
    if average is not None:
        average.load_state_dict(torch.load(path, weights_only=True), str(path))
