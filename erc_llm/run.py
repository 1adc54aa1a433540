"""A trained run, and loading a model for inference: the one owner of ``run.json``.

A *run* is a folder written by ``erc_llm/train.py`` (or shipped inside the package, see ``pretrained/``):
``adapter/`` (PEFT LoRA, or ``finetuned.safetensors`` after full fine-tuning, plus ``projector.pt`` / ``audio.json`` when trained with audio), ``run.json`` (the
:class:`RunSpec`), ``prompts/`` (the templates it was trained with) and, with speaker memory,
``speaker_store/``. :func:`load` turns a run, the shipped model's name, or a bare backbone (zero-shot) into
one :class:`Predictor` — model, prompt builder, label set, speaker context and audio projector — from which
batch evaluation, chat sessions, the HTTP service, the benchmark and training's test evaluation all get
their taggers.

    from erc_llm.run import load
    p = load("meld-gemma3-270m")                 # the shipped model (also the default of every command)
    p = load("runs/meld_seed0", dtype="bfloat16")
    p = load(None, model="gemma-3-270m", labels=MELD_LABELS)   # zero-shot backbone
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from erc_llm.audio import load_source
from erc_llm.backbone import DEFAULT_MODEL, load_backbone
from erc_llm.constants import FINETUNE_MODES, FULL_WEIGHTS
from erc_llm.data import load_split
from erc_llm.data.schema import MELD_LABELS, LabelSet
from erc_llm.io import atomic_write_json, sha256_file
from erc_llm.prompting import CONTEXTS, PROMPTS_DIR, PromptBuilder, Templates
from erc_llm.speakers import open_context, settings_of
from erc_llm.stages import StageError, Stages, describe, fit, log_report, stage_problems

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
SHIPPED = "meld-gemma3-270m"  # the default model of every command


class RunError(ValueError):
    """A run folder that cannot be used (missing or malformed files); the message says what to do."""


def shipped_models() -> list[str]:
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / RUN_FILE).is_file()) if PRETRAINED_DIR.is_dir() else []


def resolve(run: str | Path) -> Path:
    """A run folder, or the folder of a shipped model given by name."""
    if str(run) in shipped_models():
        return PRETRAINED_DIR / str(run)
    path = Path(run)
    if path.is_dir():
        return path
    raise RunError(f"run {str(run)!r} not found; expected a run folder written by erc_llm/train.py or a shipped "
                   f"model name; shipped models = {shipped_models()}")


def software_versions() -> dict[str, str]:
    """The library versions a figure depends on, recorded in every run and evaluation: the same command on
    another version of torch or transformers can give other numbers."""
    import peft  # loads torch; importing this module must not
    import torch  # loads torch; importing this module must not
    import transformers  # loads torch; importing this module must not

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


@dataclass(frozen=True)
class RunSpec:
    """What a trained adapter needs at inference: written once by training, read by everything else."""

    model: str  # backbone name / dir / hub id
    labels: tuple[str, ...]
    dataset: str = "jsonl"
    backbone: dict = field(default_factory=dict)  # the backbone's cache manifest at training time
    prompt_version: str = ""
    max_tokens: int = 2048
    max_utterance_tokens: int = 96
    context: str = "online"  # online: causal; offline: the whole dialogue's text first (header_offline.txt)
    label_history: bool = True  # labels of earlier turns written into the transcript
    lookahead: int = 0  # > 0: each slot also attends to the next N turns (offline; erc_llm.attention)
    speakers: dict | None = None  # speaker-note settings (bios, history, top_k, note_tokens)
    audio: dict | None = None  # {"source", "dir", "k_tokens"}
    train_dtype: str | None = None
    finetune: str = "lora"  # lora: peft adapter; full: adapter/finetuned.safetensors (erc_llm.training.finetune)
    software: dict = field(default_factory=dict)  # library versions at training time (software_versions())
    stages: dict | None = None  # memory / fusion / calibration settings chosen on dev (erc_llm.stages; files in stages/)

    @classmethod
    def read(cls, run: str | Path) -> "RunSpec":
        path = Path(run) / RUN_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{path} not found; expected a run folder written by erc_llm/train.py") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{path}: not valid JSON ({e}); the run folder is damaged — train again or restore it") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("model"), str) or not raw.get("labels"):
            raise RunError(f"{path}: expected an object with 'model' and 'labels'; the run folder is damaged")
        known = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: (tuple(v) if k == "labels" else v) for k, v in raw.items() if k in known})
        if spec.context not in CONTEXTS:
            raise RunError(f"{path}: context {spec.context!r} is not one of {list(CONTEXTS)}")
        if not isinstance(spec.lookahead, int) or spec.lookahead < 0 or (spec.lookahead and spec.label_history):
            raise RunError(f"{path}: lookahead {spec.lookahead!r} must be an integer >= 0, and 0 when label_history is "
                           "true; the run folder is damaged")
        if spec.finetune not in FINETUNE_MODES:
            raise RunError(f"{path}: finetune {spec.finetune!r} is not one of {list(FINETUNE_MODES)}")
        return spec

    def write(self, run: str | Path) -> Path:
        return atomic_write_json(Path(run) / RUN_FILE, {**dataclasses.asdict(self), "labels": list(self.labels)})

    @property
    def label_set(self) -> LabelSet:
        return LabelSet(self.dataset, self.labels)


@dataclass
class Predictor:
    """Everything inference needs, loaded once: tagger factories for batch evaluation and live sessions."""

    model: object
    tokenizer: object
    builder: PromptBuilder
    labels: LabelSet
    manifest: dict
    name: str  # what outputs call the model: the shipped name, the run folder, or "<backbone> (zero-shot)"
    spec: RunSpec | None = None  # None = zero-shot backbone
    run_dir: Path | None = None
    speakers: object = None  # SpeakerContext
    audio: object = None  # AudioModel (projector + feature spec) of a run trained with audio
    stages: object = None  # erc_llm.stages.Stages of a run fitted with memory / fusion / calibration

    @property
    def context(self) -> str:
        """online, or offline: the whole dialogue first (header), or look-ahead of the next turns at every slot."""
        if self.spec is None:
            return "online"
        return "offline" if self.spec.lookahead else self.spec.context

    @property
    def lookahead(self) -> int:
        return self.spec.lookahead if self.spec else 0

    @property
    def dtype(self) -> str:
        """The compute dtype the backbone runs in (``auto`` resolved)."""
        return self.manifest.get("compute_dtype", "float32")

    def history_mode(self, history: str) -> str:
        """What earlier turns carry: 'none' for a text-only model, else the requested predicted/gold."""
        return history if self.builder.write_labels else "none"

    def audio_inputs(self, split: str, dialogues, audio_dir: str = ""):
        """The projector inputs of ``dialogues`` for a run trained with audio (None otherwise)."""
        if self.audio is None:
            return None
        from erc_llm.projector import AudioInputs  # loads torch; importing this module must not

        spec = self.audio.spec
        directory = audio_dir or (self.spec.audio or {}).get("dir", "")
        if not Path(directory).is_dir():
            raise RunError(f"run {self.run_dir} was trained with {spec.source} audio features from {directory!r}, "
                           "which is not a folder here; pass --audio-dir with this split's features")
        utts = [u for d in dialogues for u in d.utterances]
        inputs = AudioInputs(spec, load_source(spec.source, directory, split), [u.utterance_id for u in utts],
                             [u.speaker for u in utts])
        log.info("audio %s: no features for %d utterances (they get the 'no audio' input)", spec.source, inputs.missing)
        return inputs

    def tagger(self, history: str = "predicted", batch: int = 1, audio_inputs=None):
        """This model's decoder (:func:`erc_llm.decoding.make_tagger`)."""
        from erc_llm.decoding import make_tagger  # loads torch; importing this module must not

        audio = self.audio.feed(audio_inputs) if audio_inputs is not None else None
        return make_tagger(self.model, self.builder, history, batch, self.speakers, audio, self.lookahead)


CHECKSUMS = "checksums.json"


def write_checksums(folder: Path) -> Path:
    """Record the sha256 of every file of an exported or shipped model (what :func:`check_reference` verifies)."""
    files = []
    for root, dirs, names in os.walk(folder, followlinks=True):  # stages/ is a link to its published version
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".") and n != CHECKSUMS]
    return atomic_write_json(folder / CHECKSUMS, {str(p.relative_to(folder)): sha256_file(p) for p in files})


def check_reference(run_dir: Path) -> None:
    """An exported or shipped model must hold the files it was written with: every file ``checksums.json`` lists
    (adapter weights and config, ``run.json``, prompts, stage files, the card) is present with its sha256; a packaged
    model's ``reference.json`` also names its adapter's. A run folder that training is still writing has no
    checksums and is not checked."""
    listed = run_dir / CHECKSUMS
    if listed.is_file():
        try:
            sums = json.loads(listed.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{listed}: not valid JSON ({e}); the model folder is damaged — export it again") from None
        bad = [name for name, digest in sums.items()
               if not (run_dir / name).is_file() or sha256_file(run_dir / name) != digest]
        if bad:
            raise RunError(f"{run_dir}: {', '.join(bad[:5])} {'does' if len(bad) == 1 else 'do'} not match the sha256 "
                           f"recorded in {listed} (changed, replaced or missing); restore the folder, export the run "
                           "again, or reinstall erc-llm for the shipped model")

    ref_file, weights = run_dir / "reference.json", run_dir / "adapter" / "adapter_model.safetensors"
    if not ref_file.is_file() or not weights.is_file():
        return
    expected = json.loads(ref_file.read_text()).get("adapter_sha256")
    if expected and sha256_file(weights) != expected:
        raise RunError(f"{weights} does not match the sha256 recorded when the model was packaged "
                       f"({ref_file}): the file is corrupted or was replaced; reinstall erc-llm or restore the folder")


def assign_full_weights(model, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy fully fine-tuned ``weights`` into ``model`` (cast to its dtype); every name must be one of the
    model's parameters, or the file was trained on another backbone."""
    import torch  # loads torch; importing this module must not

    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} tensors are not parameters of this backbone (first: {unknown[0]!r}); "
                         "the weights were trained on another model — load them with the backbone named in run.json")
    with torch.no_grad():
        for name, tensor in weights.items():
            if params[name].shape != tensor.shape:
                raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the backbone's is "
                                 f"{tuple(params[name].shape)}; the weights were trained on another model")
            params[name].copy_(tensor.to(params[name].dtype))


def trained_weights(model, run: Path, finetune: str):
    """The backbone with the run's trained weights: the LoRA adapter merged in, or the fully fine-tuned tensors."""

    expected = run / "adapter" / (FULL_WEIGHTS if finetune == "full" else "adapter_config.json")
    if not expected.is_file():
        raise RunError(f"run {run} has no adapter/{expected.name} (run.json says finetune: {finetune}); expected a run "
                       "folder written by erc_llm/train.py (training saves the weights at its first dev evaluation)")
    if finetune == "full":
        from safetensors.torch import load_file  # loads torch; importing this module must not

        try:
            assign_full_weights(model, load_file(str(expected)), str(expected))
        except ValueError as e:
            raise RunError(str(e)) from None
        return model.eval()
    from peft import PeftModel  # loads torch; importing this module must not

    return PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload().eval()


def _audio_model(run_dir: Path | None, model):
    from erc_llm.projector import AudioModel  # loads torch; importing this module must not

    return AudioModel.load(run_dir / "adapter", model.config.hidden_size, model.device) if run_dir else None


def check_labels(data_labels: LabelSet, spec: RunSpec, where: str) -> LabelSet:
    """The run's label set when the data's labels are the same set (the run's order fixes the classes)."""
    if set(data_labels.labels) != set(spec.labels):
        raise RunError(f"the data's labels {list(data_labels.labels)} differ from those of model {where} "
                       f"{list(spec.labels)}; pass --run with a model trained on this label set, or --zero-shot "
                       "to use the bare backbone with the data's labels")
    return spec.label_set


def load(run: str | Path | None, *, model: str = "", dtype: str = "auto", labels: LabelSet | None = None,
         prompts: str = "", max_tokens: int = 0, max_utterance_tokens: int = 0, speaker_options=None) -> Predictor:
    """A run folder or shipped name (``run``), or with ``run=None`` the bare ``model`` backbone (zero-shot).

    ``labels``: the data's label set (checked against a run's; the label set of a zero-shot model).
    ``max_tokens`` / ``max_utterance_tokens``: 0 = the run's (2,048 / 96 zero-shot). ``speaker_options``:
    a config with speaker fields whose ``speaker_store`` overrides the run's own store.
    """
    run_dir = resolve(run) if run else None
    spec = RunSpec.read(run_dir) if run_dir else None
    if run_dir is not None:
        check_reference(run_dir)
    if spec is not None:
        labels = check_labels(labels, spec, str(run)) if labels is not None else spec.label_set
        net, tok, manifest = load_backbone(spec.model, dtype)
        net = trained_weights(net, run_dir, spec.finetune)
        manifest = {**manifest, "run": str(run_dir), "run_prompt_version": spec.prompt_version}
        name = str(run) if str(run) in shipped_models() else str(run_dir)
    else:
        net, tok, manifest = load_backbone(model or DEFAULT_MODEL, dtype)
        labels = labels or MELD_LABELS
        name = f"{manifest.get('name', model)} (zero-shot)"
    prompt_dir = Path(prompts) if prompts else (run_dir / "prompts" if run_dir and (run_dir / "prompts").is_dir()
                                                else PROMPTS_DIR)
    templates = Templates.load(prompt_dir, spec.context if spec else "online")
    speakers, note_tokens = _speakers(spec, run_dir, speaker_options, prompt_dir, labels)
    audio = _audio_model(run_dir, net)
    stages = Stages.load(run_dir, spec.stages, len(labels.labels)) if spec is not None else None
    builder = PromptBuilder(tok, labels, templates, max_tokens or (spec.max_tokens if spec else 2048),
                            max_utterance_tokens or (spec.max_utterance_tokens if spec else 96), note_tokens,
                            audio.spec.k_tokens if audio else 0, spec.label_history if spec else True)
    return Predictor(net, tok, builder, labels, manifest, name, spec, run_dir, speakers, audio, stages)


def _speakers(spec, run_dir, options, prompt_dir: Path, labels: LabelSet):
    """(SpeakerContext or None, note token cap): the options' store if given, else the run's own."""
    settings, store = (settings_of(options), options.speaker_store) if options is not None else (None, "")
    if settings is None and spec is not None and spec.speakers:
        settings, store = spec.speakers, run_dir / "speaker_store"
    if settings is None:
        return None, getattr(options, "speaker_note_tokens", 64)
    return open_context(store, settings, prompt_dir, labels, seed=True), settings["note_tokens"]


def fit_run(run: Path, dataset: str, data_dir: str, labels: list, on_bad_row: str, opts, test: bool = True,
            limit_train: int = 0) -> dict:
    """Fit the stages ``opts`` asks for on a run folder's adapter: ``run/stages/`` (memory index, classifier
    arrays), ``run/stages.json`` (per split and stage: weighted F1, ECE, NLL; the dev grids) and the settings in
    ``run.json``. Returns the report."""
    train_d, label_set, _ = load_split(dataset, "train", data_dir, tuple(labels) or None, on_bad_row)
    data = {"train": train_d[:limit_train] if limit_train else train_d}
    for s in ("dev", "test") if test else ("dev",):
        data[s] = load_split(dataset, s, data_dir, label_set.labels, on_bad_row)[0]
    run = Path(run)
    spec = RunSpec.read(run)
    audio = bool(spec.audio) and spec.audio.get("source", "none") != "none"
    problems = stage_problems(spec.context, spec.lookahead, bool(spec.speakers), audio)
    if problems:  # before loading the model
        raise StageError(f"run {run}: stages need an online run without speaker notes or audio soft tokens; "
                         + "; ".join(problems))
    sealed = (run / CHECKSUMS).is_file()
    if sealed:  # an exported model: checked as it is, then re-sealed with its new stages
        check_reference(run)
        (run / CHECKSUMS).unlink()
    if spec.stages:  # fit from the adapter alone, not on top of the stages fitted before
        spec = dataclasses.replace(spec, stages=None)
        spec.write(run)
    p = load(run, dtype="float32", labels=label_set)
    t0 = time.time()
    fitted, report = fit(p, data, opts)
    report["seconds"] = time.time() - t0
    fitted.save(run)
    atomic_write_json(run / "stages.json", report)
    dataclasses.replace(spec, stages=report["settings"]).write(run)
    if sealed:
        write_checksums(run)
    log_report(report)
    log.info("stages: %s", describe(report["settings"]))
    return report


def init_adapter_problems(cfg) -> list[str]:
    """Why ``cfg.init_adapter`` (a run folder or shipped model name) cannot start this training: every problem,
    for the config's up-front validation (empty when it can). LoRA training continues the run's adapter, so
    its shape must be this config's; full fine-tuning starts from the run's weights merged into the backbone,
    so only the backbone must match."""
    where = f"init_adapter: {cfg.init_adapter!r}"
    try:
        run = resolve(cfg.init_adapter)
        spec = RunSpec.read(run)
        check_reference(run)  # a packaged model's adapter must be the one it was packaged with
    except RunError as e:
        return [f"{where}: {e}"]
    if cfg.finetune == "full":  # the run's weights are merged into the backbone: any run of this backbone
        return [] if spec.model == cfg.model else [
            f"{where} was trained on model {spec.model!r}, this config has {cfg.model!r}; set model: "
            f"{spec.model!r} to start from it"]
    if spec.finetune != "lora":
        return [f"{where} was trained with finetune: {spec.finetune}; it has no LoRA adapter to start from"]
    try:
        saved = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return [f"{where}: cannot read {run / 'adapter' / 'adapter_config.json'} ({e}); the run folder is damaged"]
    ours = {"model": cfg.model, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_layers": [int(i) for i in cfg.lora_layers]}
    theirs = {"model": spec.model, "lora_r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "lora_layers": list(saved.get("layers_to_transform") or [])}
    if cfg.lora_targets != ["all-linear"]:
        ours["lora_targets"], theirs["lora_targets"] = sorted(cfg.lora_targets), sorted(saved.get("target_modules") or [])
    return [f"{where} was trained with {key} {theirs[key]!r}, this config has {ours[key]!r}; set {key}: "
            f"{theirs[key]!r} to start from it" for key in ours if ours[key] != theirs[key]]
