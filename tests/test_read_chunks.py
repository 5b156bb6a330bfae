"""The block reader (``jsonl.read_chunks``, and ``read_lines`` on it) against the
line-at-a-time reader it replaced, kept here as the reference: the same lines with the same
numbers, the same issues in the same order, on random files around every limit (the line
and block limits made small so that the boundaries come often)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from analysis.rundir import jsonl
from analysis.rundir.jsonl import Issue, open_regular, printable


def reference_read_lines(
    path: Path, on_issue: Callable[[Issue], None]
) -> Iterator[tuple[int, bytes]]:
    limit = jsonl.MAX_LINE_BYTES
    name = printable(path)
    fh = open_regular(path, jsonl.MAX_FILE_BYTES)
    if isinstance(fh, str):
        on_issue(Issue(name, 0, fh))
        return
    with fh:
        line_no = records = 0
        while True:
            raw = fh.readline(limit + 1)
            if not raw:
                if not records:
                    on_issue(Issue(name, 0, "empty: no records", "note"))
                return
            line_no += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(limit)
                on_issue(Issue(name, line_no, f"line longer than {jsonl._size(limit)}"))
                continue
            if raw.strip():
                records += 1
                yield line_no, raw


@pytest.mark.parametrize("seed", range(6))
def test_blocks_read_as_the_line_reader_did(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 64)
    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 256)
    rnd = random.Random(seed)
    for trial in range(150):
        parts = []
        for _ in range(rnd.randrange(0, 30)):
            n = rnd.choice([rnd.randrange(0, 40), rnd.randrange(60, 70), rnd.randrange(0, 600), 0])
            parts.append(bytes(rnd.choice(b'ab \t\r{}"\x00') for _ in range(n)))
        data = b"\n".join(parts) + (b"\n" if rnd.random() < 0.7 else b"")
        path = tmp_path / f"t{trial}.jsonl"
        path.write_bytes(data)
        want: list[Issue] = []
        got: list[Issue] = []
        expected = list(reference_read_lines(path, want.append))
        assert list(jsonl.read_lines(path, got.append)) == expected, (trial, data)
        assert got == want, (trial, data)
