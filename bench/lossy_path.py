#!/usr/bin/env python3
"""Goodput across one lossy NAT-lab link with a 40 ms RTT, transport by transport.

Run as root from the repository (the lab needs namespaces and nftables):

    .venv/bin/python bench/lossy_path.py [--seconds 5] [--losses 0,1,3] [--rate-mbit 100]

Two namespaces joined by one veth; each direction gets half the RTT of delay
(NFQUEUE delay daemon), the same random loss (nftables numgen drop) and a tbf
rate cap (so the delay daemon, a Python process, is never the bottleneck). Every
transport streams one way for `--seconds` after its first byte and the receiver
reports bytes received over that time. Rows:

- kernel TCP with the system's default congestion control (BBR on this machine,
  which does not read random loss as congestion) and with CUBIC (loss-based),
  each plain and with TLS (Python ssl);
- utp-native (libutp, the original stack) with Node TLS over it;
- keynode uTP (nat.open_endpoint), plain and with TLS (proxy.tls.TLSStream), once
  per registered uTP congestion controller (LEDBAT and the loss-tolerant one;
  `--utp-congestion` picks), when those modules import;
- keynode tunnel (`measure_keynode_tunnel`): the Proxy end to end, TCP client ->
  forward proxy (HTTP CONNECT) -> uTP + mutual TLS -> reverse proxy -> TCP sink,
  one keynode process per namespace, once per controller too.

Time bound: (rows x losses) x (seconds + setup, each cell capped at seconds + 40);
about 4 minutes by default.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NODE_PEER = REPO / "tests" / "node" / "natlab_utp_tls.js"
CHUNK = 65536


# -- peers: this file run inside a namespace as `lossy_path.py peer ...` ------------------


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def peer_tcp_receive(host: str, port: int, seconds: float, cert: str | None, key: str | None) -> None:
    listener = socket.create_server((host, port))
    _report(event="listening", port=port)
    conn, _ = listener.accept()
    if cert and key:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        conn = context.wrap_socket(conn, server_side=True)
    conn.settimeout(seconds + 10)
    first = conn.recv(CHUNK)
    started, received = time.monotonic(), len(first)
    deadline = started + seconds
    while (left := deadline - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            data = conn.recv(CHUNK)
        except TimeoutError:
            break
        if not data:
            break
        received += len(data)
    _report(event="received", bytes=received, seconds=time.monotonic() - started)


def peer_tcp_send(host: str, port: int, seconds: float, use_tls: bool, congestion: str) -> None:
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if congestion != "default":
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
    conn.settimeout(10)
    conn.connect((host, port))
    if use_tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn = context.wrap_socket(conn)
    payload = bytes(CHUNK)
    deadline = time.monotonic() + seconds
    conn.settimeout(seconds)
    try:
        while time.monotonic() < deadline:
            conn.sendall(payload)
    except OSError:
        pass  # the receiver hung up once it had measured: that is the normal end
    _report(event="sent")


def _utp_config(congestion: str) -> object:
    from nat.utp.config import UtpConfig

    return UtpConfig(congestion=congestion)


def peer_keynode_utp_receive(host: str, port: int, seconds: float, use_tls: bool,
                             congestion: str) -> None:
    import trio

    from nat import open_endpoint

    async def main() -> None:
        async with open_endpoint(host, port, config=_utp_config(congestion)) as endpoint:
            _report(event="listening", port=endpoint.address[1])
            with trio.fail_after(seconds + 30):
                stream = await endpoint.accept()
                if use_tls:
                    from proxy.identity.tls_config import TLSConfig
                    from proxy.tls import TLSStream

                    stream = TLSStream(stream, TLSConfig.generate(), server_side=True)
            received, started = 0, None
            with trio.move_on_after(seconds + 30):
                while True:
                    data = await stream.receive_some(CHUNK)
                    if not data:
                        break
                    if started is None:
                        started = trio.current_time()
                    received += len(data)
                    if trio.current_time() - started >= seconds:
                        break
            elapsed = trio.current_time() - (started or trio.current_time())
            _report(event="received", bytes=received, seconds=elapsed)
            os._exit(0)  # measured: no graceful close needed

    trio.run(main)


def peer_keynode_utp_send(host: str, port: int, seconds: float, use_tls: bool,
                          congestion: str) -> None:
    import trio

    from nat import open_endpoint

    async def main() -> None:
        async with open_endpoint("0.0.0.0", 0, config=_utp_config(congestion)) as endpoint:
            with trio.move_on_after(seconds):
                stream = await endpoint.connect((host, port))
                if use_tls:
                    from proxy.identity.tls_config import TLSConfig
                    from proxy.tls import TLSStream

                    stream = TLSStream(stream, TLSConfig.generate(), server_side=False)
                payload = bytes(CHUNK)
                while True:
                    await stream.send_all(payload)
            _report(event="sent")
            os._exit(0)

    trio.run(main)


TUNNEL_TOKEN = "lossy-path-bench"


def peer_tunnel_receive(host: str, sink_port: int, seconds: float, congestion: str) -> None:
    """A keynode reverse side: Proxy on `host` whose server is a TCP sink on loopback."""
    import trio

    from proxy import open_proxy
    from proxy.identity.tls_config import TLSConfig

    async def main() -> None:
        tls_config = TLSConfig.generate()
        listeners = await trio.open_tcp_listeners(sink_port, host="127.0.0.1")
        done = trio.Event()
        result: dict[str, float] = {}

        async def sink(stream: trio.SocketStream) -> None:
            received, started = 0, None
            while True:
                data = await stream.receive_some(CHUNK)
                if not data:
                    break
                if started is None:
                    started = trio.current_time()
                received += len(data)
                if trio.current_time() - started >= seconds:
                    break
            result.update(bytes=received, seconds=trio.current_time() - (started or 0.0))
            done.set()

        async with open_proxy(tls_config=tls_config, auth_token=TUNNEL_TOKEN, proxy_host=host,
                              server_host="127.0.0.1", server_port=sink_port,
                              utp_config=_utp_config(congestion),
                              conn_connect_time=20.0) as proxy, trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, sink, listeners)
            _report(event="listening", port=proxy.proxy_port, node_id=str(tls_config.node_id))
            with trio.fail_after(seconds + 35):
                await done.wait()
            _report(event="received", **result)
            os._exit(0)  # measured: no graceful close needed

    trio.run(main)


def peer_tunnel_send(host: str, proxy_port: int, seconds: float, node_id: str,
                     congestion: str) -> None:
    """A keynode forward side: CONNECT through our own Proxy, then stream zeros."""
    import base64

    import trio

    from proxy import open_proxy
    from proxy.identity.tls_config import TLSConfig

    async def main() -> None:
        async with open_proxy(tls_config=TLSConfig.generate(), auth_token=TUNNEL_TOKEN,
                              utp_config=_utp_config(congestion),
                              conn_connect_time=20.0) as proxy:
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.forward_port)
            target = f"{host}:{proxy_port}?nodeId={node_id}"
            auth = base64.b64encode(TUNNEL_TOKEN.encode()).decode()
            await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
                                  f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
            response = b""
            with trio.fail_after(30):
                while b"\r\n\r\n" not in response:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    response += data
            if not response.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"CONNECT failed: {response[:100]!r}")
            payload = bytes(CHUNK)
            with trio.move_on_after(seconds):
                while True:
                    await stream.send_all(payload)
            _report(event="sent")
            os._exit(0)

    trio.run(main)


def run_peer(argv: list[str]) -> None:
    role, host, port, seconds, *rest = argv
    port_n, seconds_f = int(port), float(seconds)
    if role == "tcp-recv":
        peer_tcp_receive(host, port_n, seconds_f, *(rest + [None, None])[:2])
    elif role == "tcp-send":
        peer_tcp_send(host, port_n, seconds_f, rest[0] == "tls", rest[1])
    elif role == "utp-recv":
        peer_keynode_utp_receive(host, port_n, seconds_f, rest[0] == "tls", rest[1])
    elif role == "utp-send":
        peer_keynode_utp_send(host, port_n, seconds_f, rest[0] == "tls", rest[1])
    elif role == "tunnel-recv":
        peer_tunnel_receive(host, port_n, seconds_f, rest[0])
    elif role == "tunnel-send":
        peer_tunnel_send(host, port_n, seconds_f, rest[0], rest[1])
    else:
        raise SystemExit(f"unknown peer role {role}")


# -- the harness -------------------------------------------------------------------------


@dataclass
class Setting:
    sender: object  # tests.natlab.Host
    receiver: object
    seconds: float
    cert: str
    key: str
    port: int


def _measure(setting: Setting, receive_argv: list[str], send_argv: list[str]) -> float:
    """Start the receiver, then the sender; return goodput in Mbit/s."""
    from tests.natlab import LabProcessError

    lab = setting.receiver.lab  # type: ignore[attr-defined]
    bound = setting.seconds + 40
    receiver = setting.receiver.spawn(receive_argv, lifetime=bound)  # type: ignore[attr-defined]
    sender = None
    try:
        listening = receiver.wait_event("listening", timeout=15)
        # The sender may need what the receiver bound (e.g. the Proxy's port and NodeId).
        send_argv = [arg.format(**listening) for arg in send_argv]
        sender = setting.sender.spawn(send_argv, lifetime=bound)  # type: ignore[attr-defined]
        try:
            result = receiver.wait_event("received", timeout=bound)
        except LabProcessError as exc:
            sender.stop()
            tail = sender.stderr_text().strip().splitlines()[-3:]
            raise LabProcessError(f"{exc}; sender stderr: {' | '.join(tail)}") from exc
        seconds = float(result["seconds"])  # type: ignore[arg-type]
        return float(result["bytes"]) * 8 / seconds / 1e6 if seconds > 0 else 0.0  # type: ignore[arg-type]
    finally:
        for process in (sender, receiver):
            if process is not None:
                lab.stop_process(process)


def _python_peer(*args: object) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "peer", *map(str, args)]


def measure_tcp(congestion: str, use_tls: bool) -> Callable[[Setting], float]:
    def measure(setting: Setting) -> float:
        address = setting.receiver.address  # type: ignore[attr-defined]
        tls_args = [setting.cert, setting.key] if use_tls else []
        return _measure(setting,
                        _python_peer("tcp-recv", address, setting.port, setting.seconds, *tls_args),
                        _python_peer("tcp-send", address, setting.port, setting.seconds + 30,
                                     "tls" if use_tls else "plain", congestion))

    return measure


def measure_utp_native_tls(setting: Setting) -> float:
    address = setting.receiver.address  # type: ignore[attr-defined]
    node = ["node", str(NODE_PEER)]
    return _measure(setting, node + ["recv", address, str(setting.port), str(setting.seconds),
                                     setting.cert, setting.key],
                    node + ["send", address, str(setting.port), str(setting.seconds + 30), "tls"])


def measure_keynode_utp(congestion: str, use_tls: bool) -> Callable[[Setting], float]:
    def measure(setting: Setting) -> float:
        address = setting.receiver.address  # type: ignore[attr-defined]
        tls = "tls" if use_tls else "plain"
        return _measure(setting,
                        _python_peer("utp-recv", address, setting.port, setting.seconds, tls,
                                     congestion),
                        _python_peer("utp-send", address, setting.port, setting.seconds + 30, tls,
                                     congestion))

    return measure


def measure_keynode_tunnel(congestion: str) -> Callable[[Setting], float]:
    """The Proxy end to end: TCP client -> forward proxy (HTTP CONNECT) -> uTP + mutual TLS
    -> reverse proxy -> TCP sink, one keynode process per namespace."""

    def measure(setting: Setting) -> float:
        address = setting.receiver.address  # type: ignore[attr-defined]
        return _measure(setting,
                        _python_peer("tunnel-recv", address, setting.port, setting.seconds,
                                     congestion),
                        _python_peer("tunnel-send", address, "{port}", setting.seconds + 30,
                                     "{node_id}", congestion))

    return measure


def _importable(*modules: str) -> bool:
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def congestion_controllers() -> list[str]:
    """Every uTP congestion controller keynode registers (LEDBAT, loss-tolerant, ...)."""
    try:
        from nat.utp.congestion import CONTROLLERS
    except ImportError:
        return ["ledbat"]
    return sorted(CONTROLLERS)


def transports(controllers: list[str]) -> list[tuple[str, Callable[[Setting], float] | None, str]]:
    """(row name, measurer or None, why not measured)."""
    have_utp = _importable("nat") and hasattr(sys.modules["nat"], "open_endpoint")
    have_tls = have_utp and _importable("proxy.tls", "proxy.identity.tls_config")
    have_proxy = have_tls and _importable("proxy") and hasattr(sys.modules["proxy"], "open_proxy")
    default_cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    rows: list[tuple[str, Callable[[Setting], float] | None, str]] = [
        (f"kernel TCP ({default_cc}, default)", measure_tcp("default", False), ""),
        (f"kernel TCP + TLS ({default_cc})", measure_tcp("default", True), ""),
        ("kernel TCP (cubic)", measure_tcp("cubic", False), ""),
        ("kernel TCP + TLS (cubic)", measure_tcp("cubic", True), ""),
        ("utp-native + Node TLS (original)", measure_utp_native_tls, ""),
    ]
    for cc in controllers:
        rows += [
            (f"keynode uTP ({cc})", measure_keynode_utp(cc, False) if have_utp else None,
             "nat.open_endpoint missing"),
            (f"keynode uTP + TLS ({cc})", measure_keynode_utp(cc, True) if have_tls else None,
             "nat.open_endpoint or proxy.tls missing"),
            (f"keynode tunnel ({cc})", measure_keynode_tunnel(cc) if have_proxy else None,
             "proxy.open_proxy missing"),
        ]
    return rows


def _write_certificate(directory: str) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lossy-path-bench")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(directory, 0o755)  # peers read them from inside namespaces, still as root
    return cert_path, key_path


def main() -> int:
    parser = argparse.ArgumentParser(description="goodput across a lossy 40 ms RTT lab link")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per cell")
    parser.add_argument("--losses", default="0,1,3", help="loss percentages, each way")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="link rate cap, 0 = none")
    parser.add_argument("--only", default="", help="comma-separated row name prefixes to run")
    parser.add_argument("--utp-congestion", default="",
                        help="keynode uTP controllers to compare (default: every registered one)")
    args = parser.parse_args()

    from tests.natlab import Impairment, open_lab

    losses = [float(x) for x in args.losses.split(",") if x.strip()]
    controllers = ([c.strip() for c in args.utp_congestion.split(",") if c.strip()]
                   or congestion_controllers())
    rows = [row for row in transports(controllers)
            if not args.only or any(row[0].startswith(p.strip()) for p in args.only.split(","))]
    results: dict[tuple[str, float], str] = {}
    rate = int(args.rate_mbit * 1e6) if args.rate_mbit > 0 else None
    print(f"lossy path: one veth, {args.rtt_ms:.0f} ms RTT, loss each way, "
          f"rate cap {args.rate_mbit:.0f} Mbit/s, {args.seconds:.0f} s per cell", flush=True)
    with tempfile.TemporaryDirectory() as directory, open_lab() as lab:
        cert, key = _write_certificate(directory)
        sender, receiver = lab.add_host_pair("bench-send", "bench-recv")
        assert sender.uplink is not None
        port = 5000
        for loss in losses:
            sender.uplink.impair(Impairment(loss=loss / 100, delay=args.rtt_ms / 2000,
                                            rate_bit=rate, seed=int(loss * 10)))
            for name, measure, _why in rows:
                if measure is None:
                    results[(name, loss)] = "n/a"
                    continue
                port += 1
                setting = Setting(sender, receiver, args.seconds, cert, key, port)
                try:
                    results[(name, loss)] = f"{measure(setting):.2f}"
                except Exception as exc:  # noqa: BLE001 - a failed cell is reported, the bench goes on
                    results[(name, loss)] = "failed"
                    summary = " | ".join(str(exc).strip().splitlines()[-4:])
                    print(f"  {name} at {loss:g}% failed: {summary}", file=sys.stderr, flush=True)
                print(f"  {name:36s} {loss:4g}% loss: {results[(name, loss)]} Mbit/s", flush=True)
    width = max(len(name) for name, _, _ in rows)
    print()
    print(f"goodput, Mbit/s ({args.rtt_ms:.0f} ms RTT, loss each way)")
    print(" " * width + "".join(f"{f'{loss:g}% loss':>12}" for loss in losses))
    for name, measure, why in rows:
        line = f"{name:{width}s}" + "".join(f"{results[(name, loss)]:>12}" for loss in losses)
        print(line + ("" if measure is not None else f"   ({why})"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        run_peer(sys.argv[2:])
    else:
        sys.exit(main())
