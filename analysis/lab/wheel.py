"""The tsprobe wheel a user would ``pip install``, built from this checkout for the lab guest.

The lab guest runs the agent from the same files a user installs: ``build_wheel`` copies
what the wheel is built from (``pyproject.toml``, ``README.md`` and the package folders,
without caches) into a scratch directory and runs ``python -m build --wheel
--no-isolation`` there, so the checkout gets no ``build/`` or ``*.egg-info``, and
``unpack_packages`` unpacks the guest's packages from it (``analysis.lab.guest`` puts
them under ``/opt/tsprobe``). ``tests/test_wheel.py`` checks the same wheel's contents,
installs it into a clean virtual environment with the guest's dependencies only and runs
the agent from there.

Import names: the wheel installs four top-level packages, ``probe``, ``agent``,
``analysis`` and ``tsprobe`` (``TOP_LEVEL``; the design's folders). PyPI has
distributions named ``probe``, ``agent`` and ``analysis``; installed into the same
environment as one of them, the later install overwrites the other's files. The names
are kept (renaming them would move every import, test and document of the project), and
the agent is installed into an environment of its own (``/opt/tsprobe`` in the lab
guest, a virtual environment elsewhere: README, "Installing the agent in a guest").

When the checkout is not there (tsprobe installed from a wheel, no ``pyproject.toml``
beside the packages), ``checkout_root`` returns None and the guest copies the installed
packages, which came from a wheel already.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from analysis.lab.errors import GuestBuildError

#: The top-level import packages the wheel installs.
TOP_LEVEL = ("agent", "analysis", "probe", "tsprobe")
#: What a wheel is built from, besides the package folders.
PROJECT_FILES = ("pyproject.toml", "README.md")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def checkout_root() -> Path | None:
    """The checkout this tsprobe runs from (the folder holding ``pyproject.toml``), or
    None when it runs from an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    if all((root / name).is_file() for name in PROJECT_FILES) and all(
        (root / name).is_dir() for name in TOP_LEVEL
    ):
        return root
    return None


def build_wheel(root: Path, out: Path, timeout_s: float = 300) -> Path:
    """Build the wheel of the checkout at ``root`` into ``out``.

    :raise GuestBuildError: when ``python -m build`` is missing or fails.
    :return: the wheel's path.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tsprobe-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in PROJECT_FILES:
            shutil.copyfile(root / name, src / name)
        for name in TOP_LEVEL:
            shutil.copytree(root / name, src / name, ignore=_IGNORE)
        cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out)]
        try:
            proc = subprocess.run(
                cmd, cwd=src, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired as err:
            raise GuestBuildError(f"python -m build: no wheel after {timeout_s:.0f} s") from err
        if proc.returncode != 0:
            last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["?"]
            hint = " (pip install build)" if "No module named build" in proc.stderr else ""
            raise GuestBuildError(f"python -m build failed: {last[0]}{hint}")
    wheels = sorted(out.glob("tsprobe-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise GuestBuildError(f"python -m build left no tsprobe wheel in {out}")
    return wheels[-1]


def unpack_packages(wheel: Path, names: tuple[str, ...], dest: Path) -> list[str]:
    """Unpack the top-level packages ``names`` of ``wheel`` into ``dest``.

    :raise GuestBuildError: when the wheel lacks one of them.
    :return: the unpacked files, relative to ``dest``.
    """
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.split("/", 1)[0] in names]
        missing = [n for n in names if not any(m.startswith(f"{n}/") for m in members)]
        if missing:
            raise GuestBuildError(f"{wheel.name} holds no {', '.join(missing)}")
        for member in members:
            if not member.endswith("/"):
                zf.extract(member, dest)
    return sorted(m for m in members if not m.endswith("/"))


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
