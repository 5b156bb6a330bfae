"""The agent's side of the fork server that starts its workers (``agent.zygote`` is the
server's side, where the protocol is described).

Starting a worker as a fresh interpreter costs an interpreter's start and its imports:
about 30 ms on a real CPU, but 0.5 s of a vCPU under QEMU's TCG, six times over on a
2-CPU guest with the default canaries, all of it while the guest boots or right after a
migration. The fork server is one such fresh interpreter, started at the first worker;
every worker after it is a fork of it. The server never has threads, so forking it is
safe where forking the agent would not be.

``spawn`` returns a ``ForkedProcess``, which the supervisor uses like the
``subprocess.Popen`` of a fresh interpreter: ``pid``, ``returncode``, ``poll``, ``wait``,
``terminate``, ``kill``. The server reaps the workers and reports each exit status, so
``returncode`` is the worker's own. A worker is a grandchild of the agent: ``ps`` shows
the server's command line for it, and its role as its name (``ps -o comm``: ``stall 1``).

When the server dies, its workers run on (their pipes to the agent are theirs); their exit
status can then no longer be known, and ``returncode`` becomes ``STATUS_UNKNOWN`` once they
are gone. The next ``spawn`` starts a new server. Anything that makes the server unusable
(it cannot start, does not answer) raises ``ForkServerError`` and the supervisor starts
that worker as a fresh interpreter instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from agent.errors import ForkServerError

#: ``returncode`` of a worker that ended after its server died: its status is lost.
STATUS_UNKNOWN = -(2**16)
#: How long a request may wait for its answer (the server's own start included: seconds
#: in a TCG guest that is busy booting).
ANSWER_S = 30.0
#: How often ``wait`` checks a worker whose server died.
ORPHAN_POLL_S = 0.1


class ForkedProcess:
    """A worker forked by the server, with the part of ``Popen``'s interface the
    supervisor uses.

    :param pid: the worker's process id.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._ended = threading.Event()
        self._orphaned = False

    def _set_returncode(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def _orphan(self) -> None:
        """The server died: from now on the worker's end is seen by its pid alone."""
        self._orphaned = True
        self._ended.set()

    def poll(self) -> int | None:
        """The return code once the worker ended, else None."""
        if self.returncode is None and self._orphaned and not _alive(self.pid):
            self.returncode = STATUS_UNKNOWN
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to end.

        :raise subprocess.TimeoutExpired: when it runs on after ``timeout`` seconds.
        :return: its return code.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._orphaned:
                left = ORPHAN_POLL_S if left is None else min(left, ORPHAN_POLL_S)
            self._ended.wait(left)
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` unless the worker is known to have ended."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        """SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL."""
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Request:
    """One spawn request waiting for its answer."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.proc: ForkedProcess | None = None
        self.error = "the fork server ended before it answered"


class _Connection:
    """One running server: its process, the agent's end of its socket, its workers and
    the requests it has not answered (guarded by ``lock``)."""

    def __init__(self, sock: socket.socket, server: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.server = server
        self.lock = threading.Lock()
        self.children: dict[int, ForkedProcess] = {}
        self.pending: dict[str, _Request] = {}
        self.closed = False

    def read(self) -> None:
        """The reader thread: answers to requests, and the workers' ends."""
        try:
            while True:
                try:
                    msg = self.sock.recv(4096)
                except OSError:
                    break
                if not msg:
                    break
                self._message(msg.decode(errors="replace").split("\0"))
        finally:
            self.close()
            self.sock.close()
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.server.wait(5.0)

    def _message(self, fields: list[str]) -> None:
        if len(fields) != 3:
            return
        kind, first, second = fields
        with self.lock:
            if kind == "X":
                proc = self.children.pop(int(first), None)
                if proc is not None:
                    proc._set_returncode(int(second))
                return
            request = self.pending.pop(first, None)
            if request is None:
                return
            if kind == "P":
                request.proc = self.children[int(second)] = ForkedProcess(int(second))
            else:
                request.error = second
        request.done.set()

    def close(self, kill: bool = False) -> None:
        """Forget the server: its live workers become orphans, its requests fail."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            orphans, self.children = list(self.children.values()), {}
            pending, self.pending = list(self.pending.values()), {}
        for proc in orphans:
            proc._orphan()
        for request in pending:
            request.done.set()
        if kill:
            with contextlib.suppress(OSError):
                self.server.kill()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class ForkServer:
    """The agent's fork server: started at the first ``spawn``, again after it died.

    :param command: the server's command line for the socket descriptor it serves on
        (``agent.workers.new_fork_server``: a worker command of ``agent.zygote``).
    """

    def __init__(self, command: Callable[[int], Sequence[str]]) -> None:
        self.command = command
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        self._next_id = 0

    @property
    def server_pid(self) -> int | None:
        """The running server's pid, or None."""
        conn = self._conn
        return conn.server.pid if conn is not None and not conn.closed else None

    def _start(self) -> _Connection:
        """Start a server (lock held)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            fd = theirs.fileno()
            server = subprocess.Popen(
                list(self.command(fd)),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                process_group=0,
                pass_fds=(fd,),
            )
        except OSError as err:
            ours.close()
            raise ForkServerError(f"cannot start the fork server: {err}") from err
        finally:
            theirs.close()
        conn = _Connection(ours, server)
        threading.Thread(target=conn.read, name="forkserver", daemon=True).start()
        return conn

    def spawn(
        self, module: str, args: Sequence[str], output_fd: int, fds: Sequence[int] = ()
    ) -> ForkedProcess:
        """Fork a worker that runs ``module.main(args)``.

        :param module: the worker's module.
        :param args: its options.
        :param output_fd: its stdout and stderr.
        :param fds: descriptors it keeps under the same numbers (its options name them).
        :raise ForkServerError: when the server cannot start, answer or fork it.
        :return: the worker.
        """
        with self._lock:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = self._start()
            self._next_id += 1
            req_id = str(self._next_id)
            request = _Request()
            with conn.lock:
                conn.pending[req_id] = request
            targets = ",".join(str(fd) for fd in (1, 2, *fds))
            msg = "\0".join(["S", req_id, targets, module, *args]).encode()
            try:
                socket.send_fds(conn.sock, [msg], [output_fd, output_fd, *fds])
            except OSError as err:
                conn.close()
                raise ForkServerError(f"the fork server is gone: {err}") from err
            if not request.done.wait(ANSWER_S):
                conn.close(kill=True)
                raise ForkServerError(f"the fork server did not answer in {ANSWER_S:g} s")
            if request.proc is None:
                raise ForkServerError(f"the fork server did not start {module}: {request.error}")
            return request.proc

    def close(self, wait_s: float = 3.0) -> None:
        """Stop the server and wait for it (killed after ``wait_s``); its workers are not
        touched: the supervisors stop those."""
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.close()
        try:
            conn.server.wait(wait_s)
        except subprocess.TimeoutExpired:
            conn.server.kill()
            conn.server.wait()
