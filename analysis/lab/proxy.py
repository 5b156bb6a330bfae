"""A TCP forwarder on 127.0.0.1 that follows the guest from source to destination.

During a migration the guest's agent is reachable through the source QEMU's forwarded
port until the switchover and through the destination's afterwards; the other QEMU's
user-mode network still accepts connections, but nothing answers them. The recorder
records one agent at one URL, so the lab gives it this forwarder's URL and moves
``target`` to the destination's port when the guest moves there (the first
``postcopy-active`` or ``completed``). Connections already open stay where they were; a
request that hangs on the stopped source times out in the recorder and is retried, so
the agent's ``seq`` stays continuous.

It runs inside the recorder's asyncio loop and only ever connects to 127.0.0.1. It
listens on 127.0.0.1 and a free port unless told otherwise (``tsprobe lab run
--agent-listen``: a fixed address Prometheus can scrape for the whole run).
"""

from __future__ import annotations

import asyncio
import contextlib


class Forwarder:
    """Accept on ``host``:``port`` (0: pick one) and forward to 127.0.0.1:``target``."""

    def __init__(self, target: int, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = target
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        """Start listening.

        :return: the port it listens on.
        """
        self._server = await asyncio.start_server(self._client, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` (``127.0.0.1`` when listening on every address)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.target), 2.0
            )
        except (OSError, TimeoutError):
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
