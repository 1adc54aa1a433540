"""Batch evaluation: a dialogue set -> constrained predictions -> metrics and reports.

    erc-llm evaluate --dataset meld --split test --data-dir ../shared/data/meld --out eval/results/zero_shot_meld_test

Writes ``metrics.json``, ``predictions.jsonl``, ``confusion.png`` and ``report.md`` into ``--out``.
Without ``--run`` the shipped model is evaluated; ``--zero-shot`` evaluates the bare backbone. Predictions
are appended to ``predictions.partial.jsonl`` while running (per dialogue, and per turn for dialogues
tagged one at a time); an interrupted evaluation restarted with the same settings, model and data resumes
where it stopped. ``--processes N`` shards the dialogues over N processes (torchrun).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from erc_llm import stages as S
from erc_llm.config import EvalConfig
from erc_llm.data import LabelSet, load_split
from erc_llm.data.schema import DataError, dialogues_digest
from erc_llm.decoding import TurnPrediction
from erc_llm.io import atomic_write_jsonl, content_digest, mark_output, progress, sha256_file
from erc_llm.metrics import write_evaluation
from erc_llm.options import to_dict
from erc_llm.run import SHIPPED, RunSpec, load, resolve, software_versions
from erc_llm.speakers import dataset_order

log = logging.getLogger(__name__)


def _fingerprint(cfg: EvalConfig, p, dialogues, stages=None, audio=None) -> str:
    """What partial results depend on, by content, never by path: settings, backbone, adapter bytes, prompts, the
    speaker store's files, the audio inputs, stage files and the data."""
    keep = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "threads", "limit", "batch", "processes")}
    adapter = p.run_dir / "adapter" / "adapter_model.safetensors" if p.run_dir else None
    return content_digest(keep, p.manifest.get("sha256"), p.manifest.get("path"), p.builder.templates.version,
                          sha256_file(adapter) if adapter and adapter.is_file() else None,
                          dialogues_digest(dialogues), stages.digest() if stages is not None else None,
                          p.speakers.store.manifest.get("sha256") if p.speakers is not None else None,
                          _audio_digest(audio))[:16]


def _audio_digest(audio) -> str | None:
    """Content of a split's audio inputs (the projector inputs of every utterance)."""
    if audio is None:
        return None

    h = hashlib.sha256()
    for uid in sorted(audio.inputs):
        h.update(uid.encode() + audio.inputs[uid].numpy().tobytes())
    return h.hexdigest()


def _load_partial(path: Path, fingerprint: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Finished dialogues and the turns of a dialogue in progress from an interrupted run with the same
    fingerprint (a torn last line is ignored)."""
    done: dict[str, list[dict]] = {}
    started: dict[str, list[dict]] = {}
    if not path.is_file():
        return done, started
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}  # a torn first line: nothing in the file can be trusted
    if not isinstance(head, dict) or head.get("fingerprint") != fingerprint:
        log.warning("%s holds results of other settings, model or data; starting over", path)
        path.unlink()
        return done, started
    for line in lines[1:]:
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "dialogue_id" not in row or not {"predictions", "turn"} & set(row):
                raise KeyError(line[:40])
        except (json.JSONDecodeError, KeyError):
            log.warning("%s: a torn or foreign line after %d good ones; resuming from there", path, len(done))
            break
        if "predictions" in row:
            done[row["dialogue_id"]] = row["predictions"]
            started.pop(row["dialogue_id"], None)
        else:
            started.setdefault(row["dialogue_id"], []).append(row["turn"])
    return done, started


def _row(d, u, p, labels, stages=None) -> dict:
    row = {"dialogue_id": d.id, "utterance_id": u.utterance_id, "speaker": u.speaker, "text": u.text,
           "gold": u.emotion, "predicted": p.label,
           "probabilities": dict(zip(labels.labels, [round(x, 6) for x in p.probs]))}
    if stages is not None and stages.memory is not None:  # the memory reads the decoder's own slot state
        row["memory_probabilities"] = dict(zip(labels.labels, [round(float(x), 6) for x in stages.memory_probs(p.state)[0]]))
    return row


def predict(tagger, dialogues, partial: Path, fingerprint: str, batch: int = 1, stages=None) -> list[dict]:
    """Tag every dialogue, resuming from ``partial``; returns one row per utterance.

    With ``batch`` > 1 the dialogues go through ``tagger.tag_stream`` (a PackedTagger keeps ``batch`` of them
    in flight), each written to ``partial`` when it finishes; a dialogue a killed run had started turn by turn
    and every dialogue of a one-at-a-time run are tagged turn by turn, with each turn written to ``partial``
    as it is labelled: progress shows per turn and a killed run resumes inside a long dialogue. Dialogues
    restored from ``partial`` still feed a speaker memory, in order. With ``stages`` that hold a memory, each
    row also carries the memory's distribution for the turn's slot state.
    """
    done, started = _load_partial(partial, fingerprint)
    if done or started:
        log.info("resuming: %d of %d dialogues done, %d turns of unfinished ones kept, in %s", len(done),
                 len(dialogues), sum(len(v) for v in started.values()), partial)
    new = not partial.is_file()
    speakers = getattr(tagger, "speakers", None)
    single = getattr(tagger, "single", tagger)
    labels = tagger.labels
    turn_rows: dict[str, list[dict]] = {}  # rows of the turns written one by one (resumed or labelled)
    with open(partial, "a", encoding="utf-8") as f:
        if new:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        bar = progress(total=sum(len(d) for d in dialogues), unit="utt", desc="evaluate")

        def finish(d, preds):
            kept = turn_rows.pop(d.id, [])
            done[d.id] = [kept[i] if i < len(kept) else _row(d, u, p, labels, stages)
                          for i, (u, p) in enumerate(zip(d.utterances, preds))]
            f.write(json.dumps({"dialogue_id": d.id, "predictions": done[d.id]}, ensure_ascii=False) + "\n")
            f.flush()

        def one(d):
            kept = started.get(d.id, [])
            resume = [TurnPrediction(r["utterance_id"], r["predicted"], [r["probabilities"][k] for k in labels.labels])
                      for r in kept]
            bar.update(len(resume))
            turn_rows[d.id] = list(kept)

            def on_turn(i, p):
                turn_rows[d.id].append(_row(d, d.utterances[i], p, labels, stages))
                f.write(json.dumps({"dialogue_id": d.id, "turn": turn_rows[d.id][-1]}, ensure_ascii=False) + "\n")
                f.flush()
                bar.update(1)

            finish(d, single.tag(d, resume=resume, on_turn=on_turn))

        streamed = batch > 1
        for d in dialogues:
            if d.id in done:
                if speakers is not None:
                    key = "gold" if tagger.history == "gold" else "predicted"
                    speakers.observe(d, [r[key] for r in done[d.id]])
                bar.update(len(d))
            elif not streamed or d.id in started:
                one(d)
        if streamed:  # dialogues written as they finish: a killed run loses at most those in flight
            todo = [d for d in dialogues if d.id not in done]
            for k, preds in tagger.tag_stream(todo):
                finish(todo[k], preds)
                bar.update(len(todo[k]))
        bar.close()
    return [r for d in dialogues for r in done[d.id]]


def model_source(cfg: EvalConfig) -> str | None:
    """The run to load: ``--run``, else the shipped model; None with ``--zero-shot`` (the bare backbone)."""
    if cfg.zero_shot:
        return None
    return cfg.run or SHIPPED


def model_labels(cfg: EvalConfig) -> tuple[str, ...] | None:
    """The label set a trained model fixes (a jsonl folder then needs no train split to infer one); None for
    the bare backbone, whose labels come from ``--labels`` or the data's train split."""
    source = model_source(cfg)
    return RunSpec.read(resolve(source)).labels if source else None


def load_predictor(cfg: EvalConfig, labels: LabelSet):
    return load(model_source(cfg), model=cfg.model, dtype=cfg.dtype, labels=labels, prompts=cfg.prompts,
                max_tokens=cfg.max_tokens, max_utterance_tokens=cfg.max_utterance_tokens, speaker_options=cfg)


def evaluate(cfg: EvalConfig, command: str = "") -> dict:
    """Config -> data -> model -> predictions -> metrics and reports in ``cfg.out``.

    Under ``torchrun`` / ``accelerate launch`` with N processes (``erc-llm evaluate --processes N``), each
    process tags every N-th dialogue and the first one merges the shards into the same ``predictions.jsonl``
    and ``metrics.json`` a single process writes; each shard resumes on its own.
    """
    shard = Shard.from_env()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // shard.world))
    fixed = () if cfg.labels else model_labels(cfg)
    try:
        dialogues, labels, report = load_split(cfg.dataset, cfg.split, cfg.data_dir, tuple(cfg.labels) or fixed,
                                               cfg.on_bad_row)
    except DataError as e:
        if not fixed:
            raise
        raise DataError(f"{e}\nThe data's labels differ from those of model {model_source(cfg)} {list(fixed)}; pass "
                        "--run with a model trained on this label set, or --zero-shot with --labels to use the bare "
                        "backbone") from None
    log.info("%s; label set %s = %s", report.summary(), labels.name, list(labels.labels))
    if not dialogues:
        skipped = f" ({sum(report.skipped.values())} rows skipped on load: {dict(report.skipped)})" if report.skipped else ""
        raise DataError(f"{cfg.dataset}/{cfg.split} in {cfg.data_dir}: nothing to evaluate{skipped}; check the file "
                        "and the label set")
    if cfg.limit:
        dialogues = dialogues[: cfg.limit]
    p = load_predictor(cfg, labels)
    labels, history = p.labels, p.history_mode(cfg.history)
    if p.speakers is not None and p.speakers.settings.history:
        if shard.world > 1:
            raise ValueError("a model with cross-dialogue speaker history tags dialogues in story order, one after "
                             "another; it cannot be sharded across processes: run it with --processes 1")
        dialogues = dataset_order(dialogues)  # the cross-dialogue memory follows story order
    coverage = p.speakers.coverage(dialogues) if p.speakers is not None and p.speakers.settings.bios else None
    if coverage is not None and shard.rank == 0:
        log.info("speaker memory on %s: %s", cfg.split, coverage)
    mine = dialogues[shard.rank::shard.world]
    audio = p.audio_inputs(cfg.split, mine, cfg.audio_dir)
    tagger = p.tagger(cfg.history, cfg.batch, audio)
    batch = cfg.batch if hasattr(tagger, "tag_many") else 1
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    mark_output(out, "evaluation")
    partial = out / shard.name("predictions.partial.jsonl")
    t0 = time.time()
    stages = p.stages if cfg.stages else None
    rows = predict(tagger, mine, partial, _fingerprint(cfg, p, mine, stages, audio), batch, stages)
    rows = shard.gather(rows, out, dialogues)
    if rows is None:  # not the first process: its shard is written, the first one reports
        partial.unlink(missing_ok=True)
        return {}
    applied = apply_stages(stages, cfg, p, dialogues, rows) if stages is not None else None
    seconds = time.time() - t0
    scored = sum(r["gold"] is not None for r in rows)
    info = {
        "dataset": cfg.dataset, "split": cfg.split, "history": history, "context": p.context,
        "lookahead": p.lookahead, "labels": list(labels.labels),
        "dialogues": len(dialogues), "utterances": len(rows), "scored_utterances": scored,
        "skipped_on_load": dict(report.skipped), "model": p.name, "backbone": p.manifest.get("name", cfg.model),
        "dtype": p.dtype,
        "model_source": p.manifest.get("source"), "run": str(p.run_dir) if p.run_dir else None,
        "prompt_version": p.builder.templates.version,
        "speakers": {**p.speakers.settings.__dict__, "coverage": coverage and asdict(coverage)} if p.speakers else None,
        "audio": {"source": audio.spec.source, "missing": audio.missing} if audio else None,
        "stages": applied,
        "seconds": seconds, "utterances_per_second": len(rows) / max(seconds, 1e-9), "processes": shard.world,
        "threads": torch.get_num_threads(), "software": software_versions(), "config": to_dict(cfg), "command": command,
    }
    title = (f"{cfg.dataset}/{cfg.split} {p.name} (history={history}, {p.context}"
             f"{', ' + ' + '.join(applied['applied']) if applied else ''}"
             f"{', OFFLINE audio statistics of the whole split' if applied and applied['stage_stats'] == 'split' else ''})")
    metrics = write_evaluation(out, rows, labels, info, title)
    if not scored:
        log.warning("%s/%s has no gold labels: wrote predictions only (no metrics)", cfg.dataset, cfg.split)
    partial.unlink(missing_ok=True)
    return metrics


def apply_stages(stages, cfg: EvalConfig, p, dialogues, rows: list[dict]) -> dict:
    """Replace every row's probabilities and prediction by the stages' final (calibrated) distribution, keeping
    the adapter's (``adapter_probabilities``) and each stage's; returns what was applied, with per-stage metrics."""
    names = list(p.labels.labels)
    llm = np.array([[r["probabilities"][k] for k in names] for r in rows])
    memory = np.array([[r["memory_probabilities"][k] for k in names] for r in rows]) if stages.memory else None
    table, note = None, None
    fusion = stages.settings.get("fusion")
    if fusion and fusion["audio_source"] != "none":
        directory = cfg.audio_dir or fusion["audio_dir"]
        if Path(directory).is_dir():
            table = S.audio_table(fusion["audio_source"], directory, cfg.split)
        else:  # as a live session without audio: every turn gets the classifier's "no audio" input
            table = S.NO_AUDIO
            note = (f"no {fusion['audio_source']} audio features in {directory!r}: the fusion classifier heard the "
                    "'no audio' input for every turn, as a live session without audio does; pass --audio-dir with "
                    "this split's features")
            log.warning(note)
    stats = cfg.stage_stats or (fusion or {}).get("stage_stats", "online")
    steps = S.apply(stages, dialogues, llm, memory, table, stats)
    final = steps["calibrated"]
    for r, q in zip(rows, final):
        r["adapter_probabilities"] = r.pop("probabilities")
        r["probabilities"] = dict(zip(names, [round(float(x), 6) for x in q]))
        r["predicted"] = names[int(np.argmax(q))]
    applied = stages.names  # a fusion without this split's audio hears "no audio" (NO_AUDIO): always applied
    gold = np.array([names.index(r["gold"]) if r["gold"] is not None else -1 for r in rows])
    return {"applied": applied, "settings": stages.settings, "described": S.describe(stages.settings),
            "stage_stats": stats if table is not None else None, "note": note,
            "steps": S.stage_report(gold, steps) if (gold >= 0).any() else None}


class Shard:
    """This process's share of a sharded evaluation (``WORLD_SIZE`` / ``RANK`` as torchrun and accelerate set)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world
        self.state = None
        if world > 1:
            self.state = PartialState(cpu=not torch.cuda.is_available())

    @classmethod
    def from_env(cls) -> "Shard":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def name(self, filename: str) -> str:
        return filename if self.world == 1 else filename.replace(".jsonl", f".rank{self.rank}.jsonl")

    def gather(self, rows: list[dict], out: Path, dialogues) -> list[dict] | None:
        """All rows in dataset order on the first process (None on the others)."""
        if self.world == 1:
            return rows
        atomic_write_jsonl(out / self.name("predictions.shard.jsonl"), rows)
        self.state.wait_for_everyone()
        if self.rank != 0:
            return None
        by_dialogue: dict[str, list[dict]] = {}
        for r in range(self.world):
            path = out / f"predictions.shard.rank{r}.jsonl"
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                by_dialogue.setdefault(row["dialogue_id"], []).append(row)
            path.unlink()
        return [row for d in dialogues for row in by_dialogue[d.id]]
