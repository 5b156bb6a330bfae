"""``tsprobe report`` and ``tsprobe compare`` on real inputs: the QEMU 7.2 QMP transcripts
(tests/fixtures/qmp), the recorded run (tests/fixtures/runs) and three lab runs of a real
guest under TCG (tests/fixtures/lab-runs: precopy, paused, paused-stop, copied from
``tsprobe lab run``); and report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from analysis.analyze.attribution import analyse
from analysis.analyze.load import load_run
from analysis.analyze.timeline import build_timeline
from tsprobe.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
LAB = FIXTURES / "lab-runs"
QMP_SCENARIOS = ["precopy", "postcopy", "postcopy-paused", "cancelled", "failed"]


def _qmp_run(tmp_path: Path, scenario: str) -> Path:
    run = tmp_path / scenario
    run.mkdir()
    for side in ("src", "dst"):
        shutil.copy(FIXTURES / "qmp" / f"{scenario}-{side}.jsonl", run / f"qmp-{side}.jsonl")
    return run


@pytest.mark.parametrize("scenario", QMP_SCENARIOS)
def test_report_renders_for_qmp_fixtures(tmp_path: Path, scenario: str) -> None:
    run = _qmp_run(tmp_path, scenario)
    res = CliRunner().invoke(main, ["report", str(run), "--strict"])
    assert res.exit_code == 0, res.output
    doc = json.loads((run / "summary.json").read_text())
    loaded = load_run(run)
    expected = build_timeline(loaded.qmp).names()
    assert [p["name"] for p in doc["phases"] if p["name"] != "before migration"] == expected
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert "no guest events" in (run / "report.md").read_text()


def test_recorded_run(tmp_path: Path) -> None:
    src = FIXTURES / "runs" / "postcopy-pause-recover"
    res = CliRunner().invoke(main, ["report", str(src), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in doc["phases"]][-4:] == [
        "postcopy-recover-setup", "postcopy-recover", "postcopy-active", "completed"
    ]  # fmt: skip
    assert doc["schema_version"] == 1


def test_lab_paused_longest_stalls_in_postcopy_paused() -> None:
    a = analyse(load_run(LAB / "paused", strict=True))
    longest = max(a.stats, key=lambda s: s.longest_ns)
    assert a.spans[longest.phase].name == "postcopy-paused"
    assert longest.longest_ns > 3_000_000_000
    assert any("symmetric by construction" in label for label in a.labels)


def test_lab_precopy_downtime_is_a_clock_offset_step() -> None:
    a = analyse(load_run(LAB / "precopy", strict=True))
    names = [s.name for s in a.spans]
    assert names[1:] == build_timeline(a.run.qmp).names()
    (step,) = a.alignment.steps
    stop = step.stopped_ns
    assert stop == a.run.timeline.summary().downtime_ns  # type: ignore[union-attr]
    assert abs(step.lag_ns - stop) <= 0.10 * stop + 5_000_000


def test_lab_paused_stop_hides_the_pause_in_the_clock() -> None:
    a = analyse(load_run(LAB / "paused-stop", strict=True))
    (step,) = a.alignment.steps
    assert step.lag_ns > 3_000_000_000  # the destination's vCPUs were stopped ~3 s
    check = a.checks[0]
    assert check.ok is True


def test_compare_paused_and_paused_stop(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["compare", str(LAB / "paused"), str(LAB / "paused-stop"), "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "comparison.json").read_text())
    rows = {(r["group"], r["metric"]): r for r in doc["rows"]}
    lag = rows[("clock", "guest clock lag steps (ms)")]
    assert lag["differs"] and lag["values"][1] > 3000 > lag["values"][0]
    longest = rows[("postcopy-paused", "longest stall (ms)")]
    assert longest["differs"] and longest["values"][0] > longest["values"][1]
    html = (tmp_path / "comparison.html").read_text()
    assert 'class="diff"' in html and html.count("data:image/png;base64,") == 3
    assert "**" in (tmp_path / "comparison.md").read_text()


# --------------------------------------------------------------------------- browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'tsprobe-check';
  out.textContent = JSON.stringify({images: imgs.map(i => i.naturalWidth),
                                    svgs: document.querySelectorAll('svg').length});
  document.body.appendChild(out);
});
</script>"""


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("run", ["paused", "paused-stop"])
def test_report_in_headless_chromium(tmp_path: Path, run: str) -> None:
    out = tmp_path / "report"
    res = CliRunner().invoke(main, ["report", str(LAB / run), "--out", str(out)])
    assert res.exit_code == 0, res.output
    page = out / "report.html"
    shot = out / "report.png"
    got = _chromium(["--hide-scrollbars", "--window-size=1280,2400", f"--screenshot={shot}",
                     page.as_uri()], tmp_path / "p1")  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 50_000, got.stderr[-2000:]
    assert not _console_errors(got.stderr), _console_errors(got.stderr)
    probe = out / "probe.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    got = _chromium(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()], tmp_path / "p2")
    marker = got.stdout.split('id="tsprobe-check">', 1)
    assert len(marker) == 2, got.stderr[-2000:]
    check = json.loads(marker[1].split("</pre>", 1)[0].replace("&quot;", '"'))
    assert len(check["images"]) == 2  # the timeline and the sensitivity curve
    assert all(w > 0 for w in check["images"]), check
    keep = Path("/tmp/tsprobe-report-screenshots")
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / f"{run}.png")
