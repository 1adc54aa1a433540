"""LoRA (or, with ``--finetune full``, full) fine-tuning of a small LLM on whole-dialogue transcripts, selected
on dev.

    accelerate launch --config_file configs/accelerate/cpu.yaml erc_llm/train.py --config configs/meld.yaml \
        --data-dir ../shared/data/meld --out runs/meld
    erc-llm train --config configs/meld.yaml --data-dir ../shared/data/meld       # same, one process
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 erc_llm/train.py --config ...   # 2 CPU processes (DDP)

Flow: config -> data (tokenized once, cached with `datasets`) -> backbone + LoRA -> loop (one forward
per dialogue, loss at the emotion slots only) -> dev selection -> run dir -> test evaluation.

Run directory: ``adapter/`` (best on dev: the LoRA adapter, or ``finetuned.safetensors``), the run spec (``erc_llm.run.RunSpec``: backbone, labels, prompt options),
``config.yaml``, ``prompts/``, ``log.jsonl`` (loss, dev metrics, tokens/s), ``best.json``,
``checkpoint/`` (adapter, optimizer, scheduler, RNG and data position; ``--resume true`` continues
from it), and ``eval/test_predicted``, ``eval/test_gold`` with the final test evaluation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python erc_llm/train.py` / `accelerate launch erc_llm/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import yaml

from erc_llm.averaging import WeightAverage
from erc_llm.checkpoint import append_log, load_checkpoint, save_checkpoint, truncate_log
from erc_llm.config import TrainConfig, build, to_dict
from erc_llm.data import LabelSet, label_counts, load_split
from erc_llm.data.schema import dialogues_digest
from erc_llm.io import atomic_dir, atomic_write_json, atomic_write_text, content_digest, mark_output, progress
from erc_llm.finetune import make_trainable, save_weights, training_precision
from erc_llm.lora import compute_context, enable_activation_checkpointing
from erc_llm.losses import SlotBank, class_weights, distillation_loss, label_loss, supervised_contrastive
from erc_llm.heads import first_token_ids, pack, packed_slot_outputs
from erc_llm.objective import batch_pieces, corrupt_history, long_dialogue_report
from erc_llm.projector import AudioModel
from erc_llm.prompting import PROMPTS_DIR, PromptBuilder, Templates
from erc_llm.run import RunSpec, fit_run, software_versions
from erc_llm.teacher import Teacher

log = logging.getLogger("erc_llm.train")
BANK_SLOTS = 1024  # contrastive term: how many earlier training slots each step is compared with


# ----------------------------------------------------------------------------------------- data

class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


def tokenized(builder: PromptBuilder, dialogues, source_digest: str, notes: dict | None = None):
    """Tokenized segments of every dialogue as a ``datasets.Dataset``, cached on disk by content."""
    import datasets

    from erc_llm.backbone import cache_root

    key = content_digest(
        "v3", source_digest, builder.templates.version, builder.max_utterance_tokens, builder.labels.labels, notes,
        builder.max_note_tokens, builder.audio_tokens, builder.templates.audio, builder.write_labels,
        builder.tokenizer.name_or_path, len(builder.tokenizer), builder.label_ids,
    )[:16]
    path = cache_root() / "tokenized" / key
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    ds = datasets.Dataset.from_list([builder.encode(d, (notes or {}).get(d.id)) for d in dialogues])
    with atomic_dir(path) as tmp:
        ds.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(path))


def epoch_order(n: int, seed: int, epoch: int, world: int, per_step: int, lengths: list[int] | None = None,
                joint: int = 0, fraction: float = 1.0) -> list[int]:
    """Deterministic shuffled order, cut to a whole number of optimizer steps over all processes. With
    ``lengths`` (curriculum ``short_first``), the first epoch's dialogues then go shortest first (the cut is
    still random; equal lengths keep their shuffled order). The last ``joint`` of the ``n`` dialogues are a
    joint corpus: a seeded draw of ``fraction`` of them joins the epoch, all the others always do."""
    members = np.arange(n - joint)
    if joint:
        drawn = np.random.default_rng([seed, epoch, 2]).permutation(joint)[: round(fraction * joint)]
        members = np.concatenate([members, n - joint + np.sort(drawn)])
    order = members[np.random.default_rng([seed, epoch]).permutation(len(members))]
    order = order[: len(order) - len(order) % (world * per_step)]
    if lengths is not None and epoch == 0:
        order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    return order.tolist()


# ------------------------------------------------------------------------------------ selection

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
    from erc_llm.decoding import make_tagger
    from erc_llm.metrics import compute_metrics

    with eval_mode(model, audio.projector if audio else None):
        # the decoder of `erc-llm evaluate` at its default --batch 8
        tagger = make_tagger(model, builder, history, 8, speakers, audio, lookahead)
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


def write_run_files(run: Path, cfg: TrainConfig, labels: LabelSet, templates: Templates, manifest: dict) -> None:
    from erc_llm.speakers import TEMPLATE_NAMES, copy_store, settings_of

    run.mkdir(parents=True, exist_ok=True)
    mark_output(run, "run")
    # a prompt folder may hold only header.txt and turn.txt: the speaker-note and audio templates it does not
    # define come from the packaged set, so the run folder still serves speaker notes or audio at inference
    support = [PROMPTS_DIR / f"{name}.txt" for name in (*TEMPLATE_NAMES, "audio")]
    with atomic_dir(run / "prompts") as tmp:
        for path in [*support, *sorted(prompts_dir(cfg).glob("*.txt"))]:
            shutil.copy(path, tmp / path.name)
    if cfg.speaker_store:
        copy_store(cfg.speaker_store, run / "speaker_store")
    atomic_write_text(run / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    RunSpec(
        model=cfg.model, labels=tuple(labels.labels), dataset=cfg.dataset, backbone=manifest,
        prompt_version=templates.version, max_tokens=cfg.max_tokens, max_utterance_tokens=cfg.max_utterance_tokens,
        context=cfg.context, label_history=cfg.label_history, lookahead=cfg.lookahead, speakers=settings_of(cfg), train_dtype=manifest.get("dtype"),
        finetune=cfg.finetune, software=software_versions(),
        audio={"source": cfg.audio_source, "dir": str(Path(cfg.audio_dir).resolve()), "k_tokens": cfg.audio_k_tokens,
               "normalize": cfg.audio_normalize}
        if cfg.audio_source != "none" else None,
    ).write(run)


def prompts_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.prompts) if cfg.prompts else PROMPTS_DIR


def audio_setup(cfg: TrainConfig, train_d, dev_d, model):
    """(AudioSpec, train inputs, dev inputs, projector) or Nones; normalisation is fitted on train only."""
    from erc_llm.audio import load_source
    from erc_llm.projector import AudioInputs, AudioProjector, embedding_rms, fit_spec

    if cfg.audio_source == "none":
        return None, None, None, None
    ids = {name: [u.utterance_id for d in ds for u in d.utterances] for name, ds in (("train", train_d), ("dev", dev_d))}
    who = {name: [u.speaker for d in ds for u in d.utterances] for name, ds in (("train", train_d), ("dev", dev_d))}
    table = load_source(cfg.audio_source, cfg.audio_dir, "train")
    spec = fit_spec(cfg.audio_source, cfg.audio_k_tokens, table, ids["train"], cfg.audio_normalize)
    train_in = AudioInputs(spec, table, ids["train"], who["train"])
    dev_in = AudioInputs(spec, load_source(cfg.audio_source, cfg.audio_dir, "dev"), ids["dev"], who["dev"])
    log.info("audio %s: %d features per utterance%s; no audio for %d of %d train and %d of %d dev utterances "
             "(they get the 'no audio' input); %s normalisation%s", cfg.audio_source, spec.feature_dim,
             " (frames)" if spec.frames else "", train_in.missing, len(ids["train"]), dev_in.missing, len(ids["dev"]),
             spec.normalize, f" ({train_in.speaker_normalized} train / {dev_in.speaker_normalized} dev speakers with "
             "their own statistics, the rest corpus)" if spec.normalize == "speaker" else "")
    projector = AudioProjector(spec.in_dim, model.config.hidden_size, spec.k_tokens, spec.frames,
                               target_rms=embedding_rms(model))
    return spec, train_in, dev_in, projector


def speaker_setup(cfg: TrainConfig, labels: LabelSet, train_d, dev_d, main: bool):
    """(training notes per dialogue id, a factory of fresh evaluation contexts) or (None, None)."""
    from erc_llm.speakers import open_context, settings_of, training_notes

    settings = settings_of(cfg)
    if settings is None:
        return None, None
    ctx = open_context(cfg.speaker_store, settings, prompts_dir(cfg), labels, seed=False)
    if main and cfg.speaker_bios:
        log.info("speaker memory: train %s (its own dialogue left out); dev %s",
                 ctx.coverage(train_d, leave_out=True), ctx.coverage(dev_d))
    notes = training_notes(ctx.store, ctx.templates, ctx.settings, train_d)
    return notes, lambda: open_context(cfg.speaker_store, settings, prompts_dir(cfg), labels, seed=True)


@dataclass
class Corpus:
    """One training corpus's label set as training scores it: the prompt builder whose header lists its labels,
    its class weights, and its columns among the label tokens scored at every slot."""

    builder: PromptBuilder
    weights: object  # torch.Tensor (K,) or None
    columns: slice


def joint_setup(cfg: TrainConfig, builder: PromptBuilder, label_tokens: list[int], data, main: bool):
    """With ``joint_dataset``: (the training data with the joint corpus's tokenized dialogues appended and a
    ``corpus`` column, its :class:`Corpus`, the label tokens of both corpora, the joint dialogue count);
    otherwise the inputs unchanged with no corpus and count 0."""
    import datasets

    if not cfg.joint_dataset:
        return data, None, label_tokens, 0
    joint_d, labels, report = load_split(cfg.joint_dataset, "train", cfg.joint_data_dir, None, cfg.on_bad_row)
    jb = PromptBuilder(builder.tokenizer, labels, builder.templates, cfg.max_tokens, cfg.max_utterance_tokens,
                       cfg.speaker_note_tokens, 0, cfg.label_history)
    tokens = first_token_ids(jb)
    counts = label_counts(joint_d)
    corpus = Corpus(jb, class_weights([counts.get(lab, 0) for lab in labels.labels], cfg.class_weights),
                    slice(len(label_tokens), len(label_tokens) + len(tokens)))
    joint = tokenized(jb, joint_d, dialogues_digest(joint_d))
    if main:
        log.info("joint corpus %s (%s): %s | label set %s; %d of its %d dialogues join each epoch", cfg.joint_dataset,
                 cfg.joint_data_dir, report.summary(), list(labels.labels), round(cfg.joint_fraction * len(joint)),
                 len(joint))
        log.info("joint corpus: %s", long_dialogue_report(jb, joint, cfg.lookahead))
    data = datasets.concatenate_datasets([data.add_column("corpus", [0] * len(data)),
                                          joint.add_column("corpus", [1] * len(joint))])
    return data, corpus, label_tokens + tokens, len(joint)


# ----------------------------------------------------------------------------------------- main

@dataclass
class Recipe:
    """What :func:`setup` builds and :func:`fit` runs: one typed bundle instead of loose locals."""

    cfg: TrainConfig
    accelerator: object
    run: Path
    model: object  # wrapped by accelerate (DDP) where there are several processes
    unwrapped: object
    optimizer: object
    scheduler: object
    params: list
    builder: PromptBuilder
    data: object  # tokenized training dialogues (datasets.Dataset)
    dev_d: list
    label_tokens: list  # first tokens of every corpus's labels, scored at each slot (Corpus.columns select)
    corpora: list  # Corpus per value of the data's corpus column: dataset's first, then the joint one
    prior: np.ndarray
    total: int
    state: dict
    projector: object = None  # as accelerate prepared it (the training forward); the unwrapped one is audio.projector
    train_audio: object = None
    audio: object = None  # AudioModel: the unwrapped projector and its feature spec (saved with the adapter)
    dev_audio: object = None  # AudioInputs of the dev split
    dev_speakers: object = None
    lengths: list | None = None  # transcript tokens per training dialogue, for curriculum short_first
    average: WeightAverage | None = None  # ema_decay > 0: the averaged weights that dev selects and saves
    soft_targets: list | None = None  # teacher: per training dialogue, its (turns, labels) probabilities
    joint: int = 0  # the last `joint` training dialogues are the joint corpus (joint_fraction of them per epoch)
    bank: SlotBank | None = None  # contrastive_weight > 0: slot representations of the last steps


def sharding_problem(distributed_type, zero_stage: int | None) -> str | None:
    """Why training cannot run under this accelerate setup (``accelerate.utils.DistributedType``), or None. Dev
    evaluation, saving the adapter and the weight average work on whole trained tensors in the main process, so
    setups that shard parameters across processes (DeepSpeed ZeRO-3, FSDP) would hang or save shards; the trained
    weights of a small backbone fit on every device anyway, so data parallelism (DDP, ZeRO-1/2) is what training
    supports."""
    from accelerate.utils import DistributedType

    fsdp = distributed_type == DistributedType.FSDP
    if fsdp or (distributed_type == DistributedType.DEEPSPEED and zero_stage == 3):
        what = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
        return (f"accelerate is configured for {what}, which shards parameters across processes; training keeps "
                f"whole trained tensors on every process. Use DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed "
                f"ZeRO-2 (configs/accelerate/zero2.yaml), or quant: 4bit (QLoRA) to fit a larger backbone")
    return None


def setup(cfg: TrainConfig) -> "Recipe":
    """Config -> data (tokenized, cached) -> backbone + LoRA (+ projector) -> optimizer, schedule, state (resumed
    from the checkpoint with ``--resume``) -> the run directory's spec files."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from erc_llm.backbone import load_for_training

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    plugin = accelerator.state.deepspeed_plugin
    problem = sharding_problem(accelerator.distributed_type, plugin.zero_stage if plugin else None)
    if problem:
        raise ValueError(problem)
    world, main = accelerator.num_processes, accelerator.is_main_process
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.seed)
    run = Path(cfg.out)

    # data
    train_d, labels, report = load_split(cfg.dataset, "train", cfg.data_dir, tuple(cfg.labels) or None, cfg.on_bad_row)
    dev_d, _, dev_report = load_split(cfg.dataset, "dev", cfg.data_dir, labels.labels, cfg.on_bad_row)
    if cfg.limit_train:
        train_d = train_d[: cfg.limit_train]
    if cfg.eval_dialogues:
        dev_d = dev_d[: cfg.eval_dialogues]
    if main:
        log.info("%s | %s | label set %s", report.summary(), dev_report.summary(), list(labels.labels))
    soft_targets = None
    if cfg.teacher:
        teacher = Teacher.load(cfg.teacher, labels)
        soft_targets = teacher.targets(train_d)
        if main:
            log.info("distilling from teacher %s (predictions.jsonl sha256 %s), teacher_weight %s", teacher.folder,
                     teacher.digest, cfg.teacher_weight)

    # model
    dtype, _ = training_precision(cfg)
    model, tok, manifest = load_for_training(cfg.model, dtype, cfg.quant)
    manifest = {**manifest, "dtype": dtype}
    if cfg.attention == "block":
        from erc_llm.attention import register

        model.set_attn_implementation(register())
    if main:
        log.info("training %s with %s backbone weights (dtype %s), %s attention", cfg.finetune, dtype, cfg.dtype,
                 cfg.attention)
    templates = Templates.load(prompts_dir(cfg), cfg.context)
    builder = PromptBuilder(tok, labels, templates, cfg.max_tokens, cfg.max_utterance_tokens, cfg.speaker_note_tokens,
                            cfg.audio_k_tokens if cfg.audio_source != "none" else 0, cfg.label_history)
    label_tokens = first_token_ids(builder)
    notes, dev_speakers = speaker_setup(cfg, labels, train_d, dev_d, main)
    if dev_speakers is not None:
        from erc_llm.speakers import dataset_order

        dev_d = dataset_order(dev_d)  # the cross-dialogue memory follows story order
    with accelerator.main_process_first():
        data = tokenized(builder, train_d, dialogues_digest(train_d), notes)
    if main:
        log.info(long_dialogue_report(builder, data, cfg.lookahead))
    counts = label_counts(train_d)
    weights = class_weights([counts.get(lab, 0) for lab in labels.labels], cfg.class_weights)
    prior = np.array([counts.get(lab, 0) for lab in labels.labels], dtype=np.float64)
    prior /= prior.sum()
    corpora = [Corpus(builder, weights, slice(0, len(label_tokens)))]
    with accelerator.main_process_first():  # the joint corpus's tokenized cache, written once as the main one's
        data, joint_corpus, label_tokens, joint = joint_setup(cfg, builder, label_tokens, data, main)
    if joint_corpus is not None:
        corpora.append(joint_corpus)
    spec, train_audio, dev_audio, projector = audio_setup(cfg, train_d, dev_d, model)
    model = make_trainable(model, cfg)
    if main and cfg.init_adapter and not cfg.resume:  # a resumed run's weights are in its checkpoint
        log.info("%s initialised with the trained weights of %s", "LoRA adapter" if cfg.finetune == "lora"
                 else "backbone", cfg.init_adapter)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params}]
    if projector is not None:
        groups.append({"params": list(projector.parameters()), "lr": cfg.audio_lr})
        params = params + groups[1]["params"]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay else None
    lengths = ([len(h) + sum(map(len, ts)) for h, ts in zip(data["header"], data["turns"])]
               if cfg.curriculum == "short_first" else None)
    per_epoch = len(epoch_order(len(data), cfg.seed, 0, world, cfg.batch_dialogues, joint=joint,
                                fraction=cfg.joint_fraction)) // (world * cfg.batch_dialogues)
    if per_epoch == 0:
        raise ValueError(f"{len(data)} training dialogues are fewer than one step needs "
                         f"({world} processes x batch_dialogues {cfg.batch_dialogues}); lower batch_dialogues")
    total = cfg.max_steps or math.ceil(per_epoch * cfg.epochs)
    scheduler = get_scheduler(cfg.lr_schedule, optimizer, int(cfg.warmup_ratio * total), total)
    if projector is not None:
        model, projector, optimizer = accelerator.prepare(model, projector, optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    audio = AudioModel(spec, accelerator.unwrap_model(projector)) if projector is not None else None

    bank = SlotBank(BANK_SLOTS) if cfg.contrastive_weight else None
    state = {"step": 0, "epoch": 0, "position": 0, "best": None, "tokens": 0, "labels_seen": 0, "train_seconds": 0.0}
    if cfg.resume:
        state = load_checkpoint(run, unwrapped, cfg.finetune, optimizer, scheduler, audio.projector if audio else None,
                                average, bank)
        if main:
            log.info("resumed from %s/checkpoint at step %d", run, state["step"])
            truncate_log(run, state["step"])
    elif main and cfg.overwrite and run.is_dir():
        log.warning("--overwrite: replacing the run in %s", run)
        shutil.rmtree(run)
    if main:
        write_run_files(run, cfg, labels, templates, manifest)
    return Recipe(cfg, accelerator, run, model, unwrapped, optimizer, scheduler, params, builder, data, dev_d,
                  label_tokens, corpora, prior, total, state, projector, train_audio, audio, dev_audio,
                  dev_speakers, lengths, average, soft_targets, joint, bank)


def fit(r: "Recipe") -> None:
    """The optimisation loop: steps, logging, dev selection every ``eval_every``, checkpoints every ``save_every``."""
    cfg, accelerator, run, model, unwrapped = r.cfg, r.accelerator, r.run, r.model, r.unwrapped
    optimizer, scheduler, params, builder, data, state = r.optimizer, r.scheduler, r.params, r.builder, r.data, r.state
    projector, train_audio = r.projector, r.train_audio
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    total, label_tokens = r.total, r.label_tokens
    weights_dtype, autocast = training_precision(cfg)
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
    from erc_llm.decoding import PackedTagger

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


def train(cfg: TrainConfig) -> dict:
    """setup -> fit (dev selection inside) -> summary and the test evaluation of the selected adapter."""
    r = setup(cfg)
    fit(r)
    run, state, accelerator, main = r.run, r.state, r.accelerator, r.accelerator.is_main_process
    result = {"best": state["best"], "steps": state["step"], "train_seconds": state["train_seconds"],
              "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
              "labels_per_second": state["labels_seen"] / max(state["train_seconds"], 1e-9)}
    if main:
        atomic_write_json(run / "train_summary.json", result)
    if main and (cfg.memory or cfg.fusion):
        result["stages"] = fit_stages(cfg, run)["steps"]
        atomic_write_json(run / "train_summary.json", result)
    accelerator.wait_for_everyone()
    if main and cfg.test_eval:
        result["test"] = test_evaluation(cfg, run)
        atomic_write_json(run / "train_summary.json", result)
    accelerator.end_training()
    return result


def fit_stages(cfg: TrainConfig, run: Path) -> dict:
    """The stages the config asks for (memory, fusion, calibration) for the selected adapter
    (:func:`erc_llm.run.fit_run`)."""
    import dataclasses

    from erc_llm.config import StageOptions

    opts = StageOptions(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(StageOptions)})
    # test is not read here: the test evaluation that follows reports every stage (metrics.json "stages")
    return fit_run(run, cfg.dataset, cfg.data_dir, cfg.labels, cfg.on_bad_row, opts, False, cfg.limit_train)


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
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def test_evaluation(cfg: TrainConfig, run: Path) -> dict:
    """The best adapter on the test split, with predicted history (the figure) and gold (diagnostic)."""
    from erc_llm.config import EvalConfig, eval_flags
    from erc_llm.evaluate import evaluate

    out = {}
    extra = eval_flags(cfg.labels, cfg.on_bad_row)  # so the recorded command reproduces this evaluation
    # a text-only history (label_history false) writes no labels: gold and predicted history are the same run
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    from erc_llm.config import add_arguments, from_args
    from erc_llm.errors import run_command

    parser = argparse.ArgumentParser(prog="erc_llm/train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TrainConfig)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    return run_command(lambda: _train_and_report(from_args(TrainConfig, args)), "train", args.debug)


def _train_and_report(cfg: TrainConfig) -> int:
    result = train(cfg)
    if result.get("best"):
        print(f"best dev weighted F1 {result['best']['dev_predicted']['weighted_f1']:.2f} at step {result['best']['step']}")
    if result.get("test"):
        t = result["test"]
        gold = f", {t['gold']['weighted_f1']:.2f} (gold history, diagnostic)" if "gold" in t else ""
        shown = t["predicted"].get("history", "predicted")  # what evaluation wrote: "none" for a text-only history
        print(f"test weighted F1 {t['predicted']['weighted_f1']:.2f} "
              f"({'no labels in the history' if shown == 'none' else shown + ' history'}){gold}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
