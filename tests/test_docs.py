"""The front page and the documents: every relative link resolves; the generated tables are current."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "eval" / "README.md",
        *sorted((REPO / "erc_llm" / "pretrained").glob("*/README.md")), *sorted((REPO / "eval" / "results").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    missing = []
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert not missing, f"{doc.relative_to(REPO)}: links to missing files: {missing[:10]}"


def test_readme_is_a_front_page():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_generated_tables_are_current():
    r = subprocess.run([sys.executable, str(REPO / "eval" / "tables.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_written(tmp_path, monkeypatch):
    """The front page's own-data path, taken from README.md itself with the shipped model: the JSONL example is
    labelled by `erc-llm evaluate`, the Python snippet runs, and the curl lines get a labelled turn from the
    service; so the quick start cannot drift from what works."""
    import json
    import os
    import shlex

    from erc_llm.cli import main
    from erc_llm.server import create_app
    from erc_llm.session import Engine
    from tests.test_server import served

    monkeypatch.chdir(tmp_path)
    example = next(b for b in _blocks("json") if '"utterances"' in b)
    (tmp_path / "my_set").mkdir()
    (tmp_path / "my_set" / "test.jsonl").write_text(example)
    evaluate = next(ln for b in _blocks("bash") for ln in b.splitlines() if "--data-dir my_set --split test --out" in ln)
    assert main(shlex.split(evaluate.split("#")[0])[1:]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "my_set" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len(json.loads(example)["utterances"]) and all(r["predicted"] in r["probabilities"] for r in rows)

    python = next(b for b in _blocks("python") if "ERCSession" in b)
    exec(compile(python, "README.md", "exec"), {})

    curl = next(b for b in _blocks("bash") if "curl" in b)
    with served(create_app(Engine.load())) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        script = "\n".join(ln for ln in curl.splitlines() if not ln.startswith("erc-llm serve")).replace("8000", port)
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["label"] in answer["probabilities"] and "used" in answer
