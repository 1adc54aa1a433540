"""Performance harness: the naive InstructERC-style pipeline against ours, in one process, interleaved.

    python eval/bench.py --data-dir ../shared/data/meld --run runs/meld_gemma_seed0      # or: erc-llm bench ...

(a) naive: one prompt per target utterance carrying a window of the 12 earlier turns (with the labels it
    predicted for them), greedy ``generate`` of a few tokens, label found by string matching;
(b) ours: one streaming transcript per dialogue over a KV cache, constrained label scoring at the slot
    (label columns of the LM head only), LoRA merged into the weights, fp32 or bf16 weights, and
    (``ours_bf16_packed``) 8 dialogues packed into one forward per turn step.
Both use the same backbone, adapter and prompt templates, on the same dialogues, alternating dialogue by
dialogue. Also: supervised labels/s in training (per-utterance windowed prompts with full-vocabulary
logits vs our whole-dialogue, slot-only loss), achieved FLOP/s of our forward against the measured
matmul peak, time against dialogue length, and (``--full-test``) MELD test end to end in a subprocess
(wall time, peak RSS). Writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from erc_llm.backbone import DEFAULT_MODEL, load_for_training, native_bf16_cpu
from erc_llm.bench.harness import evaluate_in_child, forward_flops, machine, matmul_peaks, synthetic, write_results
from erc_llm.config import TrainConfig
from erc_llm.data import MELD_LABELS, load_split
from erc_llm.data.schema import Dialogue
from erc_llm.decoding import PackedTagger, StreamingTagger
from erc_llm.heads import decoder_hidden, first_token_ids, slot_logits
from erc_llm.io import atomic_write_json, atomic_write_text
from erc_llm.run import SHIPPED
from erc_llm.run import load as load_predictor
from erc_llm.training.lora import wrap_lora
from erc_llm.training.losses import label_loss

WINDOW = 12


@torch.inference_mode()
def forward_rate(model, ids: list[int], reps: int = 3) -> dict:
    """Our forward: the transformer body over ``ids`` (the label head on one position is negligible)."""
    x = torch.tensor([ids])
    decoder_hidden(model, x)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        decoder_hidden(model, x)
        best = min(best, time.perf_counter() - t)
    flops = forward_flops(model, len(ids))
    return {"tokens": len(ids), "seconds": best, "gflop": flops / 1e9, "gflop_per_s": flops / best / 1e9}


# ----------------------------------------------------------------------------------- naive

def parse_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label named first in a generation (whole words, case-insensitive); None if none is."""
    hits = [(m.start(), lab) for lab in labels for m in [re.search(rf"\b{re.escape(lab)}\b", text, re.I)] if m]
    return min(hits)[1] if hits else None


@torch.inference_mode()
def naive_tag(model, tokenizer, builder, dialogue: Dialogue, max_new_tokens: int = 4) -> tuple[list[str], int, int]:
    """(labels, tokens processed, parse failures): one windowed prompt + ``generate`` per utterance."""
    labels = builder.labels.labels
    written, tokens, failures = [], 0, 0
    header = builder.header_ids(dialogue)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i, u in enumerate(dialogue.utterances):
        ids = list(header)
        for j in range(max(0, i - WINDOW), i):
            ids += builder.turn_ids(dialogue.utterances[j]) + builder.answer_ids(written[j])
        ids += builder.turn_ids(u)
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
        new = out[0, len(ids):]
        label = parse_label(tokenizer.decode(new, skip_special_tokens=True), labels)
        if label is None:
            failures += 1
            label = labels[0]  # what a parser must fall back to: the first (majority) class
        written.append(label)
        tokens += len(ids) + len(new)
    return written, tokens, failures


def ours_tag(model, builder, dialogue: Dialogue) -> tuple[list[str], int]:
    preds = [p.label for p in StreamingTagger(model, builder).tag(dialogue)]
    return preds, len(builder.build(dialogue, preds).input_ids)


# -------------------------------------------------------------------------------- training

def train_rates(model, builder, dialogues: list[Dialogue]) -> dict:
    """Supervised labels/s: (a) a windowed prompt per utterance, full-vocabulary logits at every position,
    one backward each; (b) one forward per dialogue, label logits at the slots only. Interleaved."""
    firsts = first_token_ids(builder)
    secs = {"naive": 0.0, "ours": 0.0}
    n = 0
    model.train()
    for d in dialogues:
        gold = [u.emotion for u in d.utterances]
        t = time.perf_counter()
        header = builder.header_ids(d)
        for i, u in enumerate(d.utterances):
            ids = list(header)
            for j in range(max(0, i - WINDOW), i):
                ids += builder.turn_ids(d.utterances[j]) + builder.answer_ids(gold[j])
            ids += builder.turn_ids(u)
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # HF default: logits at every position
            loss = torch.nn.functional.cross_entropy(logits[-1:].float(), torch.tensor([firsts[builder.labels.index(gold[i])]]))
            loss.backward()
        model.zero_grad(set_to_none=True)
        secs["naive"] += time.perf_counter() - t
        t = time.perf_counter()
        tr = builder.build(d, gold)
        targets = torch.tensor([builder.labels.index(gold[j]) for j in tr.turn_index])
        label_loss(slot_logits(model, tr, firsts), targets, None, 0.0).backward()
        model.zero_grad(set_to_none=True)
        secs["ours"] += time.perf_counter() - t
        n += len(d.utterances)
    model.eval()
    out = {k: {"labels": n, "seconds": v, "labels_per_second": n / v} for k, v in secs.items()}
    out["ratio"] = out["ours"]["labels_per_second"] / out["naive"]["labels_per_second"]
    return out


# ---------------------------------------------------------------------------------- helpers

def full_test(args, dtype: str, out: Path, dataset: str = "meld") -> dict:
    """A test split end to end in a child process (``erc-llm evaluate``): wall time, utterances/s, weighted F1,
    peak RSS, and the dtype that ran (``auto`` resolved).

    Peak RSS is the child's own high-water mark (``VmHWM`` in /proc, polled): ``getrusage`` of children
    would count the pages a forked child shares with this (large) process before it execs."""
    m, wall, peak, cmd = evaluate_in_child(
        ["--dataset", dataset, "--split", "test", "--data-dir", args.data_dir, "--dtype", dtype]
        + (["--run", args.run] if args.run else [])
        + (["--zero-shot", "true", "--model", args.model or "gemma-3-270m"] if args.zero_shot else []), out)
    return {"dtype": dtype, "ran_as": m.get("dtype", dtype), "wall_seconds": wall, "utterances": m["utterances"],
            "utterances_per_second": m["utterances_per_second"], "weighted_f1": m.get("weighted_f1"),
            "peak_rss_gb": peak, "command": " ".join(cmd[2:])}


def threads() -> int:
    return int(os.environ.get("ERC_LLM_THREADS", 0)) or os.cpu_count() or 1


# -------------------------------------------------------------------------------------- main

def load(args, dtype: str):
    """(model, tokenizer, prompt builder, manifest) of ``--run`` (default: the shipped model) or, with
    ``--zero-shot``, the bare backbone."""
    p = load_predictor(None if args.zero_shot else (args.run or SHIPPED), model=args.model, dtype=dtype,
                       labels=MELD_LABELS)
    return p.model, p.tokenizer, p.builder, {**p.manifest, "name": p.name}


def compare_eval(models: dict, dialogues: list[Dialogue], pack: int = 8) -> dict:
    """Interleaved chunk by chunk (``pack`` dialogues): naive (fp32), ours per dtype, ours packed; accuracy on
    the same utterances."""
    names = ["naive", *models["ours"], "ours_bf16_packed"]
    stats = {name: {"seconds": 0.0, "tokens": 0, "correct": 0, "failures": 0} for name in names}
    model, tok, builder = models["naive"]
    m16, b16 = models["ours"]["ours_bf16"]
    packed = PackedTagger(m16, b16, batch=pack)
    n = 0
    for k in range(0, len(dialogues), pack):
        chunk = dialogues[k: k + pack]
        gold = [u.emotion for d in chunk for u in d.utterances]
        t = time.perf_counter()
        runs = [naive_tag(model, tok, builder, d) for d in chunk]
        s = stats["naive"]
        s["seconds"] += time.perf_counter() - t
        s["tokens"] += sum(r[1] for r in runs)
        s["failures"] += sum(r[2] for r in runs)
        s["correct"] += sum(p == g for p, g in zip([x for r in runs for x in r[0]], gold))
        for name, (m, b) in models["ours"].items():
            t = time.perf_counter()
            runs = [ours_tag(m, b, d) for d in chunk]
            s = stats[name]
            s["seconds"] += time.perf_counter() - t
            s["tokens"] += sum(r[1] for r in runs)
            s["correct"] += sum(p == g for p, g in zip([x for r in runs for x in r[0]], gold))
        t = time.perf_counter()
        preds = [[p.label for p in ps] for ps in packed.tag_many(chunk)]
        s = stats["ours_bf16_packed"]
        s["seconds"] += time.perf_counter() - t
        s["tokens"] += sum(len(b16.build(d, p).input_ids) for d, p in zip(chunk, preds))
        s["correct"] += sum(p == g for p, g in zip([x for p in preds for x in p], gold))
        n += len(gold)
    for s in stats.values():
        s.update(utterances=n, utterances_per_second=n / s["seconds"], tokens_per_second=s["tokens"] / s["seconds"],
                 accuracy=100 * s["correct"] / n)
    return stats


def scaling(models: dict, dialogues: list[Dialogue], lengths: list[int]) -> list[dict]:
    rows = []
    model, tok, builder = models["naive"]
    m, b = models["ours"]["ours_bf16"]
    for n in lengths:
        d = synthetic(dialogues, n)
        t = time.perf_counter()
        naive_tag(model, tok, builder, d)
        a = time.perf_counter() - t
        t = time.perf_counter()
        ours_tag(m, b, d)
        rows.append({"utterances": n, "naive_seconds": a, "ours_seconds": time.perf_counter() - t})
    return rows


def render(r: dict) -> str:
    e, tr, hw = r["eval"], r["train"], r["hardware"]
    lines = [f"# Benchmark: naive windowed generate vs streaming constrained decoding ({r['model']})", "",
             f"Command: `{r['command']}` — {r['machine']}, {r['threads']} threads, one process, interleaved.", "",
             f"## Evaluation ({e['naive']['utterances']} MELD test utterances, same dialogues)", "",
             "| path | utt/s | tokens/s | accuracy | parse failures | speed-up vs naive |", "|---|---|---|---|---|---|"]
    for name, s in e.items():
        lines.append(f"| {name} | {s['utterances_per_second']:.2f} | {s['tokens_per_second']:.0f} | {s['accuracy']:.2f} | "
                     f"{s['failures'] if name == 'naive' else '—'} | "
                     f"{s['utterances_per_second'] / e['naive']['utterances_per_second']:.1f}x |")
    lines += ["", f"## Training (supervised labels/s, {tr['ours']['labels']} labels, LoRA, fp32)", "",
              "| path | labels/s |", "|---|---|",
              f"| naive: per-utterance windowed prompt, full-vocabulary logits | {tr['naive']['labels_per_second']:.2f} |",
              f"| ours: whole dialogue, slot logits only | {tr['ours']['labels_per_second']:.2f} |",
              f"| ratio | {tr['ratio']:.1f}x |", "",
              "## Hardware efficiency (prefill of a real transcript through the transformer body)", "",
              f"Measured matmul peak: fp32 {hw['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 {hw['matmul_bf16_gflops']:.0f} GFLOP/s.", "",
              "| dtype | tokens | GFLOP | seconds | GFLOP/s | % of fp32 peak | % of same-dtype peak |", "|---|---|---|---|---|---|---|"]
    for dt, f in hw["forward"].items():
        peak = hw[f"matmul_{dt}_gflops"]
        lines.append(f"| {dt} | {f['tokens']} | {f['gflop']:.1f} | {f['seconds']:.3f} | {f['gflop_per_s']:.0f} | "
                     f"{100 * f['gflop_per_s'] / hw['matmul_fp32_gflops']:.0f}% | {100 * f['gflop_per_s'] / peak:.0f}% |")
    lines += ["", "## Time against dialogue length (one synthetic dialogue of real MELD utterances each)", "",
              "| utterances | naive s | ours (bf16) s | naive s/utt | ours s/utt |", "|---|---|---|---|---|"]
    for row in r["scaling"]:
        n = row["utterances"]
        lines.append(f"| {n} | {row['naive_seconds']:.2f} | {row['ours_seconds']:.2f} | {row['naive_seconds'] / n:.3f} | "
                     f"{row['ours_seconds'] / n:.3f} |")
    if r.get("full_test"):
        lines += ["", "## MELD test end to end (`erc-llm evaluate`, child process)", "",
                  "| dtype | utterances | wall s | utt/s | weighted F1 | peak RSS GB |", "|---|---|---|---|---|---|"]
        for f in r["full_test"]:
            lines.append(f"| {f['dtype']} | {f['utterances']} | {f['wall_seconds']:.0f} | {f['utterances_per_second']:.2f} | "
                         f"{f['weighted_f1']:.2f} | {f['peak_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="eval/bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="MELD csv folder")
    p.add_argument("--run", default="", help="trained run or shipped model name (adapter merged for every path; "
                   "default: the shipped model)")
    p.add_argument("--zero-shot", action="store_true", help="the bare backbone (--model) instead")
    p.add_argument("--model", default="", help="backbone of --zero-shot")
    p.add_argument("--dialogues", type=int, default=20, help="MELD test dialogues for the interleaved comparison")
    p.add_argument("--train-dialogues", type=int, default=6)
    p.add_argument("--lengths", default="5,10,20,40")
    p.add_argument("--full-test", action="store_true", help="also evaluate all of MELD test (fp32 and bf16) end to end")
    p.add_argument("--out", default="eval/results/bench")
    args = p.parse_args(argv)
    if native_bf16_cpu() is None:
        print("warning: this CPU has no native bf16 (no AMX / avx512_bf16): the bf16 rows run emulated, about 100x "
              "slower than float32, and on a real backbone take hours; `erc-llm evaluate` (--dtype auto = float32 "
              "here) gives this machine's speed", file=sys.stderr)
    torch.set_num_threads(threads())
    test, _, _ = load_split("meld", "test", args.data_dir)
    train, _, _ = load_split("meld", "train", args.data_dir)
    m32, tok, builder, manifest = load(args, "float32")
    m16, _, b16, _ = load(args, "bfloat16")
    models = {"naive": (m32, tok, builder), "ours": {"ours_fp32": (m32, builder), "ours_bf16": (m16, b16)}}
    sample = test[: args.dialogues]
    ids = builder.build(synthetic(test, 40), ["neutral"] * 40).input_ids[:512]
    result = {
        "command": "python eval/bench.py " + " ".join(argv),
        "machine": machine(), "threads": torch.get_num_threads(),
        "model": manifest.get("name"), "run": args.run or None,
        "hardware": {**matmul_peaks(), "forward": {"fp32": forward_rate(m32, ids), "bf16": forward_rate(m16, ids)}},
        "eval": compare_eval(models, sample),
        "scaling": scaling(models, test, [int(x) for x in args.lengths.split(",")]),
    }

    name = manifest.get("path") or args.model or DEFAULT_MODEL
    lora, _, _ = load_for_training(name, "float32")
    result["train"] = train_rates(wrap_lora(lora, TrainConfig(data_dir=".").lora_options()), builder, train[: args.train_dialogues])
    del lora
    if args.full_test:
        out = Path(args.out)
        result["full_test"] = [full_test(args, dt, out / f"full_test_{dt}") for dt in ("float32", "bfloat16")]
    atomic_write_json(Path(args.out) / "bench.json", result)
    atomic_write_text(Path(args.out) / "bench.md", render(result))
    print(render(result))
    return 0


# ------------------------------------------------------------------------------ stages

def _timed_evaluation(args, stages: str, folder: Path) -> dict:
    """One ``erc-llm evaluate`` of ``args.run`` in a child process, with its stages on or off: figures, wall
    time and peak RSS."""
    m, wall, peak, cmd = evaluate_in_child(
        ["--dataset", args.dataset, "--split", args.split, "--data-dir", args.data_dir, "--run", args.run,
         "--stages", stages, "--dtype", args.dtype] + (["--audio-dir", args.audio_dir] if args.audio_dir else []),
        folder)
    return {"wall_seconds": wall, "utterances_per_second": m["utterances_per_second"], "weighted_f1": m["weighted_f1"],
            "ece": m.get("ece"), "peak_rss_gb": peak, "dtype": m.get("dtype"), "stages": m.get("stages"),
            "command": " ".join(cmd[2:])}


def stages_main(argv: list[str]) -> int:
    """A run with stages (memory, fusion, calibration) against its adapter alone, on one split, in one run:
    each ``erc-llm evaluate`` in a child process (into a temporary folder), alternating, the same dtype and
    threads; ``results.json`` keeps every evaluation's figures and ``table.md`` the medians."""
    p = argparse.ArgumentParser(prog="erc-llm bench stages", description=stages_main.__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a trained run with stages (train.py with memory / fusion on)")
    p.add_argument("--dataset", default="meld", choices=("meld", "jsonl"))
    p.add_argument("--data-dir", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--audio-dir", default="", help="the split's audio features for the fusion stage (default: the run's)")
    p.add_argument("--repeats", type=int, default=1, help="alternating pairs of evaluations (the median is reported)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--out", default="eval/results/bench_stages")
    args = p.parse_args(argv)
    out, rows = Path(args.out), {"adapter alone": [], "with stages": []}
    with tempfile.TemporaryDirectory(prefix="bench_stages.") as work:  # the evaluations' folders
        for k in range(args.repeats):
            for name, on in (("adapter alone", "false"), ("with stages", "true")):
                rows[name].append(_timed_evaluation(args, on, Path(work) / f"stages_{on}_{k}"))
    summary = {name: {key: sorted(r[key] for r in runs)[len(runs) // 2] for key in
                      ("utterances_per_second", "weighted_f1", "peak_rss_gb")} for name, runs in rows.items()}
    ratio = summary["with stages"]["utterances_per_second"] / summary["adapter alone"]["utterances_per_second"]
    result = {"command": "erc-llm bench stages " + " ".join(argv), "machine": machine(), "run": args.run,
              "split": f"{args.dataset}/{args.split}", "runs": rows, "median": summary, "speed_ratio": ratio}
    table = "\n".join(["| | utterances/s | weighted F1 | peak RSS GB |", "|---|---|---|---|"] + [
        f"| {name} | {s['utterances_per_second']:.2f} | {s['weighted_f1']:.2f} | {s['peak_rss_gb']:.2f} |"
        for name, s in summary.items()]) + f"\n\nWith stages: {100 * ratio:.0f}% of the adapter's utterances/s.\n"
    note = (f"Machine: {result['machine']}; {args.repeats} "
            f"alternating pair(s) of `erc-llm evaluate` on {args.dataset}/{args.split} (medians).")
    return write_results(out, result, f"Stages against the adapter alone ({args.dataset}/{args.split})", note, table)
