"""The `keynode` command line (argparse).

Errors end as one line on stderr (what failed, why, what to do) and an exit code
per class of failure (EXIT_CODES below); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

from proxy.app.cli_exit import (  # noqa: F401  (re-exported: tests and scripts use them from here)
    PROGRAM,
    ArgumentParser,
    CommandError,
    ExitCode,
    UsageError,
    error_document,
    exit_code_for,
    fail,
    flush_stdout,
    stdout_gone,
    unwrap,
)
from proxy.app.config import (
    CONFIG_FILE,
    Config,
    default_config,
    default_node_dir,
    load_config,
)
from proxy.app.errors import (
    ConfigError,
    ControlRequestFailed,
    ControlUnreachable,
)
from proxy.app.node_dir import identity_document, keygen, load_identity, rotate
from proxy.tunnel.hosts import HostPort, parse_host_port

# --- node directory ----------------------------------------------------------------


def node_dir_from(args: argparse.Namespace) -> Path:
    directory = getattr(args, "dir", None)
    return Path(directory).expanduser() if directory else default_node_dir()


# --- config resolution -----------------------------------------------------------------


def resolve_config(args: argparse.Namespace, *, read_auth: bool = True) -> Config:
    """--config FILE, else <node dir>/config.toml if present, else the defaults."""
    config_path = getattr(args, "config", None)
    explicit_dir = node_dir_from(args) if getattr(args, "dir", None) else None
    if config_path:
        return load_config(config_path, read_auth=read_auth, node_dir=explicit_dir)
    node_dir = node_dir_from(args)
    if (node_dir / CONFIG_FILE).exists():
        return load_config(node_dir / CONFIG_FILE, read_auth=read_auth, node_dir=node_dir)
    return default_config(node_dir, read_auth=read_auth)


def control_path_from(args: argparse.Namespace) -> Path:
    if getattr(args, "control", None):
        return Path(args.control).expanduser()
    return resolve_config(args, read_auth=False).control_socket


# --- output ----------------------------------------------------------------------------


def print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def report(args: argparse.Namespace, answer: Any, human: object) -> int:
    """The node's answer as JSON with --json, else one line for people."""
    if args.json:
        print_json(answer)
    else:
        print(human)
    return ExitCode.OK


def host_port_argument(text: str) -> HostPort:
    try:
        return parse_host_port(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def listen_argument(text: str) -> HostPort:
    try:
        return parse_host_port(text, allow_zero=True)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def node_id_argument(text: str) -> Any:
    from proxy.identity.node_id import NodeId

    try:
        return NodeId.decode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a NodeId: {error}") from None


def forward_target_argument(text: str) -> Any:
    """NODEID@HOST:PORT, or NODEID alone (its address then comes from [peers])."""
    from proxy.app.port_forward import parse_forward_target

    try:
        if "@" not in text:
            return node_id_argument(text)
        return parse_forward_target(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --- commands --------------------------------------------------------------------------


def command_keygen(args: argparse.Namespace) -> int:
    node_dir = node_dir_from(args)
    tls_config = keygen(node_dir, force=args.force)
    if args.json:
        print_json({**identity_document(tls_config), "dir": str(node_dir)})
    else:
        print(tls_config.node_id)
        print(f"identity written to {node_dir}", file=sys.stderr)
    return ExitCode.OK


def command_id(args: argparse.Namespace) -> int:
    if args.address:
        return command_id_address(args)
    tls_config = load_identity(node_dir_from(args))
    if args.json:
        print_json(identity_document(tls_config))
    else:
        print(tls_config.node_id)
    return ExitCode.OK


def command_id_address(args: argparse.Namespace) -> int:
    """The running node's current address list as a record signed by its key (a higher
    sequence number on every call, also across restarts: unix milliseconds)."""
    try:
        answer = _control(args, "GET", "/v1/address")
    except ControlUnreachable as error:
        raise CommandError(
            f"`keynode id --address` asks the running node (its observed addresses come from its relay "
            f"nodes): {error}", ExitCode.CONTROL_UNREACHABLE,
        ) from None
    if args.json:
        print_json(answer)
    else:
        print(answer["record"])
        print(f"seq {answer['seq']}: {answer['addresses']}", file=sys.stderr)
    return ExitCode.OK


def command_rotate(args: argparse.Namespace) -> int:
    old, new = rotate(node_dir_from(args))
    # A running node switches to the new key for connections it starts from now on.
    try:
        _control(args, "POST", "/v1/reload-identity", {})
        reloaded = True
    except ControlUnreachable:
        reloaded = False
    if args.json:
        print_json({**identity_document(new), "previous_node_id": str(old.node_id), "reloaded": reloaded})
    else:
        print(new.node_id)
        running = "the running node now uses it" if reloaded else "no running node to tell"
        print(
            f"rotated from {old.node_id}; the chain ({len(new.certificate_chain)} certificates) "
            f"still proves the old NodeId; {running}",
            file=sys.stderr,
        )
    return ExitCode.OK


def command_run(args: argparse.Namespace) -> int:
    # The identity first: without keygen, "no identity" is the useful message.
    tls_config = load_identity(resolve_config(args, read_auth=False).node_dir)
    config = resolve_config(args)
    from proxy.app.runner import run_node  # imports the whole Proxy stack: only when running

    return trio.run(run_node, config, tls_config)


def _control(args: argparse.Namespace, method: str, target: str, body: Any = None) -> Any:
    from proxy.app.control import control_request

    path = control_path_from(args)
    return trio.run(lambda: control_request(path, method, target, body))


def command_status(args: argparse.Namespace) -> int:
    from proxy.app.control import format_status

    status = _control(args, "GET", "/v1/status")
    if args.json:
        print_json(status)
    else:
        print(format_status(status))
    return ExitCode.OK


def command_events(args: argparse.Namespace) -> int:
    """Follow the running node's event stream until the node ends it (or Ctrl-C)."""
    from proxy.app.control import stream_events
    from proxy.app.events import format_event

    path = control_path_from(args)

    async def follow() -> None:
        async for event in stream_events(path):
            print(json.dumps(event) if args.json else format_event(event), flush=True)

    try:
        trio.run(follow)
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED  # the usual way to stop following: no message
    return ExitCode.OK


def peer_address(args: argparse.Namespace, node_id: Any) -> HostPort:
    """Where NODEID's proxy listens, from the config's [peers] address book."""
    config = resolve_config(args, read_auth=False)
    address = config.peers.get(node_id)
    if address is None:
        raise CommandError(
            f"{node_id} is not in the [peers] address book of {config.path}; give HOST:PORT",
            ExitCode.USAGE,
        )
    return address


def command_reload(args: argparse.Namespace) -> int:
    """The running node re-reads its config's services, allow lists and [peers]."""
    stays = "(not reloaded: the running config stays)"
    try:
        answer = _control(args, "POST", "/v1/reload", {})
    except ConfigError as error:  # read here first, to find the control socket
        raise CommandError(f"{error} {stays}", ExitCode.CONFIG) from None
    except ControlRequestFailed as error:
        if error.error in ("ConfigError", "PolicyTestFailed"):  # the node rejected it whole
            raise CommandError(f"{error.message} {stays}", ExitCode.CONFIG) from None
        raise
    services = ", ".join(service["name"] for service in answer.get("services", [])) or "none"
    human = f"reloaded: services {services}; {answer.get('peers')} peers; {answer.get('revoked')} tunnels revoked"
    if answer.get("restart_needed"):
        human += f"\nnot applied until a restart: {', '.join(answer['restart_needed'])}"
    return report(args, answer, human)


def command_open_forward(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"node_id": str(args.node_id)}
    if args.address is None:
        config = resolve_config(args, read_auth=False)
        if args.node_id in config.peers or not config.relay_servers:
            args.address = peer_address(args, args.node_id)
    if args.address is not None:
        body.update(host=args.address.host, port=args.address.port)
    answer = _control(args, "POST", "/v1/forward", body)
    where = args.address if args.address is not None else answer.get("address")
    return report(args, answer, f"forward connection open to {answer.get('node_id')} at {where}")


def command_open_reverse(args: argparse.Namespace) -> int:
    body = {"host": args.address.host, "port": args.address.port}
    answer = _control(args, "POST", "/v1/reverse", body)
    return report(args, answer, f"reverse connection open to {args.address}")


def command_close(args: argparse.Namespace) -> int:
    body = {"direction": args.direction, "host": args.address.host, "port": args.address.port}
    answer = _control(args, "POST", "/v1/close", body)
    return report(args, answer, f"{args.direction} connection to {args.address} closed")


def command_lookup(args: argparse.Namespace) -> int:
    target = f"/v1/lookup?host={args.address.host}&port={args.address.port}"
    answer = _control(args, "GET", target)
    return report(args, answer, answer.get("node_id"))


def command_forward(args: argparse.Namespace) -> int:
    """Like ssh -L: through the running node, or, when none answers on the control
    socket, through a node this process runs from the same config and node directory."""
    from proxy.app.port_forward import ForwardTarget, run_port_forward
    from proxy.identity.node_id import NodeId

    config = resolve_config(args)
    if isinstance(args.target, NodeId):
        if args.target not in config.peers and config.relay_servers:
            # By NodeId alone: the running node finds it through its relay nodes and opens
            # the tunnel; the CONNECTs then name the address it was found at.
            try:
                answer = _control(args, "POST", "/v1/forward", {"node_id": str(args.target)})
            except ControlUnreachable as error:
                raise CommandError(
                    f"finding {args.target} through the relay nodes needs the running node: {error}",
                    ExitCode.CONTROL_UNREACHABLE,
                ) from None
            address = parse_host_port(answer["address"])
        else:
            address = peer_address(args, args.target)
        args.target = ForwardTarget(args.target, address.host, address.port)
    via: HostPort | None = args.via
    tls_config = None
    if via is None:
        try:
            via = parse_host_port(_control(args, "GET", "/v1/status")["forward"])
        except ControlUnreachable:
            tls_config = load_identity(config.node_dir)  # no node running: run one here
    return trio.run(lambda: run_port_forward(config, args.listen, args.target, via=via, tls_config=tls_config))


def command_demo(args: argparse.Namespace) -> int:
    try:
        import grpc  # noqa: F401 (the demo's client and server)
    except ImportError:
        raise CommandError(
            "the demo needs grpcio: pip install grpcio (or run `make demo`, which installs it)",
            ExitCode.FAILURE,
        ) from None
    if args.calls < 1 or args.stream_mib < 1:
        raise CommandError("--calls and --stream-mib must be at least 1", ExitCode.USAGE)
    from proxy.app.demo import run_demo

    passed = run_demo(calls=args.calls, stream_mib=args.stream_mib, keep=args.keep)
    return ExitCode.OK if passed else ExitCode.DEMO_FAILED


# --- parser ----------------------------------------------------------------------------


def _add_command(
    subparsers: Any,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
    examples: str,
    parents: Sequence[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=list(parents),
    )
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROGRAM,
        description="keynode: a peer-to-peer tunnel. Local TCP clients reach a remote node's "
        "server through an HTTP CONNECT proxy, uTP over UDP with NAT hole punching, "
        "and mutual TLS where identity is an Ed25519 key (the NodeId).",
        epilog="examples:\n"
        "  keynode keygen                       # create this node's identity\n"
        "  keynode run --config node.toml       # run the node\n"
        "  keynode status                       # what it is doing\n"
        "  keynode demo                         # two nodes, gRPC through the tunnel\n"
        "\nexit codes: "
        + ", ".join(f"{code.value} {code.name.lower().replace('_', ' ')}" for code in ExitCode),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {package_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    node_dir = argparse.ArgumentParser(add_help=False)
    node_dir.add_argument(
        "--dir", metavar="DIR",
        help="node directory (default: $XDG_DATA_HOME/keynode or ~/.local/share/keynode)",
    )
    json_output = argparse.ArgumentParser(add_help=False)
    json_output.add_argument("--json", action="store_true", help="print JSON for scripts")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", metavar="FILE", help="TOML config (default: <node dir>/config.toml)")
    control = argparse.ArgumentParser(add_help=False)
    control.add_argument("--control", metavar="SOCKET", help="control socket (default: from the config)")
    client = [common, node_dir, config, control, json_output]

    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen_parser = _add_command(
        subparsers, "keygen", command_keygen,
        "create an Ed25519 key (0600), certificate and auth token; print the NodeId",
        "  keynode keygen\n  keynode keygen --dir /srv/keynode-a\n  keynode keygen --force   # replace",
        [common, node_dir, json_output],
    )
    keygen_parser.add_argument("--force", action="store_true", help="replace an existing identity")
    id_parser = _add_command(
        subparsers, "id", command_id, "print this node's NodeId (or, with --address, its signed address list)",
        "  keynode id\n  keynode id --dir /srv/keynode-a --json\n"
        "  keynode id --address   # paste the record into a peer's [peers] under this NodeId",
        [common, node_dir, config, control, json_output],
    )
    id_parser.add_argument(
        "--address", action="store_true",
        help="ask the running node for its current address list (observed addresses and relay nodes) "
             "as a record signed by its key, with a sequence number above every earlier one",
    )
    _add_command(
        subparsers, "rotate", command_rotate,
        "new key, its certificate issued by the old key (the chain still proves the old NodeId); "
        "a running node switches to it for new connections",
        "  keynode rotate\n  keynode rotate --dir /srv/keynode-a",
        [common, node_dir, config, control, json_output],
    )
    _add_command(
        subparsers, "run", command_run,
        "run the node: forward proxy, UDP proxy, reverse proxy and control socket. Services: "
        "[server] is the default one; [services.<name>] (target, port, allow, kind) adds more "
        "(kind grpc: the server gets the caller's NodeId in every request, x-keynode-node-id), "
        "named by the CONNECT port (<NodeId>:<port>) or name (<name>.<NodeId>:<port>); [forward] allow_targets limits the nodes "
        "local clients reach; [[policy_tests]] are checked at load. SIGHUP (or `keynode reload`) "
        "re-reads them and [peers]. [grpc_web] (listen, target = <NodeId>:<port> or a local service, "
        "allow_origins) serves grpc-web clients such as browsers",
        "  keynode run\n  keynode run --config /etc/keynode/node.toml\n"
        "  keynode run --dir /srv/keynode-a      # uses /srv/keynode-a/config.toml if present\n"
        "\n"
        "--dir DIR is the node directory: key.pem, chain.pem, auth_token, control.sock, and\n"
        "config.toml (read if present, unless --config names another file).\n"
        "\n"
        "stdout, once the node serves: one 'name: value' line each for node_id, forward,\n"
        "proxy, server and control_socket (and grpc_web with [grpc_web]), then a line 'ready'.\n"
        "Scripts wait for 'ready'.\n"
        "Logs go to stderr; with relay nodes, a line 'observed address HOST:PORT (seen by\n"
        "relay NODEID); NAT mapping: ...' follows as each relay answers.\n"
        "\n"
        "reach nodes by NodeId alone (config.toml):\n"
        "  [relay]\n"
        "  serve = false                  # true: be a relay node (needs a reachable address)\n"
        "  servers = [\"<NodeId>@198.18.0.2:4000\"]   # relay nodes to register with and ask\n"
        "                                 # (also relay:<NodeId>@host:port, [v6]:port;\n"
        "                                 # ...:4000:tcp=4443: it relays over TCP there too)\n"
        "  prefer_tcp = true              # relay over a relay node's TCP link when offered\n"
        "  punch_window = 1.0             # seconds to punch before a tunnel starts relayed\n"
        "  tcp_port = 4443                # with serve: relay over TCP + mutual TLS here too\n"
        "  rate = 8388608                 # with serve: bytes/s per NodeId (burst = 1048576)\n"
        "  then: CONNECT <NodeId>:<port>, keynode forward/open-forward NODEID, with no [peers] entry.\n"
        "  [peers] values: host:port, a multiserver list (utp:H:P;relay:<NodeId>@H:P) or a\n"
        "  record from `keynode id --address`.",
        [common, node_dir, config],
    )
    _add_command(
        subparsers, "status", command_status,
        "show bound addresses, NodeId and every connection of the running node",
        "  keynode status\n  keynode status --json | jq '.connections[].node_id'", client,
    )
    _add_command(
        subparsers, "events", command_events,
        "follow the running node's tunnels as they are established, lost and change path "
        "(one line each; ends when the node stops)",
        "  keynode events\n  keynode events --dir /srv/keynode-a --json | jq -c 'select(.event == \"lost\")'",
        client,
    )
    _add_command(
        subparsers, "reload", command_reload,
        "re-read the config's services, allow lists and [peers] into the running node (as SIGHUP); "
        "tunnels whose NodeId lost access close as revoked, the others keep flowing; a config "
        "that fails validation or a [[policy_tests]] entry is rejected and the running one stays",
        "  keynode reload\n  keynode reload --dir /srv/keynode-a --json\n"
        "  kill -HUP $(keynode status --json | jq .pid)   # the same", client,
    )
    open_forward = _add_command(
        subparsers, "open-forward", command_open_forward,
        "open (punch and verify) a forward connection to NODEID at HOST:PORT",
        "  keynode open-forward v0abc...xyz 198.51.100.7:4000\n"
        "  keynode open-forward v0abc...xyz     # address from the config's [peers]", client,
    )
    open_forward.add_argument("node_id", metavar="NODEID", type=node_id_argument)
    open_forward.add_argument("address", metavar="HOST:PORT", type=host_port_argument, nargs="?",
                              help="the remote node's proxy (UDP) address (default: from [peers])")
    open_reverse = _add_command(
        subparsers, "open-reverse", command_open_reverse,
        "open a reverse connection (punch from this side, for NAT) to HOST:PORT",
        "  keynode open-reverse 203.0.113.5:4000", client,
    )
    open_reverse.add_argument("address", metavar="HOST:PORT", type=host_port_argument,
                              help="the remote node's proxy (UDP) address")
    close = _add_command(
        subparsers, "close", command_close, "close a forward or reverse connection",
        "  keynode close forward 198.51.100.7:4000\n  keynode close reverse 203.0.113.5:4000", client,
    )
    close.add_argument("direction", choices=("forward", "reverse"))
    close.add_argument("address", metavar="HOST:PORT", type=host_port_argument,
                       help="the remote node's proxy (UDP) address")
    lookup = _add_command(
        subparsers, "lookup", command_lookup,
        "which NodeId is behind a local TCP connection (as a server behind this node sees it)",
        "  keynode lookup 127.0.0.1:53122      # the peer address your server logged", client,
    )
    lookup.add_argument("address", metavar="HOST:PORT", type=host_port_argument)
    forward = _add_command(
        subparsers, "forward", command_forward,
        "listen locally and tunnel every connection to NODEID's server (like ssh -L)",
        "  keynode forward --listen 127.0.0.1:2222 v0abc...xyz@198.51.100.7:4000\n"
        "  keynode forward --listen 127.0.0.1:2222 v0abc...xyz   # address from [peers], else found\n"
        "                                       # through [relay] servers by the running node\n"
        "  ssh -p 2222 localhost                # reaches the server behind that node",
        [common, node_dir, config, control],
    )
    forward.add_argument("--listen", required=True, metavar="HOST:PORT", type=listen_argument,
                         help="local address to listen on (port 0: any free port)")
    forward.add_argument("--via", metavar="HOST:PORT", type=host_port_argument,
                         help="the local node's CONNECT port (default: from config or status)")
    forward.add_argument("target", metavar="NODEID@HOST:PORT", type=forward_target_argument,
                         help="remote NodeId and its proxy (UDP) address "
                              "(NODEID alone: from [peers], else via [relay] servers)")
    demo = _add_command(
        subparsers, "demo", command_demo,
        "two nodes with fresh identities, gRPC echo through the tunnel, figures, PASS/FAIL",
        "  keynode demo\n  keynode demo --calls 100 --stream-mib 8", [common],
    )
    demo.add_argument("--calls", type=int, default=500, help="unary round trips (default 500)")
    demo.add_argument("--stream-mib", type=int, default=64, help="MiB streamed each way (default 64)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keynode")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that a usage error is JSON too when --json was asked for.
    json_errors = "--json" in arguments
    command = next((word for word in arguments if not word.startswith("-")), "")
    try:
        args = build_parser().parse_args(arguments)
    except UsageError as error:
        fail(command, error, False, json_errors)
    except SystemExit:  # --help or --version printed its text
        flush_stdout()
        raise
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        code = args.handler(args)
        flush_stdout()
    except (Exception, KeyboardInterrupt, BaseExceptionGroup) as error:  # failures become a line + code
        fail(args.command, error, debug, json_errors)
    sys.exit(int(code))


if __name__ == "__main__":
    main()
