"""No function in the application packages runs past 60 lines (def line to its last line): longer ones get split."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("planner", "service", "worker", "domain")
MAX_LINES = 60


def long_functions(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_LINES:
                found.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            offenders += long_functions(path.read_text(), str(path.relative_to(ROOT)))
    assert not offenders, "split these functions:\n" + "\n".join(offenders)


def test_a_61_line_function_is_caught_and_a_60_line_one_is_not():
    def function(lines: int) -> str:
        return "def f():\n" + "    x = 1\n" * (lines - 1)

    assert long_functions(function(61), "synthetic.py") == ["synthetic.py:1 f (61 lines)"]
    assert long_functions(function(60), "synthetic.py") == []
