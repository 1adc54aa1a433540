"""Batch evaluation: a dialogue set -> constrained predictions -> metrics and reports.

    erc-llm evaluate --dataset meld --split test --data-dir ../shared/data/meld --out eval/results/zero_shot_meld_test

Writes ``metrics.json``, ``predictions.jsonl``, ``confusion.png`` and ``report.md`` into ``--out``.
Predictions are appended per dialogue to ``predictions.partial.jsonl`` while running; an interrupted
evaluation restarted with the same settings resumes after the last finished dialogue.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support
from tqdm import tqdm

from erc_llm.config import EvalConfig, to_dict
from erc_llm.data import LabelSet, load_split
from erc_llm.io import atomic_write_json, atomic_write_jsonl, atomic_write_text

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def compute_metrics(gold: list[str], pred: list[str], labels: LabelSet) -> dict:
    """Standard ERC metrics (scikit-learn): weighted F1, WA (accuracy), UA (balanced accuracy), macro F1."""
    names = list(labels.labels)
    p, r, f, s = precision_recall_fscore_support(gold, pred, labels=names, zero_division=0)
    return {
        "weighted_f1": 100 * f1_score(gold, pred, labels=names, average="weighted", zero_division=0),
        "accuracy": 100 * accuracy_score(gold, pred),
        "unweighted_accuracy": 100 * balanced_accuracy_score(gold, pred),
        "macro_f1": 100 * f1_score(gold, pred, labels=names, average="macro", zero_division=0),
        "per_class": {
            n: {"precision": 100 * float(p[i]), "recall": 100 * float(r[i]), "f1": 100 * float(f[i]), "support": int(s[i])}
            for i, n in enumerate(names)
        },
    }


def load_model_for_eval(cfg: EvalConfig):
    """Backbone (+ the run's LoRA adapter merged in, when ``cfg.run`` is given)."""
    from erc_llm.backbone import load_backbone

    if not cfg.run:
        return load_backbone(cfg.model, cfg.dtype)
    run = Path(cfg.run)
    try:
        meta = json.loads((run / RUN_FILE).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"run directory {run} has no {RUN_FILE}; expected a directory written by erc_llm/train.py") from None
    if not (run / "adapter").is_dir():
        raise FileNotFoundError(f"run directory {run} has no adapter/ folder; expected a directory written by erc_llm/train.py")
    from peft import PeftModel

    model, tok, manifest = load_backbone(meta["model"], cfg.dtype)
    model = PeftModel.from_pretrained(model, str(run / "adapter")).merge_and_unload()
    model.eval()
    return model, tok, {**manifest, "run": str(run), "run_prompt_version": meta.get("prompt_version")}


def _fingerprint(cfg: EvalConfig, manifest: dict, prompt_version: str) -> str:
    keep = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "threads", "limit", "batch")}
    blob = json.dumps([keep, manifest.get("sha256"), manifest.get("path"), prompt_version], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_partial(path: Path, fingerprint: str) -> dict[str, list[dict]]:
    """Finished dialogues of an interrupted run with the same fingerprint (a torn last line is ignored)."""
    done: dict[str, list[dict]] = {}
    if not path.is_file():
        return done
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or json.loads(lines[0]).get("fingerprint") != fingerprint:
        path.unlink()
        return done
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        done[row["dialogue_id"]] = row["predictions"]
    return done


def predict(tagger, dialogues, partial: Path, fingerprint: str, batch: int = 1) -> list[dict]:
    """Tag every dialogue, resuming from ``partial``; returns one row per utterance.

    ``batch`` dialogues at a time go through ``tagger.tag_many`` (a PackedTagger); dialogues restored from
    ``partial`` still feed a StreamingTagger's speaker memory, in order.
    """
    done = _load_partial(partial, fingerprint)
    if done:
        log.info("resuming: %d of %d dialogues already done in %s", len(done), len(dialogues), partial)
    new = not partial.is_file()
    speakers = getattr(tagger, "speakers", None)
    with open(partial, "a", encoding="utf-8") as f:
        if new:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        bar = tqdm(total=sum(len(d) for d in dialogues), unit="utt", desc="evaluate", dynamic_ncols=True)
        chunk: list = []

        def flush():
            results = tagger.tag_many(chunk) if batch > 1 else [tagger.tag(d) for d in chunk]
            for d, preds in zip(chunk, results):
                rows = [
                    {"dialogue_id": d.id, "utterance_id": u.utterance_id, "speaker": u.speaker, "text": u.text,
                     "gold": u.emotion, "predicted": p.label,
                     "probabilities": dict(zip(tagger.labels.labels, [round(x, 6) for x in p.probs]))}
                    for u, p in zip(d.utterances, preds)
                ]
                f.write(json.dumps({"dialogue_id": d.id, "predictions": rows}, ensure_ascii=False) + "\n")
                done[d.id] = rows
                bar.update(len(d))
            f.flush()
            chunk.clear()

        for d in dialogues:
            if d.id in done:
                if speakers is not None:
                    key = "gold" if tagger.history == "gold" else "predicted"
                    speakers.observe(d, [r[key] for r in done[d.id]])
                bar.update(len(d))
                continue
            chunk.append(d)
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        bar.close()
    return [r for d in dialogues for r in done[d.id]]


def plot_confusion(gold: list[str], pred: list[str], labels: LabelSet, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(labels.labels)
    cm = confusion_matrix(gold, pred, labels=names, normalize="true")
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(np.nan_to_num(cm), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title, fontsize=9)
    for i in range(len(names)):
        for j in range(len(names)):
            v = np.nan_to_num(cm[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def render_report(m: dict) -> str:
    lines = [
        f"# Evaluation: {m['dataset']}/{m['split']} — {m['model']}",
        "",
        f"History: **{m['history']}**{' (DIAGNOSTIC: gold labels of earlier turns are visible)' if m['history'] == 'gold' else ''}  ",
        f"Dialogues: {m['dialogues']}, utterances: {m['utterances']}, seconds: {m['seconds']:.1f}, "
        f"utterances/s: {m['utterances_per_second']:.2f}",
        "",
        "| weighted F1 | accuracy (WA) | UA | macro F1 |",
        "|---|---|---|---|",
        f"| {m['weighted_f1']:.2f} | {m['accuracy']:.2f} | {m['unweighted_accuracy']:.2f} | {m['macro_f1']:.2f} |",
        "",
        "| class | precision | recall | F1 | support |",
        "|---|---|---|---|---|",
    ]
    for name, c in m["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.2f} | {c['recall']:.2f} | {c['f1']:.2f} | {c['support']} |")
    lines += ["", "![confusion](confusion.png)", "", f"Command: `{m['command']}`", ""]
    return "\n".join(lines)


def prompts_dir(cfg: EvalConfig) -> Path:
    """Templates: the config's folder, else the ones the run's adapter was trained with, else the packaged ones."""
    from erc_llm.prompting import PROMPTS_DIR

    if cfg.prompts:
        return Path(cfg.prompts)
    if cfg.run and (Path(cfg.run) / "prompts").is_dir():
        return Path(cfg.run) / "prompts"
    return PROMPTS_DIR


def speaker_context(cfg: EvalConfig, labels: LabelSet):
    """(SpeakerContext or None, note token cap): the config's store if given, else the run's own."""
    from erc_llm.speakers import open_context, settings_of

    run = Path(cfg.run) if cfg.run else None
    templates = prompts_dir(cfg)
    settings, store = settings_of(cfg), cfg.speaker_store
    if settings is None and run is not None:
        settings, store = json.loads((run / RUN_FILE).read_text()).get("speakers"), run / "speaker_store"
    if settings is None:
        return None, cfg.speaker_note_tokens
    return open_context(store, settings, templates, labels, seed=True), settings["note_tokens"]


def audio_inputs(cfg: EvalConfig, dialogues, model):
    """(AudioInputs, AudioProjector) of a run trained with audio soft tokens, else None."""
    if not cfg.run or not (Path(cfg.run) / "adapter" / "audio.json").is_file():
        return None
    from erc_llm.audio import load_source
    from erc_llm.projector import AudioInputs

    run = Path(cfg.run)
    spec, projector = load_projector(run, model)
    directory = cfg.audio_dir or json.loads((run / RUN_FILE).read_text())["audio"]["dir"]
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"run {run} was trained with {spec.source} audio features from {directory}, which is "
                                "not a folder here; pass --audio-dir with this split's features")
    inputs = AudioInputs(spec, load_source(spec.source, directory, cfg.split),
                         [u.utterance_id for d in dialogues for u in d.utterances])
    log.info("audio %s: no features for %d utterances (they get the 'no audio' input)", spec.source, inputs.missing)
    return inputs, projector


def load_projector(run: Path, model):
    """(AudioSpec, AudioProjector in eval mode) saved with a run's adapter."""
    import torch

    from erc_llm.projector import AudioProjector, AudioSpec

    spec = AudioSpec.load(run / "adapter" / "audio.json")
    projector = AudioProjector(spec.in_dim, model.config.hidden_size, spec.k_tokens, spec.frames)
    projector.load_state_dict(torch.load(run / "adapter" / "projector.pt", weights_only=True))
    return spec, projector.to(model.device).eval()


def evaluate(cfg: EvalConfig, command: str = "") -> dict:
    """Config -> data -> model -> predictions -> metrics and reports in ``cfg.out``."""
    import torch

    from erc_llm.decoding import StreamingTagger
    from erc_llm.prompting import PromptBuilder, Templates

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    dialogues, labels, report = load_split(cfg.dataset, cfg.split, cfg.data_dir, tuple(cfg.labels) or None)
    log.info("%s; label set %s = %s", report.summary(), labels.name, list(labels.labels))
    if cfg.limit:
        dialogues = dialogues[: cfg.limit]
    model, tok, manifest = load_model_for_eval(cfg)
    templates = Templates.load(prompts_dir(cfg))
    speakers, note_tokens = speaker_context(cfg, labels)
    if speakers is not None and speakers.settings.history:
        from erc_llm.speakers import dataset_order

        dialogues = dataset_order(dialogues)  # the cross-dialogue memory follows story order
    audio = audio_inputs(cfg, dialogues, model)
    builder = PromptBuilder(tok, labels, templates, cfg.max_tokens, cfg.max_utterance_tokens, note_tokens,
                            audio[0].spec.k_tokens if audio else 0)
    batch = cfg.batch if speakers is None and audio is None else 1
    if batch > 1:
        from erc_llm.decoding import PackedTagger

        tagger = PackedTagger(model, builder, cfg.history, batch)
    else:
        tagger = StreamingTagger(model, builder, cfg.history, speakers, audio)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "predictions.partial.jsonl"
    t0 = time.time()
    rows = predict(tagger, dialogues, partial, _fingerprint(cfg, manifest, templates.version), batch)
    seconds = time.time() - t0
    scored = [r for r in rows if r["gold"] is not None]
    metrics = {
        **(compute_metrics([r["gold"] for r in scored], [r["predicted"] for r in scored], labels) if scored else {}),
        "dataset": cfg.dataset, "split": cfg.split, "history": cfg.history, "labels": list(labels.labels),
        "dialogues": len(dialogues), "utterances": len(rows), "scored_utterances": len(scored),
        "skipped_on_load": dict(report.skipped), "model": manifest.get("name", cfg.model),
        "model_source": manifest.get("source"), "run": cfg.run or None, "prompt_version": templates.version,
        "speakers": speakers.settings.__dict__ if speakers else None,
        "audio": {"source": audio[0].spec.source, "missing": audio[0].missing} if audio else None,
        "seconds": seconds, "utterances_per_second": len(rows) / max(seconds, 1e-9),
        "threads": torch.get_num_threads(), "config": to_dict(cfg), "command": command,
    }
    atomic_write_jsonl(out / "predictions.jsonl", rows)
    if scored:
        plot_confusion([r["gold"] for r in scored], [r["predicted"] for r in scored], labels, out / "confusion.png",
                       f"{cfg.dataset}/{cfg.split} {metrics['model']} (history={cfg.history})")
        atomic_write_text(out / "report.md", render_report(metrics))
    else:
        log.warning("%s/%s has no gold labels: wrote predictions only (no metrics)", cfg.dataset, cfg.split)
    atomic_write_json(out / "metrics.json", metrics)
    partial.unlink(missing_ok=True)
    return metrics
