"""The hostile-input suite (tests/test_robustness.py) as a table: one row per case with its outcome.

    python eval/robustness.py          # writes eval/results/robustness/{results.json,table.md}

Each case is a pytest test that asserts what a user must get (a one-line error naming the file, field or
value and the way on; no stale or lost results); the same file runs in CI with the rest of the suite.
"""

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from erc_llm.io import atomic_write_json, atomic_write_text  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_robustness.py"),
                        f"--junitxml={report}"], cwd=REPO)
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome = "skipped" if case.find("skipped") is not None else ("FAILED" if failed else "passed")
            cases.append({"case": case.get("name"), "seconds": float(case.get("time", 0)), "outcome": outcome})
    out = REPO / "eval" / "results" / "robustness"
    atomic_write_json(out / "results.json", {"command": "python eval/robustness.py", "cases": cases})
    lines = ["# Hostile-input suite (`python eval/robustness.py`; tests/test_robustness.py)", "",
             "| case | outcome |", "|---|---|"]
    lines += [f"| {c['case'].removeprefix('test_').replace('_', ' ')} | {c['outcome']} |" for c in cases]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c["outcome"] != "FAILED" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
