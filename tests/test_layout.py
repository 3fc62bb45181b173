"""The layout is the architecture, and stays so: the method imports without DeepSpeed, adapters/ never reaches
into dist/ or train/, the package has no import cycle, no library file grows past ~500 lines, nothing edits
sys.path, deepspeed.initialize is called in one place, and nothing refers to files outside the repository."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "msplora_dist"
SOURCES = [p for top in ("msplora_dist", "launch", "tools", "experiments", "tests") for p in (REPO / top).rglob("*.py")]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every msplora_dist module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules}


def test_the_method_imports_without_deepspeed():
    blocker = ("import sys, importlib.abc\n"
               "class Block(importlib.abc.MetaPathFinder):\n"
               "    def find_spec(self, name, path, target=None):\n"
               "        if name.split('.')[0] == 'deepspeed': raise ImportError('deepspeed is blocked')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import msplora_dist, msplora_dist.adapters.export, msplora_dist.adapters.merged, msplora_dist.analysis\n"
               "assert 'deepspeed' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", blocker], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_adapters_never_import_dist_or_train():
    for path in (PACKAGE / "adapters").rglob("*.py"):
        wrong = sorted(m for m in _imports(path) if m.startswith(("msplora_dist.dist", "msplora_dist.train", "msplora_dist.cli")))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def test_the_package_has_no_import_cycle():
    graph = {_module_name(p): {m for m in _imports(p)} for p in PACKAGE.rglob("*.py")}
    # A package's __init__ re-exports its modules; importing `msplora_dist.x` runs msplora_dist/__init__ first,
    # which is not a cycle of the code, so edges into a package's own __init__ are left out.
    for mod, deps in graph.items():
        deps.discard(mod)
        graph[mod] = {d for d in deps if not mod.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_no_library_file_is_over_500_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_nothing_edits_sys_path_or_refers_outside_the_repository():
    insert, outside = "sys.path." + "insert", "../" + "shared"  # split, so this file does not match itself
    files = SOURCES + list(REPO.glob("*.md")) + list((REPO / "docs").rglob("*.md")) + list(REPO.rglob("*.sh"))
    assert not [str(p.relative_to(REPO)) for p in files if insert in p.read_text()]
    assert not [str(p.relative_to(REPO)) for p in files if outside in p.read_text()]


def test_deepspeed_initialize_is_called_in_exactly_one_place():
    calls = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "initialize"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "deepspeed"):
                calls.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("msplora_dist/train/trainer.py"), calls
