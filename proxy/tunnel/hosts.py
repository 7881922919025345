"""Host and port syntax, one rule for every edge: config, CLI, control socket, CONNECT.

A host is an IP literal (IPv6 without brackets) or a DNS name (RFC 1123 labels:
letters, digits, inner hyphens; at most 253 characters). Hosts come back in one
spelling: an IP literal as ``ipaddress`` writes it, a name in lower case without
its trailing dot. A wildcard (0.0.0.0, ::) is a fine address to bind but never
one to connect to, so callers say which they parse.

Errors are ``HostPortInvalid`` (a ValueError) carrying the reason; each edge maps
it to its own typed error (ConfigError, BadConnectRequest, a 400 on the control
socket, a usage error on the command line).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_HOSTNAME_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_PORT_TEXT = re.compile(r"[0-9]{1,5}\Z")
# An IPv6 zone (fe80::1%eth0): an interface name or number. ipaddress takes any text there.
_IPV6_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_HOSTNAME_LENGTH = 253  # RFC 1035, without the trailing dot


class HostPortInvalid(ValueError):
    """A host or port that is not acceptable; the message is the reason."""


class WildcardHost(HostPortInvalid):
    """A wildcard address (0.0.0.0, ::) where a host to connect to is needed."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def ip_literal(text: str) -> IPAddress | None:
    """The address when ``text`` is an IP literal (no brackets), else None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        if not _IPV6_ZONE.match(address.scope_id):
            return None
    return address


def parse_host(host: object, *, allow_wildcard: bool = True) -> str:
    """An IP literal or DNS name in its one spelling; raises HostPortInvalid."""
    if not isinstance(host, str):
        raise HostPortInvalid(f"must be a string, not {type(host).__name__}")
    if not host:
        raise HostPortInvalid("must not be empty")
    address = ip_literal(host)
    if address is not None:
        if address.is_unspecified and not allow_wildcard:
            raise WildcardHost(f"{host!r} is a wildcard address, not a host to connect to")
        return str(address)
    name = host.lower().removesuffix(".")
    if len(name) > MAX_HOSTNAME_LENGTH:
        raise HostPortInvalid(f"hostname longer than {MAX_HOSTNAME_LENGTH} characters")
    if not all(_HOSTNAME_LABEL.match(label) for label in name.split(".")):
        raise HostPortInvalid(f"{host!r} is neither an IP address nor a hostname")
    return name


def parse_port(port: object, *, allow_zero: bool) -> int:
    """A port number given as an int (1..65535, or 0..65535 where 0 means "any")."""
    # bool is an int subclass: `port = true` is a mistake, not port 1.
    if not isinstance(port, int) or isinstance(port, bool):
        raise HostPortInvalid(f"must be an integer, not {type(port).__name__}")
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise HostPortInvalid(f"{port} is out of range {low}..65535")
    return port


def parse_port_text(text: str, *, allow_zero: bool) -> int:
    """A port number written in ASCII digits (no sign, no spaces, at most 5 digits)."""
    if not _PORT_TEXT.match(text):
        raise HostPortInvalid(f"port {text!r} is not a number")
    return parse_port(int(text), allow_zero=allow_zero)


def split_host_port(text: str) -> tuple[str, str]:
    """``host:port`` or ``[v6]:port`` -> (host, port text), neither yet checked beyond
    the brackets: what is in brackets must be an IPv6 literal, and an unbracketed
    host must not contain ':'."""
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise HostPortInvalid(f"{text!r} is not '[IPv6]:port'")
        host = text[1:close]
        if not isinstance(ip_literal(host), ipaddress.IPv6Address):
            raise HostPortInvalid(f"{host!r} in brackets is not an IPv6 address")
        return host, text[close + 2 :]
    host, sep, port_text = text.rpartition(":")
    if not sep or ":" in host:
        raise HostPortInvalid(f"{text!r} is not 'host:port' (IPv6 goes in brackets)")
    return host, port_text


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return format_host_port(self.host, self.port)


def parse_host_port(text: object, *, allow_zero: bool = False, allow_wildcard: bool = True) -> HostPort:
    """``host:port``, ``1.2.3.4:port`` or ``[v6]:port``; raises HostPortInvalid."""
    if not isinstance(text, str):
        raise HostPortInvalid(f"must be a string 'host:port', not {type(text).__name__}")
    host, port_text = split_host_port(text)
    return HostPort(
        parse_host(host, allow_wildcard=allow_wildcard), parse_port_text(port_text, allow_zero=allow_zero)
    )
