"""The import rules of the package (``trl_forking/__init__.py``), read from the source, and what an import loads.

Layers, top first: the library (the modules of ``trl_forking/`` itself), ``evaluation``, ``analysis``, ``tasks``,
``scripts``. A module imports from its own layer and the ones above it, anywhere in its code (a lazy import inside a
function counts): the library never reaches evaluation, analysis, tasks or scripts, and only scripts import the
scripts' plumbing. One exception, named here: ``trl_forking.data`` loads the bundled task as one of its datasets.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "trl_forking")
LAYERS = ("library", "evaluation", "analysis", "tasks", "scripts")
ALLOWED = {("trl_forking.data", "trl_forking.tasks.arithmetic_chains.task")}
HEAVY = ("matplotlib", "trl_forking.analysis", "trl_forking.evaluation", "trl_forking.tasks", "trl_forking.scripts")


def module_files() -> dict[str, str]:
    """Returns {module name: file} for every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, name), ROOT)[: -len(".py")].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
    return found


MODULES = module_files()


def layer(module: str) -> int:
    """Returns the index in ``LAYERS`` of ``module``; ``python -m trl_forking`` (``__main__``) is a script."""
    parts = module.split(".")
    if module == "trl_forking.__main__":
        return LAYERS.index("scripts")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else 0


def imports(module: str) -> list[tuple[str, int, bool]]:
    """Returns (imported trl_forking module, line, at module level) for each import statement of ``module``; a
    ``from package import name`` counts as the submodule when ``name`` is one."""
    path = MODULES[module]
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES]
            targets = submodules or [source]
        else:
            continue
        for target in targets:
            if target.startswith("trl_forking"):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def test_the_layers_cover_the_package_as_the_docstring_says():
    assert {LAYERS[layer(m)] for m in MODULES} == set(LAYERS)
    assert layer("trl_forking.trainer") == layer("trl_forking.data") == 0
    assert LAYERS[layer("trl_forking.scripts.usage")] == "scripts"
    assert LAYERS[layer("trl_forking.tasks.arithmetic_chains.base_model")] == "tasks"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_its_own_layer_and_the_ones_above(module):
    wrong = [
        f"line {line}: {target} ({LAYERS[layer(target)]})"
        for target, line, _ in imports(module)
        if layer(target) > layer(module) and (module, target) not in ALLOWED
    ]
    assert not wrong, f"{module} ({LAYERS[layer(module)]}) imports from a layer below it: {wrong}"


def test_the_rule_check_sees_a_lazy_import_from_below():
    """The check is not vacuous: the library's one exception is a lazy import it finds, and would refuse."""
    lazy = [(target, top) for target, _, top in imports("trl_forking.data") if target.startswith("trl_forking.tasks")]
    assert lazy and not any(top for _, top in lazy)
    assert layer(lazy[0][0]) > layer("trl_forking.data")


def test_no_import_cycle_between_modules():
    graph = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # a package re-exporting its own submodule is not a cycle
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def modules_after(statement: str) -> set[str]:
    """Returns the names in sys.modules after running ``statement`` in a fresh interpreter."""
    code = f"import sys\n{statement}\nprint('\\n'.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return set(done.stdout.split())


def test_the_trainer_loads_no_plotting_evaluation_analysis_task_or_script():
    loaded = modules_after(
        "import trl_forking\nfrom trl_forking import ForkingGRPOTrainer, ForkingGRPOConfig, ForkingStatsCallback"
    )
    assert "trl_forking.trainer" in loaded  # the statement did import the trainer
    assert not sorted(name for name in loaded if name.startswith(HEAVY))


def test_import_trl_forking_and_the_command_lines_help_load_no_torch():
    loaded = modules_after("import trl_forking\nfrom trl_forking.scripts.cli import build_parser\nbuild_parser()")
    assert "trl_forking.scripts.cli" in loaded
    assert not [name for name in loaded if name.split(".")[0] in ("torch", "transformers", "trl", "matplotlib")]
