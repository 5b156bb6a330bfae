"""Network addresses as users type them: ``HOST:PORT``, ``[V6ADDR]:PORT``, ``:PORT``.

One parser for every option that takes an address (the agent's ``--listen``, the
recorder's ``--listen``, a QMP monitor's ``HOST:PORT``) and for the port of an agent URL,
so they all accept and refuse the same things:

- the port is 1 to 5 ASCII digits (``²`` and ``١`` are digits to ``str.isdigit`` and
  ``int`` refuses the first, accepts the second: neither is a port here), from 1 to 65535,
  or 0 where the caller allows it (a listener: the kernel picks a free port);
- an IPv6 host is written in brackets, and the brackets must be closed
  (``[::1]:9466``); an unbracketed host with a colon is refused;
- an empty host is the caller's default (every IPv4 address for a listener);
- the host is at most 253 characters (a DNS name's limit), with no whitespace or control
  characters.

The parser is pure: it resolves nothing (a name that does not resolve fails when it is
used, with the socket's own message).

>>> split_host_port("[::1]:9466", default_host="0.0.0.0")
('::1', 9466)
>>> parse_port("0", allow_zero=True)
0
"""

from __future__ import annotations

from probe.errors import AddressError

#: The longest host name accepted (DNS names are at most 253 characters).
MAX_HOST = 253


def parse_port(text: str, allow_zero: bool = False) -> int:
    """Parse a TCP port.

    :param text: the port, ASCII digits.
    :param allow_zero: accept 0 (a listener's "any free port").
    :raise AddressError: when the text is not 1 to 5 ASCII digits in range.
    :return: the port.
    """
    low = 0 if allow_zero else 1
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or not (
        low <= int(text) <= 65535
    ):
        raise AddressError(
            f"the port must be a number from {low} to 65535, got {_short(text, 20)!r}"
        )
    return int(text)


def split_host_port(text: str, default_host: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[ADDR]:PORT`` for IPv6, ``:PORT`` for the default host).

    :param text: the address.
    :param default_host: the host when none is given.
    :param allow_zero: accept port 0.
    :raise AddressError: when the text is not of that form, or the port is out of range.
    :return: (host, port), the host without brackets.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise AddressError(f"{_short(text)!r}: expected HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise AddressError(f"{_short(text)!r}: write an IPv6 address as [ADDR]:PORT")
        host = host[1:-1]
    elif ":" in host or "]" in host:
        raise AddressError(f"{_short(text)!r}: write an IPv6 address as [ADDR]:PORT")
    if len(host) > MAX_HOST or any(c.isspace() or not c.isprintable() for c in host):
        raise AddressError(f"{_short(text)!r}: not a host name or address")
    try:
        port = parse_port(port_text, allow_zero)
    except AddressError:
        low = 0 if allow_zero else 1
        raise AddressError(
            f"{_short(text)!r}: the port must be a number from {low} to 65535"
        ) from None
    return host or default_host, port


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"
