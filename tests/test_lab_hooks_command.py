"""hooks_command against a stand-in for QEMU's user network in front of late hooks.

The host's first command can arrive before the guest's hooks listen (init starts their
listener with the agent, and a TCG guest boots slowly). QEMU's user network still accepts
the host's connection and then ends it without a byte; that is the fault the stand-in
makes. The real hooks are exercised by the lab's clock-step and kmsg runs
(tests/test_lab.py).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from analysis.lab import health


@contextmanager
def _late_hooks(
    refuse_first: int, answer: bytes = b'{"ok": true, "n": 1}\n'
) -> Iterator[tuple[int, list[str]]]:
    """Listen; end the first ``refuse_first`` connections unread, then answer each line."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.05)
    lines: list[str] = []
    done = threading.Event()

    def serve() -> None:
        seen = 0
        while not done.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                seen += 1
                if seen <= refuse_first:
                    continue
                lines.append(conn.makefile("r").readline())
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield srv.getsockname()[1], lines
    finally:
        done.set()
        thread.join(5)
        srv.close()


def test_an_empty_answer_is_tried_again_and_the_line_is_acted_on_once() -> None:
    with _late_hooks(refuse_first=3) as (port, lines):
        result = health.hooks_command(port, "step 2000000000", wait_s=5.0)
    assert result == {"ok": True, "n": 1}
    assert lines == ["step 2000000000\n"]


def test_hooks_that_never_answer_give_one_line_after_the_wait() -> None:
    refused = pytest.raises(health.ScenarioError)
    with _late_hooks(refuse_first=10**6) as (port, lines), refused as info:
        health.hooks_command(port, "ping", wait_s=0.5)
    assert str(info.value) == "lab hooks did not answer 'ping' within 0.5 s"
    assert lines == []


def test_a_refusal_from_the_hooks_is_not_tried_again() -> None:
    refusal = b'{"ok": false, "error": "nope"}\n'
    refused = pytest.raises(health.ScenarioError, match="refused 'kmsg x': nope")
    with _late_hooks(refuse_first=0, answer=refusal) as (port, lines), refused:
        health.hooks_command(port, "kmsg x", wait_s=5.0)
    assert lines == ["kmsg x\n"]
