"""One typed configuration schema. YAML files in ``configs/`` are instances of it; the CLI is
generated from it; unknown keys are errors; validation reports every problem at once (the machinery for all
three is ``erc_llm.options``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from erc_llm.constants import (
    CHECKPOINT_DIR,
    DATASETS,
    DECODE_BATCH,
    DEFAULT_MODEL,
    FINETUNE_MODES,
    HISTORY_MODES,
    has_checkpoint,
)
from erc_llm.data.schema import BAD_ROW_MODES
from erc_llm.io import OutputError, claim_output
from erc_llm.options import choice_problems
from erc_llm.options import option as _f  # every field below: default, help text, choices, bounds

_STATS_HELP = ("online (the speaker's turns so far, as in a live session) or split (OFFLINE: each speaker's "
               "statistics over the whole split, later turns included)")


@dataclass
class SpeakerOptions:
    """Speaker memory in the prompt (``erc_llm/speakers.py``); shared by training and evaluation."""

    speaker_store: str = _f("", "speaker store folder from `erc-llm speakers build` (empty = no speaker notes; "
                            "evaluation of a run uses the run's own copy)")
    speaker_bios: bool = _f(False, "note each speaker's biography (or, if unseen, the nearest stored speakers) "
                            "before their first turn")
    speaker_history: int = _f(0, "also note each speaker's last N emotions from earlier dialogues (0 = off); "
                              "evaluation feeds back only predicted labels", ge=0)
    speaker_top_k: int = _f(2, "stored speakers retrieved for an unseen speaker", ge=1)
    speaker_note_tokens: int = _f(64, "longest speaker note in tokens; longer ones are cut", ge=8)

    def speaker_problems(self, run: str = "") -> list[str]:
        p = []
        wanted = self.speaker_bios or self.speaker_history > 0
        if self.speaker_store and not (Path(self.speaker_store) / "manifest.json").is_file():
            p.append(f"speaker_store: {self.speaker_store!r} has no manifest.json; build one with "
                     "`erc-llm speakers build --dataset ... --split train --out DIR`")
        if wanted and not self.speaker_store and not run:
            p.append("speaker_bios/speaker_history: need speaker_store (a folder from `erc-llm speakers build`)")
        if self.speaker_store and not wanted:
            p.append("speaker_store: given but speaker_bios is false and speaker_history is 0; turn one on")
        return p


AUDIO_SOURCES = ("none", "meld_prosody", "csv", "npy")


@dataclass
class AudioOptions:
    """Audio features projected into the LLM as soft tokens (``erc_llm/projector.py``)."""

    audio_source: str = _f("none", "audio features per utterance: none, meld_prosody (meld_{split}_prosody.csv), "
                           "csv ({split}.csv or features.csv from `erc-llm audio extract`), npy (<utterance_id>.npy "
                           "files, utterance- or frame-level)", AUDIO_SOURCES)
    audio_dir: str = _f("", "folder of the audio features (evaluation of a run defaults to the run's)")
    audio_k_tokens: int = _f(1, "soft tokens per turn", ge=1)
    audio_lr: float = _f(1e-3, "learning rate of the projector (trained from scratch, with the LoRA)", gt=0)
    audio_normalize: str = _f("corpus", "feature standardisation: corpus (training mean/std) or speaker (each "
                              "speaker's own statistics over the split's features, no labels; a live session "
                              "uses the speaker's turns heard so far)", ("corpus", "speaker"))

    def audio_problems(self) -> list[str]:
        p = []
        if self.audio_source != "none" and not (self.audio_dir and Path(self.audio_dir).is_dir()):
            p.append(f"audio_dir: {self.audio_dir!r} is not a directory (needed for audio_source: {self.audio_source})")
        return p


@dataclass
class StageOptions:
    """Stages fitted after the adapter is selected, settings chosen on dev (``erc_llm/stages.py``); they need an
    online run without speaker notes or audio soft tokens (the fusion classifier hears the audio instead)."""

    memory: bool = _f(False, "nearest-neighbour memory: the final hidden states at the training turns' slots with "
                      "their gold labels, mixed with the adapter's distribution (k, temperature and weight chosen on dev)")
    memory_codec: str = _f("fp16", "how the memory stores slot states: fp16 (2 bytes per value) or pq (product "
                           "quantisation, ~20x smaller, for a shipped model)", ("fp16", "pq"))
    fusion: bool = _f(False, "late fusion with a classical classifier (logistic regression) over the utterance's "
                      "sentence embedding, its audio features and the voice of earlier turns; weight chosen on dev")
    fusion_audio_source: str = _f("none", "audio features the classifier hears: none (text only), meld_prosody, "
                                  "csv or npy (as audio_source)", ("none", "meld_prosody", "csv", "npy"))
    fusion_audio_dir: str = _f("", "folder of those features for every split")
    fusion_audio_context: int = _f(3, "the classifier also hears the speaker's previous K turns (mean) and the other "
                                   "speaker's last one, earlier turns only (0 = the utterance alone)", ge=0)
    fusion_text_encoder: str = _f("all-MiniLM-L6-v2", "sentence-transformers model for the classifier's text input "
                                  "(all-MiniLM-L6-v2 = the packaged one; a local dir or hub id; empty = audio only)")
    calibrate: bool = _f(True, "with memory or fusion on: a probability temperature chosen on dev (NLL) is applied "
                         "to the final distribution")
    stage_stats: str = _f("online", "the fusion classifier's per-speaker audio statistics, in fitting and by default "
                          f"in evaluation: {_STATS_HELP}; for comparison with offline methods", ("online", "split"))

    def stage_problems(self) -> list[str]:
        p = []
        if not (self.memory or self.fusion):
            changed = [n for n, v, d in (("memory_codec", self.memory_codec, "fp16"),
                                         ("fusion_audio_source", self.fusion_audio_source, "none"),
                                         ("fusion_audio_dir", self.fusion_audio_dir, "")) if v != d]
            return [f"{n}: set, but memory and fusion are off; turn one on or leave {n} out" for n in changed]
        if self.fusion and self.fusion_audio_source == "none" and not self.fusion_text_encoder:
            p.append("fusion: the classifier needs an input; set fusion_audio_source or fusion_text_encoder")
        if self.fusion_audio_source != "none" and not Path(self.fusion_audio_dir).is_dir():
            p.append(f"fusion_audio_dir: {self.fusion_audio_dir!r} is not a folder (needed for fusion_audio_source: "
                     f"{self.fusion_audio_source})")
        if self.fusion_audio_source != "none" and not self.fusion:
            p.append("fusion_audio_source: set, but fusion is off; set fusion: true")
        return p


@dataclass
class StagesConfig(StageOptions):
    """Fit the stages of an existing run (``erc-llm stages``): what ``train.py`` does after selecting the adapter."""

    run: str = _f("", "the run folder to fit the stages for (written by erc_llm/train.py or erc-llm export); its "
                  "stages/, stages.json and run.json are replaced")
    dataset: str = _f("meld", "dataset format", DATASETS)
    data_dir: str = _f("", "folder with the train, dev (and test) splits the run was trained on")
    labels: list = _f([], "label set for the jsonl format (default: inferred from train)")
    on_bad_row: str = _f("error", "a row the loader cannot use: error = stop and list every one; skip = leave it out "
                         "and count it", BAD_ROW_MODES)
    test: bool = _f(True, "also report every stage on test (settings are chosen on dev only)")
    threads: int = _f(0, "torch CPU threads (0 = all cores)", ge=0)

    def problems(self) -> list[str]:
        p = _common_problems(self)
        if not self.run or not (Path(self.run) / "run.json").is_file():
            p.append(f"run: {self.run!r} holds no run.json; expected a run folder (to fit the shipped model's stages, "
                     "export it first: erc-llm export --run meld-gemma3-270m --out DIR)")
        if not (self.memory or self.fusion):
            p.append("memory/fusion: both off; turn on at least one stage")
        return p + self.stage_problems()


@dataclass
class EvalConfig(SpeakerOptions):
    """Batch evaluation of a dialogue set with the constrained decoder."""

    dataset: str = _f("meld", "dataset format", DATASETS)
    split: str = _f("test", "split to evaluate", ("train", "dev", "test"))
    data_dir: str = _f("", "folder with the dataset files (MELD csvs, IEMOCAP_full_release, or {split}.jsonl)")
    labels: list = _f([], "label set for the jsonl format (default: inferred from train and printed)")
    on_bad_row: str = _f("error", "a row the loader cannot use (empty text, unknown label, wrong type): error = stop "
                         "and list every one; skip = leave it out and count it in the load report and metrics.json",
                         BAD_ROW_MODES)
    model: str = _f(DEFAULT_MODEL, "backbone of --zero-shot: a packaged name, a local Hugging Face dir, or a hub id")
    run: str = _f("", "trained run folder or shipped model name (empty = the shipped model, "
                  "meld-gemma3-270m)")
    zero_shot: bool = _f(False, "evaluate the bare backbone (--model) without any adapter")
    processes: int = _f(1, "processes to shard the dialogues over (torchrun; one predictions.jsonl and "
                        "metrics.json, as from one process)", ge=1)
    out: str = _f("eval/out", "output directory for metrics.json, predictions.jsonl, confusion.png, report.md")
    history: str = _f("predicted", "labels written for earlier turns: the model's own ('predicted') or "
                      "'gold' (diagnostic only: leaks gold labels of earlier turns)", HISTORY_MODES)
    max_tokens: int = _f(0, "token budget of a transcript; oldest turns are dropped beyond it (0 = the run's; "
                         "2048 zero-shot)", ge=0)
    max_utterance_tokens: int = _f(0, "longest utterance text in tokens; longer ones are cut (0 = the run's; 96 "
                                   "zero-shot)", ge=0)
    limit: int = _f(0, "evaluate only the first N dialogues (0 = all)", ge=0)
    batch: int = _f(DECODE_BATCH, "dialogues in flight: each step scores the next turn of each in one packed "
                    "forward, and a finished dialogue's place goes to the next one (1 = one at a time; runs with "
                    "speaker memory decode one at a time)", ge=1)
    dtype: str = _f("auto", "compute dtype: auto = bfloat16 where the CPU (AMX / avx512_bf16) or GPU has native bf16 "
                    "matmuls (about 2x faster), else float32; recorded in metrics.json", ("auto", "float32", "bfloat16"))
    threads: int = _f(0, "torch CPU threads (0 = all cores)", ge=0)
    prompts: str = _f("", "folder with prompt templates (default: the packaged prompts/)")
    audio_dir: str = _f("", "audio feature folder of this split for a run trained with audio or with a fusion stage "
                        "(default: the run's)")
    stages: bool = _f(True, "apply the run's stages (memory, fusion, calibration) where it has them; false = the "
                      "adapter alone")
    stage_stats: str = _f("", f"the fusion classifier's per-speaker audio statistics: {_STATS_HELP}; empty = what "
                          "the run's stages were fitted with", ("", "online", "split"))

    def problems(self) -> list[str]:
        p = _common_problems(self)
        if self.audio_dir and not Path(self.audio_dir).is_dir():
            p.append(f"audio_dir: {self.audio_dir!r} is not a directory")
        if self.run and self.zero_shot:
            p.append("run/zero_shot: choose one (a trained model, or the bare backbone)")
        if self.run and Path(self.run).is_dir() and Path(self.out).resolve() == Path(self.run).resolve():
            p.append(f"out: {self.out!r} is the run folder itself; write the evaluation elsewhere (e.g. {self.run}/eval/NAME)")
        p.extend(_out_problems(self.out, "evaluation", (self.data_dir, self.audio_dir, self.speaker_store)))
        if 0 < self.max_utterance_tokens < 8:
            p.append(f"max_utterance_tokens: {self.max_utterance_tokens} is out of range; expected 0 (the run's) or >= 8")
        if 0 < self.max_tokens < 4 * self.max_utterance_tokens or 0 < self.max_tokens < 64:
            p.append(f"max_tokens: {self.max_tokens} must be at least 4 x max_utterance_tokens "
                     f"({4 * self.max_utterance_tokens}) to hold the header and a few turns")
        return p + self.speaker_problems(self.run)


def _out_problems(out: str, kind: str = "", inputs: tuple = (), replace: bool = True) -> list[str]:
    """An output folder must be a folder (or not exist yet) and, for a ``kind`` of output, pass
    :func:`erc_llm.io.claim_output` (nothing the command did not write is replaced): checked before any model
    is loaded."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        return [f"out: {out!r} is a file; expected a folder (new or existing) for the outputs"]
    parent = next((q for q in [path, *path.parents] if q.exists()), None)
    if parent is not None and not parent.is_dir():
        return [f"out: {parent} is a file, so {out!r} cannot be created"]
    try:
        if kind:
            claim_output(out, kind, inputs, replace)
    except OutputError as e:
        return [f"out: {e}"]
    return []


def _common_problems(cfg) -> list[str]:
    """Choices, the data folder and the label set: checks every config with a dataset shares."""
    p = choice_problems(cfg)
    if not cfg.data_dir:
        p.append("data_dir: required — the folder holding the dataset files")
    elif not Path(cfg.data_dir).exists():
        p.append(f"data_dir: {cfg.data_dir!r} does not exist")
    if cfg.labels and cfg.dataset != "jsonl":
        p.append(f"labels: only the jsonl format takes a label set; {cfg.dataset} has a fixed one")
    canonical = [str(lab).strip().lower() for lab in cfg.labels]
    if cfg.labels and len(set(canonical)) < 2:
        p.append(f"labels: {list(cfg.labels)} names {len(set(canonical))} distinct label(s); emotion recognition needs "
                 "at least two (labels are matched case-insensitively)")
    elif len(set(canonical)) < len(canonical):
        p.append(f"labels: {list(cfg.labels)} repeats a label (labels are matched case-insensitively)")
    return p


def eval_flags(labels: list[str], on_bad_row: str, audio_dir: str = "") -> str:
    """The ``erc-llm evaluate`` options a run's config implies beyond the defaults, as command-line text (empty, or
    starting with a space), so a recorded or suggested command evaluates the run as training did."""
    options = {"labels": ",".join(labels), "on-bad-row": "" if on_bad_row == "error" else on_bad_row,
               "audio-dir": audio_dir}
    return "".join(f" --{flag} {value}" for flag, value in options.items() if value)


QUANT_MODES = ("none", "4bit")


@dataclass(frozen=True)
class LoraOptions:
    """The adapter shape training builds (``TrainConfig.lora_*``), passed to ``erc_llm.training.lora.wrap_lora``."""

    r: int
    alpha: int
    dropout: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]


@dataclass(frozen=True)
class PrecisionOptions:
    """What decides the training forward's precision (``TrainConfig.dtype``, ``autocast_bf16``, ``finetune``)."""

    dtype: str
    autocast_bf16: bool
    finetune: str


@dataclass
class TrainConfig(StageOptions, AudioOptions, SpeakerOptions):
    """LoRA fine-tuning on whole-dialogue transcripts (``erc_llm/train.py``)."""

    # data
    dataset: str = _f("meld", "dataset format", DATASETS)
    data_dir: str = _f("", "folder with the dataset files")
    labels: list = _f([], "label set for the jsonl format (default: inferred from train)")
    on_bad_row: str = _f("error", "a row the loader cannot use: error = stop and list every one; skip = leave it "
                         "out and count it in the load report", BAD_ROW_MODES)
    limit_train: int = _f(0, "use only the first N training dialogues (0 = all)", ge=0)
    joint_dataset: str = _f("", "joint training: a second corpus's training dialogues (a dataset format: "
                            f"{', '.join(DATASETS)}) mixed into every epoch. Each keeps its own label set: its "
                            "prompt header lists its labels, its loss is over them, with its own class weights. "
                            "Dev selection, the run's label set and the test evaluation stay those of dataset; "
                            "empty = off")
    joint_data_dir: str = _f("", "folder with the joint corpus's files (its train split is read; a jsonl corpus's "
                             "label set is inferred from it)")
    joint_fraction: float = _f(1.0, "share of the joint corpus's training dialogues drawn into each epoch, a fresh "
                               "seeded draw every epoch (e.g. 1/epochs: each joint dialogue about once per run)",
                               gt=0, le=1)
    # model and prompt
    model: str = _f(DEFAULT_MODEL, "backbone: a packaged name, a local Hugging Face dir, or a hub id")
    prompts: str = _f("", "folder with prompt templates (default: the packaged prompts/); copied into the run")
    max_tokens: int = _f(2048, "token budget of a transcript: a longer training dialogue is trained as several "
                         "transcripts, each its latest turns that fit; at test the oldest turns leave the context", ge=64)
    max_utterance_tokens: int = _f(96, "longest utterance text in tokens; longer ones are cut", ge=8)
    dtype: str = _f("auto", "frozen backbone weights dtype (LoRA weights and optimizer state stay float32); auto = "
                    "bfloat16 where the hardware computes it natively (CPU with AMX/avx512_bf16, GPU with bf16), "
                    "else float32; the choice is logged and stored in the run", ("auto", "float32", "bfloat16"))
    autocast_bf16: bool = _f(False, "bf16 autocast for matmuls over float32 weights (measured slower than bfloat16 "
                             "weights on CPUs; over a bfloat16 backbone the adapters always run under bf16 autocast)")
    attention: str = _f("block", "attention in the training forward: block (query blocks attend only to the keys "
                        "they can see: cost linear in length on sliding-window layers) or sdpa (full masked attention)",
                        ("block", "sdpa"))
    activation_checkpointing: bool = _f(False, "keep only each layer's input in the forward and recompute the "
                                        "rest in the backward: far less memory on long transcripts and large "
                                        "models for about a third more forward compute")
    pack_tokens: int = _f(2048, "pack consecutive dialogues of a step into one forward up to this many tokens "
                          "(block-diagonal attention; 0 = one forward per dialogue)", ge=0)
    quant: str = _f("none", "QLoRA: '4bit' loads the backbone in bitsandbytes NF4 (falls back with a warning "
                    "where bitsandbytes cannot run)", QUANT_MODES)
    finetune: str = _f("lora", "what training updates: lora (adapters on the frozen backbone; small, shippable) or "
                       "full (every transformer-layer weight, float32 master weights under bf16 autocast where "
                       "native; token embeddings and output head frozen; ~400 MB a run for Gemma 3 270M — use a "
                       "learning rate ~10x lower than LoRA's)", FINETUNE_MODES)
    # LoRA
    lora_r: int = _f(16, "LoRA rank", ge=1)
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / r)", ge=1)
    lora_dropout: float = _f(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lora_targets: list = _f(["all-linear"], "module names to adapt, or all-linear")
    lora_layers: list = _f([], "indices of transformer layers to adapt (empty = all)")
    init_adapter: str = _f("", "start from a trained run's LoRA adapter (a run folder or a shipped model name, e.g. "
                           "meld-gemma3-270m) instead of a fresh one: adapting a trained ERC model to another corpus "
                           "or label set. Its backbone, lora_r, lora_alpha, lora_layers and targets must be this "
                           "config's; only the adapter is taken (not its audio projector, speakers or prompts). "
                           "With finetune: full the run's weights are merged into the backbone first (any run of "
                           "this model). Checked against that run's files when training starts")
    # optimisation
    epochs: float = _f(1.0, "passes over the training dialogues (fractions allowed)", ge=0)
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = run all epochs)", ge=0)
    batch_dialogues: int = _f(4, "dialogues per optimizer step per process (gradient accumulation)", ge=1)
    lr: float = _f(2e-4, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    warmup_ratio: float = _f(0.05, "linear warm-up fraction of all steps, before lr_schedule takes over", ge=0, lt=1)
    lr_schedule: str = _f("linear", "learning rate after warm-up: linear or cosine decay to 0, or constant "
                          "(transformers' schedules of those names)", ("linear", "cosine", "constant_with_warmup"))
    max_grad_norm: float = _f(1.0, "gradient clipping", gt=0)
    ema_decay: float = _f(0.0, "select and save a moving average of the trained weights instead of the live ones: "
                          "per-step decay d, warmed up as min(d, (1 + step) / (10 + step)); e.g. 0.98 (0 = off)",
                          ge=0, lt=1)
    class_weights: str = _f("sqrt_inverse", "class weighting of the loss", ("none", "inverse", "sqrt_inverse"))
    focal_gamma: float = _f(0.0, "focal loss gamma (0 = plain cross-entropy)", ge=0)
    label_smoothing: float = _f(0.0, "share of the target's probability spread evenly over all labels (0 = none)",
                                ge=0, lt=1)
    contrastive_weight: float = _f(0.0, "weight of a supervised contrastive term on the slots' last-layer states "
                                   "(Khosla et al. 2020): each labelled slot is pulled towards slots of its label in "
                                   "the step and in the last 1,024 training slots, and pushed from the others "
                                   "(0 = off)", ge=0)
    contrastive_temperature: float = _f(0.1, "with contrastive_weight: the temperature of its cosine similarities",
                                        gt=0)
    teacher: str = _f("", "knowledge distillation: an evaluation folder of the train split (erc-llm evaluate --split "
                      "train, or eval/ensemble.py of several) whose per-label probabilities become soft targets; "
                      "empty = gold labels only")
    teacher_weight: float = _f(0.5, "with teacher: the share of each slot's loss that is KL(teacher || model); the "
                               "rest is cross-entropy against the gold label", gt=0, le=1)
    label_history: bool = _f(False, "write each earlier turn's emotion label into the transcript (gold, with "
                             "history_noise, in training; the model's own predictions at test time); false = the "
                             "transcript carries text only, the same in training and at test (no exposure bias)")
    history_noise: float = _f(0.0, "probability that an earlier turn's written label is replaced by one drawn from "
                              "the training prior (label corruption against exposure bias)", ge=0, le=1)
    on_policy: float = _f(0.0, "probability that a training dialogue's written labels are the model's own "
                          "predictions, decoded turn by turn with the current weights (no gradient) exactly as at "
                          "test time, instead of gold + history_noise: training sees the history it will be tested "
                          "on (DAgger-style). Costs one decoding pass per such dialogue; needs label_history: true",
                          ge=0, le=1)
    context: str = _f("online", "online: each slot sees only earlier turns (chat, streaming); offline: the "
                      "whole dialogue's text comes first (header_offline.txt), for batch labelling of finished "
                      "dialogues", ("online", "offline"))
    lookahead: int = _f(0, "offline look-ahead for batch labelling of finished dialogues: each turn's emotion slot "
                        "also attends to the next N turns' text (no extra tokens: the attention mask lets the slot "
                        "see them; the rest of the transcript stays causal). Needs label_history: false; 0 = online",
                        ge=0)
    curriculum: str = _f("none", "order of the first epoch: none (shuffled, like every later epoch) or "
                         "short_first (shortest transcripts first: long dialogues, where a wrong written label "
                         "travels furthest, come after the model has learnt on short ones)",
                         ("none", "short_first"))
    seed: int = _f(0, "seed for init, data order and corruption", ge=0)
    # selection, checkpoints, output
    out: str = _f("runs/meld", "run directory")
    eval_every: int = _f(100, "evaluate on dev every N optimizer steps (and at the end); keep the best", ge=1)
    eval_dialogues: int = _f(0, "dev dialogues used for selection (0 = all)", ge=0)
    save_every: int = _f(50, "write a resumable checkpoint every N optimizer steps", ge=1)
    resume: bool = _f(False, "continue from the run directory's last checkpoint")
    overwrite: bool = _f(False, "replace an existing run directory (without it, training refuses a non-empty --out "
                         "unless --resume true)")
    test_eval: bool = _f(True, "after training, evaluate the best adapter on test with predicted history")
    test_gold: bool = _f(True, "also evaluate test with gold history (a diagnostic of exposure bias), for a run that "
                         "writes labels into the history (label_history true); a text-only run logs that it has none")
    threads: int = _f(0, "torch CPU threads per process (0 = cores / processes)", ge=0)

    def lora_options(self) -> LoraOptions:
        return LoraOptions(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets),
                           tuple(int(i) for i in self.lora_layers))

    def precision(self) -> PrecisionOptions:
        return PrecisionOptions(self.dtype, self.autocast_bf16, self.finetune)

    def stage_options(self) -> StageOptions:
        return StageOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StageOptions)})

    def problems(self) -> list[str]:
        p = _common_problems(self)
        if self.epochs <= 0 and self.max_steps <= 0:
            p.append("epochs/max_steps: one of them must be > 0")
        if self.max_tokens < 4 * self.max_utterance_tokens:
            p.append(f"max_tokens: {self.max_tokens} must be at least 4 x max_utterance_tokens")
        if self.resume:
            if not has_checkpoint(self.out):
                p.append(f"resume: no checkpoint in {self.out}/{CHECKPOINT_DIR} to resume from")
        if self.resume and self.overwrite:
            p.append("resume/overwrite: choose one (continue the run, or replace it)")
        out = Path(self.out)
        inputs = (self.data_dir, self.joint_data_dir, self.speaker_store, self.audio_dir, self.fusion_audio_dir,
                  self.teacher, self.prompts, self.init_adapter if Path(self.init_adapter).is_dir() else "")
        if not (self.resume or self.overwrite) and out.is_dir() and any(out.iterdir()):
            p.append(f"out: {self.out} already holds files ({', '.join(sorted(x.name for x in out.iterdir())[:5])}); "
                     "pass --resume true to continue that run, --overwrite true to replace it, or choose another --out")
            p.extend(_out_problems(self.out))
        else:
            p.extend(_out_problems(self.out, "run", inputs))
        if self.prompts and not Path(self.prompts).is_dir():
            p.append(f"prompts: {self.prompts!r} is not a directory")
        if self.teacher and not (Path(self.teacher) / "predictions.jsonl").is_file():
            p.append(f"teacher: {self.teacher!r} holds no predictions.jsonl; give an evaluation folder of the train "
                     "split (erc-llm evaluate --split train --out DIR, or eval/ensemble.py ... --out DIR)")
        if self.teacher_weight != 0.5 and not self.teacher:
            p.append(f"teacher_weight: {self.teacher_weight} weighs a teacher's soft targets, but no teacher is given; "
                     "set teacher: DIR (an evaluation of the train split) or leave teacher_weight out")
        if self.contrastive_temperature != 0.1 and not self.contrastive_weight:
            p.append(f"contrastive_temperature: {self.contrastive_temperature} shapes a contrastive term that is off; "
                     "set contrastive_weight > 0 or leave contrastive_temperature out")
        if self.history_noise > 0 and not self.label_history:
            p.append(f"history_noise: {self.history_noise} corrupts written labels, but label_history is false (no "
                     "labels are written); set label_history: true or history_noise: 0")
        if self.on_policy > 0 and not self.label_history:
            p.append(f"on_policy: {self.on_policy} writes the model's own labels into the history, but label_history "
                     "is false (no labels are written); set label_history: true or on_policy: 0")
        if self.lookahead and self.label_history:
            p.append(f"lookahead: {self.lookahead} lets each slot see later turns, and with label_history: true their "
                     "written labels too; set label_history: false (text-only history) or lookahead: 0")
        if self.lookahead and self.context != "online":
            p.append(f"lookahead: {self.lookahead} and context: {self.context} are two kinds of offline context; "
                     "choose one (context: online with lookahead, or lookahead: 0)")
        if self.lookahead and (self.speaker_bios or self.speaker_history or self.audio_source != "none"):
            p.append(f"lookahead: {self.lookahead} labels whole dialogues in one forward, which speaker memory and "
                     "audio soft tokens do not support yet; set speaker_bios: false, speaker_history: 0 and "
                     "audio_source: none, or lookahead: 0")
        if self.finetune == "full" and self.quant != "none":
            p.append(f"finetune: full trains the backbone's own weights, which a {self.quant} quantized backbone "
                     "cannot hold; set quant: none, or finetune: lora for QLoRA")
        if self.finetune == "full" and self.dtype == "bfloat16":
            p.append("dtype: bfloat16 weights would round away most updates of full fine-tuning; use auto "
                     "(float32 master weights, bf16 autocast where native) or float32")
        if self.audio_source == "meld_prosody" and self.dataset != "meld":
            p.append("audio_source: meld_prosody features only exist for dataset: meld")
        p.extend(self.joint_problems())
        if (self.memory or self.fusion) and (self.lookahead or self.context != "online" or self.speaker_bios or
                                             self.speaker_history or self.audio_source != "none"):
            p.append("memory/fusion: the stages need an online run without speaker notes or audio soft tokens "
                     "(context: online, lookahead: 0, speaker_bios: false, speaker_history: 0, audio_source: none); "
                     "change those or turn the stages off")
        return p + self.speaker_problems() + self.audio_problems() + self.stage_problems()

    def joint_problems(self) -> list[str]:
        if not self.joint_dataset:
            return [f"{name}: {value!r} is set, but joint_dataset is empty; set joint_dataset too, or leave {name} out"
                    for name, value in (("joint_data_dir", self.joint_data_dir), ("joint_fraction", self.joint_fraction))
                    if value not in ("", 1.0)]
        p = []
        if self.joint_dataset not in DATASETS:
            p.append(f"joint_dataset: {self.joint_dataset!r} is not a dataset format; available: {', '.join(DATASETS)}")
        if not self.joint_data_dir:
            p.append("joint_data_dir: required with joint_dataset — the folder holding the joint corpus's files")
        elif not Path(self.joint_data_dir).exists():
            p.append(f"joint_data_dir: {self.joint_data_dir!r} does not exist")
        unsupported = [name for name, on in (
            ("label_history", self.label_history), ("teacher", bool(self.teacher)),
            ("speaker_bios", self.speaker_bios), ("speaker_history", self.speaker_history > 0),
            ("audio_source", self.audio_source != "none")) if on]
        if unsupported:
            p.append(f"joint_dataset: joint training keeps each corpus's label set apart, which {', '.join(unsupported)} "
                     "(written labels, teacher targets, speaker memory, audio features of one corpus) do not support "
                     "yet; turn them off or leave joint_dataset empty")
        return p


@dataclass
class BaselineConfig:
    """The classical fused text+audio baseline (``erc-llm baseline train``)."""

    dataset: str = _f("meld", "dataset format", DATASETS)
    data_dir: str = _f("", "folder with the dataset files")
    labels: list = _f([], "label set for the jsonl format (default: inferred from train)")
    text_encoder: str = _f("", "sentence-transformers model dir (default: packaged all-MiniLM-L6-v2)")
    audio: str = _f("none", "audio features: none (text only) or meld_prosody (8 Praat features per utterance)",
                    ("none", "meld_prosody"))
    audio_dir: str = _f("", "folder of the audio features (meld_prosody: meld_{split}_prosody.csv)")
    hidden: int = _f(384, "hidden size of every modality token", ge=1)
    k_tokens: int = _f(4, "tokens per modality", ge=1)
    heads: int = _f(4, "self-attention heads", ge=1)
    vga_lambda: float = _f(0.5, "weight of the VAD agreement term in cross-attention logits (0 = plain attention)", ge=0)
    fusion: str = _f("gates", "gates (text/audio/interaction weights summing to 1) or concat", ("gates", "concat"))
    context: bool = _f(True, "speaker-aware GRU over the speaker's earlier utterances")
    loss: str = _f("focal", "focal (gamma 2) or weighted cross-entropy", ("focal", "ce"))
    focal_gamma: float = _f(2.0, "focal loss gamma", ge=0)
    class_weights: str = _f("sqrt_inverse", "class weighting of the loss", ("none", "inverse", "sqrt_inverse"))
    vad_weight: float = _f(0.1, "weight of the auxiliary VAD regression (0 = off)", ge=0)
    dropout: float = _f(0.3, "dropout in the model", ge=0, lt=1)
    feature_dropout: float = _f(0.1, "dropout on the input features", ge=0, lt=1)
    noise_std: float = _f(0.05, "Gaussian noise added to input features in training", ge=0)
    mixup_alpha: float = _f(0.4, "mixup Beta(alpha, alpha) on utterance representations (0 = off)", ge=0)
    lr: float = _f(1e-3, "AdamW learning rate", gt=0)
    weight_decay: float = _f(1e-2, "AdamW weight decay", ge=0)
    batch_dialogues: int = _f(16, "dialogues per batch", ge=1)
    max_epochs: int = _f(30, "epoch limit", ge=1)
    patience: int = _f(5, "early stopping: epochs without dev weighted-F1 improvement", ge=1)
    seeds: list = _f([0, 1, 2, 3, 4], "one model per seed; results are reported as mean +- std")
    out: str = _f("runs/baseline", "output directory")
    threads: int = _f(0, "torch CPU threads (0 = all cores)", ge=0)

    def problems(self) -> list[str]:
        p = _common_problems(self)
        if self.audio != "none" and not (self.audio_dir and Path(self.audio_dir).is_dir()):
            p.append(f"audio_dir: {self.audio_dir!r} is not a directory (needed for audio: {self.audio})")
        if self.audio == "meld_prosody" and self.dataset != "meld":
            p.append("audio: meld_prosody features only exist for dataset: meld")
        if self.heads >= 1 and self.hidden % self.heads:
            p.append(f"hidden: {self.hidden} must be divisible by heads ({self.heads})")
        if not self.seeds:
            p.append("seeds: give at least one seed")
        return p + _out_problems(self.out)
