"""The lab's forwarder on real sockets: it follows the guest to the destination's port and
closes the connections left on the source's, which would never be answered."""

from __future__ import annotations

import asyncio

from analysis.lab.proxy import Forwarder


async def _serve(answer: bytes | None) -> tuple[asyncio.Server, int]:
    """A server on 127.0.0.1 that answers each line with ``answer`` (None: never answers)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            if answer is not None:
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def test_moving_the_target_closes_the_connections_to_the_old_one() -> None:
    async def main() -> tuple[bytes, bytes, bytes]:
        source, source_port = await _serve(None)  # a stopped guest: accepts, never answers
        dest, dest_port = await _serve(b"dest\n")
        forwarder = Forwarder(source_port)
        port = await forwarder.start()
        try:
            old_reader, old_writer = await asyncio.open_connection("127.0.0.1", port)
            old_writer.write(b"hello\n")
            await old_writer.drain()
            await asyncio.sleep(0.2)
            forwarder.target = dest_port
            gone = await asyncio.wait_for(old_reader.read(), 2.0)  # EOF at once, not a hang
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"hello\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), 2.0)
            forwarder.target = dest_port  # the same port again: nothing is closed
            writer.write(b"again\n")
            await writer.drain()
            again = await asyncio.wait_for(reader.readline(), 2.0)
            writer.close()
            old_writer.close()
            return gone, answer, again
        finally:
            await forwarder.close()
            source.close()
            dest.close()

    gone, answer, again = asyncio.run(main())
    assert gone == b""
    assert answer == again == b"dest\n"
