"""The package's import structure, read from the code: no circles, the config schema free of the model stack, and
inference never reaching into training code (imports inside functions count as much as those at the top)."""

import ast

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "erc_llm"
# The layers, bottom up: a module may import modules of its own layer or below, never above. Training sits
# beside inference (above it, so it may use the decoders for dev selection); nothing of inference imports it.
LAYERS = [
    ("foundation", {"erc_llm", "erc_llm.constants", "erc_llm.errors", "erc_llm.io", "erc_llm.palette",
                    "erc_llm.gguf_parts", "erc_llm.data.text", "erc_llm.options"}),
    ("data", {"erc_llm.data", "erc_llm.data.schema", "erc_llm.data.jsonl", "erc_llm.data.meld", "erc_llm.data.iemocap"}),
    ("config", {"erc_llm.config"}),
    ("inputs", {"erc_llm.prompting", "erc_llm.audio", "erc_llm.backbone", "erc_llm.speakers", "erc_llm.uploads"}),
    ("model", {"erc_llm.projector", "erc_llm.attention", "erc_llm.heads", "erc_llm.kvcache"}),
    ("decoding and stages", {"erc_llm.decoding", "erc_llm.stages"}),
    ("run", {"erc_llm.run", "erc_llm.metrics"}),
    ("use", {"erc_llm.evaluate", "erc_llm.session", "erc_llm.export"}),
    ("apps", {"erc_llm.chat", "erc_llm.server"}),
    ("training", {"erc_llm.train", "erc_llm.training", "erc_llm.training.averaging", "erc_llm.training.checkpoint",
                  "erc_llm.training.finetune", "erc_llm.training.lora", "erc_llm.training.loop",
                  "erc_llm.training.losses", "erc_llm.training.objective", "erc_llm.training.recipe",
                  "erc_llm.training.select", "erc_llm.training.teacher", "erc_llm.baseline",
                  "erc_llm.baseline.features", "erc_llm.baseline.model", "erc_llm.baseline.train"}),
    ("tools", {"erc_llm.bench", "erc_llm.bench.harness", "erc_llm.bench.inference", "erc_llm.bench.training"}),
    ("command line", {"erc_llm.cli"}),
]
LAYER = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
TRAINING = {m for m in LAYERS[9][1]}
INFERENCE = sorted(m for m, i in LAYER.items() if i < 9)

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


def test_the_config_schema_imports_only_dependency_free_modules_and_checking_a_config_loads_no_torch(tmp_path):
    """The schema reaches only the standard library, yaml and dependency-free erc_llm modules (checks that read
    another run's files belong to training setup); building and checking a config loads neither torch nor
    transformers."""
    import subprocess
    import sys

    graph = imports()
    assert reachable(graph, "erc_llm.config") <= {"erc_llm.constants", "erc_llm.data.schema", "erc_llm.io",
                                                  "erc_llm.options"}
    code = ("import sys\nfrom erc_llm.config import TrainConfig\nfrom erc_llm.options import build\ntry:\n"
            f"    build(TrainConfig, None, {{'data_dir': '.', 'out': {str(tmp_path / 'run')!r}, 'lora_r': 0}})\n"
            "except ValueError as e:\n    print(e)\nprint('torch' in sys.modules, 'transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "lora_r" in done.stdout and done.stdout.strip().endswith("False False"), done.stdout + done.stderr


@pytest.mark.parametrize("module", INFERENCE)
def test_inference_never_imports_training_code(module):
    assert not reachable(imports(), module) & TRAINING


def test_every_module_has_a_layer_and_imports_point_down():
    graph = imports()
    assert not sorted(set(graph) - set(LAYER)), "place new modules in LAYERS"
    upward = sorted(f"{m} ({LAYERS[LAYER[m]][0]}) -> {d} ({LAYERS[LAYER[d]][0]})"
                    for m, deps in graph.items() for d in deps if LAYER[d] > LAYER[m])
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_layer_check_catches_an_upward_import():
    """The config schema reading run folders (config -> run) is the kind of arrow the layer test exists for."""
    graph = {**imports(), "erc_llm.config": {"erc_llm.run"}}
    assert any(LAYER[d] > LAYER[m] for m, deps in graph.items() for d in deps)


def test_imports_sit_at_the_top_and_each_lazy_one_says_why():
    """Module-top imports outnumber those inside functions at least 3 to 1, and every import inside a function
    carries a comment with its reason (a heavy or optional dependency kept out of a light module)."""
    top = inner = 0
    silent = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        lines, tree = source.splitlines(), ast.parse(source)
        lazy = {n for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        every = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        top += len(every) - len(lazy)
        inner += len(lazy)
        silent += [f"{path.relative_to(REPO)}:{n.lineno}" for n in lazy
                   if "#" not in " ".join(lines[n.lineno - 1:n.end_lineno])]
    assert top >= 3 * inner, (top, inner)
    assert not silent, f"imports inside functions without a reason: {silent}"
