"""Late fusion of finished LLM evaluations with an acoustic classifier: a logistic regression on each utterance's
audio features (Praat prosody, eGeMAPS, ...), trained on the train split, and the LLM's label probabilities are
combined as ``log p_llm + w * log p_audio``; the weight ``w`` is chosen on dev and then read once on test.

    python eval/audio_fusion.py --dataset jsonl --data-dir ../shared/data/iemocap \
        --audio-source csv --audio-dir ../shared/data/iemocap_prosody \
        --dev runs/iemocap_s0/eval/dev_predicted --test runs/iemocap_s0/eval/test_predicted \
        --out eval/results/iemocap_lora_gemma-3-270m_textonly_prosody-fusion_seed0

``--dev`` and ``--test`` are folders written by ``erc-llm evaluate`` for the same model(s); several folders are
averaged first (a probability ensemble, as ``eval/ensemble.py``). Only evaluations without labels in the
history are accepted: with predicted labels in the transcript, changing one prediction would change what later
turns read. The audio inputs are the ones the LLM's audio soft tokens use (``erc_llm.projector``): z-scores
with a missing-value mask, by default with each speaker's own statistics over the split (no labels).
``--audio-context K`` adds the voice of earlier turns (the speaker's previous K utterances, the other speaker's
last one) and ``--text-encoder all-MiniLM-L6-v2`` the utterance's sentence embedding, which makes the second
opinion a classical text + audio classifier. Writes ``dev/`` and ``test/`` evaluation folders (``eval/seeds.py``
reads them like an ensemble's) whose ``metrics.json`` carries the dev curve of ``w``, the chosen ``w`` and the
classifier's own scores.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from ensemble import (MUST_MATCH, average, check_members, member_record, probability_matrix, read_member,  # noqa: E402
                      with_probabilities)

from erc_llm.audio import FEATURE_SOURCES, load_source  # noqa: E402
from erc_llm.backbone import cache_root  # noqa: E402
from erc_llm.baseline.features import encoder_path, text_embeddings  # noqa: E402
from erc_llm.data import DATASETS, load_split  # noqa: E402
from erc_llm.data.schema import DataError, LabelSet  # noqa: E402
from erc_llm.metrics import compute_metrics, scored_pairs, write_evaluation  # noqa: E402
from erc_llm.projector import NORMALIZE, AudioInputs, AudioSpec, fit_spec  # noqa: E402

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)


@dataclass
class SplitAudio:
    """One split's utterances in order, their gold labels (None = unlabelled) and acoustic classifier inputs."""

    ids: list[str]
    gold: list[str | None]
    x: np.ndarray
    without_audio: int


def audio_context(dialogues, x: np.ndarray, turns: int) -> np.ndarray:
    """Per utterance (rows of ``x`` in spoken order): the mean audio inputs of the same speaker's previous
    ``turns`` utterances of the dialogue and the inputs of the last utterance by another speaker; zeros
    (= the mean voice) before there is one. Only earlier turns: usable online."""
    same, other, n = np.zeros_like(x), np.zeros_like(x), 0
    for d in dialogues:
        rows: dict[str, list[int]] = {}  # speaker -> rows of their utterances so far
        for u in d.utterances:
            if rows.get(u.speaker):
                same[n] = x[rows[u.speaker][-turns:]].mean(axis=0)
            others = [r[-1] for s, r in rows.items() if s != u.speaker]
            if others:
                other[n] = x[max(others)]
            rows.setdefault(u.speaker, []).append(n)
            n += 1
    return np.hstack([same, other])


def split_audio(args, split: str, labels: tuple[str, ...], spec: AudioSpec | None = None) -> tuple[AudioSpec, SplitAudio]:
    """The classifier inputs of one split: the audio inputs the soft tokens get, then (as asked) their context
    and the sentence embedding of the text; ``spec=None`` fits the audio spec on this split."""
    dialogues, _, _ = load_split(args.dataset, split, args.data_dir, labels if args.dataset == "jsonl" else None)
    utts = [u for d in dialogues for u in d.utterances]
    ids = [u.utterance_id for u in utts]
    table = load_source(args.audio_source, args.audio_dir, split)
    spec = spec or fit_spec(args.audio_source, 1, table, ids, args.audio_normalize)
    inputs = AudioInputs(spec, table, ids, [u.speaker for u in utts])
    x = np.stack([inputs.inputs[i].numpy() for i in ids])
    parts = [x, audio_context(dialogues, x, args.audio_context)] if args.audio_context else [x]
    if args.text_encoder:
        text = text_embeddings(dialogues, encoder_path(args.text_encoder), cache_root())
        parts.append(np.stack([text[i] for i in ids]))
    return spec, SplitAudio(ids, [u.emotion for u in utts], np.hstack(parts), inputs.missing)


def acoustic_probabilities(args, labels: tuple[str, ...]) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Per split (dev, test): utterance id -> the acoustic classifier's label probabilities, in ``labels`` order;
    and a report of coverage and the classifier's own dev/test metrics."""
    spec, train = split_audio(args, "train", labels)
    keep = [i for i, g in enumerate(train.gold) if g is not None]
    unknown = sorted({train.gold[i] for i in keep} - set(labels))
    if unknown:
        raise DataError(f"{args.data_dir}: train labels {unknown} are not in the evaluations' label set {list(labels)}")
    clf = LogisticRegression(max_iter=5000, class_weight="balanced").fit(train.x[keep], [train.gold[i] for i in keep])
    order = [list(clf.classes_).index(n) for n in labels if n in clf.classes_]
    if len(order) != len(labels):
        raise DataError(f"{args.data_dir}: labels {sorted(set(labels) - set(clf.classes_))} never occur in train; "
                        "the acoustic classifier needs examples of every label")
    out, report = {}, {"train_utterances": len(keep), "train_without_audio": train.without_audio}
    for split in ("dev", "test"):
        _, a = split_audio(args, split, labels, spec)
        probs = clf.predict_proba(a.x)[:, order]
        out[split] = dict(zip(a.ids, probs))
        scored = [i for i, g in enumerate(a.gold) if g is not None]
        pred = [labels[int(np.argmax(probs[i]))] for i in scored]
        m = compute_metrics([a.gold[i] for i in scored], pred, LabelSet(name=args.dataset, labels=labels))
        report[split] = {"without_audio": a.without_audio, **{k: m[k] for k in ("weighted_f1", "unweighted_accuracy")}}
    return out, report


def fuse(rows: list[dict], acoustic: dict[str, np.ndarray], labels: tuple[str, ...], w: float) -> list[dict]:
    """Rows with probabilities ∝ p_llm * p_audio ** w and the argmax as the prediction (ties: label order)."""
    missing = [r["utterance_id"] for r in rows if r["utterance_id"] not in acoustic]
    if missing:
        raise DataError(f"{len(missing)} evaluated utterances (e.g. {missing[:3]}) are not in the data split; "
                        "evaluate and fuse the same --data-dir")
    llm = np.log(np.clip(probability_matrix(rows, labels), 1e-12, None))
    z = llm + w * np.log(np.clip([acoustic[r["utterance_id"]] for r in rows], 1e-12, None))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return with_probabilities(rows, p, labels)


def weighted_f1(rows: list[dict], labels: LabelSet) -> float:
    return compute_metrics(*scored_pairs(rows), labels)["weighted_f1"]


def read_split(folders: list[Path], split: str) -> tuple[dict, list[dict], list[dict]]:
    """The first member's metrics, the (averaged) rows, and a record of each member."""
    members = [(f, *read_member(f)) for f in folders]
    check_members(members)
    ref = {**members[0][1], "seconds": sum(m.get("seconds", 0.0) for _, m, _ in members)}
    if ref.get("split") != split:
        raise SystemExit(f"{folders[0]}: split {ref.get('split')!r}; --{split} expects {split} evaluations")
    rows = average([m[2] for m in members], list(ref["labels"]))
    return ref, rows, [member_record(f, m) for f, m, _ in members]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS, help="dataset the evaluations were made on")
    ap.add_argument("--data-dir", type=Path, required=True, help="the dataset's folder (train, dev and test splits)")
    ap.add_argument("--audio-source", required=True, choices=FEATURE_SOURCES, help="how to read the audio features")
    ap.add_argument("--audio-dir", type=Path, required=True, help="folder of the audio features of every split")
    ap.add_argument("--audio-normalize", default="speaker", choices=NORMALIZE,
                    help="standardise with each speaker's own statistics over the split (speaker) or train's (corpus)")
    ap.add_argument("--audio-context", type=int, default=0, metavar="K",
                    help="the classifier also hears the speaker's previous K utterances (mean) and the other "
                         "speaker's last one, earlier turns only (0 = the utterance alone)")
    ap.add_argument("--text-encoder", default="", metavar="NAME",
                    help="the classifier also reads the utterance's sentence embedding from this "
                         "sentence-transformers model (all-MiniLM-L6-v2 = the packaged one; default: audio only)")
    ap.add_argument("--dev", type=Path, nargs="+", required=True, help="dev evaluation folder(s) of the model")
    ap.add_argument("--test", type=Path, nargs="+", required=True, help="test evaluation folder(s), same models and order")
    ap.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS), help="grid of w (0 = the LLM alone)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the fused dev/ and test/ evaluations")
    args = ap.parse_args(argv)
    if len(args.dev) != len(args.test):
        ap.error(f"--dev has {len(args.dev)} folders and --test {len(args.test)}; give one of each per model")
    if args.audio_context < 0:
        ap.error(f"--audio-context {args.audio_context}: expected 0 (none) or a number of earlier turns")
    if 0.0 not in args.weights:
        ap.error("--weights must include 0 (the LLM alone) so the change can be read off")
    command = "python eval/audio_fusion.py " + " ".join(sys.argv[1:] if argv is None else argv)
    splits = {s: read_split(f, s) for s, f in (("dev", args.dev), ("test", args.test))}
    ref = splits["dev"][0]
    models = {s: [m["model"] for m in members] for s, (_, _, members) in splits.items()}
    if models["dev"] != models["test"]:
        raise SystemExit(f"--dev evaluates {models['dev']} but --test {models['test']}; the weight chosen on dev "
                         "applies only to the same model(s), in the same order")
    if ref["dataset"] != args.dataset:
        raise SystemExit(f"{args.dev[0]}: evaluated on {ref['dataset']!r}, but --dataset is {args.dataset!r}")
    labels = LabelSet(name=ref["dataset"], labels=tuple(ref["labels"]))
    try:
        acoustic, report = acoustic_probabilities(args, labels.labels)
        dev_rows = splits["dev"][1]
        curve = [{"weight": w, "dev_weighted_f1": weighted_f1(fuse(dev_rows, acoustic["dev"], labels.labels, w), labels)}
                 for w in args.weights]
        best = max(curve, key=lambda c: (c["dev_weighted_f1"], -c["weight"]))["weight"]
        fusion = {"audio_source": args.audio_source, "audio_dir": str(args.audio_dir), "normalize": args.audio_normalize,
                  "audio_context": args.audio_context, "text_encoder": args.text_encoder or None,
                  "weight_chosen_on_dev": best, "dev_curve": curve, "acoustic_classifier": report}
        for split, (m, rows, members) in splits.items():
            fused = fuse(rows, acoustic[split], labels.labels, best)
            info = {**{k: m[k] for k in MUST_MATCH}, "history": "none", "dialogues": m["dialogues"],
                    "utterances": len(fused), "scored_utterances": sum(r["gold"] is not None for r in fused),
                    "model": f"{len(members)} LLM evaluation(s) + acoustic classifier", "members": members,
                    "seconds": m["seconds"], "utterances_per_second": len(fused) / max(m["seconds"], 1e-9),
                    "audio_fusion": fusion, "command": command}
            out = write_evaluation(args.out / split, fused, labels, info,
                                   f"{m['dataset']}/{split} LLM + audio (w = {best})")
            print(f"{m['dataset']}/{split}: LLM {weighted_f1(rows, labels):.2f} -> fused (w = {best}) "
                  f"{out['weighted_f1']:.2f} weighted F1; acoustic classifier alone {report[split]['weighted_f1']:.2f}")
    except DataError as e:
        raise SystemExit(str(e)) from None
    print("dev curve: " + ", ".join(f"w {c['weight']}: {c['dev_weighted_f1']:.2f}" for c in curve) + f" -> {args.out}")


if __name__ == "__main__":
    main()
