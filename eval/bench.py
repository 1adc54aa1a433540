"""Performance benchmarks: naive windowed generate vs our streaming constrained decoder (one process), and training throughput.

    python eval/bench.py --data-dir ../shared/data/meld --full-test
    python eval/bench.py training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap

Same as `erc-llm bench ...`; the harness lives in erc_llm/bench/inference.py. Writes eval/results/bench/{bench.json,bench.md}.
"""

import sys

from erc_llm.bench import main

if __name__ == "__main__":
    sys.exit(main())
