"""The code's shape: no import circles, every import inside a function says why, no oversized file or function
without its reason, and the graph tool itself finds what it should (on a small tree written here)."""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from components import codegraph

REPO = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _project_files() -> list[Path]:
    return sorted(p for pkg in codegraph.PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_no_import_circles():
    assert codegraph.circles(REPO) == []


def test_every_import_inside_a_function_says_why():
    assert codegraph.unexplained_local_imports(REPO) == [], "hoist them, or say `# lazy: <reason>`"


def test_no_file_over_the_limit_without_a_reason():
    """A module over the limit says why in its docstring, on a line that starts with ``Kept whole:``."""
    over = []
    for path in _project_files():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_FILE_LINES and "Kept whole:" not in doc:
            over.append(f"{path.relative_to(REPO)}: {len(text.splitlines())} lines")
    assert over == []


def test_no_function_over_the_limit_without_a_reason():
    """A function over the limit has ``# long: <reason>`` on the line above its ``def`` (or its decorators)."""
    over = []
    for path in _project_files():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and \
                        not lines[first - 2].strip().startswith("# long:"):
                    over.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert over == []


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_graph_finds_a_circle_hidden_in_a_function_and_the_closure(tmp_path):
    root = _tree(tmp_path, {
        "components/__init__.py": "",
        "components/a.py": "from components import b\n",
        "components/b.py": "def f():\n    from components.sub import c  # lazy: start-up time\n    return c\n",
        "components/sub/__init__.py": "",
        "components/sub/c.py": "import json\n\ndef g():\n    from components import a\n    import os\n",
        "components/d.py": "X = 1\n",
    })
    assert codegraph.circles(root) == [["components.a", "components.b", "components.sub.c"]]
    assert codegraph.closure("components.b", root) == {
        "components", "components.a", "components.b", "components.sub", "components.sub.c"}
    assert codegraph.unexplained_local_imports(root) == ["components/sub/c.py:4", "components/sub/c.py:5"]
