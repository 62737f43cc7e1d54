"""The code's shape that the maintainers rely on: no import cycles, small studies/ modules, and a
worker that imports only what it runs."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ltm", "studies", "analysis")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at any depth (lazy imports count)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_itself_through_others():
    graph = _imports()
    assert graph["studies.tasks"] and "studies.launcher" not in graph["studies.tasks"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_studies_modules_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "studies").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


def function_lengths(folder: Path) -> dict[str, int]:
    """"<file>:<function>" -> its lines, from its def to its last line, for every function in the folder."""
    return {f"{p.relative_to(folder)}:{node.name}": node.end_lineno - node.lineno + 1
            for p in sorted(folder.rglob("*.py")) for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_functions_fit_on_a_screen():
    for pkg in PACKAGES:  # studies/, ltm/ (subpackages included) and analysis/
        long = {name: n for name, n in function_lengths(ROOT / pkg).items() if n > 60}
        assert not long, (pkg, long)


def test_the_worker_and_the_study_scripts_import_only_what_they_run():
    graph = _imports()
    assert graph["studies.worker"] <= {"ltm.files", "ltm.names", "ltm.signals", "studies.messages", "studies.point"}
    for script in ("inference_scaling", "sample_efficiency", "inference_cost", "zero_shot", "icl_gsm8k", "generation",
                   "ladder"):
        ours = {m for m in graph[f"studies.{script}"] if m.startswith("studies.")}
        assert ours <= {"studies.launcher", "studies.study", "studies.tasks"}, script  # not the machinery
    assert "studies.ray_backend" not in graph["studies.slurm_backend"]  # a SLURM job never imports Ray's side


def test_the_readme_names_every_module():
    readme = (ROOT / "README.md").read_text()
    modules = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if p.name != "__init__.py"]
    unnamed = [str(p.relative_to(ROOT)) for p in modules
               if str(p.relative_to(ROOT)) not in readme and f"`{p.name}`" not in readme]
    assert not unnamed, f"README.md does not describe {unnamed}: add each to a module table or list"


def test_a_module_that_runs_as_a_command_names_its_logger():
    """Run as `python -m ltm.train` or `python analysis/compare.py`, a module's __name__ is "__main__": a logger
    of `getLogger(__name__)` would be outside the `ltm`/`studies`/`analysis` loggers that the command configures."""
    unnamed = [str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
               if '__name__ == "__main__"' in (text := p.read_text()) and "getLogger(__name__)" in text]
    assert not unnamed, unnamed
