"""scripts/qemu_backports.py: the backports source derived from the machine's own apt
configuration (deb822 and one-line entries), and the version directory's name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "qemu_backports.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qemu_backports", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["qemu_backports"] = module
    spec.loader.exec_module(module)
    return module


qb = _module()

DEB822 = """\
Types: deb
# a comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_deb822_entry_of_the_release_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    source = qb.find_release_source(tmp_path)
    assert source == qb.Source(
        "http://mirror.example/debian",
        ("main", "contrib"),
        "/usr/share/keyrings/debian-archive-keyring.gpg",
    )
    text = qb.backports_paragraph(source)
    assert "Suites: bookworm-backports\n" in text
    assert "URIs: http://mirror.example/debian\n" in text
    assert "Components: main contrib\n" in text
    assert "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n" in text


def test_one_line_entry_and_disabled_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "off.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nEnabled: no\n"
    )
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main non-free\n"
    )
    source = qb.find_release_source(tmp_path)
    assert source == qb.Source("http://one.example/debian", ("main", "non-free"), "/k.gpg")


def test_no_release_entry(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://x.example/debian trixie main\n")
    assert qb.find_release_source(tmp_path) is None


def test_upstream_version() -> None:
    assert qb.upstream_version("1:10.0.2+ds-2+deb13u1~bpo12+1") == "10.0.2"
    assert qb.upstream_version("1:7.2+dfsg-7+deb12u18+b3") == "7.2"
