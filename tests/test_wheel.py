"""The sdist and the wheel a user installs, and the agent run from that wheel.

``python -m build --no-isolation`` builds both from the checkout (tests/ and bench/ are
pruned by MANIFEST.in). The wheel must hold the four top-level packages and nothing
else (``analysis.lab.wheel.TOP_LEVEL``; why those names are kept is said there), the
package data the lab and the agent read (``analysis/lab/init.sh``, the guest hooks and
workload, ``py.typed`` of each package) and the ``tsprobe`` entry point. Then the wheel
goes into a clean virtual environment with the guest's dependencies only (psutil,
prometheus-client, click: from PyPI, or pip's cache) and ``tsprobe agent`` runs from
there, importing nothing from the checkout. The lab guest unpacks the same wheel
(``analysis.lab.guest``); the last test checks that its files are the wheel's.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from analysis.lab.wheel import TOP_LEVEL, build_wheel, unpack_packages

REPO = Path(__file__).resolve().parent.parent
GUEST_DEPENDENCIES = ("psutil", "prometheus-client", "click")
PACKAGE_DATA = (
    "agent/py.typed",
    "probe/py.typed",
    "analysis/py.typed",
    "tsprobe/py.typed",
    "analysis/lab/init.sh",
    "analysis/lab/guest_hooks.py",
    "analysis/lab/guest_workload.py",
    "tsprobe/cli.py",
    "agent/main.py",
    "probe/stall.py",
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [wheel] = out.glob("tsprobe-*.whl")
    [sdist] = out.glob("tsprobe-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def test_wheel_contents(dists: dict[str, Path]) -> None:
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = zf.read(entry_points).decode()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == set(TOP_LEVEL)
    assert not [n for n in names if "/tests/" in n or n.startswith(("tests/", "bench/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    for path in PACKAGE_DATA:
        assert path in names, path
    assert "tsprobe = tsprobe.cli:main" in scripts
    requires = [ln for ln in metadata.splitlines() if ln.startswith("Requires-Dist:")]
    plain = [ln for ln in requires if "extra ==" not in ln]
    assert sorted(ln.split()[1].split(">")[0] for ln in plain) == sorted(GUEST_DEPENDENCIES)


def test_sdist_contents(dists: dict[str, Path]) -> None:
    with tarfile.open(dists["sdist"]) as tf:
        names = [n.split("/", 1)[1] for n in tf.getnames() if "/" in n]
    assert not [n for n in names if n.startswith(("tests/", "bench/"))]
    for path in ("pyproject.toml", "README.md", *PACKAGE_DATA):
        assert path in names, path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_agent_runs_from_the_wheel_in_a_clean_venv(dists: dict[str, Path], tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, str(dists["wheel"])], capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed)}
    assert {"tsprobe", *GUEST_DEPENDENCIES} <= installed
    assert not installed & {"numpy", "matplotlib", "qemu.qmp", "qemu-qmp"}  # no host extras

    where = subprocess.run(
        [str(py), "-c", "import agent, probe, tsprobe; print(agent.__file__)"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60, check=True,
    ).stdout.strip()  # fmt: skip
    assert where.startswith(str(env_dir)), where

    port = _free_port()
    events = tmp_path / "events.jsonl"
    agent = subprocess.Popen(
        [str(env_dir / "bin" / "tsprobe"), "agent", "--duration", "20s", "--canaries", "none",
         "--listen", f"127.0.0.1:{port}", "--events", str(events)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        health: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not health.get("probes"):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    health = json.loads(r.read())
            except OSError:
                time.sleep(0.2)
        assert health.get("version") == "0.1.0", health
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert "tsprobe_cpu_samples_total" in metrics
    finally:
        agent.terminate()
        output = agent.communicate(timeout=30)[0].decode(errors="replace")
    assert "Traceback" not in output, output
    kinds = [json.loads(line)["kind"] for line in events.read_text().splitlines()]
    assert kinds[0] == "agent_start"


def test_lab_guest_packages_are_the_wheels(tmp_path: Path) -> None:
    wheel = build_wheel(REPO, tmp_path / "out")
    files = unpack_packages(wheel, ("probe", "agent", "tsprobe"), tmp_path / "opt")
    assert "agent/main.py" in files and "tsprobe/cli.py" in files
    assert not [f for f in files if f.startswith("analysis/")]
    for name in files:
        if name.endswith(".py"):
            assert (tmp_path / "opt" / name).read_bytes() == (REPO / name).read_bytes(), name
