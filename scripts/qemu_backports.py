#!/usr/bin/env python3
"""Unpack Debian's bookworm-backports QEMU beside the system's QEMU, for the lab.

Run by ``scripts/setup`` as root on Debian 12 (bookworm), whose own QEMU is 7.2. It
leaves every installed package alone: installing the backports ``qemu-system-x86``
would replace 7.2 (same package name), so it is unpacked instead:

1. The apt source: the machine's own Debian entry for the suite ``bookworm`` (a deb822
   paragraph of ``/etc/apt/sources.list.d/*.sources`` or a one-line entry of
   ``/etc/apt/sources.list`` and ``*.list``) gives the URI, the components and the
   ``Signed-By`` keyring; ``SOURCE_FILE`` gets the same with ``Suites:
   bookworm-backports``. No mirror is named here. ``apt-get update`` runs only when the
   source was added (or apt knows no backports version yet). Backports are
   ``NotAutomatic``: ``apt-get upgrade`` never takes a package from them.
2. ``apt-get download`` of the backports ``qemu-system-x86``, ``qemu-system-data``,
   ``seabios`` and ``qemu-system-common`` into a temporary directory, each unpacked with
   ``dpkg-deb -x`` into ``CACHE_ROOT/qemu-VERSION/root`` (VERSION: the upstream version,
   e.g. ``10.0.2``). Nothing is installed; dpkg does not know these files.
3. ``CACHE_ROOT/qemu-VERSION/qemu-system-x86_64``: an exec wrapper that runs the unpacked
   binary with ``-L`` for the unpacked SeaBIOS and QEMU data (searched first, so the
   host's older firmware is never used) and ``QEMU_MODULE_DIR`` set to the unpacked
   module directory (so the host's 7.2 modules are never loaded). The lab finds it with
   ``tsprobe lab run --qemu 10.0`` (``analysis.lab.qemu.resolve_qemu``).

It does nothing when a wrapper that answers ``--version`` is already there, and nothing
on another Debian release (Debian 13's own QEMU is 10.x).

Usage: scripts/qemu_backports.py [--check]   (--check: say what is there, change nothing)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

RELEASE = "bookworm"
SUITE = f"{RELEASE}-backports"
SOURCE_FILE = Path("/etc/apt/sources.list.d/tsprobe-backports.sources")
CACHE_ROOT = Path(os.environ.get("TSPROBE_QEMU_CACHE", "/var/cache/tsprobe"))
PACKAGES = ("qemu-system-x86", "qemu-system-data", "seabios", "qemu-system-common")
WRAPPER = "qemu-system-x86_64"
MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"
#: Searched in this order by the wrapper's -L options.
DATA_DIRS = ("usr/share/seabios", "usr/share/qemu")


@dataclass(frozen=True)
class Source:
    """One apt source entry (only what a new suite needs from it)."""

    uri: str
    components: tuple[str, ...]
    signed_by: str | None


def parse_deb822(text: str) -> list[tuple[list[str], Source]]:
    """Each ``Types: deb`` paragraph of a ``.sources`` file: (its suites, its source).

    Comment lines are skipped; a paragraph with ``Enabled: no`` is left out.
    """
    out: list[tuple[list[str], Source]] = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in para.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0] in " \t" and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no" or not fields.get("uris"):
            continue
        source = Source(
            uri=fields["uris"].split()[0],
            components=tuple(fields.get("components", "main").split()),
            signed_by=fields.get("signed-by") or None,
        )
        out.append((fields.get("suites", "").split(), source))
    return out


def parse_one_line(text: str) -> list[tuple[list[str], Source]]:
    """Each ``deb [options] URI SUITE COMPONENT...`` line of a ``.list`` file."""
    out: list[tuple[list[str], Source]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        match = re.match(r"deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not match:
            continue
        options = dict(opt.split("=", 1) for opt in (match.group(1) or "").split() if "=" in opt)
        out.append(
            (
                [match.group(3)],
                Source(match.group(2), tuple(match.group(4).split()), options.get("signed-by")),
            )
        )
    return out


def find_release_source(etc_apt: Path = Path("/etc/apt")) -> Source | None:
    """The machine's own entry for ``RELEASE`` (deb822 files first)."""
    entries: list[tuple[list[str], Source]] = []
    for path in sorted(etc_apt.glob("sources.list.d/*.sources")):
        if path.name != SOURCE_FILE.name:
            entries += parse_deb822(path.read_text(errors="replace"))
    for path in [etc_apt / "sources.list", *sorted(etc_apt.glob("sources.list.d/*.list"))]:
        if path.is_file():
            entries += parse_one_line(path.read_text(errors="replace"))
    for suites, source in entries:
        if RELEASE in suites:
            return source
    return None


def backports_paragraph(source: Source) -> str:
    """The deb822 text of ``SOURCE_FILE`` for ``source``'s mirror."""
    lines = [
        "# Added by tsprobe's scripts/setup: QEMU 10 for the lab (unpacked, not installed).",
        "Types: deb",
        f"URIs: {source.uri}",
        f"Suites: {SUITE}",
        f"Components: {' '.join(source.components)}",
    ]
    if source.signed_by:
        lines.append(f"Signed-By: {source.signed_by}")
    return "\n".join(lines) + "\n"


def upstream_version(debian_version: str) -> str:
    """``1:10.0.2+ds-2+deb13u1~bpo12+1`` -> ``10.0.2``."""
    version = debian_version.split(":", 1)[-1]
    return re.split(r"[+~-]", version, maxsplit=1)[0]


def run(cmd: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its stdout. Exits with one line when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        sys.exit(f"qemu-backports: {' '.join(cmd)} failed: {last}")
    return proc.stdout


def backports_version(package: str) -> str | None:
    """The version of ``package`` that apt knows from ``SUITE`` (None: none known)."""
    out = subprocess.run(
        ["apt-cache", "madison", package], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 3 and f"{SUITE}/" in parts[2]:
            return parts[1]
    return None


def installed_wrappers() -> list[Path]:
    """Wrappers already unpacked under ``CACHE_ROOT``, newest version last."""

    def key(path: Path) -> tuple[int, ...]:
        digits = re.findall(r"\d+", path.parent.name)
        return tuple(int(d) for d in digits)

    found = [Path(p) for p in glob.glob(str(CACHE_ROOT / "qemu-*" / WRAPPER))]
    return sorted((p for p in found if os.access(p, os.X_OK)), key=key)


def wrapper_works(path: Path) -> bool:
    """Whether ``path --version`` answers a QEMU version."""
    proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "QEMU emulator version" in proc.stdout


def write_wrapper(target: Path) -> Path:
    """Write ``target/WRAPPER`` for the tree unpacked in ``target/root``."""
    root = target / "root"
    lines = [
        "#!/bin/sh",
        "# QEMU from Debian's bookworm-backports, unpacked by tsprobe's scripts/setup.",
        f'export QEMU_MODULE_DIR="{root / MODULE_DIR}"',
        f'exec "{root / "usr/bin" / WRAPPER}" '
        + " ".join(f'-L "{root / d}"' for d in DATA_DIRS)
        + ' "$@"',
    ]
    path = target / WRAPPER
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.chmod(0o755)
    tmp.rename(path)
    return path


def ensure_source() -> bool:
    """Write ``SOURCE_FILE`` when missing; whether it was added."""
    if SOURCE_FILE.exists():
        return False
    source = find_release_source()
    if source is None:
        sys.exit(f"qemu-backports: no apt source for suite {RELEASE} in /etc/apt")
    SOURCE_FILE.write_text(backports_paragraph(source))
    print(f"qemu-backports: added {SOURCE_FILE} ({SUITE}, the {RELEASE} entry's mirror)")
    return True


def unpack() -> Path:
    """Download and unpack the backports QEMU; the wrapper's path."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    added = ensure_source()
    if added or backports_version("qemu-system-x86") is None:
        print("qemu-backports: apt-get update")
        run(["apt-get", "update", "-q"], env=env)
    versions = {pkg: backports_version(pkg) for pkg in PACKAGES}
    missing = [pkg for pkg, version in versions.items() if version is None]
    if missing:
        sys.exit(f"qemu-backports: {SUITE} has no {', '.join(missing)}")
    target = CACHE_ROOT / f"qemu-{upstream_version(str(versions['qemu-system-x86']))}"
    with tempfile.TemporaryDirectory(prefix="tsprobe-qemu-") as tmp:
        os.chmod(tmp, 0o755)  # apt's _apt user writes the downloads
        run(["apt-get", "download", "-q", *(f"{p}={v}" for p, v in versions.items())], cwd=tmp)
        staging = target.with_name(target.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "root").mkdir(parents=True)
        for deb in sorted(Path(tmp).glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), str(staging / "root")])
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    wrapper = write_wrapper(target)  # last: its presence means the tree is complete
    if not wrapper_works(wrapper):
        sys.exit(f"qemu-backports: {wrapper} --version failed")
    return wrapper


def release() -> str:
    """``VERSION_CODENAME`` of /etc/os-release."""
    text = Path("/etc/os-release").read_text(errors="replace")
    match = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", text, re.M)
    return match.group(1) if match else "?"


def main(argv: list[str]) -> int:
    """See the module docstring."""
    have = [p for p in installed_wrappers() if wrapper_works(p)]
    if have:
        if "--check" in argv:
            print(f"qemu-backports: {have[-1]}")
        return 0
    if release() != RELEASE:
        if "--check" in argv:
            print(f"qemu-backports: not {RELEASE}: the system's QEMU is used")
        return 0
    if "--check" in argv:
        print("qemu-backports: not unpacked")
        return 1
    if os.geteuid() != 0:
        sys.exit("qemu-backports: run as root (apt sources, apt-get update)")
    wrapper = unpack()
    version = subprocess.run(
        [str(wrapper), "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()[0]
    print(f"qemu-backports: {wrapper}: {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
