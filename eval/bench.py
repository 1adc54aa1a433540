"""Performance benchmarks: naive windowed generate vs our streaming constrained decoder (one process), and training throughput.

    python eval/bench.py --data-dir ../shared/data/meld --full-test
    python eval/bench.py training --meld-dir ../shared/data/meld --iemocap-dir ../shared/data/iemocap

Same as `erc-llm bench ...`; the harness lives in erc_llm/bench.py. Writes eval/results/bench/{bench.json,bench.md}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from erc_llm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
