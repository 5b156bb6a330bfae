"""The fork server's own side: a small single-threaded process that forks the workers.

``agent.forkserver`` (the agent's side) starts this once, as a fresh interpreter with the
workers' own bootstrap (``agent.workers.worker_command("agent.zygote", [FD])``), with one
end of a ``SOCK_SEQPACKET`` socket pair. For each worker the agent sends a request; the
server imports the worker's module (once per module), forks, and the child becomes the
worker: it moves the descriptors it was sent to the numbers the worker expects, names
itself, and runs ``MODULE.main(args)`` as the bootstrap of
``agent.workers.worker_command`` would, then ``os._exit`` with its status.

Why fork from here and not from the agent: the agent has threads, and a forked child
would inherit their locks and the agent's whole heap. This process never starts a thread
and imports only what the workers import, so a child forked from it is what a fresh
interpreter would be after its imports, without paying for them again: an interpreter's
start and imports cost 0.5 s of a TCG guest's vCPU, a fork a few milliseconds.

Messages, one datagram each (fields separated by NUL bytes, numbers in ASCII):

``S id targets module arg...`` (agent to server), with one descriptor per target in
    SCM_RIGHTS: fork a worker; ``targets`` is the comma-separated list of the descriptor
    numbers the child must see them as (1 and 2 for its output pipe, then the descriptors
    the worker's options name).
``P id pid``      the worker was forked.
``F id message``  it was not (the module does not import, fork failed, bad request).
``X pid code``    a child ended; ``code`` as ``subprocess`` gives it (``-N``: signal N).

The server exits when the agent's end closes (the agent is gone); the workers then exit
at their next write, as they do when the agent dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import importlib
import os
import select
import signal
import socket
import sys

#: The most descriptors one request may carry (output twice and a few the worker names).
MAX_FDS = 8
#: The largest request (a worker's options are short).
MAX_REQUEST = 65536
#: Longest name the kernel keeps in /proc/PID/comm (16 bytes with the NUL).
COMM_MAX = 15


def worker_name(module: str, args: list[str]) -> str:
    """The name a forked worker gives itself in /proc/PID/comm (what ``ps -o comm`` and
    ``top`` show; its command line stays the server's): the module's last part without
    ``canary_``, and its ``--cpu``, e.g. ``stall 1``, ``heartbeat 0``.

    :param module: the worker's module, e.g. ``probe.stall``.
    :param args: the worker's options.
    :return: at most 15 characters.
    """
    name = module.rsplit(".", 1)[-1].removeprefix("canary_")
    if "--role" in args[:-1]:
        name += "-" + args[args.index("--role") + 1]
    if "--cpu" in args[:-1]:
        name += " " + args[args.index("--cpu") + 1]
    return name[:COMM_MAX]


def parse_request(msg: bytes) -> tuple[str, list[int], str, list[str]]:
    """Split an ``S`` request into its id, target descriptors, module and options.

    :param msg: the datagram.
    :raise ValueError: when it is not a well-formed request.
    :return: (id, targets, module, args).
    """
    if not msg.startswith(b"S\0"):
        raise ValueError(f"not a spawn request: {msg[:20]!r}")
    fields = msg[2:].decode().split("\0")
    if len(fields) < 3 or not fields[2]:
        raise ValueError("a spawn request needs an id, targets and a module")
    targets = [int(text) for text in fields[1].split(",") if text]
    if any(target < 0 for target in targets):
        raise ValueError(f"negative descriptor in {fields[1]!r}")
    return fields[0], targets, fields[2], fields[3:]


def _exit_code(code: object) -> int:
    """The process status of ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


def _become_worker(
    module: str, args: list[str], targets: list[int], fds: list[int], keep: list[int]
) -> None:
    """In the forked child: set up the descriptors and run the worker; never returns."""
    code: object = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        os.setpgid(0, 0)
        # Move what was sent above every number in play, then down to the targets.
        floor = max([*targets, *fds, *keep, 2]) + 1
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in fds]
        for fd in {*fds, *keep}:
            os.close(fd)
        for target, fd in zip(targets, moved, strict=True):
            os.dup2(fd, target)
        for fd in moved:
            if fd not in targets:
                os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        if devnull != 0:
            os.dup2(devnull, 0)
            os.close(devnull)
        try:
            with open("/proc/self/comm", "w") as fh:
                fh.write(worker_name(module, args))
        except OSError:
            pass  # only a name
        sys.argv = [module, *args]
        code = importlib.import_module(module).main(args)
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # nothing left to report it to
                stream.flush()
    os._exit(_exit_code(code))


def _reap(sock: socket.socket) -> None:
    """Report every child that ended."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(b"X\0%d\0%d" % (pid, os.waitstatus_to_exitcode(status)))


def _spawn(sock: socket.socket, msg: bytes, fds: list[int], keep: list[int]) -> None:
    """Handle one request: fork the worker, answer P or F."""
    req_id = "?"
    try:
        req_id, targets, module, args = parse_request(msg)
        if len(targets) != len(fds):
            raise ValueError(f"{len(fds)} descriptors for {len(targets)} targets")
        importlib.import_module(module)  # here once, so that every child has it
        gc.freeze()  # a child's collections then leave what it shares with the server alone
        pid = os.fork()
        if pid == 0:
            _become_worker(module, args, targets, fds, [sock.fileno(), *keep])
        sock.send(b"P\0%s\0%d" % (req_id.encode(), pid))
    except Exception as err:  # a bad request or a module that does not import
        sock.send(b"F\0%s\0%s" % (req_id.encode(), f"{type(err).__name__}: {err}".encode()))
    finally:
        for fd in fds:
            os.close(fd)


def serve(fd: int) -> int:
    """Serve the agent on the socket ``fd`` until it closes; return the exit status."""
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    for end in (wake_r, wake_w):
        os.set_blocking(end, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            ready = dict(poller.poll())
            if wake_r in ready:
                while True:
                    try:
                        if not os.read(wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            _reap(sock)
            if sock.fileno() in ready:
                msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, MAX_FDS)
                if not msg:
                    return 0  # the agent closed its end
                _spawn(sock, msg, fds, [wake_r, wake_w])
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the agent is gone


def main(argv: list[str]) -> int:
    """Entry point of the server's worker command: ``agent.zygote FD``."""
    if len(argv) != 1 or not argv[0].isdigit():
        sys.stderr.write("usage: agent.zygote FD (the socket to serve on)\n")
        return 2
    return serve(int(argv[0]))
