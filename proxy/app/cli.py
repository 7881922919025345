"""The `keynode` command line (argparse).

Errors end as one line on stderr (what failed, why, what to do) and an exit code
per class of failure (EXIT_CODES below); `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import trio

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
    NodeDirectoryError,
    PortForwardError,
)
from proxy.app.node_dir import identity_document, keygen, load_identity, rotate
from proxy.identity.errors import IdentityError, KeynodeError
from proxy.tunnel.hosts import HostPort, parse_host_port

PROGRAM = "keynode"


class ExitCode(enum.IntEnum):
    OK = 0
    FAILURE = 1  # anything unexpected (a bug: rerun with --debug and report it)
    USAGE = 2  # bad command line (argparse uses 2 too)
    CONFIG = 3  # the config file is unreadable or invalid
    IDENTITY = 4  # no identity in the node directory, or keygen would overwrite it
    CONTROL_UNREACHABLE = 5  # no running node answers on the control socket
    REQUEST_FAILED = 6  # the node refused or failed the request
    NETWORK = 7  # cannot bind or reach an address
    DEMO_FAILED = 8  # `keynode demo` ran and its checks failed
    INTERRUPTED = 130  # SIGINT before the work was done


class CommandError(KeynodeError):
    """A failure the CLI reports as one line with a chosen exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CommandError):
    """The command line does not parse (argparse's complaint, exit code 2)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message, ExitCode.USAGE)
        self.parser = parser
        self.message = message


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its usage errors raised (main prints them, as text or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def exit_code_for(error: BaseException) -> ExitCode:
    if isinstance(error, CommandError):
        return error.code
    if isinstance(error, ConfigError):
        return ExitCode.CONFIG
    if isinstance(error, (NodeDirectoryError, IdentityError)):
        return ExitCode.IDENTITY
    if isinstance(error, ControlUnreachable):
        return ExitCode.CONTROL_UNREACHABLE
    if isinstance(error, (PortForwardError, OSError)):
        return ExitCode.NETWORK
    if isinstance(error, (ControlRequestFailed, KeynodeError)):
        return ExitCode.REQUEST_FAILED
    return ExitCode.FAILURE


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
        "run the node: forward proxy, UDP proxy, reverse proxy and control socket",
        "  keynode run\n  keynode run --config /etc/keynode/node.toml\n"
        "  keynode run --dir /srv/keynode-a      # uses /srv/keynode-a/config.toml if present\n"
        "\n"
        "--dir DIR is the node directory: key.pem, chain.pem, auth_token, control.sock, and\n"
        "config.toml (read if present, unless --config names another file).\n"
        "\n"
        "stdout, once the node serves: one 'name: value' line each for node_id, forward,\n"
        "proxy, server and control_socket, then a line 'ready'. Scripts wait for 'ready'.\n"
        "Logs go to stderr; with relay nodes, a line 'observed address HOST:PORT (seen by\n"
        "relay NODEID); NAT mapping: ...' follows as each relay answers.\n"
        "\n"
        "reach nodes by NodeId alone (config.toml):\n"
        "  [relay]\n"
        "  serve = false                  # true: be a relay node (needs a reachable address)\n"
        "  servers = [\"<NodeId>@198.18.0.2:4000\"]   # relay nodes to register with and ask\n"
        "                                 # (also relay:<NodeId>@host:port, [v6]:port)\n"
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


def unwrap(error: BaseException) -> BaseException:
    """The single failure inside nested exception groups (trio nurseries wrap)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def error_document(error: BaseException, message: str, code: int) -> dict[str, Any]:
    """What --json prints on stderr for a failure (README: "Errors")."""
    document: dict[str, Any] = {"error": type(error).__name__, "message": message, "exit_code": code}
    if isinstance(error, ControlRequestFailed):  # the node's own error type and status
        document.update(node_error=error.error, http_status=error.status)
    return document


def fail(command: str, error: BaseException, debug: bool, json_errors: bool = False) -> NoReturn:
    if debug:
        traceback.print_exception(error)
    error = unwrap(error)
    if isinstance(error, BrokenPipeError):
        stdout_gone()
    code = ExitCode.INTERRUPTED if isinstance(error, KeyboardInterrupt) else exit_code_for(error)
    message = str(error) or type(error).__name__
    if isinstance(error, KeyboardInterrupt):
        message = "interrupted"
    elif isinstance(error, UsageError):
        message = error.message
    elif isinstance(error, OSError) and error.strerror:
        message = f"{error.strerror}" + (f": {error.filename}" if error.filename else "")
    if code is ExitCode.FAILURE and not debug:
        message = f"{type(error).__name__}: {message} (unexpected; rerun with --debug and report it)"
    if json_errors:
        print(json.dumps(error_document(error, message, code)), file=sys.stderr)
    elif isinstance(error, UsageError):
        error.parser.print_usage(sys.stderr)
        print(f"{error.parser.prog}: error: {message}", file=sys.stderr)
    else:
        print(f"{PROGRAM} {command}: {message}", file=sys.stderr)
    sys.exit(code)


def flush_stdout() -> None:
    """Flush now, so a closed pipe shows here and not in the interpreter's flush at exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        stdout_gone()


def stdout_gone() -> NoReturn:
    """The reader of our output went away (`keynode status | head -1`): that is its
    choice, not our failure. Python's advice: point stdout at devnull so the flush at
    exit does not fail again, and leave quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(ExitCode.OK)


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
