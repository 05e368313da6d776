"""The package's shape (issue: one way through the code): nothing under powerlow/ imports the command line but the
command line itself, and the modules import each other without a cycle (walked from their source, no import)."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "powerlow"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """powerlow modules ``name`` imports (module level and inside functions)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        else:
            continue
        out.update(c for c in cands if c in mods and c != name)
    return out


def test_only_the_cli_imports_the_cli():
    mods = _modules()
    users = sorted(n for n, p in mods.items() if "powerlow.cli" in _imports(n, p, mods)
                   and n not in ("powerlow.cli", "powerlow.__main__"))
    assert users == [], f"modules importing powerlow.cli: {users}"


def test_module_level_imports_have_no_cycle():
    """Imports at module level (what runs at import time) form no cycle; a function-level import that closes a
    loop is allowed (it runs later), but none may reach the CLI."""
    mods = _modules()
    graph = {}
    for n, p in mods.items():
        tree = ast.parse(p.read_text())
        top = ast.Module(body=[s for s in tree.body if isinstance(s, (ast.Import, ast.ImportFrom))], type_ignores=[])
        pkg = n if p.name == "__init__.py" else n.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(top):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                edges.update(c for c in [mod] + [f"{mod}.{a.name}" for a in node.names] if c in mods and c != n)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in mods and a.name != n)
        graph[n] = edges
    state, stack = {}, []

    def visit(u):
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            if v not in state:
                visit(v)
        stack.pop()
        state[u] = 2
    for u in sorted(graph):
        if u not in state:
            visit(u)


def test_modules_and_functions_stay_small():
    """No module under powerlow/ or predictors/ over 600 lines, no function over 80 (the issue's measure of a tree a
    newcomer can read)."""
    roots = [PKG, PKG.parent / "predictors"]
    long_mods, long_fns = [], []
    for root in roots:
        for p in sorted(root.rglob("*.py")):
            text = p.read_text()
            if text.count("\n") > 600:
                long_mods.append((p.name, text.count("\n")))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                    long_fns.append((p.name, node.name, node.end_lineno - node.lineno + 1))
    assert long_mods == [] and long_fns == [], (long_mods, long_fns)
