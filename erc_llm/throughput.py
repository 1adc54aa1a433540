"""Training throughput benchmark: the training recipes before/after the fast path, FLOP/s against the
measured matmul peak, peak memory, and cost per token against dialogue length (training and decoding).

    python eval/bench.py training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap

*Before* is the original loop (float32 weights, masked sdpa attention, one forward per dialogue:
``--dtype float32 --attention sdpa --pack-tokens 0``); *after* is the default (``--dtype auto``: bfloat16
weights where the CPU computes bf16 natively, block attention, dialogues packed into one forward). Each
recipe runs as a real ``erc_llm/train.py`` child process for the same steps on the same dialogues;
tokens/s is the optimisation time only (as ``train_summary.json`` reports it) and peak RSS is the child's
``VmHWM``. Writes ``bench.json`` and ``bench.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PATHS = {"before": ["--dtype", "float32", "--attention", "sdpa", "--pack-tokens", "0"],
         "after": ["--dtype", "auto", "--attention", "block"]}
RECIPES = {"meld": ("configs/meld.yaml", "meld_dir"), "iemocap": ("configs/iemocap.yaml", "iemocap_dir")}


def recipe_run(config: str, data_dir: str, path: str, steps: int, work: Path, threads: int) -> dict:
    """One training child process for ``steps`` optimizer steps; tokens/s, labels/s, seconds, peak RSS."""
    from erc_llm.bench import _vm_hwm_kb

    out = work / f"{Path(config).stem}_{path}"
    cmd = [sys.executable, str(REPO / "erc_llm" / "train.py"), "--config", str(REPO / config), "--data-dir", data_dir,
           "--out", str(out), "--overwrite", "true", "--max-steps", str(steps), "--eval-every", str(10 * steps),
           "--eval-dialogues", "1", "--save-every", str(10 * steps), "--test-eval", "false",
           "--threads", str(threads), *PATHS[path]]
    t = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    hwm = 0
    while child.poll() is None:
        hwm = max(hwm, _vm_hwm_kb(child.pid))
        time.sleep(0.2)
    if child.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({child.returncode}): {child.stderr.read()[-2000:]}")
    summary = json.loads((out / "train_summary.json").read_text())
    from erc_llm.run import RunSpec

    dtype = RunSpec.read(out).train_dtype
    return {"tokens_per_second": summary["tokens_per_second"], "labels_per_second": summary["labels_per_second"],
            "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t,
            "peak_rss_gb": hwm / 1024**2, "dtype": dtype, "command": " ".join(cmd[1:])}


def train_flops_per_token(model, tokens: int) -> float:
    """Training FLOPs per token of a frozen backbone with LoRA: forward plus the backward to the inputs
    (no weight gradients outside the small adapters), i.e. about twice the forward."""
    from erc_llm.bench import forward_flops

    return 2 * forward_flops(model, tokens) / tokens


def avg_tokens(config: str, data_dir: str, tokenizer) -> float:
    """Mean transcript length of the recipe's training dialogues (its prompt, its token budget)."""
    from erc_llm.config import TrainConfig, build
    from erc_llm.data import load_split
    from erc_llm.prompting import PromptBuilder, Templates

    cfg = build(TrainConfig, str(REPO / config), {"data_dir": data_dir, "out": tempfile.mkdtemp()})
    dialogues, labels, _ = load_split(cfg.dataset, "train", data_dir, tuple(cfg.labels) or None)
    b = PromptBuilder(tokenizer, labels, Templates.load(context=cfg.context), cfg.max_tokens, cfg.max_utterance_tokens)
    lens = [len(b.build(d, [u.emotion for u in d.utterances]).input_ids) for d in dialogues]
    return sum(lens) / len(lens)


def length_scaling(model_name: str, data_dir: str, lengths: list[int], reps: int = 1) -> list[dict]:
    """Training (one dialogue forward+backward) and decoding (streaming, predicted history) tokens/s for
    synthetic dialogues of real IEMOCAP utterances, before and after; no truncation (budget above length)."""
    from erc_llm.attention import register
    from erc_llm.backbone import load_backbone, load_for_training, resolve_dtype
    from erc_llm.bench import synthetic
    from erc_llm.config import TrainConfig
    from erc_llm.data import load_split
    from erc_llm.decoding import StreamingTagger
    from erc_llm.losses import label_loss
    from erc_llm.objective import first_token_ids, slot_logits
    from erc_llm.prompting import PromptBuilder
    from erc_llm.train import wrap_lora

    dialogues, labels, _ = load_split("jsonl", "train", data_dir)
    rows = []
    models = {}
    for path, dtype, attn in (("before", "float32", "sdpa"), ("after", resolve_dtype("auto"), "block")):
        m, tok, _ = load_for_training(model_name, dtype)
        if attn == "block":
            m.set_attn_implementation(register())
        models[path] = (wrap_lora(m, TrainConfig(data_dir=".")).train(), tok)
    dec, tok, _ = load_backbone(model_name, resolve_dtype("auto"))
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
                label_loss(slot_logits(m, tr, first_token_ids(b)).float(), targets, None, 0.0).backward()
                m.zero_grad(set_to_none=True)
                best = min(best, time.perf_counter() - t)
            row[f"train_{path}_tokens_per_second"] = len(tr.input_ids) / best
        t = time.perf_counter()
        StreamingTagger(dec, b).tag(d)
        row["decode_tokens_per_second"] = len(tr.input_ids) / (time.perf_counter() - t)
        rows.append(row)
    return rows[1:]


def run(args) -> dict:
    from erc_llm.backbone import load_backbone
    from erc_llm.bench import matmul_peak

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, tok, manifest = load_backbone(args.model)
    result = {"command": "python eval/bench.py training " + " ".join(args.argv), "threads": threads,
              "machine": _machine(), "model": manifest.get("name"),
              "hardware": {"matmul_fp32_gflops": matmul_peak(torch.float32),
                           "matmul_bf16_gflops": matmul_peak(torch.bfloat16)},
              "training": {}}
    with tempfile.TemporaryDirectory(prefix="erc_llm_bench_") as work:
        for name, (config, attr) in RECIPES.items():
            data_dir = getattr(args, attr)
            per_token = train_flops_per_token(model, int(avg_tokens(config, data_dir, tok)))
            r = {path: recipe_run(config, data_dir, path, args.steps, Path(work), threads) for path in PATHS}
            for path in PATHS:
                r[path]["gflop_per_second"] = r[path]["tokens_per_second"] * per_token / 1e9
            r["speedup"] = r["after"]["tokens_per_second"] / r["before"]["tokens_per_second"]
            r["peak_rss_gb"] = r["after"]["peak_rss_gb"]
            r["train_gflop_per_token"] = per_token / 1e9
            result["training"][name] = r
    del model
    result["length_scaling"] = length_scaling(args.model, args.iemocap_dir, [int(x) for x in args.lengths.split(",")])
    return result


def _machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    from erc_llm.backbone import native_bf16_cpu

    bf16 = {"amx_bf16": "AMX", "avx512_bf16": "avx512_bf16"}.get(native_bf16_cpu(), "no native bf16")
    return f"{cpu}, {os.cpu_count()} cores, {bf16}"


def render(r: dict) -> str:
    hw = r["hardware"]
    lines = [f"# Training throughput ({r['model']})", "", f"Command: `{r['command']}` — {r['machine']}, "
             f"{r['threads']} threads. Measured matmul peak: fp32 {hw['matmul_fp32_gflops']:.0f} GFLOP/s, bf16 "
             f"{hw['matmul_bf16_gflops']:.0f} GFLOP/s.", "",
             "Before: float32 weights, masked sdpa attention, one forward per dialogue. After: the default "
             "(bfloat16 weights where native, block attention, packed dialogues).", "",
             "| recipe | path | weights | tokens/s | labels/s | GFLOP/s | % of fp32 peak | % of bf16 peak | peak RSS GB | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, t in r["training"].items():
        for path in PATHS:
            s = t[path]
            lines.append(f"| {name} | {path} | {s['dtype']} | {s['tokens_per_second']:.0f} | {s['labels_per_second']:.1f} | "
                         f"{s['gflop_per_second']:.0f} | {100 * s['gflop_per_second'] / hw['matmul_fp32_gflops']:.0f}% | "
                         f"{100 * s['gflop_per_second'] / hw['matmul_bf16_gflops']:.0f}% | {s['peak_rss_gb']:.2f} | "
                         + (f"**{t['speedup']:.2f}x** |" if path == "after" else "1.00x |"))
    lines += ["", "## Cost per token against dialogue length (synthetic dialogues of real IEMOCAP utterances, "
              "no truncation)", "", "| turns | tokens | train before tok/s | train after tok/s | decode tok/s |",
              "|---|---|---|---|---|"]
    for row in r["length_scaling"]:
        lines.append(f"| {row['turns']} | {row['tokens']} | {row['train_before_tokens_per_second']:.0f} | "
                     f"{row['train_after_tokens_per_second']:.0f} | {row['decode_tokens_per_second']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    import argparse

    from erc_llm.io import atomic_write_json, atomic_write_text

    p = argparse.ArgumentParser(prog="eval/bench.py training", description=__doc__.split("\n\n")[0])
    p.add_argument("--meld-dir", required=True, help="MELD csv folder")
    p.add_argument("--iemocap-dir", required=True, help="IEMOCAP JSONL folder ({train,dev,test}.jsonl)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per recipe and path")
    p.add_argument("--lengths", default="10,50,100,200")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="eval/results/bench_training")
    args = p.parse_args(argv)
    args.argv = argv
    result = run(args)
    atomic_write_json(Path(args.out) / "bench.json", result)
    atomic_write_text(Path(args.out) / "bench.md", render(result))
    print(render(result))
    return 0
