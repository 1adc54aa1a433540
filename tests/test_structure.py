"""The package's import structure, read from the code: no circles, the config schema free of the model stack, and
inference never reaching into training code (imports inside functions count as much as those at the top)."""

import ast

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "erc_llm"
TRAINING = {"erc_llm.train", "erc_llm.finetune", "erc_llm.lora", "erc_llm.checkpoint", "erc_llm.objective",
            "erc_llm.losses", "erc_llm.averaging", "erc_llm.teacher", "erc_llm.throughput"}
INFERENCE = ["erc_llm.run", "erc_llm.decoding", "erc_llm.heads", "erc_llm.session", "erc_llm.server", "erc_llm.chat",
             "erc_llm.evaluate", "erc_llm.stages", "erc_llm.export", "erc_llm.metrics", "erc_llm.prompting"]


def imports() -> dict[str, set[str]]:
    """Module -> the erc_llm modules it imports anywhere in its code."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("erc_llm"):
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("erc_llm")}
        graph[name] = found
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for d in graph[todo.pop()]:
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def test_no_import_circles():
    graph = imports()
    circles = sorted(m for m in graph if m in reachable(graph, m) and m != "erc_llm")
    assert not circles, f"modules that import themselves through others: {circles}"


def test_the_config_schema_imports_no_training_code_and_checking_a_config_loads_no_torch(tmp_path):
    """At the top the schema imports only the standard library, yaml and dependency-free erc_llm modules; its checks
    reach run folders (an init_adapter) at call time, and even then torch is not loaded."""
    import subprocess
    import sys

    graph = imports()
    assert not reachable(graph, "erc_llm.config") & TRAINING
    top = {n.module for n in ast.parse((PACKAGE / "config.py").read_text()).body
           if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("erc_llm")}
    assert top <= {"erc_llm.constants", "erc_llm.data.schema"}
    code = ("import sys\nfrom erc_llm.config import TrainConfig, build\ntry:\n"
            f"    build(TrainConfig, None, {{'data_dir': '.', 'out': {str(tmp_path / 'run')!r}, "
            "'init_adapter': 'meld-gemma3-270m', 'lora_r': 3})\nexcept ValueError as e:\n    print(e)\n"
            "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "lora_r 16, this config has 3" in done.stdout and done.stdout.strip().endswith("False"), done.stdout + done.stderr


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training_code(module):
    assert not reachable(imports(), module) & TRAINING
