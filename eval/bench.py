"""Performance benchmark (issue 8): naive windowed generate vs our streaming constrained decoder, one process.

    python eval/bench.py --data-dir ../shared/data/meld --run runs/meld_gemma_seed0 --full-test

Same as `erc-llm bench ...`; the harness lives in erc_llm/bench.py. Writes eval/results/bench/{bench.json,bench.md}.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from erc_llm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
