"""The project's own import graph, read from the source with :mod:`ast` (nothing is imported or run).

It answers three questions: which files a DVC stage's command can execute (the import closure of its module, which
``slotcon deps`` writes into ``dvc.yaml``), whether any modules import each other in a circle, and which imports sit
inside a function without saying why (``# lazy: <reason>`` on the line, or the line above, marks one that waits to
save start-up time).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PACKAGES = ("components", "pipelines")


@dataclass(frozen=True)
class Import:
    """One import statement's project target, as written in ``source`` at ``line``."""

    source: str
    target: str
    line: int
    local: bool  # inside a function body
    lazy: bool  # says ``lazy:`` in a comment on its line or the line above


def module_files(root: str | Path = ".") -> dict[str, Path]:
    """Every project module under ``root``: dotted name -> file (a package is its ``__init__.py``)."""
    root = Path(root)
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _local_nodes(tree: ast.AST) -> set[int]:
    out: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            out.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def _says_lazy(lines: list[str], lineno: int) -> bool:
    here = lines[lineno - 1]
    above = lines[lineno - 2].strip() if lineno >= 2 else ""
    return ("#" in here and "lazy:" in here.split("#", 1)[1]) or (above.startswith("#") and "lazy:" in above)


def all_imports(path: Path, module: str, modules: dict[str, Path], *, project_only: bool = True) -> list[Import]:
    """The imports of one file; ``project_only`` keeps those whose target is a project module."""
    text = path.read_text()
    tree = ast.parse(text)
    lines = text.splitlines()
    local = _local_nodes(tree)
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            # ``from pkg import name``: the submodule when there is one, else the package that defines the name
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if project_only and (target not in modules or target == module):
                continue
            out.append(Import(module, target, node.lineno, id(node) in local, _says_lazy(lines, node.lineno)))
    return out


@lru_cache(maxsize=4)
def _graph(root: str) -> tuple[dict[str, Path], dict[str, tuple[Import, ...]]]:
    modules = module_files(root)
    return modules, {m: tuple(all_imports(p, m, modules)) for m, p in modules.items()}


def graph(root: str | Path = ".") -> tuple[dict[str, Path], dict[str, tuple[Import, ...]]]:
    """(modules, imports by module) of the tree at ``root``; cached per root, so a test edits a copy."""
    return _graph(str(Path(root).resolve()))


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def closure(module: str, root: str | Path = ".") -> set[str]:
    """Every project module that importing ``module`` can execute: its imports (top-level and inside functions),
    transitively, and the ``__init__`` of every package on the way."""
    modules, edges = graph(root)
    if module not in modules:
        raise KeyError(f"{module}: no such module under {root}")
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(i.target for i in edges[m])
        todo.extend(p for p in _parents(m) if p in modules)
    return seen


def circles(root: str | Path = ".") -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected components of
    more than one module, Tarjan's algorithm); an import inside a function counts like any other."""
    modules, edges = graph(root)
    succ = {m: sorted({i.target for i in edges[m]}) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def unexplained_local_imports(root: str | Path = ".") -> list[str]:
    """``file:line`` of every import inside a function (project or not) that no ``# lazy:`` comment explains."""
    root = Path(root)
    out = []
    for module, path in module_files(root).items():
        for imp in all_imports(path, module, {}, project_only=False):
            if imp.local and not imp.lazy:
                out.append(f"{path.relative_to(root)}:{imp.line}")
    return sorted(set(out), key=lambda s: (s.split(":")[0], int(s.split(":")[1])))
