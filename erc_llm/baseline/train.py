"""Train and evaluate the classical fused baseline; one model per seed, mean +- std over seeds.

    erc-llm baseline train --config configs/baseline_meld.yaml --data-dir ../shared/data/meld \
        --audio-dir ../shared/data/meld_prosody --out eval/results/baseline_meld_prosody
    erc-llm baseline evaluate --run eval/results/baseline_meld_prosody/seed0 --split test --out DIR

Early stopping on dev weighted F1; the test split is scored once per seed with the dev-best weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erc_llm.baseline.features import audio_features, dialogue_arrays, encoder_path, text_embeddings
from erc_llm.baseline.model import FusedERC
from erc_llm.config import BaselineConfig
from erc_llm.data import LabelSet, label_counts, load_split
from erc_llm.io import atomic_write_json, cache_root
from erc_llm.metrics import compute_metrics, write_evaluation
from erc_llm.options import build, to_dict
from erc_llm.training.losses import class_weights, per_example_loss

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


@dataclass
class Prepared:
    labels: LabelSet
    dialogues: dict  # split -> list[Dialogue]
    arrays: dict  # split -> list[dict of np arrays]
    text_dim: int
    audio_dim: int
    normalizer: dict | None
    weights: torch.Tensor
    audio_report: dict


def prepare(cfg: BaselineConfig) -> Prepared:
    dialogues = {}
    dialogues["train"], labels, report = load_split(cfg.dataset, "train", cfg.data_dir, tuple(cfg.labels) or None)
    log.info(report.summary())
    for s in ("dev", "test"):  # the label set of train (given or inferred) applies to every split
        dialogues[s], _, report = load_split(cfg.dataset, s, cfg.data_dir, labels.labels)
        log.info(report.summary())
    enc = encoder_path(cfg.text_encoder)
    # per split: utterance ids (e.g. MELD's dia0_utt0) repeat across splits
    text = {s: text_embeddings(dialogues[s], enc, cache_root()) for s in SPLITS}
    audio, audio_report = audio_features(cfg.audio, cfg.audio_dir, dialogues)
    vad = cfg.vad_weight > 0
    arrays = {s: [dialogue_arrays(d, text[s], audio, s, labels, vad) for d in dialogues[s]] for s in SPLITS}
    counts = label_counts(dialogues["train"])
    weights = class_weights([counts.get(lab, 0) for lab in labels.labels], cfg.class_weights)
    norm = {"mean": audio.normalizer.mean, "std": audio.normalizer.std} if audio.normalizer else None
    text_dim = next(iter(text["train"].values())).shape[0]
    return Prepared(labels, dialogues, arrays, text_dim, 2 * audio.dim, norm, weights, audio_report)


def collate(items: list[dict]) -> dict:
    t = max(len(x["label"]) for x in items)
    b = len(items)
    out = {"mask": torch.zeros(b, t, dtype=torch.bool), "speaker": torch.zeros(b, t, dtype=torch.long),
           "label": torch.full((b, t), -1, dtype=torch.long)}
    for key in ("text", "audio", "vad"):
        if key in items[0]:
            out[key] = torch.zeros(b, t, items[0][key].shape[-1])
    for i, x in enumerate(items):
        n = len(x["label"])
        out["mask"][i, :n] = True
        out["speaker"][i, :n] = torch.from_numpy(x["speaker"])
        out["label"][i, :n] = torch.from_numpy(x["label"])
        for key in ("text", "audio", "vad"):
            if key in x:
                out[key][i, :n] = torch.from_numpy(x[key])
    return out


def make_model(cfg: BaselineConfig, text_dim: int, audio_dim: int, n_labels: int) -> FusedERC:
    return FusedERC(text_dim, audio_dim, n_labels, cfg.hidden, cfg.k_tokens, cfg.heads, cfg.vga_lambda, cfg.fusion,
                    cfg.context, cfg.dropout)


def augment(batch: dict, cfg: BaselineConfig, gen: torch.Generator) -> dict:
    """Feature dropout and Gaussian noise on the inputs (training only)."""
    out = dict(batch)
    for key in ("text", "audio"):
        if key in batch:
            x = batch[key]
            keep = (torch.rand(x.shape, generator=gen) >= cfg.feature_dropout).float() / (1 - cfg.feature_dropout)
            out[key] = x * keep + cfg.noise_std * torch.randn(x.shape, generator=gen)
    return out


def batch_loss(model, batch, cfg: BaselineConfig, weights, gen: torch.Generator) -> torch.Tensor:
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    valid = (batch["label"] >= 0).flatten()
    mix = None
    idx = valid.nonzero()[:, 0]
    if cfg.mixup_alpha > 0:
        lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(cfg.mixup_alpha, cfg.mixup_alpha))
        perm = torch.arange(valid.numel())
        perm[idx] = idx[torch.randperm(len(idx), generator=gen)]
        mix = (lam, perm)
    logits, _, _, vad = model(augment(batch, cfg, gen), mixup=mix)
    y = batch["label"].flatten()
    flat = logits.flatten(0, 1)[idx]
    w = weights if cfg.class_weights != "none" else None
    loss = per_example_loss(flat, y[idx], gamma) * (w[y[idx]] if w is not None else 1)
    if mix is not None:
        lam, perm = mix
        loss = lam * loss + (1 - lam) * per_example_loss(flat, y[perm][idx], gamma) * (w[y[perm][idx]] if w is not None else 1)
    loss = loss.mean()
    if cfg.vad_weight > 0 and "vad" in batch:
        target = batch["vad"].flatten(0, 1)[batch["mask"].flatten()]  # VAD estimates come in mask order
        ok = ~torch.isnan(target).any(-1)
        est = vad.mean(1)
        if ok.any():
            loss = loss + cfg.vad_weight * torch.nn.functional.mse_loss(est[ok], target[ok])
    return loss


@torch.no_grad()
def predict(model, arrays: list[dict], batch_size: int = 32):
    """Probabilities (N, K) for every labelled-or-not utterance in order, and gate weights (N, 3) or None."""
    model.eval()
    probs, gates = [], []
    for i in range(0, len(arrays), batch_size):
        batch = collate(arrays[i: i + batch_size])
        logits, _, g, _ = model(batch)
        m = batch["mask"].flatten()
        probs.append(torch.softmax(logits.flatten(0, 1)[m], -1))
        if g is not None:
            gates.append(g)
    return torch.cat(probs).numpy(), (torch.cat(gates).numpy() if gates else None)


def train_seed(cfg: BaselineConfig, prep: Prepared, seed: int) -> tuple[FusedERC, list[dict]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_model(cfg, prep.text_dim, prep.audio_dim, len(prep.labels))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gold_dev = [prep.labels.labels[y] for a in prep.arrays["dev"] for y in a["label"] if y >= 0]
    best, best_state, history, stale = -1.0, None, [], 0
    train = prep.arrays["train"]
    for epoch in range(cfg.max_epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total = 0.0
        for i in range(0, len(order), cfg.batch_dialogues):
            loss = batch_loss(model, collate([train[j] for j in order[i: i + cfg.batch_dialogues]]), cfg, prep.weights, gen)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item()
        probs, _ = predict(model, prep.arrays["dev"])
        labelled = np.concatenate([a["label"] for a in prep.arrays["dev"]]) >= 0
        pred = [prep.labels.labels[k] for k in probs[labelled].argmax(1)]
        f1 = compute_metrics(gold_dev, pred, prep.labels)["weighted_f1"]
        history.append({"epoch": epoch, "train_loss": total, "dev_weighted_f1": f1})
        if f1 > best:
            best, stale = f1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    return model, history


def evaluate_split(model, prep: Prepared, split: str, out: Path, meta: dict) -> dict:
    """metrics.json / predictions.jsonl / confusion.png / report.md, as the LLM evaluation writes them."""
    t0 = time.time()
    probs, gates = predict(model, prep.arrays[split])
    names = prep.labels.labels
    utts = [(d, u) for d in prep.dialogues[split] for u in d.utterances]
    rows = [{"dialogue_id": d.id, "utterance_id": u.utterance_id, "speaker": u.speaker, "gold": u.emotion,
             "predicted": names[int(p.argmax())], "probabilities": dict(zip(names, [round(float(x), 6) for x in p]))}
            for (d, u), p in zip(utts, probs)]
    info = {"dataset": meta["dataset"], "split": split, "history": "n/a (classifier over causal context)",
            "model": meta["model"], "dialogues": len(prep.dialogues[split]), "utterances": len(utts),
            "seconds": time.time() - t0, "utterances_per_second": len(utts) / max(time.time() - t0, 1e-9),
            "command": meta["command"], "labels": list(names)}
    note = ""
    if gates is not None:
        info["gates"] = dict(zip(("text", "audio", "interaction"), gates.mean(0).round(4).tolist()))
        note = "\nAverage gates: " + ", ".join(f"{k} {v:.3f}" for k, v in info["gates"].items()) + "\n"
    return write_evaluation(out, rows, prep.labels, info, f"{meta['dataset']}/{split} {meta['model']}", note)


def describe(cfg: BaselineConfig) -> str:
    parts = ["text" + ("+" + cfg.audio if cfg.audio != "none" else "")]
    if cfg.audio != "none":
        parts.append(cfg.fusion + ("" if cfg.vga_lambda else ", no VGA"))
    parts.append("context GRU" if cfg.context else "no context")
    parts.append(cfg.loss)
    return "fused baseline (" + ", ".join(parts) + ")"


def run(cfg: BaselineConfig, command: str = "") -> dict:
    """Config -> cached features -> one model per seed (dev early stopping) -> test metrics -> mean +- std."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    t0 = time.time()
    prep = prepare(cfg)
    out = Path(cfg.out)
    meta = {"dataset": cfg.dataset, "model": describe(cfg), "command": command}
    per_seed = []
    for seed in (int(s) for s in cfg.seeds):
        ts = time.time()
        model, history = train_seed(cfg, prep, seed)
        d = out / f"seed{seed}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), d / "model.pt")
        atomic_write_json(d / "baseline.json", {"config": to_dict(cfg), "labels": list(prep.labels.labels),
                                                "text_dim": prep.text_dim, "audio_dim": prep.audio_dim,
                                                "normalizer": prep.normalizer, "seed": seed, "history": history})
        m = evaluate_split(model, prep, "test", d, meta)
        m["train_seconds"] = time.time() - ts
        per_seed.append(m)
        log.info("seed %d: test weighted F1 %.2f (best dev %.2f, %d epochs)", seed, m["weighted_f1"],
                 max(h["dev_weighted_f1"] for h in history), len(history))
    keys = ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1")
    summary = {k: {"mean": float(np.mean([m[k] for m in per_seed])), "std": float(np.std([m[k] for m in per_seed]))}
               for k in keys}
    summary["per_class_f1"] = {lab: {"mean": float(np.mean([m["per_class"][lab]["f1"] for m in per_seed])),
                                     "std": float(np.std([m["per_class"][lab]["f1"] for m in per_seed]))}
                               for lab in prep.labels.labels}
    if per_seed[0].get("gates"):
        summary["gates"] = {g: float(np.mean([m["gates"][g] for m in per_seed])) for g in per_seed[0]["gates"]}
    summary.update({"model": meta["model"], "seeds": [int(s) for s in cfg.seeds], "audio_report": prep.audio_report,
                    "seconds": time.time() - t0, "command": command, "config": to_dict(cfg)})
    atomic_write_json(out / "summary.json", summary)
    return summary


def evaluate_saved(run_dir: str, split: str, out: str, data_dir: str = "", audio_dir: str = "", command: str = "") -> dict:
    """Re-score a saved seed directory on a split (same features, same metrics files)."""
    meta = json.loads((Path(run_dir) / "baseline.json").read_text())
    over = {k: v for k, v in {"data_dir": data_dir, "audio_dir": audio_dir}.items() if v}
    cfg = build(BaselineConfig, None, {**meta["config"], **over, "seeds": [meta["seed"]]})
    prep = prepare(cfg)
    model = make_model(cfg, meta["text_dim"], meta["audio_dim"], len(prep.labels))
    model.load_state_dict(torch.load(Path(run_dir) / "model.pt", weights_only=True))
    return evaluate_split(model, prep, split, Path(out), {"dataset": cfg.dataset, "model": describe(cfg), "command": command})
