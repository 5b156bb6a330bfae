"""A seeded fuzz corpus of run directories, run through timeline, report and compare.

Each *mutation* turns a copy of ``tests/fixtures/lab-runs/paused`` into a broken run
directory (a truncated line, every line twice, nesting 10,000 deep, an integer past
2**63, bytes that are not UTF-8, a lone surrogate, a stray newline, a FIFO, seq games, a
stall on a CPU the agent never announced, ...) and says what a correct reader must do
with it (``Expect``). Every mutated directory is given to ``tsprobe timeline``,
``timeline --json``, ``report`` and ``compare`` (against the untouched fixture), each in a
process of its own forked from this one, with a deadline; the result is one of:

``ok``              exit 0, and the figures are what the mutation allows;
``clear error``     a non-zero exit whose message is the ``tsprobe: ...`` (or click
                    ``Error: ...``) line, no traceback;
``traceback``       an exception escaped (or the process died of a signal);
``hang``            the command outlived its deadline (it is killed);
``silently wrong``  exit 0 but the figures break the mutation's rule: figures changed
                    where the rule says they must not (``same``), changed without a word
                    on stderr about the file touched (``reported``), a skip not blamed on
                    the lines the mutation broke, or timeline and report disagreeing on
                    the downtime.

The figures compared are the printed table (``timeline``), the phases and summary
(``timeline --json``), summary.json's phases, stalls, CPUs, timeouts and migration
(``report``) and the mutated run's column of comparison.json (``compare``).

Mutations are generated from a seed: the seed picks the line, field and position each
mutation touches, so a seed is one corpus; the CI test runs one seed, and
``python -m tests.fuzz_rundir --seed N --size K`` runs others (``--held-out`` runs the
held-out seeds) and prints the table of outcome classes per command as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).parent / "fixtures" / "lab-runs" / "paused"
COMMANDS = ("timeline", "timeline --json", "report", "compare")
CLASSES = ("ok", "clear error", "traceback", "hang", "silently wrong")
#: The CI corpus's seed, and seeds kept out of CI (run them with ``--held-out``).
SEED = 18
HELD_OUT_SEEDS = (1801, 1802, 1803, 1804, 1805)
#: Seconds a command may take before it counts as a hang.
DEADLINE_S = 30.0
#: Address space a command may take (a reader that slurps /dev/zero fails, not the host).
MEMORY_LIMIT = 3 << 30

JSONL_FILES = (
    "guest-events.jsonl",
    "qmp-src.jsonl",
    "qmp-dst.jsonl",
    "clock-samples.jsonl",
    "lab-steps.jsonl",
    "agent-guest.jsonl",
)


@dataclass
class Expect:
    """What a correct reader does with a mutated run.

    :param rule: ``same`` (the figures stay the baseline's), ``reported`` (they may
        change, but stderr names ``file``), ``free`` (anything but a traceback or hang).
    :param file: the file the mutation touched.
    :param lines: lines that must be blamed on stderr (``file:line``).
    """

    rule: str
    file: str = ""
    lines: tuple[int, ...] = ()


@dataclass(frozen=True)
class Mutation:
    """A named way of breaking a run directory."""

    name: str
    apply: Callable[[Path, random.Random], Expect]


@dataclass
class Outcome:
    """One command on one mutated run."""

    mutation: str
    command: str
    cls: str
    detail: str = ""
    figures: Any = None
    stderr: str = ""


# --------------------------------------------------------------------------- helpers


def _read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def _pick(rng: random.Random, lines: list[bytes], pred: Callable[[bytes], bool] = bool) -> int:
    """A random index of a line for which ``pred`` holds (0-based)."""
    choices = [i for i, ln in enumerate(lines) if pred(ln)]
    return rng.choice(choices) if choices else 0


def _numeric_fields(line: bytes) -> list[re.Match[bytes]]:
    return list(re.finditer(rb'"([a-z_]+)":(-?\d+)(?=[,}\]])', line))


def _string_fields(line: bytes) -> list[re.Match[bytes]]:
    return list(re.finditer(rb'"([a-z_]+)":"([^"\\]*)"', line))


def _line_edit(
    fname: str, edit: Callable[[bytes, random.Random], bytes | None], rule: str = "reported"
) -> Callable[[Path, random.Random], Expect]:
    """A mutation that rewrites one random line of ``fname`` (blamed on that line)."""

    def apply(run: Path, rng: random.Random) -> Expect:
        path = run / fname
        lines = _read_lines(path)
        order = list(range(len(lines)))
        rng.shuffle(order)
        for i in order:
            new = edit(lines[i], rng)
            if new is not None:
                lines[i] = new
                _write_lines(path, lines)
                return Expect(rule, fname, (i + 1,))
        return Expect("free", fname)

    return apply


def _file_edit(
    fname: str, edit: Callable[[list[bytes], random.Random], Expect | None]
) -> Callable[[Path, random.Random], Expect]:
    def apply(run: Path, rng: random.Random) -> Expect:
        path = run / fname
        lines = _read_lines(path)
        expect = edit(lines, rng)
        _write_lines(path, lines)
        if expect is None:
            return Expect("reported", fname)
        expect.file = expect.file or fname
        return expect

    return apply


def _replace_value(
    fields: Callable[[bytes], list[re.Match[bytes]]], value: bytes
) -> Callable[[bytes, random.Random], bytes | None]:
    """An edit that puts ``value`` in place of one random field's value (``fields``)."""

    def edit(line: bytes, rng: random.Random) -> bytes | None:
        found = fields(line)
        if not found:
            return None
        m = rng.choice(found)
        return line[: m.start(2)] + value + line[m.end(2) :]

    return edit


def _replace_number(value: bytes) -> Callable[[bytes, random.Random], bytes | None]:
    return _replace_value(_numeric_fields, value)


def _replace_string(value: bytes) -> Callable[[bytes, random.Random], bytes | None]:
    return _replace_value(_string_fields, value)


def _replace_field(key: bytes, value: bytes) -> Callable[[bytes, random.Random], bytes | None]:
    """Set one named numeric field (lines without it are passed by)."""

    def edit(line: bytes, rng: random.Random) -> bytes | None:
        m = re.search(rb'"' + key + rb'":(-?\d+)', line)
        if m is None:
            return None
        return line[: m.start(1)] + value + line[m.end(1) :]

    return edit


def _insert_at(value: bytes) -> Callable[[bytes, random.Random], bytes | None]:
    def edit(line: bytes, rng: random.Random) -> bytes | None:
        body = line.rstrip(b"\n")
        if len(body) < 3:
            return None
        pos = rng.randrange(1, len(body) - 1)
        return body[:pos] + value + body[pos:] + b"\n"

    return edit


def _deep_field(line: bytes, rng: random.Random) -> bytes | None:
    body = line.rstrip(b"\n")
    if not body.endswith(b"}"):
        return None
    depth = rng.choice((10_000, 100_000))
    return body[:-1] + b',"zz_deep":' + b"[" * depth + b"]" * depth + b"}\n"


def _with_fifo(fname: str) -> Callable[[Path, random.Random], Expect]:
    def apply(run: Path, rng: random.Random) -> Expect:
        (run / fname).unlink(missing_ok=True)
        os.mkfifo(run / fname)
        return Expect("reported", fname)

    return apply


def _with_dir(fname: str) -> Callable[[Path, random.Random], Expect]:
    def apply(run: Path, rng: random.Random) -> Expect:
        (run / fname).unlink(missing_ok=True)
        (run / fname).mkdir()
        return Expect("reported", fname)

    return apply


def _with_symlink(fname: str, target: str) -> Callable[[Path, random.Random], Expect]:
    def apply(run: Path, rng: random.Random) -> Expect:
        (run / fname).unlink(missing_ok=True)
        (run / fname).symlink_to(target)
        return Expect("reported", fname)

    return apply


# --------------------------------------------------------------------------- mutations


def _generic(fname: str) -> Iterator[Mutation]:
    """The mutations every JSONL file of a run gets."""
    stem = fname.removesuffix(".jsonl")

    def trunc_mid(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines, lambda ln: len(ln) > 10)
        cut = rng.randrange(2, len(lines[i]) - 2)
        del lines[i + 1 :]
        lines[i] = lines[i][:cut]
        return Expect("reported", fname, (i + 1,))

    def trunc_half(lines: list[bytes], rng: random.Random) -> Expect:
        data = b"".join(lines)
        lines[:] = [data[: len(data) // 2]]
        return Expect("free", fname)

    def dup_all(lines: list[bytes], rng: random.Random) -> Expect:
        lines[:] = [ln for ln in lines for _ in (0, 1)]
        return Expect("same", fname)

    def dup_file(lines: list[bytes], rng: random.Random) -> Expect:
        lines[:] = lines + lines
        return Expect("same", fname)

    def dup_one(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i + 1, lines[i])
        return Expect("same", fname)

    def deep_line(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i, b"[" * 10_000 + b"\n")
        return Expect("reported", fname, (i + 1,))

    def stray_newline(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines, lambda ln: len(ln) > 20)
        ln = lines[i]
        pos = rng.randrange(5, len(ln) - 5)
        lines[i : i + 1] = [ln[:pos] + b"\n", ln[pos:]]
        return Expect("reported", fname, (i + 1, i + 2))

    def crlf(lines: list[bytes], rng: random.Random) -> Expect:
        lines[:] = [ln.rstrip(b"\n") + b"\r\n" for ln in lines]
        return Expect("same", fname)

    def blank_lines(lines: list[bytes], rng: random.Random) -> Expect:
        for _ in range(5):
            lines.insert(rng.randrange(len(lines) + 1), rng.choice((b"\n", b"  \n", b"\t\n")))
        return Expect("same", fname)

    def long_line(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i, b'{"pad":"' + b"x" * (3 << 20) + b'"}\n')
        return Expect("reported", fname, (i + 1,))

    def array_line(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i, rng.choice((b"[1,2]\n", b'"text"\n', b"42\n", b"null\n")))
        return Expect("reported", fname, (i + 1,))

    def garbage(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i, bytes(rng.randrange(256) for _ in range(200)).replace(b"\n", b"") + b"\n")
        return Expect("reported", fname, (i + 1,))

    def bom(lines: list[bytes], rng: random.Random) -> Expect:
        lines[0] = b"\xef\xbb\xbf" + lines[0]
        return Expect("reported", fname, (1,))

    def empty(lines: list[bytes], rng: random.Random) -> Expect:
        lines[:] = []
        return Expect("reported", fname)

    def unknown_fields(lines: list[bytes], rng: random.Random) -> Expect:
        lines[:] = [
            ln.rstrip(b"\n")[:-1] + b',"zz_extra":{"a":[1,"b",null]}}\n'
            if ln.rstrip(b"\n").endswith(b"}")
            else ln
            for ln in lines
        ]
        return Expect("same", fname)

    def two_values(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines[i] = lines[i].rstrip(b"\n") + b" {}\n"
        return Expect("reported", fname, (i + 1,))

    def nul_line(lines: list[bytes], rng: random.Random) -> Expect:
        i = _pick(rng, lines)
        lines.insert(i, b"\x00" * 64 + b"\n")
        return Expect("reported", fname, (i + 1,))

    def no_final_newline(lines: list[bytes], rng: random.Random) -> Expect:
        lines[-1] = lines[-1].rstrip(b"\n")
        return Expect("same", fname)

    file_edits: dict[str, Callable[[list[bytes], random.Random], Expect | None]] = {
        "trunc-mid": trunc_mid,
        "trunc-half": trunc_half,
        "dup-all": dup_all,
        "dup-file": dup_file,
        "dup-one": dup_one,
        "deep-line": deep_line,
        "stray-newline": stray_newline,
        "crlf": crlf,
        "blank-lines": blank_lines,
        "long-line": long_line,
        "array-line": array_line,
        "garbage": garbage,
        "bom": bom,
        "empty": empty,
        "unknown-fields": unknown_fields,
        "two-values": two_values,
        "nul-line": nul_line,
        "no-final-newline": no_final_newline,
    }
    for name, edit in file_edits.items():
        yield Mutation(f"{stem}:{name}", _file_edit(fname, edit))
    line_edits: dict[str, Callable[[bytes, random.Random], bytes | None]] = {
        "deep-field": _deep_field,
        "int-2^63": _replace_number(str(2**63).encode()),
        "int-2^64": _replace_number(str(2**64 + 5).encode()),
        "int-neg-2^63": _replace_number(str(-(2**63) - 1).encode()),
        "int-10^30": _replace_number(str(10**30).encode()),
        "int-4301-digits": _replace_number(b"9" * 4301),
        "host-mono-2^63": _replace_field(b"host_mono_ns", str(2**63).encode()),
        "host-real-2^64-1": _replace_field(b"host_real_ns", str(2**64 - 1).encode()),
        "host-real-negative": _replace_field(b"host_real_ns", b"-1"),
        "mono-2^63": _replace_field(b"mono_ns", str(2**63).encode()),
        "real-ns-2^63": _replace_field(b"real_ns", str(2**63).encode()),
        "seq-2^64-1": _replace_field(b"seq", str(2**64 - 1).encode()),
        "seconds-2^63": _replace_field(b"seconds", str(2**63).encode()),
        "microseconds-huge": _replace_field(b"microseconds", str(2**62).encode()),
        "latency-2^64-1": _replace_field(b"latency_ns", str(2**64 - 1).encode()),
        "leading-zeros": _replace_number(b"000000099"),
        "nan": _replace_number(b"NaN"),
        "infinity": _replace_number(b"-Infinity"),
        "float-1e400": _replace_number(b"1e400"),
        "float": _replace_number(b"1.5"),
        "int-as-string": _replace_number(b'"12"'),
        "int-as-bool": _replace_number(b"true"),
        "int-as-object": _replace_number(b'{"a":1}'),
        "bad-utf8": _insert_at(b"\xff\xfe\xc3"),
        "overlong-utf8": _replace_string(b"\xc0\xaf"),
        "surrogate": _replace_string(b"\\ud800"),
        "surrogate-raw": _replace_string(b"\xed\xa0\x80"),
        "string-huge": _replace_string(b"y" * 200_000),
        "control-chars": _replace_string(b"\\u0000\\u001b[2J"),
    }
    for name, line_edit in line_edits.items():
        rule = "reported"
        yield Mutation(f"{stem}:{name}", _line_edit(fname, line_edit, rule))
    yield Mutation(f"{stem}:fifo", _with_fifo(fname))
    yield Mutation(f"{stem}:directory", _with_dir(fname))
    yield Mutation(f"{stem}:dev-zero", _with_symlink(fname, "/dev/zero"))
    yield Mutation(f"{stem}:dangling-link", _with_symlink(fname, "/nonexistent/x"))
    yield Mutation(f"{stem}:link-loop", _with_symlink(fname, fname))


def _guest(name: str) -> Callable[[Callable[[list[bytes], random.Random], Expect]], Mutation]:
    def wrap(edit: Callable[[list[bytes], random.Random], Expect]) -> Mutation:
        return Mutation(f"guest-events:{name}", _file_edit("guest-events.jsonl", edit))

    return wrap


def _stall_lines(lines: list[bytes]) -> list[int]:
    return [i for i, ln in enumerate(lines) if b'"kind":"stall"' in ln]


def _set(line: bytes, key: str, value: bytes) -> bytes:
    return re.sub(rb'"' + key.encode() + rb'":-?\d+', b'"' + key.encode() + b'":' + value, line)


def _seq(line: bytes) -> int:
    m = re.search(rb'"seq":(\d+)', line)
    return int(m[1]) if m else 0


def _on_a_stall(name: str, key: str, value: bytes) -> Mutation:
    """A guest-events mutation that sets ``key`` of one random stall line to ``value``."""

    def edit(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        lines[i] = _set(lines[i], key, value)
        return Expect("reported", "guest-events.jsonl", (i + 1,))

    return _guest(name)(edit)


def _guest_mutations() -> Iterator[Mutation]:
    @_guest("seq-backwards")
    def seq_backwards(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.randrange(len(lines) // 2, len(lines) - 1)
        lines[i], lines[i + 1] = lines[i + 1], lines[i]
        return Expect("reported", "guest-events.jsonl")

    @_guest("seq-restart")
    def seq_restart(lines: list[bytes], rng: random.Random) -> Expect:
        k = rng.randrange(len(lines) // 2, len(lines) - 2)
        for i in range(k, len(lines)):
            lines[i] = _set(lines[i], "seq", str(_seq(lines[i]) - k + 1).encode())
        return Expect("reported", "guest-events.jsonl", (k + 1,))

    @_guest("seq-gap")
    def seq_gap(lines: list[bytes], rng: random.Random) -> Expect:
        k = rng.randrange(5, len(lines) - 2)
        for i in range(k, len(lines)):
            lines[i] = _set(lines[i], "seq", str(_seq(lines[i]) + 990).encode())
        return Expect("reported", "guest-events.jsonl", (k + 1,))

    @_guest("seq-dup-other-content")
    def seq_dup_other(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        copy = _set(lines[i], "duration_ns", b"999000000")
        lines.insert(i + 1, copy)
        return Expect("reported", "guest-events.jsonl", (i + 2,))

    @_guest("seq-missing")
    def seq_missing(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        lines[i] = re.sub(rb'"seq":\d+,', b"", lines[i])
        return Expect("reported", "guest-events.jsonl", (i + 1,))

    @_guest("phantom-cpu-added")
    def phantom_added(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        extra = _set(_set(lines[i], "cpu", b"9"), "seq", str(10**6).encode())
        lines.append(extra)
        return Expect("reported", "guest-events.jsonl", (len(lines),))

    @_guest("boot-id-surrogate")
    def boot_surrogate(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        lines[i] = re.sub(rb'"boot_id":"[^"]*"', lambda m: b'"boot_id":"\\udc80x"', lines[i])
        return Expect("reported", "guest-events.jsonl", (i + 1,))

    @_guest("reverse")
    def reverse(lines: list[bytes], rng: random.Random) -> Expect:
        lines.reverse()
        return Expect("reported", "guest-events.jsonl")

    @_guest("shuffle")
    def shuffle(lines: list[bytes], rng: random.Random) -> Expect:
        rng.shuffle(lines)
        return Expect("reported", "guest-events.jsonl")

    @_guest("second-agent-start")
    def second_start(lines: list[bytes], rng: random.Random) -> Expect:
        start = lines[0].replace(b'"agent_id":"', b'"agent_id":"ff')
        k = rng.randrange(len(lines) // 2, len(lines) - 2)
        rest = [_set(ln, "seq", str(_seq(ln) - k + 1).encode()) for ln in lines[k:]]
        lines[k:] = [_set(start, "seq", b"0"), *rest]
        return Expect("free", "guest-events.jsonl")

    @_guest("agent-start-cpus-huge")
    def start_cpus(lines: list[bytes], rng: random.Random) -> Expect:
        lines[0] = lines[0].replace(b'"cpus":[0,1]', b'"cpus":[0,1,' + str(10**30).encode() + b"]")
        return Expect("reported", "guest-events.jsonl")

    @_guest("agent-start-ladder-huge")
    def start_ladder(lines: list[bytes], rng: random.Random) -> Expect:
        lines[0] = lines[0].replace(b'"timeouts_ns":[', b'"timeouts_ns":[' + b"9" * 40 + b",")
        return Expect("reported", "guest-events.jsonl", (1,))

    @_guest("cause-unknown")
    def cause(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        lines[i] = re.sub(rb'"cause":"[^"]*"', lambda m: b'"cause":"\\u00e9\\u202e"', lines[i])
        return Expect("free", "guest-events.jsonl")

    @_guest("timeout-cpu-phantom")
    def timeout_cpu(lines: list[bytes], rng: random.Random) -> Expect:
        i = rng.choice(_stall_lines(lines))
        ln = lines[i].replace(b'"kind":"stall"', b'"kind":"timeout"')
        ln = _set(_set(ln, "cpu", str(10**30).encode()), "seq", str(10**7).encode())
        lines.append(ln.rstrip(b"\n")[:-1] + b',"timeout_ns":10000000,"canary":"timer"}\n')
        return Expect("reported", "guest-events.jsonl", (len(lines),))

    yield from (
        seq_backwards,
        seq_restart,
        seq_gap,
        seq_dup_other,
        seq_missing,
        _on_a_stall("phantom-cpu-10^30", "cpu", str(10**30).encode()),
        _on_a_stall("phantom-cpu-7", "cpu", b"7"),
        phantom_added,
        _on_a_stall("negative-cpu", "cpu", b"-1"),
        _on_a_stall("duration-leading-zeros", "duration_ns", b"000000099"),
        _on_a_stall("duration-2^63", "duration_ns", str(2**63).encode()),
        _on_a_stall("mono-plus-duration-overflow", "mono_ns", str(2**63 - 10).encode()),
        _on_a_stall("negative-duration", "duration_ns", b"-5"),
        _on_a_stall("mono-4301-digits", "mono_ns", b"9" * 4301),
        boot_surrogate,
        reverse,
        shuffle,
        second_start,
        start_cpus,
        start_ladder,
        cause,
        timeout_cpu,
    )


def _meta_mutations() -> Iterator[Mutation]:
    def doc_edit(name: str, edit: Callable[[bytes], bytes], rule: str = "reported") -> Mutation:
        def apply(run: Path, rng: random.Random) -> Expect:
            path = run / "meta.json"
            path.write_bytes(edit(path.read_bytes()))
            return Expect(rule, "meta.json")

        return Mutation(f"meta:{name}", apply)

    yield doc_edit("deep", lambda d: b'{"x":' + b"[" * 10_000 + b"]" * 10_000 + b"}")
    yield doc_edit(
        "deep-inside", lambda d: d.rstrip()[:-1] + b',"zz":' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    yield doc_edit(
        "start-2^63",
        lambda d: re.sub(
            rb'("start": \{\s*"mono_ns": \d+,\s*"real_ns": )\d+', rb"\g<1>" + str(2**63).encode(), d
        ),
    )
    yield doc_edit(
        "start-10^30",
        lambda d: re.sub(
            rb'("start": \{\s*"mono_ns": \d+,\s*"real_ns": )\d+',
            rb"\g<1>" + str(10**30).encode(),
            d,
        ),
    )
    yield doc_edit(
        "start-string",
        lambda d: re.sub(rb'("start": \{\s*"mono_ns": \d+,\s*"real_ns": )\d+', rb'\g<1>"soon"', d),
        "free",
    )
    yield doc_edit(
        "int-4301-digits",
        lambda d: d.replace(b'"duration_s": 17.011', b'"duration_s": ' + b"9" * 4301),
    )
    yield doc_edit("surrogate", lambda d: d.replace(b'"paused"', b'"\\ud800paused"', 1))
    yield doc_edit("bad-utf8", lambda d: d.replace(b'"paused"', b'"\xffpaused"', 1))
    yield doc_edit("not-json", lambda d: d[: len(d) // 2])
    yield doc_edit("array", lambda d: b"[" + d + b"]")
    yield doc_edit("empty", lambda d: b"")
    yield doc_edit("nan", lambda d: d.replace(b'"duration_s": 17.011', b'"duration_s": NaN'))
    yield doc_edit("huge", lambda d: d.rstrip()[:-1] + b',"zz":"' + b"z" * (80 << 20) + b'"}')
    yield doc_edit(
        "agents-not-dict",
        lambda d: d.replace(b'"agents": {', b'"agents": [{', 1).replace(
            b'"command_line"', b'"zz": 1}], "command_line"', 1
        ),
        "free",
    )
    yield doc_edit("bom", lambda d: b"\xef\xbb\xbf" + d, "free")
    yield Mutation("meta:fifo", _with_fifo("meta.json"))
    yield Mutation("meta:directory", _with_dir("meta.json"))
    yield Mutation("meta:dev-zero", _with_symlink("meta.json", "/dev/zero"))
    yield Mutation("meta:dev-tty", _with_symlink("meta.json", "/dev/tty"))


def _run_mutations() -> Iterator[Mutation]:
    def add_file(name: str, fname: bytes, copy_of: str, rule: str = "free") -> Mutation:
        def apply(run: Path, rng: random.Random) -> Expect:
            data = (run / copy_of).read_bytes() if copy_of else b"{}\n"
            with open(os.path.join(os.fsencode(run), fname), "wb") as fh:
                fh.write(data)
            return Expect(rule)

        return Mutation(f"run:{name}", apply)

    yield add_file("bad-name-guest-events", b"guest-events-\xff\xfe.jsonl", "guest-events.jsonl")
    yield add_file("bad-name-qmp", b"qmp-\xff.jsonl", "qmp-dst.jsonl")
    yield add_file("surrogate-name-qmp", b"qmp-\xed\xa0\x80.jsonl", "qmp-dst.jsonl")
    yield add_file("newline-name-qmp", b"qmp-a\nb.jsonl", "qmp-dst.jsonl")
    yield add_file("bad-name-other", b"\xff.jsonl", "")

    def vcpu_states(name: str, body: bytes, rule: str = "reported") -> Mutation:
        def apply(run: Path, rng: random.Random) -> Expect:
            (run / "vcpu-states.jsonl").write_bytes(body)
            return Expect(rule, "vcpu-states.jsonl")

        return Mutation(f"vcpu-states:{name}", apply)

    good = (
        b'{"endpoint":"dst","vcpu":0,"tid":4711,"state":"userfault",'
        b'"start_mono_ns":4379000000000,"end_mono_ns":4379100000000,'
        b'"start_real_ns":1795641464000000000,"samples":3}\n'
    )
    yield vcpu_states("vcpu-10^30", good.replace(b'"vcpu":0', b'"vcpu":' + str(10**30).encode()))
    yield vcpu_states("deep", b'{"a":' + b"[" * 10_000 + b"\n")
    yield vcpu_states(
        "end-2^64",
        good.replace(b'"end_mono_ns":4379100000000', b'"end_mono_ns":' + str(2**64).encode()),
    )
    yield vcpu_states("surrogate-wchan", good[:-2] + b',"wchan":"\\udfff"}\n')
    yield vcpu_states("fifo-like-dup", good + good, "free")

    def long_path(run: Path, rng: random.Random) -> Expect:
        return Expect("free")

    yield Mutation("run:long-path", long_path)
    yield Mutation("run:not-a-dir", lambda run, rng: Expect("free"))
    yield Mutation("run:bad-dir-name", lambda run, rng: Expect("free"))
    yield Mutation("run:only-fifos", _only_fifos)


def _only_fifos(run: Path, rng: random.Random) -> Expect:
    for p in list(run.iterdir()):
        p.unlink()
        os.mkfifo(p)
    return Expect("free")


#: The cases issue 18 names: always among the mutations that go through every command.
KEY_CASES = (
    "guest-events:deep-line",
    "meta:deep",
    "guest-events:duration-2^63",
    "guest-events:mono-4301-digits",
    "meta:start-2^63",
    "qmp-src:surrogate",
    "run:bad-name-guest-events",
    "run:long-path",
    "qmp-src:fifo",
    "meta:fifo",
    "guest-events:dup-all",
    "guest-events:seq-backwards",
    "guest-events:seq-restart",
    "guest-events:seq-gap",
    "guest-events:phantom-cpu-10^30",
    "guest-events:duration-leading-zeros",
    "qmp-src:stray-newline",
    "qmp-dst:stray-newline",
)


def mutations() -> list[Mutation]:
    """Every mutation of the corpus, in a fixed order."""
    out: list[Mutation] = []
    for fname in JSONL_FILES:
        out.extend(_generic(fname))
    out.extend(_guest_mutations())
    out.extend(_meta_mutations())
    out.extend(_run_mutations())
    return out


# --------------------------------------------------------------------------- running


def _figures(command: str, stdout: str, target: Path) -> Any:
    """The figures a command printed or wrote (compared against the baseline's)."""
    if command == "timeline":
        return stdout
    if command == "timeline --json":
        doc = json.loads(stdout)
        return {"phases": doc.get("phases"), "summary": doc.get("summary")}
    if command == "report":
        doc = json.loads((target / "summary.json").read_text())
        keep = ("migration", "phases", "stalls", "asymmetry", "cpus", "timeout_sensitivity")
        figures = {k: doc.get(k) for k in keep}
        figures["guest_events"] = doc.get("input", {}).get("guest_events")
        return figures
    doc = json.loads((target / "comparison.json").read_text())
    return [(r["group"], r["metric"], r["values"][0]) for r in doc.get("rows", [])]


def _argv(command: str, run: Path | str | bytes, out: Path) -> list[Any]:
    if command == "timeline":
        return ["timeline", run]
    if command == "timeline --json":
        return ["timeline", "--json", run]
    if command == "report":
        return ["report", run, "--out", str(out)]
    return ["compare", run, str(FIXTURE), "--out", str(out), "--name", "mut", "--name", "base"]


def _child(argv: list[Any], out: Path, command: str, result: Path, err_path: Path) -> None:
    """In the forked child: run one command with real stdout/stderr streams."""
    os.setsid()  # no controlling terminal: /dev/tty cannot block the corpus
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    out_fd = os.open(out / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    # What a real process has under a UTF-8 locale: stdout strict, stderr backslashreplace.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), "utf-8", "strict")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), "utf-8", "backslashreplace")
    sys.stdin = io.TextIOWrapper(io.BytesIO(b""), "utf-8")
    status: dict[str, Any] = {"exit": 0, "traceback": False}
    from tsprobe.cli import main

    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv]
    try:
        main.main(args, prog_name="tsprobe", standalone_mode=True)
    except SystemExit as err:
        code = err.code
        status["exit"] = code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        status["exit"] = 1
        status["traceback"] = True
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    if status["exit"] == 0 and not status["traceback"]:
        try:
            status["figures"] = _figures(command, (out / "stdout").read_text(errors="replace"), out)
        except Exception as err:
            status["figures_error"] = f"{type(err).__name__}: {err}"
    result.write_text(json.dumps(status))


def run_command(command: str, run: Path | str | bytes, work: Path, deadline_s: float) -> Outcome:
    """Run one command on one run directory in a forked child; classify its end."""
    out = work / command.replace(" ", "").replace("-", "")
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    err_path = out / "stderr"
    argv = _argv(command, run, out)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        code = 0
        try:
            _child(argv, out, command, result, err_path)
        except BaseException:
            code = 3
        os._exit(code)
    os.close(write_fd)
    end = time.monotonic() + deadline_s
    status: int | None = None
    while True:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got:
            status = st
            break
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        select.select([read_fd], [], [], 0.01)
    os.close(read_fd)
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if status is None:
        return Outcome("", command, "hang", f"no exit after {deadline_s:.0f} s", stderr=stderr)
    if os.WIFSIGNALED(status) or not result.exists():
        return Outcome("", command, "traceback", f"child died ({status})", stderr=stderr)
    doc = json.loads(result.read_text())
    if doc["traceback"] or "Traceback (most recent call last)" in stderr:
        last = [ln for ln in stderr.splitlines() if ln.strip()]
        return Outcome("", command, "traceback", last[-1] if last else "", stderr=stderr)
    if doc["exit"] != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        clear = bool(lines) and (lines[-1].startswith(("tsprobe: ", "Error: ")))
        cls = "clear error" if clear else "traceback"
        return Outcome("", command, cls, lines[-1] if lines else "(no message)", stderr=stderr)
    if "figures_error" in doc:
        return Outcome("", command, "silently wrong", doc["figures_error"], stderr=stderr)
    return Outcome("", command, "ok", figures=doc.get("figures"), stderr=stderr)


def _judge(outcome: Outcome, expect: Expect, baseline: dict[str, Any]) -> None:
    """Turn an ``ok`` into ``silently wrong`` when the figures break the mutation's rule."""
    if outcome.cls != "ok" or expect.rule == "free":
        return
    same = outcome.figures == baseline[outcome.command]
    if expect.rule == "same" and not same:
        outcome.cls, outcome.detail = "silently wrong", "figures changed (must not)"
        return
    said = [ln for ln in outcome.stderr.splitlines() if expect.file and expect.file in ln]
    if not same and not said:
        outcome.cls = "silently wrong"
        outcome.detail = f"figures changed without a word about {expect.file}"
        return
    for line in expect.lines:
        if not same and not any(f"{expect.file}:{line}:" in ln for ln in said):
            outcome.cls = "silently wrong"
            outcome.detail = f"{expect.file}:{line} not blamed"
            return


def _agree(outcomes: list[Outcome]) -> None:
    """timeline --json and report must give the same downtime (they read the same files)."""
    by = {o.command: o for o in outcomes}
    tl, rep = by.get("timeline --json"), by.get("report")
    if not (tl and rep and tl.cls == "ok" and rep.cls == "ok"):
        return
    a = ((tl.figures or {}).get("summary") or {}).get("downtime_ns")
    b = ((rep.figures or {}).get("migration") or {}).get("downtime_ns")
    if a != b:
        rep.cls, rep.detail = "silently wrong", f"downtime {b} in report, {a} in timeline"


def _target(m: Mutation, run: Path, tmp: Path) -> Path | str | bytes:
    """The path to hand to the commands (most mutations: the mutated copy itself)."""
    if m.name == "run:long-path":
        return str(run) + "/" + "x" * 5000
    if m.name == "run:not-a-dir":
        return run / "meta.json"
    if m.name == "run:bad-dir-name":
        bad = os.path.join(os.fsencode(tmp), b"run-\xff\xfe")
        os.rename(os.fsencode(run), bad)
        return bad
    return run


def baseline(tmp: Path, deadline_s: float) -> dict[str, Any]:
    """The untouched fixture's figures per command."""
    run = tmp / "baseline"
    shutil.copytree(FIXTURE, run)
    figures = {}
    for command in COMMANDS:
        got = run_command(command, run, tmp / "baseline-out", deadline_s)
        if got.cls != "ok":
            raise RuntimeError(f"baseline {command}: {got.cls}: {got.detail}\n{got.stderr}")
        figures[command] = got.figures
    return figures


def _preload() -> None:
    """Import the commands once here, so that each forked command starts warm."""
    import importlib

    for name in ("tsprobe.cli", *(spec.split(":")[0] for spec in _command_modules())):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name in (
        "analysis.analyze.attribution",
        "analysis.report.summary",
        "analysis.report.compare",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _command_modules() -> list[str]:
    from tsprobe.cli import COMMANDS as ALL

    return [ALL[c][0] for c in ("timeline", "report", "compare")]


def run_corpus(
    seed: int = SEED,
    size: int | None = None,
    deadline_s: float = DEADLINE_S,
    log: Callable[[str], None] | None = None,
    shard: tuple[int, int] = (0, 1),
    heavy: int | None = None,
) -> list[Outcome]:
    """Mutate the fixture with every mutation (or ``size`` of them, picked by the seed)
    and run each command on each mutated run.

    :param seed: picks lines, fields and positions (and the sample, with ``size``).
    :param size: how many mutations; all of them when None; more than there are repeats
        mutations with other draws of the seed.
    :param deadline_s: seconds per command before it is a hang.
    :param heavy: how many of the mutations also go through ``report`` and ``compare``
        (each writes plots: about a second): the ``KEY_CASES`` first, then a sample
        picked by the seed; every mutation when None. The others run the two timelines.
    :param shard: (k, n): run only the mutations whose position is k modulo n (the
        draws do not depend on the shard, so n shards together are the whole corpus).
    :return: one outcome per (mutation, command).
    """
    _preload()
    rng = random.Random(seed)
    chosen = mutations()
    if size is not None:
        if size <= len(chosen):
            chosen = rng.sample(chosen, size)
        else:
            chosen = chosen + [rng.choice(chosen) for _ in range(size - len(chosen))]
    if heavy is None:
        full = set(range(len(chosen)))
    else:
        order = list(range(len(chosen)))
        rng.shuffle(order)
        order.sort(key=lambda i: chosen[i].name not in KEY_CASES)
        full = set(order[:heavy])
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="tsprobe-fuzz-") as tmpdir:
        tmp = Path(tmpdir)
        base = baseline(tmp, deadline_s)
        draws = [rng.getrandbits(64) for _ in chosen]
        for i, m in enumerate(chosen):
            if i % shard[1] != shard[0]:
                continue
            case = tmp / f"case{i}"
            case.mkdir()
            run = case / "run"
            shutil.copytree(FIXTURE, run)
            expect = m.apply(run, random.Random(draws[i]))
            target = _target(m, run, case)
            got = []
            for command in COMMANDS if i in full else COMMANDS[:2]:
                o = run_command(command, target, case / "out", deadline_s)
                o.mutation = m.name
                _judge(o, expect, base)
                got.append(o)
            _agree(got)
            outcomes.extend(got)
            if log is not None:
                log(f"{m.name}: " + ", ".join(f"{o.command}={o.cls}" for o in got))
            with contextlib.suppress(OSError):
                shutil.rmtree(os.fsencode(case))
    return outcomes


def table(outcomes: list[Outcome]) -> dict[str, dict[str, int]]:
    """Counts of each outcome class per command."""
    counts = {c: dict.fromkeys(CLASSES, 0) for c in COMMANDS}
    for o in outcomes:
        counts[o.command][o.cls] += 1
    return counts


def _markdown(counts: dict[str, dict[str, int]]) -> str:
    rows = ["| command | " + " | ".join(CLASSES) + " |", "|---" * (len(CLASSES) + 1) + "|"]
    for command, by in counts.items():
        rows.append(f"| {command} | " + " | ".join(str(by[c]) for c in CLASSES) + " |")
    return "\n".join(rows)


def run_parallel(
    seed: int = SEED,
    size: int | None = None,
    deadline_s: float = DEADLINE_S,
    jobs: int = 2,
    heavy: int | None = None,
) -> list[Outcome]:
    """``run_corpus`` split over ``jobs`` processes (``python -m tests.fuzz_rundir --shard``)."""
    if jobs <= 1:
        return run_corpus(seed, size, deadline_s, heavy=heavy)
    root = Path(__file__).resolve().parent.parent
    procs = []
    for k in range(jobs):
        cmd = [sys.executable, "-m", "tests.fuzz_rundir", "--seed", str(seed)]
        cmd += ["--deadline", str(deadline_s), "--shard", f"{k}/{jobs}", "--outcomes"]
        if size is not None:
            cmd += ["--size", str(size)]
        if heavy is not None:
            cmd += ["--heavy", str(heavy)]
        procs.append(subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE))
    outcomes: list[Outcome] = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"fuzz shard failed with exit status {proc.returncode}")
        outcomes.extend(Outcome(**o) for o in json.loads(out))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """Run corpora and print their table as JSON (``--markdown`` also as a table)."""
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz_rundir", description=__doc__)
    parser.add_argument("--seed", type=int, action="append", help=f"default {SEED}")
    parser.add_argument("--held-out", action="store_true", help="the held-out seeds")
    parser.add_argument("--size", type=int, default=None, help="mutations per seed")
    parser.add_argument(
        "--heavy", type=int, default=None, help="mutations that also run report and compare"
    )
    parser.add_argument("--deadline", type=float, default=DEADLINE_S)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="one line per mutation")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--outcomes", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    seeds = list(args.seed or []) + (list(HELD_OUT_SEEDS) if args.held_out else [])
    seeds = seeds or [SEED]
    started = time.monotonic()
    outcomes: list[Outcome] = []
    log = (lambda s: print(s, file=sys.stderr)) if args.verbose else None
    if args.outcomes:  # one shard of a parallel run: the outcomes themselves
        k, n = (int(x) for x in args.shard.split("/"))
        got = run_corpus(seeds[0], args.size, args.deadline, log, (k, n), args.heavy)
        print(json.dumps([{**asdict(o), "figures": None} for o in got]))
        return 0
    for seed in seeds:
        if args.verbose or args.jobs <= 1:
            outcomes.extend(run_corpus(seed, args.size, args.deadline, log, heavy=args.heavy))
        else:
            outcomes.extend(run_parallel(seed, args.size, args.deadline, args.jobs, args.heavy))
    counts = table(outcomes)
    bad = [
        {"mutation": o.mutation, "command": o.command, "class": o.cls, "detail": o.detail}
        for o in outcomes
        if o.cls not in ("ok", "clear error")
    ]
    doc = {
        "seeds": seeds,
        "mutations": sum(o.command == "timeline" for o in outcomes),
        "runs": len(outcomes),
        "seconds": round(time.monotonic() - started, 1),
        "table": counts,
        "bad": bad,
    }
    print(json.dumps(doc, indent=2))
    if args.markdown:
        print(_markdown(counts))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
