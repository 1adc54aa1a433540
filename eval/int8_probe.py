"""Dynamic int8 linear layers (fbgemm) as a fast path for CPUs without native bf16: speed and agreement with float32.

    python eval/int8_probe.py --data-dir ../shared/data/meld --dialogues 60

The shipped model is loaded once in float32 (LoRA merged) and decodes the first ``--dialogues`` MELD test dialogues
as ``erc-llm evaluate`` does (16 in flight, predicted history). Then each variant replaces some of the transformer
body's ``nn.Linear`` layers with torch's dynamic int8 linear (int8 weights, activations quantized per call) and
decodes the same dialogues: utterances/s, weighted F1, the mean absolute difference of the probabilities and the
share of turns whose label changes against float32. The embedding and the label head stay float32. Writes
eval/results/int8_probe/{results.json,table.md}. A probe, not a product path: no command of the package runs int8.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent

from erc_llm.bench.harness import machine, write_results
from erc_llm.data import load_split
from erc_llm.io import claim_output
from erc_llm.metrics import compute_metrics
from erc_llm.run import SHIPPED, load

# (name, parts of a layer's qualified name left in float32, weight granularity)
VARIANTS = (("every linear layer", (), "per channel"),
            ("every linear layer", (), "per tensor"),
            ("all but mlp.down_proj", ("down_proj",), "per channel"),
            ("attention projections only", ("mlp",), "per channel"),
            ("mlp only", ("self_attn",), "per channel"))


def quantized(model, skip: tuple[str, ...], granularity: str):
    """A copy of ``model`` whose body's linear layers (except those whose name contains one of ``skip``) are
    torch's dynamic int8 linear layers."""
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if granularity == "per channel" else default_dynamic_qconfig
    m = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore")
        for parent_name, parent in list(m.get_decoder().named_modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and not any(s in f"{parent_name}.{name}" for s in skip):
                    setattr(parent, name, quantize_dynamic(torch.nn.Sequential(child), {torch.nn.Linear: qconfig},
                                                           dtype=torch.qint8)[0])
    return m


def decode(predictor, model, dialogues) -> tuple[np.ndarray, float]:
    predictor.model = model
    tagger = predictor.tagger(batch=16)
    start = time.perf_counter()
    out = tagger.tag_many(dialogues)
    return np.array([t.probs for preds in out for t in preds]), time.perf_counter() - start


def row(name: str, probs: np.ndarray, seconds: float, gold: list[str], labels, ref: np.ndarray | None) -> dict:
    pred = [labels.labels[i] for i in probs.argmax(1)]
    r = {"variant": name, "utterances_per_second": len(probs) / seconds, "seconds": seconds,
         "weighted_f1": compute_metrics(gold, pred, labels)["weighted_f1"]}
    if ref is not None:
        r |= {"probability_mean_abs_diff": float(np.abs(probs - ref).mean()),
              "changed_labels": float((probs.argmax(1) != ref.argmax(1)).mean())}
    return r


def table(res: dict) -> str:
    base = res["rows"][0]["utterances_per_second"]
    lines = ["| linear layers in int8 | weights | utt/s | speed-up | weighted F1 | mean abs. probability difference "
             "| labels changed |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        diff = (f"{r['probability_mean_abs_diff']:.4f} | {100 * r['changed_labels']:.1f}%"
                if "changed_labels" in r else " | ")
        lines.append(f"| {r['variant']} | {r.get('weights', '')} | {r['utterances_per_second']:.1f} | "
                     f"{r['utterances_per_second'] / base:.2f}x | {r['weighted_f1']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="MELD folder")
    p.add_argument("--dialogues", type=int, default=60, help="first N test dialogues (0 = all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--out", default=str(ROOT / "eval" / "results" / "int8_probe"))
    args = p.parse_args()
    out = claim_output(args.out, "results", inputs=[args.data_dir])
    if args.threads:
        torch.set_num_threads(args.threads)
    dialogues, _, _ = load_split("meld", "test", args.data_dir)
    dialogues = dialogues[:args.dialogues] if args.dialogues else dialogues
    gold = [u.emotion for d in dialogues for u in d.utterances]
    predictor = load(SHIPPED, dtype="float32")
    base = predictor.model
    ref, seconds = decode(predictor, base, dialogues)
    rows = [row("none (float32)", ref, seconds, gold, predictor.labels, None)]
    for name, skip, granularity in VARIANTS:
        probs, seconds = decode(predictor, quantized(base, skip, granularity), dialogues)
        rows.append(row(name, probs, seconds, gold, predictor.labels, ref) | {"weights": granularity})
        print(rows[-1], flush=True)
    res = {"command": "python eval/int8_probe.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "dialogues": len(dialogues), "utterances": len(gold), "threads": torch.get_num_threads(), "rows": rows}
    return write_results(out, res, "Dynamic int8 linear layers against float32 (shipped model, MELD test)",
                         f"Machine: {res['machine']}; {res['dialogues']} dialogues ({res['utterances']} utterances), "
                         f"decoded as `erc-llm evaluate` does (16 in flight), one variant after another in one "
                         "process.", table(res))


if __name__ == "__main__":
    sys.exit(main())
