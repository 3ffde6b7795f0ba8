"""The shape of the project: which module may import which, read from the source with `ast`.

From the ground up: data/ (the inputs) imports no stage; model.py imports only data/; rotate.py,
quant.py and lora.py import model.py (and data/), not each other; eval.py composes them; train.py
sits on top; a file of extras/ sits just above what it uses (never under a stage that needs it);
bench/ may use everything. No cycle anywhere, and no import of a project module inside a function
(the way a cycle is hidden). Imports of other packages (torch, lm_eval, ...) are not checked.
"""
import ast

import pytest

from helpers import ROOT

STAGES = ("model", "rotate", "quant", "lora", "eval", "train")
# What each stage may import (besides data/). The extras a stage may call sit on its own level or below.
ALLOWED = {
    "model": set(),
    "rotate": {"model"},
    "quant": {"model"},
    "lora": {"model"},
    "eval": {"model", "rotate", "quant", "lora", "extras.compile", "extras.quantized_checkpoint",
             "extras.int_kernels"},
    "train": {"model", "rotate", "quant", "lora", "eval", "extras.compile", "extras.quantized_checkpoint",
              "extras.hf_export", "extras.checkpoints", "extras.distributed", "extras.spinquant", "extras.int_kernels"},
}
# The stages under each extras/ file: what it may import (besides data/ and the extras listed).
EXTRAS = {
    "extras.compile": {"model"},
    "extras.distributed": set(),
    "extras.spinquant": {"model", "rotate", "quant"},
    "extras.hf_export": {"model", "rotate"},
    "extras.quantized_checkpoint": {"model", "rotate", "quant"},
    "extras.int_kernels": {"model", "quant"},
    "extras.checkpoints": {"model", "rotate", "lora"},
    "extras.harness": {"eval", "extras.int_kernels"},
    "extras.sample": {"model", "eval", "extras.int_kernels"},
}


def project_modules() -> dict[str, object]:
    """Dotted name -> path of every project module (tests excepted)."""
    paths = [ROOT / f"{name}.py" for name in STAGES]
    paths += sorted((ROOT / "data").rglob("*.py")) + sorted((ROOT / "extras").glob("*.py"))
    paths += sorted((ROOT / "bench").glob("*.py"))
    names = {}
    for path in paths:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[0] == "bench":  # run as scripts, with bench/ on sys.path
            parts = ["bench", parts[-1]]
        names[".".join(parts)] = path
    return names


MODULES = project_modules()
BENCH_SCRIPTS = {name.removeprefix("bench.") for name in MODULES if name.startswith("bench.")}
TOP_LEVEL = {name.split(".")[0] for name in MODULES} - {"bench"} | BENCH_SCRIPTS


def resolve(name: str) -> str | None:
    """The project module an imported name refers to (a module, or the package of a name in it)."""
    if name.split(".")[0] not in TOP_LEVEL:
        return None
    if name in BENCH_SCRIPTS:  # bench scripts importing each other
        return f"bench.{name}"
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path) -> list[tuple[str, int, bool]]:
    """(project module, line, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                # `from extras import spinquant`: the submodule when there is one, else the module
                names = [f"{child.module}.{alias.name}" if f"{child.module}.{alias.name}" in MODULES
                         else child.module for alias in child.names]
            for name in names:
                target = resolve(name)
                if target is not None:
                    found.append((target, child.lineno, in_function))
            visit(child, inner)
    visit(tree, False)
    return found


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def edges() -> dict[str, set[str]]:
    return {name: {target for target, _, _ in found if target != name} for name, found in GRAPH.items()}


def layer_of(name: str) -> str:
    return "data" if name == "data" or name.startswith("data.") else name


def test_the_graph_sees_every_stage_and_extra():
    assert set(STAGES) <= set(MODULES) and set(EXTRAS) <= set(MODULES)
    assert {"data.options", "data.mirror", "data.tokenizer", "data.models", "bench.reproduce"} <= set(MODULES)
    assert "model" in edges()["rotate"] and "eval" in edges()["train"]  # the reader sees real imports


def test_no_import_cycle():
    graph, state, path = edges(), {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not n.startswith("bench")))
def test_imports_point_one_way(name):
    """Each module imports only what its layer may: a stage its allowed stages and extras, an
    extras file the stages under it, data/ nothing of the project above it."""
    targets = edges()[name]
    if layer_of(name) == "data":
        wrong = {t for t in targets if layer_of(t) != "data"}
    elif name in ALLOWED:
        wrong = {t for t in targets if layer_of(t) != "data" and t not in ALLOWED[name]}
    elif name in EXTRAS:
        wrong = {t for t in targets if layer_of(t) != "data" and t not in EXTRAS[name] and t != "extras"}
    else:
        wrong = {t for t in targets if t.startswith(("bench", "tests"))}
    assert not wrong, f"{MODULES[name].relative_to(ROOT)} imports {sorted(wrong)}, which its layer may not"


def test_extras_sit_above_what_they_use():
    """An extras file never imports a stage that imports it back through a longer path."""
    for name, used in EXTRAS.items():
        for stage, allowed in ALLOWED.items():
            if name in allowed:  # the stage calls it: it may use only stages below that one
                assert used <= ALLOWED[stage], f"{name} uses {sorted(used - ALLOWED[stage])}, not under {stage}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_project_import_inside_a_function(name):
    """An import inside a function is how a cycle gets hidden; other packages (lm_eval, matplotlib,
    safetensors, ...) may be imported where they are used."""
    inside = [(target, line) for target, line, in_function in GRAPH[name] if in_function]
    assert not inside, f"{MODULES[name].relative_to(ROOT)} imports {inside} inside a function"


def test_model_py_knows_nothing_of_the_stages():
    assert edges()["model"] and not {t for t in edges()["model"] if layer_of(t) != "data"}
