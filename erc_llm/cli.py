"""``erc-llm`` command line: thin — parse, then call one function."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from erc_llm.config import BaselineConfig, ConfigError, EvalConfig, add_arguments, from_args
from erc_llm.data import DataError


def _prepare_model(args) -> None:
    from erc_llm.backbone import prepare_model

    path, manifest = prepare_model(args.name)
    print(f"{args.name}: ready at {path}")
    for k, v in manifest.items():
        print(f"  {k}: {v}")


def _evaluate(args) -> None:
    from erc_llm.evaluate import evaluate

    cfg = from_args(EvalConfig, args)
    m = evaluate(cfg, command="erc-llm " + shlex.join(sys.argv[1:]))
    if "weighted_f1" not in m:
        print(f"{m['utterances']} utterances labelled (no gold labels to score) -> {cfg.out}/predictions.jsonl")
        return
    print(f"{m['dataset']}/{m['split']} ({m['history']} history): weighted F1 {m['weighted_f1']:.2f}, "
          f"WA {m['accuracy']:.2f}, UA {m['unweighted_accuracy']:.2f}, macro F1 {m['macro_f1']:.2f}; "
          f"{m['utterances']} utterances in {m['seconds']:.0f}s ({m['utterances_per_second']:.2f} utt/s) -> {cfg.out}")


def _baseline_train(args) -> None:
    from erc_llm.baseline.train import run
    from erc_llm.config import BaselineConfig

    cfg = from_args(BaselineConfig, args)
    s = run(cfg, command="erc-llm " + shlex.join(sys.argv[1:]))
    f1 = s["weighted_f1"]
    print(f"{s['model']}: test weighted F1 {f1['mean']:.2f} +- {f1['std']:.2f} over seeds {s['seeds']} -> {cfg.out}")
    if "gates" in s:
        print("  average gates: " + ", ".join(f"{k} {v:.3f}" for k, v in s["gates"].items()))


def _baseline_evaluate(args) -> None:
    from erc_llm.baseline.train import evaluate_saved

    m = evaluate_saved(args.run, args.split, args.out, args.data_dir, args.audio_dir, "erc-llm " + shlex.join(sys.argv[1:]))
    print(f"{args.split}: weighted F1 {m['weighted_f1']:.2f}, WA {m['accuracy']:.2f}, UA {m['unweighted_accuracy']:.2f} -> {args.out}")


def _data_download(args) -> None:
    from erc_llm.data.meld import download_meld

    for p in download_meld(args.out):
        print(f"wrote {p}")


def _data_stats(args) -> None:
    from erc_llm.data import label_counts, load_split

    dialogues, labels, report = load_split(args.dataset, args.split, args.data_dir)
    print(report.summary())
    counts = label_counts(dialogues)
    total = sum(counts.values()) or 1
    for lab in labels.labels:
        print(f"  {lab:<12} {counts.get(lab, 0):>6}  {100 * counts.get(lab, 0) / total:5.1f}%")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="erc-llm", description="Emotion recognition in conversation with a small LLM.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="LoRA training (see `erc-llm train --help`; same as erc_llm/train.py)")

    pm = sub.add_parser("prepare-model", help="convert a packaged GGUF backbone into the cache (once)")
    pm.add_argument("name", nargs="?", default="gemma-3-270m", help="gemma-3-270m (default) or smollm2-135m-instruct")
    pm.set_defaults(func=_prepare_model)

    ev = sub.add_parser("evaluate", help="evaluate a dialogue set with the constrained decoder")
    add_arguments(ev, EvalConfig)
    ev.set_defaults(func=_evaluate)

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
        from erc_llm.train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"erc-llm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
