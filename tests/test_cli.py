import json
import os
import subprocess
import sys

import pytest

from erc_llm.cli import main
from tests.conftest import REPO, write_jsonl_dataset


def test_evaluate_command_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl_dataset(tmp_path / "data")
    out = tmp_path / "out"
    rc = main(["evaluate", "--dataset", "jsonl", "--split", "dev", "--data-dir", str(data), "--model", str(tiny_model_dir),
               "--zero-shot", "true", "--out", str(out), "--history", "gold"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "jsonl/dev — " in printed and "(zero-shot) (gold history, online): weighted F1" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] == "gold" and metrics["command"].startswith("erc-llm ")
    assert "DIAGNOSTIC" in (out / "report.md").read_text()
    for name in ("predictions.jsonl", "confusion.png", "report.md"):
        assert (out / name).stat().st_size > 0


def test_bad_config_exits_2_with_every_problem(tmp_path, capsys):
    rc = main(["evaluate", "--dataset", "jsonl", "--data-dir", str(tmp_path / "missing"), "--max-tokens", "abc"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "max_tokens: expected int, got 'abc'" in err


def test_bad_data_exits_2_naming_the_file(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_text('{"dialogue_id": 1}\n')
    rc = main(["data", "stats", "--dataset", "jsonl", "--split", "train", "--data-dir", str(tmp_path)])
    assert rc == 2
    assert "train.jsonl, line 1: missing field(s) ['utterances']" in capsys.readouterr().err


def test_data_stats_on_meld(meld_dir, capsys):
    assert main(["data", "stats", "--dataset", "meld", "--split", "test", "--data-dir", str(meld_dir)]) == 0
    out = capsys.readouterr().out
    assert "280 dialogues, 2610 utterances" in out and "neutral" in out and "1256" in out


def test_download_offline_message(tmp_path, capsys, monkeypatch):
    import urllib.request

    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["data", "download", "meld", "--out", str(tmp_path)]) == 2
    assert "seems to be offline" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sharded_evaluation_equals_one_process(tmp_path, tiny_model_dir):
    """`--processes 2` (torchrun, 2 CPU processes) writes the predictions and metrics of one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = write_jsonl_dataset(tmp_path / "data", 5)
    base = [str(Path(sys.executable).parent / "erc-llm"), "evaluate", "--dataset", "jsonl", "--split", "test",
            "--data-dir", str(data), "--model", str(tiny_model_dir), "--zero-shot", "true", "--batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        r = subprocess.run(base + ["--processes", str(n), "--out", str(tmp_path / f"p{n}")], capture_output=True,
                           text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = ([json.loads(x) for x in (tmp_path / f"p{n}" / "predictions.jsonl").read_text().splitlines()]
                for n in (1, 2))
    assert [r["utterance_id"] for r in two] == [r["utterance_id"] for r in one]  # dataset order, nothing lost
    assert [r["predicted"] for r in two] == [r["predicted"] for r in one]
    for a, b in zip(one, two):  # same labels; float32 sums may differ in the last written digit between layouts
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    m1, m2 = (json.loads((tmp_path / f"p{n}" / "metrics.json").read_text()) for n in (1, 2))
    assert m2["processes"] == 2 and m2["utterances"] == m1["utterances"] == 3 + 4 + 5 + 6 + 7
    for key in ("weighted_f1", "accuracy", "unweighted_accuracy", "macro_f1", "per_class"):
        assert m2[key] == m1[key]
    assert not list((tmp_path / "p2").glob("*rank*"))  # shard files merged and removed


def test_serve_flags_set_every_limit(monkeypatch):
    import erc_llm.server as server
    from erc_llm.cli import main

    seen = {}
    monkeypatch.setattr(server, "serve", lambda *a: seen.update(limits=a[-3], batching=a[-2:], dtype=a[5]))
    main(["serve", "--max-dialogues-per-client", "3", "--turns-per-minute", "7", "--idle-minutes", "2"])
    assert (seen["limits"].max_dialogues_per_client, seen["limits"].turns_per_minute) == (3, 7)
    assert seen["limits"].idle_seconds == 120 and seen["limits"].max_dialogues == 200
    assert seen["batching"] == (2.0, 64) and seen["dtype"] == "auto"  # batched, fast path by default
    main(["serve", "--max-batch", "1", "--batch-window-ms", "0", "--dtype", "float32"])
    assert seen["batching"] == (0.0, 1) and seen["dtype"] == "float32"
    with pytest.raises(SystemExit, match="--max-batch 0"):
        main(["serve", "--max-batch", "0"])


def test_evaluate_and_chat_print_no_warnings(tmp_path, tiny_model_dir):
    """What `make demo` runs (evaluate, then a piped chat), as separate processes: their output holds results and
    progress lines, never a library warning, a deprecation notice or a traceback."""
    import subprocess
    import sys

    data = write_jsonl_dataset(tmp_path / "data")
    base = [sys.executable, "-m", "erc_llm.cli"]
    runs = [subprocess.run(base + ["evaluate", "--dataset", "jsonl", "--split", "test", "--data-dir", str(data),
                                   "--model", str(tiny_model_dir), "--zero-shot", "true", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=600),
            subprocess.run(base + ["chat", "--zero-shot", "--model", str(tiny_model_dir)], capture_output=True, text=True,
                           input="Ross: We were on a break!\nRachel: Were we?\nhow does Ross feel?\n", timeout=600)]
    for r in runs:
        assert r.returncode == 0, r.stderr
        said = (r.stdout + r.stderr).lower()
        assert not [ln for ln in said.splitlines() if "warn" in ln or "deprecat" in ln or "traceback" in ln], said
    assert "weighted f1" in runs[0].stdout.lower() and "ross" in runs[1].stdout.lower()


@pytest.mark.parametrize("argv, preset, expected", [
    (["serve"], None, "PASSIVE"),  # request threads get the cycles OpenMP workers would spin away
    (["evaluate"], None, None),  # batch decoding keeps OpenMP's default: it is faster there
    (["serve"], "ACTIVE", "ACTIVE"),  # a user's own setting wins
    (["-v", "serve", "--port", "9000"], None, "PASSIVE"),
])
def test_serve_stops_openmp_workers_spinning_before_torch_loads(argv, preset, expected):
    code = ("import os, sys; sys.argv = ['erc-llm'] + sys.argv[1:]; import erc_llm.cli; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env |= {"OMP_WAIT_POLICY": preset} if preset else {}
    out = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [str(expected), "False"]  # set (or left alone) before torch, and with it OpenMP, has loaded
