"""eval/seeds.py: mean ± sample std over seeds, and refusal of runs whose recipes differ."""

import json
from pathlib import Path

import pytest
import yaml

from eval import seeds as seeds_script
from eval import seeds_table

ROOT = Path(__file__).resolve().parent.parent


def write_result(folder: Path, seed: int, dev: float, test: float, **cfg) -> Path:
    (folder / "test_predicted").mkdir(parents=True)
    config = {"seed": seed, "out": str(folder), "lr": 2e-4, "label_smoothing": 0.0, "test_gold": True, **cfg}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "best.json").write_text(json.dumps({"step": 100, "dev_predicted": {"weighted_f1": dev}}))
    metrics = {"weighted_f1": test, "accuracy": test, "unweighted_accuracy": test, "macro_f1": test,
               "per_class": {"joy": {"f1": test - 1}, "anger": {"f1": test + 1}}}
    (folder / "test_predicted" / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_mean_and_sample_std_ignore_where_and_how_a_run_was_written(tmp_path):
    # seed, out and test_gold (an extra gold-history evaluation) do not change the model or its test_predicted
    runs = [write_result(tmp_path / "a", 0, 50.0, 60.0), write_result(tmp_path / "b", 1, 52.0, 62.0, test_gold=False),
            write_result(tmp_path / "c", 2, 54.0, 64.0)]
    seeds_script.main([str(r) for r in runs] + ["--out", str(tmp_path / "sum")])
    s = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert s["seeds"] == [0, 1, 2]
    assert s["weighted_f1"]["mean"] == pytest.approx(62.0) and s["weighted_f1"]["std"] == pytest.approx(2.0)
    assert s["dev_weighted_f1"]["values"] == [50.0, 52.0, 54.0]
    assert s["per_class_f1"]["anger"]["mean"] == pytest.approx(63.0)


def test_runs_of_different_recipes_or_repeated_seeds_are_refused(tmp_path):
    a = write_result(tmp_path / "a", 0, 50.0, 60.0)
    b = write_result(tmp_path / "b", 1, 52.0, 62.0, label_smoothing=0.1)
    with pytest.raises(SystemExit, match=r"differ in more than the seed \(label_smoothing\)"):
        seeds_script.main([str(a), str(b), "--out", str(tmp_path / "sum")])
    c = write_result(tmp_path / "c", 0, 52.0, 62.0)
    with pytest.raises(SystemExit, match=r"duplicate seeds \[0, 0\]"):
        seeds_script.main([str(a), str(c), "--out", str(tmp_path / "sum")])
    assert not (tmp_path / "sum").exists()


def write_ensemble(folder: Path, seeds: list[int], dev: float, test: float, lrs=(1e-4, 2e-4)) -> Path:
    members = [{"model": f"runs/lr{lr}_s{s}", "config": {"seed": s, "out": f"runs/lr{lr}_s{s}", "lr": lr}}
               for s, lr in zip(seeds, lrs)]
    for split, value in (("dev", dev), ("test", test)):
        (folder / split).mkdir(parents=True)
        metrics = {"split": split, "members": members, "weighted_f1": value, "accuracy": value,
                   "unweighted_accuracy": value, "macro_f1": value, "per_class": {"joy": {"f1": value}}}
        (folder / split / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_a_row_of_ensembles_is_summarised_by_their_members_seed(tmp_path):
    ens = [write_ensemble(tmp_path / f"e{s}", [s, s], 55.0 + s, 60.0 + 2 * s) for s in (0, 1, 2)]
    seeds_script.main([str(e) for e in ens] + ["--out", str(tmp_path / "sum")])
    s = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert s["seeds"] == [0, 1, 2]
    assert s["dev_weighted_f1"]["values"] == [55.0, 56.0, 57.0]
    assert s["weighted_f1"]["mean"] == pytest.approx(62.0) and s["weighted_f1"]["std"] == pytest.approx(2.0)
    assert [m["lr"] for m in s["recipe"]["members"]] == [1e-4, 2e-4]


def test_ensembles_of_mixed_seeds_or_different_recipes_are_refused(tmp_path):
    mixed = write_ensemble(tmp_path / "mixed", [0, 1], 55.0, 60.0)
    other = write_ensemble(tmp_path / "other", [1, 1], 55.0, 60.0)
    with pytest.raises(SystemExit, match=r"members of seeds \[0, 1\]"):
        seeds_script.main([str(mixed), str(other), "--out", str(tmp_path / "sum")])
    third = write_ensemble(tmp_path / "third", [2, 2], 55.0, 60.0, lrs=(1e-4, 5e-5))
    with pytest.raises(SystemExit, match=r"differ in more than the seed \(members\)"):
        seeds_script.main([str(other), str(third), "--out", str(tmp_path / "sum")])
    assert not (tmp_path / "sum").exists()


def test_an_ensemble_without_its_test_split_is_named(tmp_path):
    ens = write_ensemble(tmp_path / "e0", [0, 0], 55.0, 60.0)
    (ens / "test" / "metrics.json").unlink()
    with pytest.raises(SystemExit, match=r"e0: missing test/metrics.json beside dev/"):
        seeds_script.main([str(ens), "--out", str(tmp_path / "sum")])




def test_table_of_seed_rows_shows_each_rows_seeds_and_refuses_mixed_label_sets(tmp_path):
    a = [write_result(tmp_path / f"a{s}", s, 50.0 + 2 * s, 60.0 + 2 * s) for s in (0, 1, 2)]
    b = [write_result(tmp_path / f"b{s}", s, 55.0, 61.0 + s, lr=1e-4) for s in (0, 1)]
    seeds_script.main([str(r) for r in a] + ["--out", str(tmp_path / "A")])
    seeds_script.main([str(r) for r in b] + ["--out", str(tmp_path / "B")])
    seeds_table.main([f"text only={tmp_path / 'A'}", f"+ half rate={tmp_path / 'B'}", "--out", str(tmp_path / "t")])
    lines = (tmp_path / "t" / "table.md").read_text().splitlines()
    assert lines[0] == "| variant | seeds | dev wF1 | test wF1 | WA | UA | joy | anger |"
    assert lines[2] == "| text only | 0 · 1 · 2 | 52.00 ± 2.00 | 62.00 ± 2.00 | 62.00 ± 2.00 | 62.00 ± 2.00 | 61.0 | 63.0 |"
    assert lines[3].startswith("| + half rate | 0 · 1 | 55.00 ± 0.00 | 61.50 ± 0.71 |")
    assert any(x.startswith(f"python eval/seeds_table.py 'text only={tmp_path / 'A'}' '+ half rate=") for x in lines)
    summary = json.loads((tmp_path / "B" / "summary.json").read_text())
    summary["per_class_f1"] = {"sad": summary["per_class_f1"]["joy"]}
    (tmp_path / "B" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match=r"row '\+ half rate' has classes \['sad'\]"):
        seeds_table.main([f"a={tmp_path / 'A'}", f"+ half rate={tmp_path / 'B'}", "--out", str(tmp_path / "u")])
    with pytest.raises(SystemExit, match="expected LABEL=FOLDER"):
        seeds_table.main([str(tmp_path / "A"), "--out", str(tmp_path / "u")])
    assert not (tmp_path / "u").exists()
