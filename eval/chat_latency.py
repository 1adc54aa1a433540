"""Per-turn latency of a live session (``ERCSession.add_turn``, what `erc-llm chat` and `erc-llm serve` run for every
turn) with a run's stages and with the adapter alone, in one process on the same machine.

    python eval/chat_latency.py --dataset jsonl --data-dir ../shared/data/iemocap --run runs/iemocap_s0 \
        --audio-dir ../shared/data/iemocap_prosody --dialogues 4 --out eval/results/chat_latency/iemocap

Replays the first ``--dialogues`` test dialogues turn by turn (participants known up front, each turn's audio
features from ``--audio-dir`` when the run's fusion hears audio) through two sessions, one with the stages and
one without, alternating dialogue by dialogue so both see the same machine load. Writes ``results.json`` and
``table.md`` (p50 / p95 / mean per-turn milliseconds, turns per second) into ``--out``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from erc_llm.data import DATASETS, load_split
from erc_llm.io import claim_output


def replay(session, dialogue, table) -> list[float]:
    session.reset(participants=dialogue.speakers)
    out = []
    for u in dialogue.utterances:
        audio = table.values.get(u.utterance_id) if table is not None and session.engine.hears_audio else None
        t0 = time.perf_counter()
        session.add_turn(u.speaker, u.text, audio)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def summary(ms: list[float]) -> dict:
    a = np.array(ms)
    return {"turns": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "mean_ms": float(a.mean()), "turns_per_second": float(1000 / a.mean())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=DATASETS)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--run", required=True, help="a run folder with stages (erc_llm/train.py or erc-llm stages)")
    ap.add_argument("--audio-dir", default="", help="audio features of the test split for a fusion that hears audio")
    ap.add_argument("--dialogues", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    from erc_llm.bench.harness import machine, write_results
    from erc_llm.session import Engine, ERCSession
    from erc_llm.stages import audio_table

    dialogues, labels, _ = load_split(args.dataset, "test", args.data_dir)
    dialogues = dialogues[: args.dialogues]
    with_stages = Engine.load(args.run, labels=labels, dtype=args.dtype)
    if with_stages.stages is None:
        raise SystemExit(f"{args.run}: no stages in run.json; fit them first (erc-llm stages --run {args.run} ...)")
    alone = Engine(**{**with_stages.__dict__, "stages": None})
    fusion = with_stages.stages.settings.get("fusion") or {}
    table = (audio_table(fusion["audio_source"], args.audio_dir or fusion["audio_dir"], "test")
             if fusion.get("audio_source", "none") != "none" else None)
    sessions = {"stages": ERCSession(with_stages), "adapter alone": ERCSession(alone)}
    replay(sessions["stages"], dialogues[0], table)  # warm-up: the sentence encoder and first forwards
    replay(sessions["adapter alone"], dialogues[0], table)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for d in dialogues:
        for name, s in sessions.items():
            times[name] += replay(s, d, table)
    rows = {name: summary(ms) for name, ms in times.items()}
    from erc_llm.stages import describe

    result = {"run": args.run, "dataset": args.dataset, "dialogues": len(dialogues), "dtype": args.dtype,
              "stages": describe(with_stages.stages.settings), "audio": table is not None, "latency": rows,
              "machine": machine(), "python": platform.python_version(),
              "command": "python eval/chat_latency.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = ["| session | turns | p50 ms | p95 ms | mean ms | turns/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {r['turns']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {r['mean_ms']:.1f} | "
              f"{r['turns_per_second']:.2f} |" for n, r in rows.items()]
    out = claim_output(args.out, "results", inputs=[args.run, args.data_dir])
    write_results(out, result, "Chat latency per turn, with and without the stages",
                  f"Machine: {result['machine']}; stages: {result['stages']}.", "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
