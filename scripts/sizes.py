#!/usr/bin/env python3
"""Count the modules over 800 lines and the functions over 80 (ast: end_lineno - lineno + 1).

Usage: scripts/sizes.py [DIR...]   (default: probe agent analysis tsprobe)
"""

import ast
import sys
from pathlib import Path

MAX_MODULE = 800
MAX_FUNCTION = 80


def main(roots: list[str]) -> None:
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for root in roots:
        for path in sorted(Path(root).rglob("*.py")):
            text = path.read_text()
            n = len(text.splitlines())
            if n > MAX_MODULE:
                modules.append((n, str(path)))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION:
                        functions.append((length, f"{path}:{node.lineno} {node.name}"))
    print(f"modules > {MAX_MODULE} lines: {len(modules)}")
    for n, where in sorted(modules, reverse=True):
        print(f"  {n:5d} {where}")
    print(f"functions > {MAX_FUNCTION} lines: {len(functions)}")
    for n, where in sorted(functions, reverse=True):
        print(f"  {n:5d} {where}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["probe", "agent", "analysis", "tsprobe"])
