"""Selection and the final evaluation: dev metrics with the decoder of ``erc-llm evaluate`` (the best weights go
to ``run/adapter``), the stages the config asks for, and the test evaluation of the selected model."""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list

from erc_llm.config import EvalConfig, TrainConfig, eval_flags
from erc_llm.constants import DECODE_BATCH
from erc_llm.decoding import make_tagger
from erc_llm.evaluate import evaluate
from erc_llm.io import atomic_dir, atomic_write_json
from erc_llm.metrics import compute_metrics
from erc_llm.options import build
from erc_llm.prompting import PromptBuilder
from erc_llm.run import fit_run
from erc_llm.training.averaging import WeightAverage
from erc_llm.training.checkpoint import append_log
from erc_llm.training.finetune import save_weights

log = logging.getLogger("erc_llm.train")


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


@contextlib.contextmanager
def eval_mode(*modules):
    """Put ``modules`` (``None`` entries skipped) into eval mode for the block; each gets its previous mode back
    afterwards, also when the block raises."""
    modules = [m for m in modules if m is not None]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def dev_metrics(model, builder: PromptBuilder, dialogues, history: str, speakers=None, audio=None,
                lookahead: int = 0) -> dict:
    """Dev metrics; ``speakers`` = a fresh SpeakerContext (dialogues must then be in dataset order);
    ``audio`` = an AudioFeed of the dev split; ``lookahead`` > 0: a look-ahead model (whole-dialogue forwards)."""
    with eval_mode(model, audio.projector if audio else None):
        tagger = make_tagger(model, builder, history, DECODE_BATCH, speakers, audio, lookahead)  # as `erc-llm evaluate`
        predictions = (tagger.tag_many(dialogues) if hasattr(tagger, "tag_many")
                       else [tagger.tag(d) for d in dialogues])
    gold, pred = [], []
    for d, preds in zip(dialogues, predictions):
        for u, p in zip(d.utterances, preds):
            if u.emotion is not None:
                gold.append(u.emotion)
                pred.append(p.label)
    m = compute_metrics(gold, pred, builder.labels)
    return {k: m[k] for k in ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1")}


def evaluate_and_select(cfg, run, accelerator, model, builder, dev_d, state, speakers=None, audio=None,
                        dev_audio=None, average: WeightAverage | None = None) -> None:
    """Dev evaluation on the main process with predicted history; the best adapter (with ``audio``, the
    AudioModel, if any) goes to ``run/adapter``. ``dev_audio``: the dev split's AudioInputs; ``average``: the
    weights evaluated and saved are its averaged ones."""
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        raise TrainingDiverged(f"adapter weights became NaN/inf by step {state['step']}; nothing was saved from this "
                               f"step (the best adapter so far stays in {run}/adapter). Lower lr")
    if accelerator.is_main_process:
        t0 = time.time()
        with average.applied() if average is not None else contextlib.nullcontext():
            m = dev_metrics(model, builder, dev_d, "predicted", speakers() if speakers else None,
                            audio.feed(dev_audio) if audio else None, cfg.lookahead)
            seconds = time.time() - t0
            best = state["best"] is None or m["weighted_f1"] > state["best"]["dev_predicted"]["weighted_f1"]
            if best:
                with atomic_dir(run / "adapter") as tmp:
                    save_weights(model, cfg.finetune, tmp)
                    if audio:
                        audio.save(tmp)
        if best:
            state["best"] = {"step": state["step"], "dev_predicted": m}
            atomic_write_json(run / "best.json", state["best"])
        append_log(run, {"step": state["step"], "dev_predicted": m, "eval_seconds": seconds})
        log.info("step %d dev weighted F1 %.2f (best %.2f at step %d)", state["step"], m["weighted_f1"],
                 state["best"]["dev_predicted"]["weighted_f1"], state["best"]["step"])
    accelerator.wait_for_everyone()
    state["best"] = _broadcast(accelerator, state["best"])


def _broadcast(accelerator, obj):
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def fit_stages(cfg: TrainConfig, run: Path) -> dict:
    """The stages the config asks for (memory, fusion, calibration) for the selected adapter
    (:func:`erc_llm.run.fit_run`)."""
    # test is not read here: the test evaluation that follows reports every stage (metrics.json "stages")
    return fit_run(run, cfg.dataset, cfg.data_dir, cfg.labels, cfg.on_bad_row, cfg.stage_options(), False,
                   cfg.limit_train)


def test_evaluation(cfg: TrainConfig, run: Path) -> dict:
    """The best adapter on the test split, with predicted history (the figure) and gold (diagnostic)."""
    out = {}
    extra = eval_flags(cfg.labels, cfg.on_bad_row)  # so the recorded command reproduces this evaluation
    if cfg.test_gold and not cfg.label_history:  # said once, so test_gold is never a silent no-op
        log.info("test_gold: no gold-history evaluation: with no labels in the history it would be the same run "
                 "as eval/test_predicted")
    for history in ("predicted", "gold") if cfg.test_gold and cfg.label_history else ("predicted",):
        ecfg = build(EvalConfig, None, {
            "dataset": cfg.dataset, "split": "test", "data_dir": cfg.data_dir, "labels": cfg.labels, "run": str(run),
            "out": str(run / "eval" / f"test_{history}"), "history": history, "max_tokens": cfg.max_tokens,
            "max_utterance_tokens": cfg.max_utterance_tokens, "dtype": "float32", "threads": cfg.threads,
            "on_bad_row": cfg.on_bad_row})
        m = evaluate(ecfg, command=f"erc-llm evaluate --dataset {cfg.dataset} --split test --data-dir {cfg.data_dir} "
                                   f"--run {run} --history {history}{extra} --dtype float32 --out {ecfg.out}")
        out[history] = {k: m[k] for k in ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1", "history")}
    return out

