"""Exceptions of the ``agent`` package.

One root, so the command line can turn everything the agent raises on purpose into one
clear line for the user instead of a traceback::

    AgentError
     ├── ConfigError   the agent cannot start as configured: a bad flag value, an event
     │                 spool that cannot be written, no online CPU among --cpus
     │    └── ListenError   the HTTP address cannot be bound (in use, not local, bad form)
     ├── SpoolError    a write to the event spool failed after start (disk full, I/O
     │                 error); the event log counts it and keeps serving from memory, so
     │                 it never reaches the user as a failure of the agent
     └── ForkServerError   the fork server cannot start a worker (it does not start or
                       answer); the supervisor starts that worker as a fresh interpreter

Errors keep their cause (``raise ConfigError(...) from err``) and their message is one line
fit to print to a user. Errors of the probes (``probe.errors.ProbeError``) are not wrapped:
a probe that fails is reported as down, and the agent keeps running.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError, ValueError):
    """The agent cannot start with this configuration; the message says which flag."""


class ListenError(ConfigError):
    """The HTTP listen address is malformed or cannot be bound."""


class SpoolError(AgentError):
    """Writing the event spool failed; counted by the event log, never fatal after start."""


class ForkServerError(AgentError):
    """The fork server cannot start a worker; a fresh interpreter is started instead."""
