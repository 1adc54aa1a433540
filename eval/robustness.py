"""The hostile-input suite (tests/test_robustness.py, tests/test_outputs.py and the hostile-input cases of other test
files) as a table: one row per case with its outcome.

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

from erc_llm.io import atomic_write_json, atomic_write_text

# the second probe's cases that live beside the code they test
CASES = ["tests/test_robustness.py", "tests/test_outputs.py",
         "tests/data/test_loaders.py::test_a_duplicated_meld_column_is_an_error_naming_both_positions",
         "tests/data/test_loaders.py::test_a_jsonl_file_with_a_byte_order_mark_is_read",
         "tests/test_evaluate.py::test_resume_fingerprint_follows_the_content_of_the_speaker_store_and_audio_not_their_paths",
         "tests/test_evaluate.py::test_a_torn_partial_file_is_read_up_to_the_tear_or_started_over",
         "tests/test_evaluate.py::test_a_folder_with_only_a_test_split_takes_the_label_set_from_the_model",
         "tests/test_export.py::test_an_exported_folder_refuses_any_changed_file",
         "tests/test_export.py::test_the_shipped_model_lists_every_file_it_consists_of",
         "tests/test_backbone.py::test_a_damaged_safetensors_header_is_a_clear_error_naming_the_rebuild",
         "tests/test_ensemble.py::test_members_with_other_gold_labels_a_missing_label_or_torn_metrics_are_refused",
         "tests/test_server.py::test_one_client_cannot_lock_out_the_others_and_limits_are_visible",
         "tests/test_server.py::test_any_speaker_name_round_trips_through_its_id",
         "tests/test_server.py::test_bad_uploads_name_the_line_and_field_and_the_session_survives",
         "tests/test_server.py::test_an_upload_over_the_body_limit_is_a_413_json_error",
         "tests/test_server.py::test_a_request_malformed_at_the_http_level_gets_a_json_400"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", *CASES, f"--junitxml={report}"], cwd=REPO)
        cases = []
        for case in ET.parse(report).getroot().iter("testcase"):
            failed = case.find("failure") is not None or case.find("error") is not None
            outcome = "skipped" if case.find("skipped") is not None else ("FAILED" if failed else "passed")
            cases.append({"case": case.get("name"), "seconds": float(case.get("time", 0)), "outcome": outcome})
    out = REPO / "eval" / "results" / "robustness"
    atomic_write_json(out / "results.json", {"command": "python eval/robustness.py", "cases": cases})
    lines = ["# Hostile-input suite (`python eval/robustness.py`; the cases listed in it)", "",
             "| case | outcome |", "|---|---|"]
    lines += [f"| {c['case'].removeprefix('test_').replace('_', ' ')} | {c['outcome']} |" for c in cases]
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c["outcome"] != "FAILED" for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
