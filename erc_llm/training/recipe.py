"""The training recipe's setup: config -> data (tokenized once, cached with ``datasets``) -> backbone + LoRA (+ an
audio projector) -> optimizer, schedule and state (resumed from the checkpoint with ``--resume``) -> the run
folder's spec files. :func:`setup` returns a :class:`Recipe`, the typed bundle :func:`erc_llm.training.loop.fit`
runs."""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType
from transformers import get_scheduler

from erc_llm.attention import register
from erc_llm.audio import load_source
from erc_llm.backbone import load_for_training
from erc_llm.config import TrainConfig
from erc_llm.data import LabelSet, label_counts, load_split
from erc_llm.data.schema import dialogues_digest
from erc_llm.heads import first_token_ids
from erc_llm.io import atomic_dir, atomic_write_text, cache_root, content_digest, mark_output
from erc_llm.options import ConfigError, to_dict
from erc_llm.projector import AudioInputs, AudioModel, AudioProjector, embedding_rms, fit_spec
from erc_llm.prompting import PROMPTS_DIR, PromptBuilder, Templates
from erc_llm.run import RunSpec, init_adapter_problems, software_versions
from erc_llm.speakers import TEMPLATE_NAMES, copy_store, dataset_order, open_context, settings_of, training_notes
from erc_llm.training.averaging import WeightAverage
from erc_llm.training.checkpoint import load_checkpoint, truncate_log
from erc_llm.training.finetune import make_trainable, training_precision
from erc_llm.training.lora import enable_activation_checkpointing
from erc_llm.training.losses import SlotBank, class_weights
from erc_llm.training.objective import long_dialogue_report
from erc_llm.training.teacher import Teacher

log = logging.getLogger("erc_llm.train")
BANK_SLOTS = 1024  # contrastive term: how many earlier training slots each step is compared with


def tokenized(builder: PromptBuilder, dialogues, source_digest: str, notes: dict | None = None):
    """Tokenized segments of every dialogue as a ``datasets.Dataset``, cached on disk by content."""
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


def write_run_files(run: Path, cfg: TrainConfig, labels: LabelSet, templates: Templates, manifest: dict) -> None:
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
    fsdp = distributed_type == DistributedType.FSDP
    if fsdp or (distributed_type == DistributedType.DEEPSPEED and zero_stage == 3):
        what = "FSDP" if fsdp else "DeepSpeed ZeRO-3"
        return (f"accelerate is configured for {what}, which shards parameters across processes; training keeps "
                f"whole trained tensors on every process. Use DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed "
                f"ZeRO-2 (configs/accelerate/zero2.yaml), or quant: 4bit (QLoRA) to fit a larger backbone")
    return None


def setup(cfg: TrainConfig) -> "Recipe":
    """Config -> data (tokenized, cached) -> backbone + LoRA (+ projector) -> optimizer, schedule, state (resumed
    from the checkpoint with ``--resume``) -> the run directory's spec files. The checks that read another run's
    files (``init_adapter``) come first, before any data or weights are loaded."""
    problems = init_adapter_problems(cfg) if cfg.init_adapter else []
    if problems:
        raise ConfigError(f"{len(problems)} config problem(s):\n  - " + "\n  - ".join(problems))
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
    dtype, _ = training_precision(cfg.precision())
    model, tok, manifest = load_for_training(cfg.model, dtype, cfg.quant)
    manifest = {**manifest, "dtype": dtype}
    if cfg.attention == "block":
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
    model = make_trainable(model, cfg.finetune, cfg.lora_options(), "" if cfg.resume else cfg.init_adapter)
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

