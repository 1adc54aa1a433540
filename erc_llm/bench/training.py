"""Training throughput benchmark: the training recipes before/after the fast path, FLOP/s against the
measured matmul peak, peak memory, and cost per token against dialogue length (training and decoding).

    python eval/bench.py training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap
    python eval/bench.py training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap \
        --model gemma-3-270m,qwen2.5-coder-0.5b --paths after --lengths "" --out eval/results/bench_backbones

*Before* is the original loop (float32 weights, masked sdpa attention, one forward per dialogue:
``--dtype float32 --attention sdpa --pack-tokens 0``); *after* is the recipe as configured (``--dtype auto``:
bfloat16 weights where the CPU computes bf16 natively, with the adapters under bf16 autocast; block attention;
dialogues packed into one forward; the vectorised LoRA dropout of ``erc_llm.training.lora``; activation checkpointing
where the recipe turns it on). Each
recipe runs as a real ``erc_llm/train.py`` child process for the same steps on the same dialogues;
tokens/s is the optimisation time only (as ``train_summary.json`` reports it) and peak RSS is the child's
``VmHWM``. ``--model`` takes several backbones (each recipe as configured, with that ``--model``; a recipe that
starts from an adapter of another backbone starts from a fresh one), measured in one run against the same matmul
peak. The stages (memory, fusion) are not training and are switched off. Writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from erc_llm.attention import register
from erc_llm.backbone import load_for_training, resolve_dtype
from erc_llm.bench.harness import evaluate_in_child, forward_flops, machine, matmul_peaks, run_child, synthetic
from erc_llm.config import TrainConfig
from erc_llm.data import load_split
from erc_llm.decoding import StreamingTagger
from erc_llm.heads import first_token_ids, slot_logits
from erc_llm.io import atomic_write_json, atomic_write_text
from erc_llm.options import build
from erc_llm.prompting import PromptBuilder, Templates
from erc_llm.run import RunSpec
from erc_llm.training.lora import compute_context, wrap_lora
from erc_llm.training.losses import label_loss

REPO = Path(__file__).resolve().parents[2]
PATHS = {"before": ["--dtype", "float32", "--attention", "sdpa", "--pack-tokens", "0", "--activation-checkpointing", "false"],
         "after": ["--dtype", "auto", "--attention", "block"]}
RECIPES = {"meld": ("configs/meld.yaml", "meld_dir"), "iemocap": ("configs/iemocap.yaml", "iemocap_dir")}


def recipe_run(config: str, data_dir: str, path: str, steps: int, work: Path, threads: int, model: str) -> dict:
    """One training child process for ``steps`` optimizer steps; tokens/s, labels/s, seconds, peak RSS."""

    out = work / f"{Path(config).stem}_{path}"
    recipe = yaml.safe_load((REPO / config).read_text())
    other = model != recipe.get("model") and recipe.get("init_adapter")  # a start adapter fits its own backbone only
    cmd = [sys.executable, str(REPO / "erc_llm" / "train.py"), "--config", str(REPO / config), "--data-dir", data_dir,
           "--model", model, *(["--init-adapter", ""] if other else []),
           "--out", str(out), "--overwrite", "true", "--max-steps", str(steps), "--eval-every", str(10 * steps),
           "--eval-dialogues", "1", "--save-every", str(10 * steps), "--test-eval", "false",
           "--memory", "false", "--memory-codec", "fp16", "--fusion", "false",  # the stages are not training
           "--threads", str(threads), *PATHS[path]]
    wall, hwm = run_child(cmd)
    summary = json.loads((out / "train_summary.json").read_text())

    dtype = RunSpec.read(out).train_dtype
    checkpointing = bool(yaml.safe_load((out / "config.yaml").read_text()).get("activation_checkpointing"))
    return {"tokens_per_second": summary["tokens_per_second"], "labels_per_second": summary["labels_per_second"],
            "train_seconds": summary["train_seconds"], "wall_seconds": wall,
            "peak_rss_gb": hwm / 1024**2, "dtype": dtype, "activation_checkpointing": checkpointing,
            "command": " ".join(cmd[1:])}


def train_flops_per_token(model, tokens: int) -> float:
    """Training FLOPs per token of a frozen backbone with LoRA: forward plus the backward to the inputs
    (no weight gradients outside the small adapters), i.e. about twice the forward."""

    return 2 * forward_flops(model, tokens) / tokens


def avg_tokens(config: str, data_dir: str, tokenizer) -> float:
    """Mean transcript length of the recipe's training dialogues (its prompt, its token budget)."""
    cfg = build(TrainConfig, str(REPO / config), {"data_dir": data_dir, "out": tempfile.mkdtemp()})
    dialogues, labels, _ = load_split(cfg.dataset, "train", data_dir, tuple(cfg.labels) or None)
    b = PromptBuilder(tokenizer, labels, Templates.load(context=cfg.context), cfg.max_tokens, cfg.max_utterance_tokens)
    lens = [len(b.build(d, [u.emotion for u in d.utterances]).input_ids) for d in dialogues]
    return sum(lens) / len(lens)


def length_scaling(model_name: str, data_dir: str, lengths: list[int], reps: int = 1) -> list[dict]:
    """Training (one dialogue forward+backward) and decoding (streaming, predicted history) tokens/s for
    synthetic dialogues of real IEMOCAP utterances, before and after; no truncation (budget above length)."""
    dialogues, labels, _ = load_split("jsonl", "train", data_dir)
    rows = []
    models = {}
    for path, dtype, attn in (("before", "float32", "sdpa"), ("after", resolve_dtype("auto"), "block")):
        m, tok, _ = load_for_training(model_name, dtype)
        if attn == "block":
            m.set_attn_implementation(register())
        models[path] = (wrap_lora(m, TrainConfig(data_dir=".").lora_options()).train(), tok)
    dec, tok, _ = load_for_training(model_name, resolve_dtype("auto"))  # load_backbone would bound oneDNN's cache
    dec.eval()
    for n in [lengths[0], *lengths]:  # the first pass warms up (allocator, kernels) and is not reported
        d = synthetic(dialogues, n)
        b = PromptBuilder(tok, labels, max_tokens=1_000_000)
        tr = b.build(d, [u.emotion for u in d.utterances])
        targets = torch.tensor([labels.index(d.utterances[j].emotion) for j in tr.turn_index])
        row = {"turns": n, "tokens": len(tr.input_ids)}
        for path, (m, _) in models.items():
            best = float("inf")
            for _ in range(reps):
                t = time.perf_counter()
                with compute_context(m, next(m.parameters()).dtype, "cpu"):
                    logits = slot_logits(m, tr, first_token_ids(b))
                label_loss(logits.float(), targets, None, 0.0).backward()
                m.zero_grad(set_to_none=True)
                best = min(best, time.perf_counter() - t)
            row[f"train_{path}_tokens_per_second"] = len(tr.input_ids) / best
        t = time.perf_counter()
        StreamingTagger(dec, b).tag(d)
        row["decode_tokens_per_second"] = len(tr.input_ids) / (time.perf_counter() - t)
        rows.append(row)
    return rows[1:]


def backbone_rows(name: str, args, paths: list[str], threads: int, work: Path) -> dict:
    """Every recipe on one backbone, each path a training child; GFLOP/s from the backbone's FLOPs per token."""
    model, tok, _ = load_for_training(name)  # not load_backbone: its oneDNN setting would reach the children
    rows = {}
    for recipe, (config, attr) in RECIPES.items():
        data_dir = getattr(args, attr)
        per_token = train_flops_per_token(model, int(avg_tokens(config, data_dir, tok)))
        r = {path: recipe_run(config, data_dir, path, args.steps, work / name, threads, name) for path in paths}
        for path in paths:
            r[path]["gflop_per_second"] = r[path]["tokens_per_second"] * per_token / 1e9
        if len(paths) == 2:
            r["speedup"] = r["after"]["tokens_per_second"] / r["before"]["tokens_per_second"]
        r["peak_rss_gb"] = r[paths[-1]]["peak_rss_gb"]
        r["train_gflop_per_token"] = per_token / 1e9
        rows[recipe] = r
    return rows


def run(args) -> dict:
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    models = [m for m in args.model.split(",") if m]
    paths = [p for p in PATHS if p in args.paths.split(",")]
    result = {"command": "python eval/bench.py training " + " ".join(args.argv), "threads": threads,
              "machine": machine(), "models": models, "paths": paths,
              "hardware": matmul_peaks(),
              "training": {}}
    with tempfile.TemporaryDirectory(prefix="erc_llm_bench_") as work:
        for name in models:
            result["training"][name] = backbone_rows(name, args, paths, threads, Path(work))
    lengths = [int(x) for x in args.lengths.split(",") if x]
    result["length_scaling"] = length_scaling(models[0], args.iemocap_dir, lengths) if lengths else []
    return result


def evaluate_child(args: list[str], out: Path) -> dict:
    """``erc-llm evaluate ARGS --out OUT`` (``--dtype auto``, what a user runs) as a child process: the model it
    scored, the dtype it ran in, wall time, utterances/s, weighted F1, peak RSS (the child's ``VmHWM``)."""

    m, wall, peak, _ = evaluate_in_child(args, out)
    return {"model": m["model"], "dtype": m["dtype"], "utterances": m["utterances"], "seconds": wall,
            "utterances_per_second": m["utterances_per_second"], "weighted_f1": m.get("weighted_f1"), "peak_rss_gb": peak,
            "command": "erc-llm evaluate " + " ".join(args) + " --out OUT"}


def long_dialogue_dir(data_dir: str, turns: int, work: Path) -> Path:
    """A JSONL data folder whose test split is one dialogue of ``turns`` real IEMOCAP training utterances."""
    dialogues, _, _ = load_split("jsonl", "train", data_dir)
    utts = [u for d in dialogues for u in d.utterances]
    d = synthetic([type(dialogues[0])("all", utts * (turns // len(utts) + 1))], turns)
    folder = work / f"long{turns}"
    folder.mkdir(parents=True, exist_ok=True)
    row = {"dialogue_id": d.id, "utterances": [{"speaker": u.speaker, "text": u.text, "emotion": u.emotion,
                                                 "utterance_id": u.utterance_id} for u in d.utterances]}
    (folder / "test.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def decoding(args) -> dict:
    """Batch evaluation speed: MELD test (the shipped model) and IEMOCAP test (``--iemocap-run``) through
    ``erc-llm evaluate`` at ``--dtype auto``, and one synthetic dialogue per ``--turns`` length (IEMOCAP utterances, the
    IEMOCAP run; transcripts truncated at the run's token budget) to show time proportional to length."""
    result = {"command": "python eval/bench.py decoding " + " ".join(args.argv), "machine": machine(), "corpora": {}}
    with tempfile.TemporaryDirectory(prefix="erc_llm_bench_") as tmp:
        work = Path(tmp)
        result["corpora"]["meld"] = evaluate_child(
            ["--dataset", "meld", "--split", "test", "--data-dir", args.meld_dir], work / "meld")
        result["corpora"]["iemocap"] = evaluate_child(
            ["--dataset", "jsonl", "--split", "test", "--data-dir", args.iemocap_dir, "--run", args.iemocap_run],
            work / "iemocap")
        c = result["corpora"]
        result["iemocap_vs_meld"] = c["iemocap"]["utterances_per_second"] / c["meld"]["utterances_per_second"]

        labels = ",".join(RunSpec.read(Path(args.iemocap_run)).labels)
        result["long_dialogue"] = []
        for n in [int(x) for x in args.turns.split(",")]:
            folder = long_dialogue_dir(args.iemocap_dir, n, work)
            r = evaluate_child(["--dataset", "jsonl", "--split", "test", "--data-dir", str(folder), "--labels", labels,
                                "--run", args.iemocap_run], work / f"out{n}")
            result["long_dialogue"].append({"turns": n, **r, "seconds_per_turn": r["seconds"] / n})
    return result


def render_decoding(r: dict) -> str:
    c = r["corpora"]
    dtypes = sorted({x.get("dtype", "bfloat16") for x in [*c.values(), *r["long_dialogue"]]})
    lines = ["# Batch evaluation speed", "", f"Command: `{r['command']}` — {r['machine']}; {' / '.join(dtypes)}, "
             "packed, one process.", "",
             "| corpus | model | utterances | seconds | utterances/s | weighted F1 | peak RSS GB |",
             "|---|---|---|---|---|---|---|"]
    for name, x in c.items():
        lines.append(f"| {name} test | {x.get('model', '')} | {x['utterances']} | {x['seconds']:.0f} | {x['utterances_per_second']:.1f} | "
                     f"{x['weighted_f1']:.2f} | {x['peak_rss_gb']:.2f} |")
    lines += ["", f"IEMOCAP / MELD utterances/s: **{r['iemocap_vs_meld']:.2f}**", "",
              "| one dialogue of N turns | seconds | seconds per turn | peak RSS GB |", "|---|---|---|---|"]
    for x in r["long_dialogue"]:
        lines.append(f"| {x['turns']} | {x['seconds']:.0f} | {x['seconds_per_turn']:.3f} | {x['peak_rss_gb']:.2f} |")
    return "\n".join(lines) + "\n"


def bf16_share(gflops: float, hw: dict) -> str:
    """Achieved GFLOP/s as a share of the bf16 matmul peak; '-' where bf16 is emulated (the share would mislead)."""
    return f"{100 * gflops / hw['matmul_bf16_gflops']:.0f}%" if hw.get("bf16_native", True) else "- (no native bf16)"


def render(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# Training throughput ({', '.join(r['models'])})", "", f"Command: `{r['command']}` — {r['machine']}, "
             f"{r['threads']} threads. Measured matmul peak: fp32 {hw['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 "
             f"{hw['matmul_bf16_gflops']:.0f} GFLOP/s.", "",
             "Before: float32 weights, masked sdpa attention, one forward per dialogue. After: the recipe's "
             "config (bfloat16 weights where native with the adapters under bf16 autocast, block attention, "
             "packed dialogues, vectorised LoRA dropout; `activation_checkpointing` as the recipe sets it).", "",
             "| backbone | recipe | path | weights | GFLOP/token | tokens/s | labels/s | GFLOP/s | % of fp32 peak | "
             "% of bf16 peak | peak RSS GB | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, recipes in r["training"].items():
        for name, t in recipes.items():
            for path in r["paths"]:
                s = t[path]
                weights = s["dtype"] + (" + activation checkpointing" if s.get("activation_checkpointing") else "")
                speedup = "1.00x" if path == "before" else f"**{t['speedup']:.2f}x**" if "speedup" in t else "-"
                lines.append(f"| {model} | {name} | {path} | {weights} | {t['train_gflop_per_token']:.2f} | "
                             f"{s['tokens_per_second']:.0f} | {s['labels_per_second']:.1f} | {s['gflop_per_second']:.0f} | "
                             f"{100 * s['gflop_per_second'] / hw['matmul_fp32_gflops']:.0f}% | "
                             f"{bf16_share(s['gflop_per_second'], hw)} | {s['peak_rss_gb']:.2f} | "
                             f"{speedup} |")
    if not r["length_scaling"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Cost per token against dialogue length (synthetic dialogues of real IEMOCAP utterances, "
              "no truncation)", "", "| turns | tokens | train before tok/s | train after tok/s | decode tok/s |",
              "|---|---|---|---|---|"]
    for row in r["length_scaling"]:
        lines.append(f"| {row['turns']} | {row['tokens']} | {row['train_before_tokens_per_second']:.0f} | "
                     f"{row['train_after_tokens_per_second']:.0f} | {row['decode_tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def _parser(prog: str, description: str):
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--meld-dir", required=True, help="MELD csv folder")
    p.add_argument("--iemocap-dir", required=True, help="IEMOCAP JSONL folder ({train,dev,test}.jsonl)")
    p.add_argument("--out", default="eval/results/bench_training")
    return p


def _save(out: str, stem: str, result: dict, text: str) -> int:
    atomic_write_json(Path(out) / f"{stem}.json", result)
    atomic_write_text(Path(out) / f"{stem}.md", text)
    print(text)
    return 0


def decoding_main(argv: list[str]) -> int:
    p = _parser("eval/bench.py decoding", decoding.__doc__.split("\n\n")[0])
    p.add_argument("--iemocap-run", required=True, help="a run trained on IEMOCAP (configs/iemocap.yaml)")
    p.add_argument("--turns", default="1000,5000", help="lengths of the synthetic long dialogues")
    args = p.parse_args(argv)
    args.argv = argv
    result = decoding(args)
    return _save(args.out, "eval_speed", result, render_decoding(result))


def main(argv: list[str]) -> int:
    p = _parser("eval/bench.py training", __doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma-3-270m", help="backbone(s), comma-separated: each runs every recipe")
    p.add_argument("--paths", default="before,after", help="which of before,after to run")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per recipe and path")
    p.add_argument("--lengths", default="10,50,100,200")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    unknown = set(args.paths.split(",")) - set(PATHS)
    if unknown or not args.model.strip(","):
        p.error(f"--paths {args.paths!r} / --model {args.model!r}: expected paths from {list(PATHS)} and one or "
                "more backbones")
    args.argv = argv
    result = run(args)
    return _save(args.out, "bench", result, render(result))
