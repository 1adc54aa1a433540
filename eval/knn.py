"""Nearest-neighbour memory over the LLM's own representations (kNN-LM style): the final hidden state at every
training turn's emotion slot is stored with its gold label in a faiss index; a dev or test turn's label
distribution from its k nearest training turns is mixed with the LLM's own, ``(1 - λ) p_llm + λ p_knn``, with
k, the temperature and λ chosen on dev and then read once on test.

    python eval/knn.py --dataset meld --data-dir ../shared/data/meld --run runs/meld_cur_s0 \
        --dev runs/meld_cur_s0/eval/dev_predicted --test runs/meld_cur_s0/eval/test_predicted \
        --out eval/results/meld_lora_gemma-3-270m_textonly_curriculum_knn_seed0

``--dev`` and ``--test`` are folders written by ``erc-llm evaluate --run RUN`` (their probabilities are the
constrained decoder's); the slot states come from one forward per dialogue of the same run (from its streaming
decoder for dialogues longer than the token budget, which it reads in shortened windows), and where every
label is one token the script checks that these states give the evaluation's probabilities, so a folder of
another model is refused. Only text-only runs (no labels, speaker notes or audio in the transcript, online
context) are accepted: their slot states do not depend on what was predicted for earlier turns. The states of
each split are cached by content (run adapter, prompts, utterances) under the erc-llm cache. Writes ``dev/`` and
``test/`` evaluation folders (``eval/seeds.py`` reads them) whose ``metrics.json`` carries the dev grid, the
chosen setting and the kNN distribution's own scores.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from audio_fusion import weighted_f1  # noqa: E402
from ensemble import MUST_MATCH, member_record, probability_matrix, read_member, with_probabilities  # noqa: E402

from erc_llm.backbone import cache_root  # noqa: E402
from erc_llm.data import DATASETS, load_split  # noqa: E402
from erc_llm.data.schema import DataError, LabelSet  # noqa: E402
from erc_llm.io import atomic_dir  # noqa: E402
from erc_llm.metrics import write_evaluation  # noqa: E402

NEIGHBOURS = (8, 32, 128)
TEMPERATURES = (0.01, 0.03, 0.1)
LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def check_text_only(p, run: Path) -> None:
    """Refuse runs whose slot states depend on more than the dialogue's text up to the turn."""
    problems = []
    if p.builder.write_labels:
        problems.append("it writes labels into the transcript (label_history: true)")
    if p.speakers is not None:
        problems.append("it writes speaker-memory notes")
    if p.audio is not None:
        problems.append("it reads audio soft tokens")
    if p.context != "online":
        problems.append(f"its context is {p.context!r}")
    if problems:
        raise SystemExit(f"{run}: kNN memory needs a text-only online run; " + "; ".join(problems))


def adapter_digest(run: Path) -> str:
    """Content hash of a run's trained weights (the ``adapter/`` folder), part of every split's cache key."""
    adapter = hashlib.sha256()
    for f in sorted((run / "adapter").glob("*")):
        adapter.update(f.name.encode() + f.read_bytes())
    return adapter.hexdigest()


def states_key(p, adapter: str, dialogues) -> str:
    texts = [(u.utterance_id, u.speaker, u.text) for d in dialogues for u in d.utterances]
    payload = json.dumps([adapter, p.builder.templates.version, p.builder.max_tokens, texts])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def streamed_states(p, dialogue) -> list:
    """Slot states of a dialogue longer than the token budget, read from the streaming decoder that evaluated it
    (a hook on the decoder body; its first call per turn ends at the slot), so each turn keeps exactly the
    earlier turns that decoder kept."""
    from erc_llm.decoding import LabelTrie, StreamState

    captured = []
    hook = p.model.get_decoder().register_forward_hook(lambda m, i, o: captured.append(o.last_hidden_state[0, -1].float()))
    try:
        state, out = StreamState(p.model, p.builder, LabelTrie(p.builder.label_ids), p.builder.header_ids(dialogue)), []
        for utt in dialogue.utterances:
            first = len(captured)
            state.score(utt)
            out.append(captured[first])
            state.commit(p.labels.labels[0])  # not written: the transcript carries text only
    finally:
        hook.remove()
    return out


def slot_states(p, dialogues) -> tuple[np.ndarray, np.ndarray]:
    """Final hidden state (after the last norm) and label-token logits at every turn's slot, in spoken order:
    one forward per dialogue that fits the token budget, the streaming decoder's own states for longer ones."""
    import torch
    from tqdm import tqdm

    from erc_llm.objective import decoder_hidden, label_head

    firsts = [ids[0] for ids in p.builder.label_ids]
    states, logits = [], []
    with torch.inference_mode():
        for d in tqdm(dialogues, unit="dialogue", desc="slot states"):
            enc = p.builder.encode(d)
            tr = p.builder.assemble(enc["header"], enc["turns"], [0] * len(enc["turns"]))
            if tr.first_turn == 0:
                h = decoder_hidden(p.model, torch.tensor([tr.input_ids])).last_hidden_state[0, tr.slots].float()
            else:
                h = torch.stack(streamed_states(p, d))
            states.append(h.numpy())
            logits.append(label_head(p.model, h, firsts).float().numpy())
    return np.concatenate(states), np.concatenate(logits)


def cached_states(p, adapter: str, dialogues) -> tuple[np.ndarray, np.ndarray]:
    path = cache_root() / "features" / f"slots-{states_key(p, adapter, dialogues)}"
    if not (path / "states.npy").is_file():
        states, logits = slot_states(p, dialogues)
        with atomic_dir(path) as tmp:
            np.save(tmp / "states.npy", states.astype(np.float32))
            np.save(tmp / "logits.npy", logits.astype(np.float32))
    return np.load(path / "states.npy"), np.load(path / "logits.npy")


def check_same_model(rows: list[dict], logits: np.ndarray, p, folder: Path) -> float:
    """Largest gap between the evaluation's probabilities and the ones these slot states give (single-token labels;
    NaN otherwise, when the constrained decoder scores whole label sequences). Refuses a gap above 0.05."""
    if any(len(ids) != 1 for ids in p.builder.label_ids):
        return float("nan")
    own = np.exp(logits - logits.max(axis=1, keepdims=True))
    own /= own.sum(axis=1, keepdims=True)
    theirs = probability_matrix(rows, p.labels.labels)
    gap = float(np.abs(own - theirs).max())
    if gap > 0.05:
        raise SystemExit(f"{folder}: its probabilities differ from --run's by up to {gap:.3f}; evaluate and fuse "
                         "the same run (and the same --data-dir)")
    return gap


def knn_probabilities(index, train_labels: np.ndarray, queries: np.ndarray, k: int, temperature: float,
                      n_labels: int) -> np.ndarray:
    """Label distribution of each query's k nearest training slots (cosine similarity), weighted by
    softmax(similarity / temperature); k is capped at the number of stored slots."""
    k = min(k, index.ntotal)
    sims, idx = index.search(queries, k)
    w = np.exp((sims - sims[:, :1]) / temperature)
    out = np.zeros((len(queries), n_labels))
    np.add.at(out, (np.repeat(np.arange(len(queries)), k), train_labels[idx].ravel()), w.ravel())
    return out / out.sum(axis=1, keepdims=True)


def mix(rows: list[dict], llm: np.ndarray, knn: np.ndarray, labels: tuple[str, ...], lam: float) -> list[dict]:
    """The rows with ``(1 - lam) * llm + lam * knn`` (``llm``: the rows' own probabilities, :func:`probability_matrix`)."""
    return with_probabilities(rows, (1 - lam) * llm + lam * knn, labels)


def unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, choices=DATASETS, help="dataset the evaluations were made on")
    ap.add_argument("--data-dir", type=Path, required=True, help="the dataset's folder (train, dev and test splits)")
    ap.add_argument("--run", type=Path, required=True, help="the training run folder both evaluations were made with")
    ap.add_argument("--dev", type=Path, required=True, help="its dev evaluation folder (erc-llm evaluate --split dev)")
    ap.add_argument("--test", type=Path, required=True, help="its test evaluation folder")
    ap.add_argument("--neighbours", type=int, nargs="+", default=list(NEIGHBOURS), help="grid of k")
    ap.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES),
                    help="grid of the softmax temperature over cosine similarities")
    ap.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS), help="grid of λ (0 = the LLM alone)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the mixed dev/ and test/ evaluations")
    args = ap.parse_args(argv)
    bad = [f"--neighbours {k}" for k in args.neighbours if k < 1] + \
          [f"--temperatures {t}" for t in args.temperatures if t <= 0] + \
          [f"--lambdas {lam}" for lam in args.lambdas if not 0 <= lam <= 1]
    if bad:
        ap.error(f"{', '.join(bad)}: expected k ≥ 1, temperature > 0 and 0 ≤ λ ≤ 1")
    if 0.0 not in args.lambdas:
        ap.error("--lambdas must include 0 (the LLM alone) so the change can be read off")
    command = "python eval/knn.py " + " ".join(sys.argv[1:] if argv is None else argv)
    evals = {s: (f, *read_member(f)) for s, f in (("dev", args.dev), ("test", args.test))}
    for split, (folder, m, _) in evals.items():
        if (m.get("dataset"), m.get("split")) != (args.dataset, split):
            raise SystemExit(f"{folder}: evaluated {m.get('dataset')}/{m.get('split')}; --{split} expects {args.dataset}/{split}")
    import faiss

    from erc_llm.run import load

    try:
        data = {s: load_split(args.dataset, s, args.data_dir)[0] for s in ("train", "dev", "test")}
        labels = LabelSet(name=args.dataset, labels=tuple(evals["dev"][1]["labels"]))
        p = load(args.run, dtype="float32", labels=labels)
        check_text_only(p, args.run)
        adapter = adapter_digest(args.run)
        states = {s: cached_states(p, adapter, d) for s, d in data.items()}
        gaps = {}
        for split, (folder, _, rows) in evals.items():
            ids = [u.utterance_id for d in data[split] for u in d.utterances]
            if [r["utterance_id"] for r in rows] != ids:
                raise SystemExit(f"{folder}: its {len(rows)} utterances are not the {len(ids)} of {args.data_dir}/{split} "
                                 "in order; evaluate and fuse the same --data-dir")
            gaps[split] = check_same_model(rows, states[split][1], p, folder)
    except DataError as e:
        raise SystemExit(str(e)) from None
    gold = [u.emotion for d in data["train"] for u in d.utterances]
    keep = np.array([g is not None for g in gold])
    train_labels = np.array([labels.index(g) for g in gold if g is not None])
    index = faiss.IndexFlatIP(states["train"][0].shape[1])
    index.add(unit(states["train"][0][keep]))
    queries = {s: unit(states[s][0]) for s in ("dev", "test")}
    llm = {s: probability_matrix(rows, labels.labels) for s, (_, _, rows) in evals.items()}
    grid = []
    for k, t in itertools.product(args.neighbours, args.temperatures):
        knn = knn_probabilities(index, train_labels, queries["dev"], k, t, len(labels.labels))
        for lam in args.lambdas:
            grid.append({"k": k, "temperature": t, "lambda": lam,
                         "dev_weighted_f1": weighted_f1(mix(evals["dev"][2], llm["dev"], knn, labels.labels, lam), labels)})
    best = max(grid, key=lambda g: (g["dev_weighted_f1"], -g["lambda"], g["k"], -g["temperature"]))
    memory = {"run": str(args.run), "train_slots": int(keep.sum()), "max_probability_gap": gaps,
              "chosen_on_dev": {k: best[k] for k in ("k", "temperature", "lambda")}, "dev_grid": grid}
    for split, (folder, m, rows) in evals.items():
        knn = knn_probabilities(index, train_labels, queries[split], best["k"], best["temperature"], len(labels.labels))
        memory[f"knn_alone_{split}_weighted_f1"] = weighted_f1(mix(rows, llm[split], knn, labels.labels, 1.0), labels)
        mixed = mix(rows, llm[split], knn, labels.labels, best["lambda"])
        info = {**{k: m[k] for k in MUST_MATCH}, "history": "none", "dialogues": m["dialogues"],
                "utterances": len(mixed), "scored_utterances": sum(r["gold"] is not None for r in mixed),
                "model": m["model"], "members": [member_record(folder, m)],
                "seconds": m["seconds"], "utterances_per_second": len(mixed) / max(m["seconds"], 1e-9), "knn_memory": memory, "command": command}
        out = write_evaluation(args.out / split, mixed, labels, info,
                               f"{args.dataset}/{split} LLM + kNN (k = {best['k']}, T = {best['temperature']}, λ = {best['lambda']})")
        print(f"{args.dataset}/{split}: LLM {weighted_f1(rows, labels):.2f} -> with kNN {out['weighted_f1']:.2f} weighted F1 "
              f"(k {best['k']}, T {best['temperature']}, λ {best['lambda']}); kNN alone {memory[f'knn_alone_{split}_weighted_f1']:.2f}")


if __name__ == "__main__":
    main()
