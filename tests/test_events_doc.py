"""docs/events.md keeps up with the code: every kind has a section, every example parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from probe.errors import EventFormatError
from probe.events import KNOWN_KINDS, parse_event

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "events.md"
SOURCE_DIRS = ("probe", "agent")

#: Where the code names the kind of an event it emits: ``RawEvent("stall", ...)`` in the
#: probes and ``self._raw("agent_start", ...)`` in the agent.
_EMIT = re.compile(r"""\b(?:RawEvent|_raw)\(\s*["']([a-z][a-z0-9_]*)["']""")
_HEADING = re.compile(r"^(#{2,6}) (.*)$")


def emitted_kinds() -> set[str]:
    kinds: set[str] = set()
    for directory in SOURCE_DIRS:
        for path in sorted((ROOT / directory).glob("*.py")):
            kinds.update(_EMIT.findall(path.read_text(encoding="utf-8")))
    return kinds


def doc_lines() -> list[str]:
    return DOC.read_text(encoding="utf-8").splitlines()


def kind_headings() -> dict[str, int]:
    """Each name in a ``##`` or ``###`` heading -> the heading's line index.

    A name in backquotes (``### `stall` ``) wins over the same word in running text.
    """
    quoted: dict[str, int] = {}
    plain: dict[str, int] = {}
    for index, line in enumerate(doc_lines()):
        match = _HEADING.match(line)
        if match is None or len(match.group(1)) > 3:
            continue
        for name in re.findall(r"`([a-z][a-z0-9_]*)`", match.group(2)):
            quoted.setdefault(name, index)
        for word in re.findall(r"\b[a-z][a-z0-9_]*\b", match.group(2)):
            plain.setdefault(word, index)
    return {**plain, **quoted}


def section(start: int) -> range:
    """The line indexes of the section whose heading is at ``start``, up to the next ## or ###."""
    lines = doc_lines()
    end = start + 1
    while end < len(lines):
        match = _HEADING.match(lines[end])
        if match is not None and len(match.group(1)) <= 3:
            break
        end += 1
    return range(start, end)


def json_examples(where: range | None = None) -> list[tuple[int, str]]:
    """(line number, text) of each line inside a ```json fence, in the whole doc or ``where``."""
    lines = doc_lines()
    out: list[tuple[int, str]] = []
    fence: str | None = None
    for index in where if where is not None else range(len(lines)):
        stripped = lines[index].strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else stripped[3:].strip()
            continue
        if fence == "json" and stripped:
            out.append((index + 1, stripped))
    return out


def test_the_code_still_names_the_kinds_it_emits() -> None:
    """Guards the regex: if emitting changes shape, the doc check below must not go blind."""
    kinds = emitted_kinds()
    assert {"agent_start", "agent_stop", "probe_status", "stall", "kernel_warning"} <= kinds
    assert kinds <= KNOWN_KINDS, (
        f"emitted but not in probe.events.KNOWN_KINDS: {kinds - KNOWN_KINDS}"
    )


@pytest.mark.parametrize("kind", sorted(emitted_kinds() | KNOWN_KINDS))
def test_every_kind_has_a_heading(kind: str) -> None:
    assert kind in kind_headings(), f"docs/events.md has no ## or ### heading naming {kind!r}"


def test_every_example_line_is_a_valid_event() -> None:
    examples = json_examples()
    assert len(examples) >= len(emitted_kinds())
    for line_no, text in examples:
        try:
            parse_event(text)
        except EventFormatError as err:
            pytest.fail(f"docs/events.md:{line_no}: {err}")


@pytest.mark.parametrize("kind", sorted(emitted_kinds()))
def test_each_kind_section_shows_an_example_of_that_kind(kind: str) -> None:
    headings = kind_headings()
    if kind not in headings:
        pytest.skip(f"{kind} has no section (reported by test_every_kind_has_a_heading)")
    where = section(headings[kind])
    events = [(line_no, parse_event(text)) for line_no, text in json_examples(where)]
    assert any(event.kind == kind for _, event in events), f"no {kind} example in its section"
    # Every field of an example is explained, in the common fields or in the kind's section.
    lines = doc_lines()
    common = section(lines.index("## Common fields"))
    explained = "\n".join(lines[i] for i in (*common, *where))
    for line_no, event in events:
        for name in event.to_dict():
            assert f"`{name}`" in explained, f"docs/events.md:{line_no}: {name!r} not described"
