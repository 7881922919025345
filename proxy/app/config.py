"""The `keynode run` configuration: a TOML file read into typed, validated dataclasses.

Every key is known: an unknown or invalid one raises `ConfigError` naming the file,
the dotted key and the reason, so a typo never silently becomes a default.

    [node]
    dir = "~/.local/share/keynode"      # key.pem, chain.pem, auth_token, control.sock

    [forward]                            # HTTP CONNECT listener for local clients
    host = "127.0.0.1"
    port = 0                             # 0: any free port (printed at start)
    allow_targets = "*"                  # or ["v...", ...]: the nodes local clients may reach

    [proxy]                              # the one UDP socket (uTP + ping/pong)
    host = "0.0.0.0"
    port = 4000

    [server]                             # the default service: the local TCP server remote
    host = "127.0.0.1"                   # nodes reach when they name no service (every
    port = 50051                         # verified node may)
    service_port = 22                    # optional: the CONNECT port that names it
    kind = "tcp"                         # or "grpc": HTTP/2 with the caller's NodeId injected

    [services.agent]                     # more services (services_config.py): a caller names
    target = "127.0.0.1:50052"           # one by port (CONNECT <NodeId>:1314) or by name
                                         # (CONNECT agent.<NodeId>:443)
    port = 1314
    allow = "*"                          # or ["v...", ...]: only these NodeIds
    kind = "tcp"                         # or "grpc"

    [grpc_web]                           # the in-process grpc-web bridge (grpc_app.py)
    listen = "127.0.0.1:8080"            # host:port (port 0: any free port, printed at start)
    target = "v0123...abc:50051"         # a remote node's service, through this node's tunnel,
                                         # or "host:port" / a local service name: direct
    allow_origins = ["https://app.example"]   # browser origins allowed; "*": any

    [[policy_tests]]                     # checked at every load; a failure rejects the config
    node = "v0123...abc"
    service = "agent"
    expect = "allow"                     # or "deny"

    [auth]                               # at most one; none: <node dir>/auth_token
    token_file = "auth_token"            # or token = "..." or token_env = "VAR"

    [timeouts]                           # seconds, DESIGN.md names and defaults
    conn_connect_time = 2.0

    [transport]                          # uTP congestion controller
    congestion = "rate"                  # rate (default), tolerant, or ledbat (libutp's)

    [tls]
    max_chain_length = 32                # longer peer chains are refused unverified

    [peers]                              # address book: NodeId -> where its proxy listens
    "v0123...abc" = "198.51.100.7:4000"  # host:port, or [v6]:port
    "v4567...def" = "utp:198.51.100.8:4000;relay:v89ab...@198.18.0.2:4000"   # a multiserver list
    "vcdef...012" = "keynode-record:AYCC..."   # a record pasted from `keynode id --address`
    # (a list or record: its first utp address is used; without one, its relay:
    #  entries are the relay nodes asked for that node; a record must verify under
    #  the NodeId it is filed under)

    [relay]                              # rendezvous: reach nodes by NodeId alone
    serve = false                        # true: be a relay node (needs a reachable address)
    servers = ["<NodeId>@198.18.0.2:4000"]   # relay nodes to register with and ask;
                                         # also "relay:<NodeId>@host:port", [v6]:port;
                                         # "...:4000:tcp=4443": it also relays over TCP
                                         # (used when no UDP registration answers)
    prefer_tcp = true                    # relay over TCP whenever a relay offers it (the
                                         # default: batched, 3-5x the UDP relay's MiB/s and
                                         # less relay CPU per byte); false: UDP first
    punch_window = 1.0                   # seconds a CONNECT by NodeId waits for a direct
                                         # punch before it starts over a relay
    tcp_port = 4443                      # with serve: also relay over TCP + mutual TLS
                                         # here (0: any port; status shows it)
    rate = 8388608                       # with serve: bytes/s each NodeId may relay
    burst = 1048576                      # with serve: bytes at once (>= 65573)

    [log]
    level = "info"                       # debug, info, warning, error
    format = "text"                      # text or json (one JSON object a line)

    [control]
    socket = "control.sock"              # relative to the node directory

`keynode reload` (or SIGHUP) re-reads [server], [services], [forward] allow_targets,
[[policy_tests]] and [peers] into the running node; other sections need a restart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from proxy.app.errors import ConfigError
from proxy.app.services_config import ServicesConfig, build_policy, check_policy_tests, read_services
from proxy.identity.errors import KeyFileError, NodeIdInvalid

# The appliance's congestion default (keeps most of a lossy path, bench/lossy_path.py).
from proxy.tunnel.defaults import DEFAULT_CONGESTION
from proxy.tunnel.hosts import (
    HostPort,
    HostPortInvalid,
    parse_host,
    parse_host_port,
    parse_port,
)

KEY_FILE = "key.pem"
CHAIN_FILE = "chain.pem"
AUTH_TOKEN_FILE = "auth_token"
CONTROL_SOCKET_FILE = "control.sock"
CONFIG_FILE = "config.toml"

LOG_LEVELS = ("debug", "info", "warning", "error")
# proxy.identity.verification.DEFAULT_MAX_CHAIN_LENGTH (not imported: cryptography is
# slow to import and most commands only read the config). One rotation adds one.
DEFAULT_MAX_CHAIN_LENGTH = 32
MAX_CHAIN_LENGTH_BOUNDS = (1, 1024)
# Names of nat.utp.congestion.CONTROLLERS that a config may choose.
CONGESTION_CONTROLLERS = ("ledbat", "tolerant", "rate")
LOG_FORMATS = ("text", "json")

_MAX_TOKEN_BYTES = 4096


def default_node_dir() -> Path:
    """`$XDG_DATA_HOME/keynode`, else `~/.local/share/keynode` (XDG base directories)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    if data_home and os.path.isabs(data_home):
        return Path(data_home) / "keynode"
    return Path.home() / ".local" / "share" / "keynode"


@dataclass(frozen=True)
class Timeouts:
    """The Proxy's timing options (DESIGN.md "The Proxy"), seconds."""

    conn_connect_time: float = 2.0
    conn_keep_alive_timeout_time: float = 20.0
    conn_end_time: float = 1.0
    conn_punch_interval_time: float = 0.05
    conn_keep_alive_interval_time: float = 1.0


# Inclusive bounds per timeout: small enough to be sane, large enough for any real link.
TIMEOUT_BOUNDS: dict[str, tuple[float, float]] = {
    "conn_connect_time": (0.01, 20.0),
    "conn_keep_alive_timeout_time": (0.05, 3600.0),
    "conn_end_time": (0.01, 60.0),
    "conn_punch_interval_time": (0.001, 10.0),
    "conn_keep_alive_interval_time": (0.01, 600.0),
}


@dataclass(frozen=True)
class AuthToken:
    """Where the CONNECT auth token came from, and its value."""

    source: Literal["token", "token_file", "token_env"]
    origin: str  # "inline", the file path, or the variable name
    value: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    path: str  # the file it came from ("<defaults>" when none)
    node_dir: Path
    forward: HostPort
    proxy: HostPort
    server: HostPort | None
    auth: AuthToken
    timeouts: Timeouts
    peers: Mapping[Any, HostPort]  # NodeId -> where its proxy listens
    log_level: str
    log_format: str
    control_socket: Path
    congestion: str = DEFAULT_CONGESTION  # uTP congestion controller (CONGESTION_CONTROLLERS)
    max_chain_length: int = DEFAULT_MAX_CHAIN_LENGTH  # certificates a peer's chain may hold
    relay_serve: bool = False  # [relay] serve: answer, register and introduce other nodes
    relay_servers: tuple[Any, ...] = ()  # [relay] servers: proxy.rendezvous.addresses.RelayAddress
    relay_tcp_port: int | None = None  # [relay] tcp_port: the relay over TCP + mutual TLS (serve)
    relay_rate: int | None = None  # [relay] rate, bytes/s per NodeId (None: RelayLimits' default)
    relay_burst: int | None = None  # [relay] burst, bytes
    relay_prefer_tcp: bool = True  # [relay] prefer_tcp: relayed datagrams over TCP links when offered
    relay_punch_window: float = 1.0  # [relay] punch_window: seconds before a CONNECT by NodeId takes a relay
    peer_relays: Mapping[Any, tuple[Any, ...]] = field(default_factory=dict)  # [peers] relay: entries
    services: ServicesConfig = ServicesConfig()  # [services], allow lists, [[policy_tests]]
    policy: Any = None  # proxy.tunnel.services.ServicePolicy built from server and services
    grpc_web: Any = None  # [grpc_web]: proxy.app.grpc_web_config.GrpcWebConfig, or None

    @property
    def key_path(self) -> Path:
        return self.node_dir / KEY_FILE

    @property
    def chain_path(self) -> Path:
        return self.node_dir / CHAIN_FILE


# --- loading -------------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str], *, read_auth: bool = True, node_dir: Path | None = None
) -> Config:
    """Read and validate a TOML config file.

    `read_auth=False` skips reading the token (its source is still validated): for
    commands that only talk to the control socket. `node_dir` (the command line's
    --dir, or the directory the file was found in) replaces the file's [node] dir."""
    path_text = os.fspath(path)
    try:
        with open(path_text, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(path_text, "(file)", "no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path_text, "(file)", f"cannot read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path_text, "(file)", f"not valid TOML: {error}") from None
    base_dir = Path(path_text).resolve().parent
    return config_from_mapping(data, path_text, base_dir=base_dir, read_auth=read_auth, node_dir=node_dir)


def default_config(node_dir: Path | None = None, *, read_auth: bool = True) -> Config:
    """The configuration `keynode run` uses without a file."""
    data: dict[str, Any] = {}
    if node_dir is not None:
        data["node"] = {"dir": str(node_dir)}
    return config_from_mapping(data, "<defaults>", base_dir=Path.cwd(), read_auth=read_auth)


_SECTIONS = (
    "node", "forward", "proxy", "server", "auth", "timeouts", "transport", "tls", "peers", "log", "control",
    "relay",
    "services", "policy_tests",
    "grpc_web",
)
MAX_RELAY_SERVERS = 16
# [relay] punch_window: long enough for one punch round trip on a far path, short
# enough that relay fallback stays well inside conn_connect_time's bound.
PUNCH_WINDOW_BOUNDS = (0.05, 10.0)


class _Reader:
    """Walks one mapping, remembering the dotted key for errors."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, key, reason)

    def table(self, data: Mapping[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(name, f"must be a table [{name}], not {type(value).__name__}")
        return dict(value)

    def reject_unknown(self, table: Mapping[str, Any], prefix: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                where = f"{prefix}.{key}" if prefix else key
                raise self.fail(where, f"unknown key (known: {', '.join(known)})")

    def string(self, table: Mapping[str, Any], key: str, default: str | None) -> str | None:
        value = table.get(key.rpartition(".")[2], default)
        if value is not None and not isinstance(value, str):
            raise self.fail(key, f"must be a string, not {type(value).__name__}")
        if isinstance(value, str) and "\x00" in value:
            raise self.fail(key, "must not contain NUL characters")
        return value

    def path_value(self, table: Mapping[str, Any], key: str, base: Path) -> Path | None:
        text = self.string(table, key, None)
        if text is None:
            return None
        if not text:
            raise self.fail(key, "must not be empty")
        path = Path(os.path.expanduser(text))
        return path if path.is_absolute() else base / path

    def host_port(
        self, data: Mapping[str, Any], section: str, host: str, port: int | None, allow_zero: bool,
        extra: tuple[str, ...] = (),
    ) -> HostPort | None:
        table = self.table(data, section)
        self.reject_unknown(table, section, ("host", "port", *extra))
        host_value = table.get("host", host)
        port_value = table.get("port", port)
        if port_value is None:
            if "host" in table:
                raise self.fail(f"{section}.port", "missing (a host needs a port)")
            return None
        try:
            host_value = parse_host(host_value)
        except HostPortInvalid as error:
            raise self.fail(f"{section}.host", str(error)) from None
        try:
            port_value = parse_port(port_value, allow_zero=allow_zero)
        except HostPortInvalid as error:
            raise self.fail(f"{section}.port", str(error)) from None
        return HostPort(host_value, port_value)


def config_from_mapping(
    data: Mapping[str, Any],
    path: str,
    *,
    base_dir: Path,
    read_auth: bool = True,
    node_dir: Path | None = None,
) -> Config:
    """Validate parsed TOML; relative paths resolve against `base_dir` (the file's)."""
    reader = _Reader(path)
    if not isinstance(data, Mapping):
        raise reader.fail("(file)", "must be a TOML table")
    reader.reject_unknown(data, "", _SECTIONS)

    node = reader.table(data, "node")
    reader.reject_unknown(node, "node", ("dir",))
    node_dir = node_dir or reader.path_value(node, "node.dir", base_dir) or default_node_dir()

    forward = reader.host_port(data, "forward", "127.0.0.1", 0, allow_zero=True, extra=("allow_targets",))
    proxy = reader.host_port(data, "proxy", "0.0.0.0", 0, allow_zero=True)
    server = reader.host_port(data, "server", "127.0.0.1", None, allow_zero=False, extra=("service_port", "kind"))
    assert forward is not None and proxy is not None  # both have a default port
    services = read_services(
        path, data, reader.table(data, "server"), reader.table(data, "forward"), has_server=server is not None
    )
    policy = build_policy(services, server)
    check_policy_tests(path, services, policy)
    grpc_web = None
    if "grpc_web" in data:  # the bridge's modules (h2, h11) load only when it is configured
        from proxy.app.grpc_app import read_grpc_web_section

        grpc_web = read_grpc_web_section(path, data, services, server)

    auth = _read_auth(reader, reader.table(data, "auth"), node_dir, base_dir, read_auth)
    timeouts = _read_timeouts(reader, reader.table(data, "timeouts"))
    peers, peer_relays = _read_peers(reader, reader.table(data, "peers"))

    transport = reader.table(data, "transport")
    reader.reject_unknown(transport, "transport", ("congestion",))
    congestion = reader.string(transport, "transport.congestion", DEFAULT_CONGESTION)
    if congestion not in CONGESTION_CONTROLLERS:
        raise reader.fail(
            "transport.congestion", f"{congestion!r} is not one of {', '.join(CONGESTION_CONTROLLERS)}"
        )

    max_chain_length = _read_tls(reader, reader.table(data, "tls"))
    relay_table = reader.table(data, "relay")
    relay_serve, relay_servers = _read_relay(reader, relay_table)
    relay_tcp_port, relay_rate, relay_burst = _read_relay_forwarding(reader, relay_table, relay_serve)
    relay_prefer_tcp = relay_table.get("prefer_tcp", True)
    if not isinstance(relay_prefer_tcp, bool):
        raise reader.fail("relay.prefer_tcp", f"must be true or false, not {type(relay_prefer_tcp).__name__}")
    relay_punch_window = relay_table.get("punch_window", 1.0)
    if isinstance(relay_punch_window, bool) or not isinstance(relay_punch_window, (int, float)):
        raise reader.fail("relay.punch_window", f"must be a number of seconds, not {type(relay_punch_window).__name__}")
    low, high = PUNCH_WINDOW_BOUNDS
    if not (math.isfinite(relay_punch_window) and low <= relay_punch_window <= high):
        raise reader.fail("relay.punch_window", f"{relay_punch_window} is out of range {low}..{high} seconds")

    log = reader.table(data, "log")
    reader.reject_unknown(log, "log", ("level", "format"))
    level = reader.string(log, "log.level", "info")
    if level not in LOG_LEVELS:
        raise reader.fail("log.level", f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    log_format = reader.string(log, "log.format", "text")
    if log_format not in LOG_FORMATS:
        raise reader.fail("log.format", f"{log_format!r} is not one of {', '.join(LOG_FORMATS)}")

    control = reader.table(data, "control")
    reader.reject_unknown(control, "control", ("socket",))
    control_socket = reader.path_value(control, "control.socket", node_dir)
    control_socket = control_socket or node_dir / CONTROL_SOCKET_FILE
    # sockaddr_un.sun_path holds 108 bytes including the NUL.
    if len(os.fsencode(str(control_socket))) > 107:
        raise reader.fail("control.socket", f"path longer than 107 bytes: {control_socket}")

    return Config(
        path=path,
        node_dir=node_dir,
        forward=forward,
        proxy=proxy,
        server=server,
        auth=auth,
        timeouts=timeouts,
        peers=peers,
        log_level=level,
        log_format=log_format,
        control_socket=control_socket,
        congestion=congestion,
        max_chain_length=max_chain_length,
        relay_serve=relay_serve,
        relay_servers=relay_servers,
        relay_tcp_port=relay_tcp_port,
        relay_rate=relay_rate,
        relay_burst=relay_burst,
        relay_prefer_tcp=relay_prefer_tcp,
        relay_punch_window=float(relay_punch_window),
        peer_relays=peer_relays,
        services=services,
        policy=policy,
        grpc_web=grpc_web,
    )


def _read_auth(
    reader: _Reader, table: dict[str, Any], node_dir: Path, base_dir: Path, read: bool
) -> AuthToken:
    sources = ("token", "token_file", "token_env")
    reader.reject_unknown(table, "auth", sources)
    given = [name for name in sources if name in table]
    if len(given) > 1:
        raise reader.fail(f"auth.{given[1]}", f"give exactly one of {', '.join(sources)}")
    source = given[0] if given else "token_file"
    key = f"auth.{source}"
    if not read:
        reader.string(table, key, None)
        return AuthToken(source, "(not read)", "")  # type: ignore[arg-type]
    if source == "token":
        value = reader.string(table, key, None) or ""
        origin = "inline"
    elif source == "token_env":
        origin = reader.string(table, key, None) or ""
        if not origin:
            raise reader.fail(key, "must name an environment variable")
        if origin not in os.environ:
            raise reader.fail(key, f"environment variable {origin} is not set")
        value = os.environ[origin]
    else:
        token_path = reader.path_value(table, key, base_dir) if given else None
        token_path = token_path or node_dir / AUTH_TOKEN_FILE
        origin = str(token_path)
        value = _read_token_file(reader, key, token_path, defaulted=not given)
    value = value.strip()
    if not value:
        raise reader.fail(key, "the auth token is empty")
    if len(value.encode()) > _MAX_TOKEN_BYTES or not value.isprintable():
        raise reader.fail(key, f"the auth token must be printable and at most {_MAX_TOKEN_BYTES} bytes")
    return AuthToken(source, origin, value)  # type: ignore[arg-type]


def _read_token_file(reader: _Reader, key: str, path: Path, *, defaulted: bool) -> str:
    from proxy.identity.keys import read_private_file  # cryptography: imported late to keep config light

    try:
        return read_private_file(path).decode("utf-8")
    except FileNotFoundError:
        hint = " (run `keynode keygen` first, or set [auth])" if defaulted else ""
        raise reader.fail(key, f"{path} does not exist{hint}") from None
    except KeyFileError as error:  # exposed to others, or not a regular file
        raise reader.fail(key, str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise reader.fail(key, f"cannot read {path}: {error}") from None


def _read_timeouts(reader: _Reader, table: dict[str, Any]) -> Timeouts:
    names = tuple(f.name for f in dataclasses.fields(Timeouts))
    reader.reject_unknown(table, "timeouts", names)
    values: dict[str, float] = {}
    for name, raw in table.items():
        key = f"timeouts.{name}"
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            raise reader.fail(key, f"must be a number of seconds, not {type(raw).__name__}")
        low, high = TIMEOUT_BOUNDS[name]
        if not math.isfinite(raw) or not low <= raw <= high:
            raise reader.fail(key, f"{raw} is out of range {low}..{high} seconds")
        values[name] = float(raw)
    timeouts = Timeouts(**values)
    if timeouts.conn_keep_alive_interval_time >= timeouts.conn_keep_alive_timeout_time:
        raise reader.fail(
            "timeouts.conn_keep_alive_interval_time",
            "must be shorter than conn_keep_alive_timeout_time, or every connection times out",
        )
    return timeouts


def _read_tls(reader: _Reader, table: dict[str, Any]) -> int:
    reader.reject_unknown(table, "tls", ("max_chain_length",))
    value = table.get("max_chain_length", DEFAULT_MAX_CHAIN_LENGTH)
    low, high = MAX_CHAIN_LENGTH_BOUNDS
    if not isinstance(value, int) or isinstance(value, bool):
        raise reader.fail("tls.max_chain_length", f"must be an integer, not {type(value).__name__}")
    if not low <= value <= high:
        raise reader.fail("tls.max_chain_length", f"{value} is out of range {low}..{high}")
    return value


def _read_relay(reader: _Reader, table: dict[str, Any]) -> tuple[bool, tuple[Any, ...]]:
    from proxy.rendezvous.addresses import parse_relay_server
    from proxy.rendezvous.errors import RelayServerInvalid

    reader.reject_unknown(table, "relay", ("serve", "servers", "tcp_port", "rate", "burst", "prefer_tcp",
                                             "punch_window"))
    serve = table.get("serve", False)
    if not isinstance(serve, bool):
        raise reader.fail("relay.serve", f"must be true or false, not {type(serve).__name__}")
    raw = table.get("servers", [])
    if not isinstance(raw, list):
        raise reader.fail("relay.servers", f"must be a list of '<NodeId>@host:port', not {type(raw).__name__}")
    if len(raw) > MAX_RELAY_SERVERS:
        raise reader.fail("relay.servers", f"at most {MAX_RELAY_SERVERS} relay nodes")
    servers = []
    for index, entry in enumerate(raw):
        try:
            server = parse_relay_server(entry)
        except RelayServerInvalid as error:
            raise reader.fail(f"relay.servers[{index}]", str(error)) from None
        if server in servers:
            raise reader.fail(f"relay.servers[{index}]", f"{entry!r} is listed twice")
        servers.append(server)
    return serve, tuple(servers)


def _read_relay_forwarding(reader: _Reader, table: dict[str, Any], serve: bool
                           ) -> tuple[int | None, int | None, int | None]:
    """[relay] tcp_port, rate and burst: a relay node's forwarding (each needs serve)."""
    from proxy.relay.limits import LARGEST_SEND

    values: dict[str, int | None] = {}
    for key, low, high, what in (("tcp_port", 0, 65535, "a TCP port (0: any)"),
                                 ("rate", 1, 1 << 40, "bytes per second"),
                                 ("burst", LARGEST_SEND, 1 << 40, f"bytes (at least {LARGEST_SEND}: one largest datagram)")):
        value = table.get(key)
        if value is None:
            values[key] = None
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise reader.fail(f"relay.{key}", f"must be an integer, {what}, not {type(value).__name__}")
        if not low <= value <= high:
            raise reader.fail(f"relay.{key}", f"{value} is out of range {low}..{high} ({what})")
        if not serve:
            raise reader.fail(f"relay.{key}", "only a relay node uses it: set serve = true too")
        values[key] = value
    return values["tcp_port"], values["rate"], values["burst"]


def _read_peers(reader: _Reader, table: dict[str, Any]) -> tuple[dict[Any, HostPort], dict[Any, tuple[Any, ...]]]:
    """NodeId -> its proxy address, and NodeId -> its home relays (the relay: entries of
    an address list or record; asked for that node when it has no utp address)."""
    from proxy.identity.node_id import NodeId  # identity layer; imported late to keep config light

    peers: dict[Any, HostPort] = {}
    peer_relays: dict[Any, tuple[Any, ...]] = {}
    for name, raw in table.items():
        key = f"peers.{name}"
        try:
            node_id = NodeId.decode(name)
        except (NodeIdInvalid, ValueError) as error:
            raise reader.fail(key, f"not a NodeId: {error}") from None
        if isinstance(raw, str) and _is_address_list(raw):
            address, relays = _peer_from_list(reader, key, node_id, raw)
            if address is not None:
                peers[node_id] = address
            if relays:
                peer_relays[node_id] = relays
            continue
        try:
            peers[node_id] = parse_host_port(raw, allow_wildcard=False)
        except HostPortInvalid as error:
            raise reader.fail(key, str(error)) from None
    return peers, peer_relays


def _is_address_list(text: str) -> bool:
    """A record or multiserver list rather than `host:port` (`utp:4000` is the host
    `utp`, port 4000: a list's utp/relay address has two colons at least)."""
    return (text.startswith("keynode-record:") or ";" in text
            or (text.startswith(("utp:", "relay:")) and text.count(":") >= 2))


def _peer_from_list(reader: _Reader, key: str, node_id: Any, text: str) -> tuple[HostPort | None, tuple[Any, ...]]:
    """The first utp address and the relay addresses of a multiserver list or of a
    signed record (which must be the NodeId's own)."""
    from proxy.rendezvous.addresses import RelayAddress, UtpAddress, keynode_addresses, record_from_text
    from proxy.rendezvous.errors import RendezvousError

    try:
        if text.startswith("keynode-record:"):
            record = record_from_text(text)
            if record.node_id != node_id:
                raise reader.fail(key, f"the record is signed by {record.node_id}, not by {node_id}")
            addresses = record.understood()
        else:
            addresses = keynode_addresses(text)
    except RendezvousError as error:
        raise reader.fail(key, str(error)) from None
    utp = [HostPort(address.host, address.port) for address in addresses if isinstance(address, UtpAddress)]
    relays = tuple(address for address in addresses if isinstance(address, RelayAddress))
    return (utp[0] if utp else None), relays
