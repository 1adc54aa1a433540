"""eval/records.py: a results folder packed into one record.json reads as it did loose; the repository's
results stay within their budget."""

import gzip
import json

import pytest

from eval import records
from eval import seeds as seeds_script
from tests.test_seeds import write_ensemble, write_result


def test_a_packed_folder_reads_as_it_did_loose_and_unpacks_to_the_same_files(tmp_path):
    run = write_result(tmp_path / "r_seed0", 0, 50.0, 60.0)
    (run / "log.jsonl").write_text('{"step": 100, "dev_predicted": {"weighted_f1": 50.0}}\n')
    (run / "README.md").write_text("# what this row is\n")
    (run / "test_predicted" / "predictions.jsonl.gz").write_bytes(gzip.compress(b'{"label": "joy"}\n'))
    loose = {rel: (run / rel).read_text() for rel in ("config.yaml", "best.json", "log.jsonl",
                                                      "test_predicted/metrics.json")}
    row = seeds_script.read_run(run)

    assert records.pack(run) == 4
    kept = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    assert kept == ["README.md", "record.json", "test_predicted/predictions.jsonl.gz"]
    assert records.exists(run, "test_predicted/metrics.json") and not records.exists(run, "dev/metrics.json")
    assert records.read_json(run, "test_predicted/metrics.json") == json.loads(loose["test_predicted/metrics.json"])
    assert records.read_text(run, "log.jsonl") == loose["log.jsonl"]
    assert seeds_script.read_run(run) == row

    assert records.unpack(run) == 4
    assert not (run / "record.json").exists()
    for rel, text in loose.items():
        assert json.loads((run / rel).read_text()) == json.loads(text) if rel.endswith(".json") \
            else (run / rel).read_text() == text


def test_a_summary_over_packed_runs_and_ensembles_equals_the_one_over_loose_ones(tmp_path):
    runs = [write_result(tmp_path / f"r{s}", s, 50.0 + s, 60.0 + s) for s in range(3)]
    seeds_script.main([str(r) for r in runs] + ["--out", str(tmp_path / "loose")])
    for r in runs:
        records.pack(r)
    seeds_script.main([str(r) for r in runs] + ["--out", str(tmp_path / "packed")])
    assert json.loads((tmp_path / "loose" / "summary.json").read_text())["weighted_f1"] == \
        json.loads((tmp_path / "packed" / "summary.json").read_text())["weighted_f1"]

    ensemble = write_ensemble(tmp_path / "ens", [0, 0], 55.0, 65.0)
    records.pack(ensemble)
    assert seeds_script.read_ensemble(ensemble)["weighted_f1"] == 65.0


def test_a_missing_file_names_what_the_folder_holds(tmp_path):
    run = write_result(tmp_path / "r", 0, 50.0, 60.0)
    records.pack(run)
    with pytest.raises(records.RecordError, match=r"no stages.json; the folder holds \['best.json', 'config.yaml'"):
        records.read_text(run, "stages.json")
    (run / "record.json").write_text('{"metrics": 1}')
    with pytest.raises(records.RecordError, match="expected"):
        records.read_json(run, "best.json")


def test_the_committed_results_stay_within_their_budget():
    files, size = records.budget()
    assert files <= records.MAX_FILES, f"eval/results holds {files} files; pack rows that are not headline ones"
    assert size <= records.MAX_BYTES, f"eval/results holds {size / 2**20:.1f} MB"


def test_a_hand_kept_row_takes_its_figures_from_its_results_and_refuses_one_they_lack(tmp_path):
    from eval import tables

    runs = [write_result(tmp_path / f"r_seed{s}", s, 50.0 + 2 * s, 60.0 + 2 * s) for s in range(3)]
    records.pack(runs[1])  # a packed seed reads like a loose one
    section = {"header": "| variant | seeds | dev wF1 | test wF1 | kept? |", "figures": [None, "seeds", "dev", "test", None],
               "rows": [{"results": [str(r) for r in runs], "cells": ["x", "{value}", "**{value}** (3 seeds)", "{value}", "no"]},
                        {"cells": ["y", "1", "51.00", "—", "as measured"]}]}
    assert tables.recorded(section).splitlines()[2:] == ["| x | 3 | **52.00 ± 2.00** (3 seeds) | 62.00 ± 2.00 | no |",
                                                         "| y | 1 | 51.00 | — | as measured |"]
    evaluation = tmp_path / "eval_only"
    evaluation.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps({"weighted_f1": 61.0, "accuracy": 1, "unweighted_accuracy": 1,
                                                         "macro_f1": 1}))
    section["rows"] = [{"results": str(evaluation), "cells": ["z", "1", "{value}", "61.00", ""]}]
    with pytest.raises(SystemExit, match=r"a dev cell of the row 'z \| 1' asks for a figure its results"):
        tables.recorded(section)
