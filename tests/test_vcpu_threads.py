"""vcpu_threads: the parsers on literal text, the rule on each case, and recorded /proc trees.

The trees under tests/fixtures/proc-vcpu/ are copies of real QEMU processes' /proc task
records (stat, wchan, schedstat, syscall, comm) with the QMP replies taken at the same time
(qmp.json): a KVM guest whose firmware halted both vCPUs (``kvm_vcpu_block`` inside
``ioctl(KVM_RUN)``, syscall 16 with request 0xae80), a multi-threaded TCG guest running,
a multi-threaded TCG ``-incoming`` destination, and a multi-threaded TCG guest whose vCPU 1
thread the cgroup v1 freezer froze in place (state ``D``, still in ``futex_do_wait``), and
a QEMU 10.0 multi-threaded TCG destination 1 s into postcopy-paused, vCPU 0 blocked on a
missing page, vCPU 1 and the main loop waiting on one mutex (the big QEMU lock).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from analysis.record.vcpu_threads import (
    COND_SPAN,
    HomeFutex,
    Reading,
    ThreadFiles,
    ThreadGone,
    classify,
    parse_schedstat,
    parse_stack,
    parse_state,
    parse_syscall,
    same_object,
)
from tests.blocked_threads import FutexWords, wait_futex

FIXTURES = Path(__file__).parent / "fixtures" / "proc-vcpu"
HALT = 0x55F74492FAA8


def test_parse_state_takes_the_field_after_the_last_parenthesis() -> None:
    assert parse_state("4337 (qemu-system-x86) S 1 4334 4334 0") == "S"
    assert parse_state("12 (odd) name) R 1 2 3") == "R"
    with pytest.raises(ValueError):
        parse_state("4337 qemu S")
    with pytest.raises(ValueError):
        parse_state("4337 (x) ")


def test_parse_schedstat() -> None:
    assert parse_schedstat("72786730 8921125 74\n") == (72786730, 8921125, 74)
    with pytest.raises(ValueError):
        parse_schedstat("12 13\n")
    with pytest.raises(ValueError):
        parse_schedstat("a b c")


def test_parse_syscall() -> None:
    line = "202 0x55f74492faa8 0x189 0x0 0x0 0x0 0xffffffff 0x7ffd6c 0x7fb1c0"
    assert parse_syscall(line) == (202, HALT)
    assert parse_syscall("16 0xd 0xae80 0x0 0x0 0x0 0x0 0x7ff 0x7fe") == (16, 0xD)
    assert parse_syscall("running\n") is None
    assert parse_syscall("-1 0x7ffd 0x55d0\n") is None
    assert parse_syscall("271") == (271, None)
    with pytest.raises(ValueError):
        parse_syscall("futex 0x1")


def sleeping(word: int | None, wchan: str = "futex_do_wait", letter: str = "S") -> Reading:
    syscall = 202 if word is not None else None
    return Reading(letter, wchan, 100, 10, syscall=syscall, futex=word)


RUN = Reading("R", "0", 1_000, 100)


@pytest.mark.parametrize(
    ("reading", "previous", "running", "home", "expected"),
    [
        (Reading("T", "do_signal_stop", 0, 0), None, True, None, "stopped"),
        (Reading("t", "ptrace_stop", 0, 0), None, True, None, "stopped"),
        (Reading("D", "__refrigerator", 0, 0), None, True, None, "stopped"),
        (Reading("S", "do_freezer_trap", 0, 0), None, True, None, "stopped"),
        (sleeping(HALT, letter="D"), None, True, HALT, "stopped"),
        (sleeping(None, "kvm_vcpu_block", letter="D"), None, True, None, "stopped"),
        (Reading("D", "handle_userfault", 0, 0), None, True, None, "userfault"),
        (Reading("D", "io_schedule", 0, 0), None, True, None, "other"),
        (Reading("S", "handle_userfault", 0, 0), None, True, None, "userfault"),
        (Reading("S", "handle_userfault", 0, 0), None, False, None, "userfault"),
        (RUN, None, True, None, "running"),
        (Reading("R", "0", 9_000_000, 100), RUN, True, None, "running"),
        (Reading("R", "0", 2_000, 9_000_000), RUN, True, None, "runnable"),
        (RUN, RUN, False, None, "running"),
        (sleeping(HALT), None, False, HALT, "stopped"),
        (sleeping(None, "kvm_vcpu_block"), None, True, None, "halted"),
        (sleeping(None, "kvm_vcpu_halt"), None, True, None, "halted"),
        (sleeping(HALT), None, True, HALT, "halted"),
        (sleeping(HALT + 4), None, True, HALT, "halted"),
        (sleeping(HALT + COND_SPAN), None, True, HALT, "lock-wait"),
        (sleeping(0x55F72694D7A8), None, True, HALT, "lock-wait"),
        (sleeping(0x55F72694D7A8), None, True, None, "lock-wait"),
        (sleeping(None), None, True, HALT, "other"),
        (sleeping(None, "poll_schedule_timeout.constprop.0"), None, True, None, "other"),
    ],
)
def test_classify(
    reading: Reading, previous: Reading | None, running: bool, home: int | None, expected: str
) -> None:
    assert classify(reading, previous, vm_running=running, home=home) == expected


def test_a_word_other_vcpus_wait_on_at_once_is_never_a_vcpus_own() -> None:
    assert classify(sleeping(HALT), None, vm_running=True, home=HALT) == "halted"
    shared = frozenset({HALT})
    assert classify(sleeping(HALT), None, vm_running=True, home=HALT, shared=shared) == (
        "lock-wait"
    )


def test_same_object_spans_one_pthread_cond() -> None:
    assert same_object(HALT, HALT + 4)
    assert same_object(HALT + 4, HALT)
    assert not same_object(HALT, HALT + COND_SPAN)


def test_home_is_the_word_waited_on_while_the_vm_was_stopped() -> None:
    home = HomeFutex()
    lock = 0x55F72694D7A8
    for _ in range(5):  # many episodes on a lock while running ...
        home.observe(sleeping(lock), vm_running=True)
        home.observe(RUN, vm_running=True)
    assert home.home == lock
    home.observe(sleeping(HALT), vm_running=False)  # ... but the stopped VM tells
    assert home.home == HALT
    home.observe(sleeping(lock), vm_running=True)
    assert home.home == HALT


def test_home_counts_episodes_not_readings() -> None:
    home = HomeFutex()
    lock = 0x55F72694D7A8
    for _ in range(50):  # one long wait on a lock: one episode
        home.observe(sleeping(lock), vm_running=True)
    for word in (HALT, HALT + 4, HALT):  # three halts, alternating cond words
        home.observe(RUN, vm_running=True)
        home.observe(sleeping(word), vm_running=True)
    assert home.home == HALT
    assert home.episodes[HALT] == 3 and home.episodes[lock] == 1


def test_home_without_any_wait_is_unknown() -> None:
    home = HomeFutex()
    home.observe(RUN, vm_running=True)
    assert home.home is None


# -- recorded /proc trees -------------------------------------------------------------------


def snapshot(name: str) -> tuple[Path, int, dict[int, int], bool]:
    """(proc root, QEMU pid, vCPU threads, VM running) of a recorded snapshot."""
    root = FIXTURES / name
    qmp = json.loads((root / "qmp.json").read_text())
    threads = {c["cpu-index"]: c["thread-id"] for c in qmp["query-cpus-fast"]}
    (pid_dir,) = [p for p in root.iterdir() if p.is_dir()]
    return root, int(pid_dir.name), threads, bool(qmp["query-status"]["running"])


def read_thread(root: Path, pid: int, tid: int) -> Reading:
    files = ThreadFiles(root, pid, tid)
    try:
        return files.read()
    finally:
        files.close()


def classify_snapshot(name: str) -> dict[int, str]:
    """Each vCPU's state from one reading, as the sampler's first pass would give it.

    Words that two of the read threads (the vCPUs and the main loop, tid = pid) wait on
    are shared; a vCPU's home is what this one reading shows.
    """
    root, pid, threads, running = snapshot(name)
    readings = {tid: read_thread(root, pid, tid) for tid in {*threads.values(), pid}}
    words = [r.futex for r in readings.values() if r.futex is not None]
    shared = frozenset(w for w in words if words.count(w) > 1)
    out: dict[int, str] = {}
    for vcpu, tid in threads.items():
        home = HomeFutex()
        home.observe(readings[tid], running)
        out[vcpu] = classify(readings[tid], None, vm_running=running, home=home.home, shared=shared)
    return out


def test_kvm_vcpus_halted_in_kvm_vcpu_block() -> None:
    root, pid, threads, running = snapshot("kvm-firmware-halted")
    assert running
    for tid in threads.values():
        files = ThreadFiles(root, pid, tid)
        reading = files.read()
        files.close()
        assert reading.wchan == "kvm_vcpu_block" and reading.letter == "S"
        assert reading.syscall is None  # the syscall file is read for futex waits only
        syscall = (root / str(pid) / "task" / str(tid) / "syscall").read_text()
        assert parse_syscall(syscall) is not None
        assert syscall.split()[2] == "0xae80"  # ioctl(fd, KVM_RUN)
    assert classify_snapshot("kvm-firmware-halted") == {0: "halted", 1: "halted"}


def test_tcg_vcpus_idle_on_their_own_condition() -> None:
    assert classify_snapshot("mttcg-running") == {0: "halted", 1: "halted"}


def test_an_incoming_destinations_vcpus_are_stopped() -> None:
    _root, _pid, _threads, running = snapshot("mttcg-incoming")
    assert not running
    assert classify_snapshot("mttcg-incoming") == {0: "stopped", 1: "stopped"}


def test_a_vcpu_frozen_in_place_is_stopped_and_its_sibling_halted() -> None:
    root, pid, threads, _running = snapshot("mttcg-vcpu1-frozen")
    files = ThreadFiles(root, pid, threads[1])
    frozen = files.read()
    files.close()
    assert (frozen.letter, frozen.wchan) == ("D", "futex_do_wait") and frozen.futex
    assert classify_snapshot("mttcg-vcpu1-frozen") == {0: "halted", 1: "stopped"}


def test_qemu10_paused_one_vcpu_on_a_missing_page_the_other_on_the_main_loops_lock() -> None:
    """QEMU 10.0, MTTCG, 1 s into postcopy-paused: the seed's case, seen on real threads."""
    root, pid, threads, _running = snapshot("qemu10-mttcg-paused-bql")
    main = read_thread(root, pid, pid)
    blocked, waiting = (read_thread(root, pid, threads[v]) for v in (0, 1))
    assert blocked.wchan == "handle_userfault"
    syscall = (root / str(pid) / "task" / str(threads[0]) / "syscall").read_text()
    assert parse_syscall(syscall) is None  # a fault in user mode, outside any syscall
    assert waiting.futex is not None and waiting.futex == main.futex  # one mutex ...
    task = root / str(pid) / "task" / str(threads[1])
    assert (task / "syscall").read_text().split()[2] == "0x80"  # ... FUTEX_WAIT_PRIVATE
    assert classify_snapshot("qemu10-mttcg-paused-bql") == {0: "userfault", 1: "lock-wait"}


def test_every_vcpu_of_a_snapshot_waits_on_its_own_word() -> None:
    root, pid, threads, _running = snapshot("mttcg-running")
    words = []
    for tid in threads.values():
        files = ThreadFiles(root, pid, tid)
        words.append(files.read().futex)
        files.close()
    assert None not in words and len(set(words)) == len(words)


def test_a_missing_thread_is_gone(tmp_path: Path) -> None:
    with pytest.raises(ThreadGone):
        ThreadFiles(tmp_path, 1, 2)


def test_a_malformed_record_is_a_value_error(tmp_path: Path) -> None:
    task = tmp_path / "1" / "task" / "2"
    task.mkdir(parents=True)
    for name, text in {
        "stat": "garbage",
        "wchan": "0",
        "schedstat": "1 2 3",
        "syscall": "",
    }.items():
        (task / name).write_text(text)
    files = ThreadFiles(tmp_path, 1, 2)
    with pytest.raises(ValueError):
        files.read()
    files.close()


def write_task(root: Path, stat: str, wchan: str, schedstat: str, syscall: str) -> None:
    task = root / "1" / "task" / "2"
    task.mkdir(parents=True, exist_ok=True)
    for name, text in {"stat": stat, "wchan": wchan, "schedstat": schedstat,
                       "syscall": syscall}.items():  # fmt: skip
        (task / name).write_text(text)


def test_a_thread_that_did_not_run_is_not_read_again(tmp_path: Path) -> None:
    cond = "202 0x55f74492faa8 0x189 0x0 0x0 0x0 0x0 0x7ff 0x7fb"
    write_task(tmp_path, "2 (q) S 1", "futex_do_wait", "100 10 5", cond)
    files = ThreadFiles(tmp_path, 1, 2)
    first = files.read()
    assert first.futex == HALT and first.slices == 5
    write_task(tmp_path, "2 (q) S 1", "futex_do_wait", "100 10 5", "202 0x10 0x80 0 0 0 0 1 2")
    assert files.read(first) is first  # slept through: the futex word is not read again
    write_task(tmp_path, "2 (q) S 1", "futex_do_wait", "150 10 6", "202 0x10 0x80 0 0 0 0 1 2")
    assert files.read(first).futex == 0x10  # it ran in between: read again
    write_task(tmp_path, "2 (q) R 1", "0", "100 10 5", "running")
    assert files.read(first).letter == "R"  # woken, not yet on a CPU: runnable, not asleep
    files.close()


def test_a_futex_wait_that_ended_between_two_reads_is_running(tmp_path: Path) -> None:
    write_task(tmp_path, "2 (q) S 1", "futex_do_wait", "100 10 5", "running")
    files = ThreadFiles(tmp_path, 1, 2)
    reading = files.read()
    files.close()
    assert reading.letter == "R" and classify(reading, None, vm_running=True, home=None) == (
        "running"
    )


def test_parse_stack_keeps_the_first_function_names() -> None:
    text = (
        "[<0>] poll_schedule_timeout.constprop.0+0x37/0x90\n"
        "[<0>] do_select+0x65c/0x940\n[<0>] core_sys_select+0x231/0x4d0\n"
    )
    assert parse_stack(text) == ["poll_schedule_timeout.constprop.0", "do_select",
                                 "core_sys_select"]  # fmt: skip
    assert parse_stack(text, frames=1) == ["poll_schedule_timeout.constprop.0"]
    assert parse_stack("") == []


def test_the_stack_of_a_real_sleeping_thread() -> None:
    words = FutexWords(1)
    waiter = threading.Thread(target=words.wait, args=(0,), daemon=True)
    waiter.start()
    try:
        tid = waiter.native_id or 0
        wait_futex(tid, words.address(0))
        files = ThreadFiles(Path("/proc"), os.getpid(), tid)
        stack = files.stack()
        files.close()
    finally:
        words.wake(0)
        waiter.join(5)
    if stack is None:
        pytest.skip("/proc/PID/task/TID/stack is not readable here (needs root)")
    assert any(name.startswith("futex") for name in stack), stack


def test_a_reading_caught_going_to_sleep_is_read_again(tmp_path: Path) -> None:
    # A thread read at the instant it goes to sleep (state set, time accounted, still in
    # schedule()) reads wchan 0; it then sleeps without running, so its schedstat stays:
    # that reading must not stand for the sleep (seen under load: a 400 ms userfault read
    # as "other"). A real wchan is kept while the thread does not run.
    task = tmp_path / "7" / "task" / "8"
    task.mkdir(parents=True)
    (task / "stat").write_text("8 (qemu) S 1 2 3\n")
    (task / "schedstat").write_text("1000 20 5\n")
    (task / "wchan").write_text("")
    (task / "syscall").write_text("-1 0x7ffd 0x5555\n")
    files = ThreadFiles(tmp_path, 7, 8)
    try:
        caught = files.read()
        assert caught.wchan == "0"
        (task / "wchan").write_text("handle_userfault")
        asleep = files.read(caught)
        assert asleep.wchan == "handle_userfault"
        (task / "wchan").write_text("something_else")
        assert files.read(asleep) is asleep  # not run since: not read again
    finally:
        files.close()
