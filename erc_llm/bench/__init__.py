"""Benchmarks of the package on this machine: the harness (``harness``), decoding against a naive pipeline
(``inference``) and training throughput and batch-evaluation speed by dialogue length (``training``).

    erc-llm bench --data-dir ../shared/data/meld --full-test            # inference (python eval/bench.py ...)
    erc-llm bench training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap
    erc-llm bench decoding --meld-dir ... --iemocap-dir ... --iemocap-run runs/iemocap
    erc-llm bench stages --run runs/meld --data-dir ../shared/data/meld --audio-dir ../shared/data/meld_prosody
"""

from __future__ import annotations

import sys

from erc_llm.bench import inference, training


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["training"]:
        return training.main(argv[1:])
    if argv[:1] == ["decoding"]:
        return training.decoding_main(argv[1:])
    if argv[:1] == ["stages"]:
        return inference.stages_main(argv[1:])
    return inference.main(argv)
