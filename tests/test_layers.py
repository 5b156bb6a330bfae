"""The package layering (docs/architecture.md), checked on the source: ``analysis`` never
imports ``agent``; inside ``analysis`` the stages import only the stages before them; no
library module imports a command-line module (``cli.py``, ``*_cli.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What each stage of analysis/ may import of the other stages.
ALLOWED = {
    "rundir": set(),
    "record": {"rundir"},
    "analyze": {"rundir"},
    "report": {"rundir", "analyze"},
    "prom": {"rundir", "analyze", "report"},
    "lab": {"rundir", "record", "analyze", "report"},
}
#: Known exceptions, each with its reason.
EXCEPTIONS = {
    # The study report reads the study plan's model (RunSpec, RunRecord) from the lab.
    ("analysis/report/study.py", "lab"),
    ("analysis/report/study_render.py", "lab"),
    # `tsprobe report --prometheus` is a front end of both the report and prom stages.
    ("analysis/report/cli.py", "prom"),
}


def _imports(path: Path) -> list[str]:
    out: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli")


def test_analysis_never_imports_agent() -> None:
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p in sorted((ROOT / "analysis").rglob("*.py"))
        for m in _imports(p)
        if m == "agent" or m.startswith("agent.")
    ]
    assert bad == []


def test_stages_import_only_the_stages_before_them() -> None:
    bad = []
    for p in sorted((ROOT / "analysis").rglob("*.py")):
        rel = p.relative_to(ROOT)
        if len(rel.parts) < 3:
            continue
        stage = rel.parts[1]
        for m in _imports(p):
            parts = m.split(".")
            if parts[0] != "analysis" or len(parts) < 2 or parts[1] not in ALLOWED:
                continue
            target = parts[1]
            allowed = target == stage or target in ALLOWED[stage]
            if not allowed and (rel.as_posix(), target) not in EXCEPTIONS:
                bad.append((rel.as_posix(), m))
    assert bad == []


def test_no_library_module_imports_a_command_line_module() -> None:
    bad = []
    for root in ("probe", "agent", "analysis"):
        for p in sorted((ROOT / root).rglob("*.py")):
            if _is_cli(p.stem):
                continue
            bad += [(str(p.relative_to(ROOT)), m) for m in _imports(p) if _is_cli(m)]
    assert bad == []
