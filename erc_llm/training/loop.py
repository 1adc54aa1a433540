"""The optimisation loop: one forward per packed group of dialogue pieces, the loss at the emotion slots only
(cross-entropy, a teacher's soft targets, a contrastive term), the written history (gold with noise, or the
model's own labels decoded as at test time), logging, dev selection every ``eval_every`` steps and a resumable
checkpoint every ``save_every``."""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from erc_llm.decoding import PackedTagger
from erc_llm.heads import pack, packed_slot_outputs
from erc_llm.io import progress
from erc_llm.training.checkpoint import append_log, save_checkpoint
from erc_llm.training.finetune import training_precision
from erc_llm.training.lora import compute_context
from erc_llm.training.losses import distillation_loss, label_loss, supervised_contrastive
from erc_llm.training.objective import batch_pieces, corrupt_history
from erc_llm.training.recipe import Recipe, epoch_order
from erc_llm.training.select import TrainingDiverged, eval_mode, evaluate_and_select


def fit(r: "Recipe") -> None:
    """The optimisation loop: steps, logging, dev selection every ``eval_every``, checkpoints every ``save_every``."""
    cfg, accelerator, run, model, unwrapped = r.cfg, r.accelerator, r.run, r.model, r.unwrapped
    optimizer, scheduler, params, builder, data, state = r.optimizer, r.scheduler, r.params, r.builder, r.data, r.state
    projector, train_audio = r.projector, r.train_audio
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    total, label_tokens = r.total, r.label_tokens
    weights_dtype, autocast = training_precision(cfg.precision())
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[weights_dtype]
    bar = progress(total=total, initial=state["step"], desc="train", unit="step", disable=not main)
    model.train()
    if projector is not None:
        projector.train()
    while state["step"] < total:
        order = epoch_order(len(data), cfg.seed, state["epoch"], world, cfg.batch_dialogues, r.lengths, r.joint,
                            cfg.joint_fraction)[rank::world]
        if state["position"] >= len(order):
            state["epoch"] += 1
            state["position"] = 0
            continue
        batch = order[state["position"]: state["position"] + cfg.batch_dialogues]
        t_step = time.time()
        step_loss, step_tokens, step_labels = 0.0, 0, 0
        rows = [data[idx] for idx in batch]
        written = history_labels(r, batch, rows)
        owner, pieces, shares = zip(*step_pieces(r, rows, written))
        step_targets = [torch.tensor(p.targets(rows[o]["labels"])) for o, p in zip(owner, pieces)]
        labelled = sum(int((t >= 0).sum()) for t in step_targets)
        packs = pack([len(p.transcript.input_ids) for p in pieces], cfg.pack_tokens)
        for i, group in enumerate(packs):
            sync = contextlib.nullcontext() if i == len(packs) - 1 else accelerator.no_sync(model)
            with sync:
                with compute_context(unwrapped, dtype, accelerator.device.type, autocast):
                    soft = (train_audio.soft_tokens(projector, [rows[owner[j]]["utterance_ids"][t] for j in group
                                                                for t in pieces[j].transcript.turn_index])
                            if projector is not None else None)
                    out = packed_slot_outputs(model, [pieces[j].transcript for j in group], label_tokens, soft,
                                              cfg.lookahead, states=r.bank is not None)
                loss = out.logits[0].sum() * 0.0  # a graph tensor even if no turn of the group carries a label
                if r.bank is not None:
                    loss = loss + contrastive_term(r, out.states, [step_targets[j] for j in group],
                                                   [rows[owner[j]].get("corpus", 0) for j in group], labelled)
                for j, lg in zip(group, out.logits):
                    corpus = r.corpora[rows[owner[j]].get("corpus", 0)]
                    targets = step_targets[j].to(accelerator.device)
                    keep = targets >= 0
                    if keep.any():
                        loss = loss + piece_loss(r, lg[:, corpus.columns], targets, keep, batch[owner[j]], pieces[j],
                                                 corpus.weights) * shares[j] / len(batch)
                    step_tokens += len(pieces[j].transcript.input_ids)
                    step_labels += int(keep.sum())
                accelerator.backward(loss)
            step_loss += loss.item()
        if not math.isfinite(step_loss):
            raise TrainingDiverged(
                f"training loss is {step_loss} at step {state['step'] + 1} (lr {scheduler.get_last_lr()[0]:.3g}); "
                f"stopped before the weights were updated. The best adapter so far stays in {run}/adapter "
                f"({'none yet' if state['best'] is None else 'step ' + str(state['best']['step'])}). Lower lr or "
                "max_grad_norm and start again")
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        if norm is not None and not math.isfinite(float(norm)):
            raise TrainingDiverged(f"gradient norm is {float(norm)} at step {state['step'] + 1}; stopped before the "
                                   f"weights were updated (the best adapter so far stays in {run}/adapter). Lower lr")
        optimizer.step()
        scheduler.step()
        if r.average is not None:
            r.average.update()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["position"] += len(batch)
        state["tokens"] += step_tokens * world
        state["labels_seen"] += step_labels * world
        state["train_seconds"] += time.time() - t_step  # optimisation only; dev evaluation is timed apart
        tps = state["tokens"] / max(state["train_seconds"], 1e-9)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tps:.0f}", epoch=state["epoch"])
        bar.update(1)
        if main:
            row = {"step": state["step"], "epoch": state["epoch"], "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_second": tps,
                   "labels_per_second": state["labels_seen"] / max(state["train_seconds"], 1e-9)}
            if cfg.label_history:  # how often the labels written into this step's transcripts were right
                pairs = [(w, g) for row_, ws in zip(rows, written) for w, g in zip(ws, row_["labels"]) if g >= 0]
                row["history_agreement"] = sum(w == g for w, g in pairs) / max(len(pairs), 1)
            append_log(run, row)
        if state["step"] % cfg.eval_every == 0 or state["step"] == total:
            evaluate_and_select(cfg, run, accelerator, unwrapped, builder, r.dev_d, state, r.dev_speakers,
                                r.audio, r.dev_audio, r.average)
        if state["step"] % cfg.save_every == 0 or state["step"] == total:
            if main:
                save_checkpoint(run, unwrapped, cfg.finetune, optimizer, scheduler, state,
                                r.audio.projector if r.audio else None, r.average, r.bank)
            accelerator.wait_for_everyone()
    bar.close()


def piece_loss(r: "Recipe", logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor, dialogue: int,
               piece, weights) -> torch.Tensor:
    """The loss at a piece's labelled slots (``keep``; ``logits`` over its corpus's labels, ``weights`` that
    corpus's class weights): cross-entropy against the gold labels, or with a teacher the distillation mix
    against its probabilities for that training ``dialogue``'s turns."""
    cfg = r.cfg
    if r.soft_targets is None:
        return label_loss(logits[keep], targets[keep], weights, cfg.focal_gamma, cfg.label_smoothing)
    soft = torch.from_numpy(r.soft_targets[dialogue][piece.transcript.turn_index]).to(logits.device)
    return distillation_loss(logits[keep], targets[keep], soft[keep], cfg.teacher_weight, weights, cfg.focal_gamma,
                             cfg.label_smoothing)


def contrastive_term(r: "Recipe", states: list[torch.Tensor], targets: list[torch.Tensor], corpora: list[int],
                     labelled: int) -> torch.Tensor:
    """``contrastive_weight`` times the supervised contrastive loss of a packed group's labelled slots against
    each other and the bank of earlier steps' slots, weighted by the group's share of the step's labelled slots
    (as the label loss is); the group's slots then join the bank. Labels of a joint corpus are kept apart
    from the dataset's (a label index is only meaningful within its corpus)."""
    cfg = r.cfg
    keep = [t >= 0 for t in targets]
    z = torch.cat([s[k.to(s.device)] for s, k in zip(states, keep)])
    labels = torch.cat([t[k] + c * len(r.label_tokens) for t, k, c in zip(targets, keep, corpora)])
    if not len(labels):
        return z.sum() * 0.0
    bank_z, bank_labels = r.bank.view(z.shape[-1])
    loss = supervised_contrastive(z, labels.to(z.device), bank_z, bank_labels, cfg.contrastive_temperature)
    r.bank.push(z, labels)
    return cfg.contrastive_weight * loss * len(labels) / max(labelled, 1)


def step_pieces(r: "Recipe", rows: list[dict], written: list[list[int]]):
    """:func:`batch_pieces` of a step's ``rows``, each cut and weighted by its own corpus's builder and class
    weights: (row index, piece, share of that row's loss)."""
    out = []
    for k, (row, w) in enumerate(zip(rows, written)):
        corpus = r.corpora[row.get("corpus", 0)]
        out.extend((k, p, share) for _, p, share in batch_pieces(corpus.builder, [row], [w], corpus.weights,
                                                                 r.cfg.lookahead))
    return out


def history_labels(r: "Recipe", batch: list[int], rows: list[dict]) -> list[list[int]]:
    """The labels written into the transcripts of training dialogues ``batch`` (``rows``, their tokenized
    forms): for each, with probability ``on_policy`` the model's own, decoded turn by turn with the current
    weights as at test time (the step's dialogues packed into one forward per turn step, audio soft tokens
    included); otherwise gold corrupted at ``history_noise``. Both draws are seeded by (seed, epoch, dialogue),
    so a resumed run repeats them."""
    cfg, epoch = r.cfg, r.state["epoch"]
    if not cfg.label_history:
        return [row["labels"] for row in rows]  # not written: the transcripts carry no labels
    own = [bool(cfg.on_policy) and np.random.default_rng([cfg.seed, epoch, idx, 1]).random() < cfg.on_policy
           for idx in batch]
    written = [None if o else corrupt_history(row["labels"], cfg.history_noise, r.prior,
                                              np.random.default_rng([cfg.seed, epoch, idx]))
               for o, idx, row in zip(own, batch, rows)]
    todo = [k for k, o in enumerate(own) if o]
    if not todo:
        return written
    model, projector = r.unwrapped, r.audio.projector if r.audio else None
    soft = ((lambda k, t: r.train_audio.soft_tokens(projector, [rows[todo[k]]["utterance_ids"][t]]))
            if projector is not None else None)
    with eval_mode(model, projector), torch.inference_mode():
        decoded = PackedTagger(model, r.builder, batch=len(todo)).rollout_many(
            [(rows[k]["header"], rows[k]["turns"]) for k in todo], soft)
    for k, labels in zip(todo, decoded):
        written[k] = labels
    return written

