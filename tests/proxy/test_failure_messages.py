"""What a user sees when a CONNECT fails (issue item 13): the answering node logs it
(rate-limited, with the target), and every text says what happened and what to do."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from proxy.errors import ProxyBindError
from proxy.identity.tls_config import TLSConfig
from proxy.tls import TLSStream
from proxy.tunnel import start_status
from proxy.tunnel.proxy import open_proxy
from proxy.tunnel.ratelimit import RateLimitedLog
from tests.proxy.test_proxy_support import running_node, target_for, tcp_server
from tests.proxy.test_proxy_wiring import refused_connect, rotated
from tests.proxy.test_strangers import original_forward
from tests.proxy.test_tls_support import echo_through, node_tls_peer, random_bytes

PROXY_LOG = "proxy.tunnel.proxy"


def connect_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == PROXY_LOG and r.getMessage().startswith("CONNECT to")]


# --- the log on the answering node -----------------------------------------------------------


async def test_failed_connects_are_logged_at_info_with_the_target(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stranger = TLSConfig.generate().node_id
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            status, _ = await refused_connect(local.proxy, target_for(remote.proxy, stranger))
            assert status == 526
            [line] = connect_lines(caplog)
            assert line.startswith(f"CONNECT to 127.0.0.1:{remote.proxy.proxy_port} ({stranger}) answered 526: ")
            assert [r.levelno for r in caplog.records if r.name == PROXY_LOG] == [logging.INFO]


async def test_a_503_while_stopping_is_logged_with_the_target(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            # A start that hangs (a silent UDP socket) is under way when stop() begins: 503.
            silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await silent.bind(("127.0.0.1", 0))
            port = silent.getsockname()[1]
            async with trio.open_nursery() as nursery:
                answers: list[int] = []

                async def connect() -> None:
                    answers.append((await refused_connect(local.proxy, f"127.0.0.1:{port}?nodeId={remote.node_id}"))[0])

                nursery.start_soon(connect)
                while not local.proxy.peers.get(("127.0.0.1", port)):
                    await trio.sleep(0.01)
                await local.proxy.stop()
            silent.close()
            assert answers == [503]
            assert any(line.startswith(f"CONNECT to 127.0.0.1:{port} ") and "answered 503" in line
                       for line in connect_lines(caplog))


def test_the_log_is_rate_limited_per_key_and_says_how_many_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    now = [0.0]
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), per_second=5, clock=lambda: now[0])
    for _ in range(8):
        limited.info("a", "failed %s", "a")
    limited.info("b", "failed %s", "b")  # another key has its own share
    now[0] = 1.0
    limited.info("a", "failed %s", "a")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["failed a"] * 5 + ["failed b", "failed a (3 more like it suppressed)"]


def test_the_rate_limiter_forgets_the_least_recent_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    limited = RateLimitedLog(logging.getLogger("test.ratelimit"), max_keys=3, clock=lambda: 0.0)
    for key in range(10):
        limited.info(key, "x")
    assert len(limited._keys) == 3


# --- what the texts say ------------------------------------------------------------------------


async def test_a_start_timeout_names_the_step_and_the_likely_causes(virtual_clock: MockClock) -> None:
    with trio.fail_after(10):
        silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with silent:
            await silent.bind(("127.0.0.1", 0))
            port = silent.getsockname()[1]
            async with running_node(conn_connect_time=0.5) as node:
                status, body = await refused_connect(node.proxy, f"127.0.0.1:{port}?nodeId={node.node_id}")
    assert status == 504
    assert "not started within conn_connect_time (0.5 s), opening uTP (no answer to its SYN)" in body
    for cause in ("not running", "`keynode open-reverse`", "relay", "symmetric NAT"):
        assert cause in body, cause


async def test_the_remote_servers_being_down_is_a_502_that_says_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down = closed.getsockname()[1]
    closed.close()  # nothing listens there
    with trio.fail_after(15):
        async with running_node(down) as remote, running_node() as local:
            status, body = await refused_connect(local.proxy, target_for(remote.proxy, remote.node_id))
            assert status == 502
            assert "the remote node could not connect to its server" in body
            assert "Connection refused" in body
            assert local.proxy.connection_forward_count == 0
    # The remote says where, in its own log (the caller is not told its server's address).
    assert f"cannot connect to the server 127.0.0.1:{down}: Connection refused" in caplog.text
    assert f"127.0.0.1:{down}" not in body


async def test_a_remote_that_rejects_our_chain_is_a_502_that_says_so() -> None:
    with trio.fail_after(15):
        async with (
            tcp_server() as server,
            running_node(server.port, max_chain_length=1) as remote,
            running_node(tls_config=rotated(1)) as local,
        ):
            status, body = await refused_connect(local.proxy, target_for(remote.proxy, remote.node_id))
            assert status == 502
            assert "the remote node rejected this node's certificate chain" in body
            assert "2 certificates; at most 1" in body
            assert server.peers == []


async def test_a_526_names_the_node_id_the_peer_presented() -> None:
    wanted = TLSConfig.generate().node_id
    with trio.fail_after(15):
        async with tcp_server() as server, running_node(server.port) as remote, running_node() as local:
            status, body = await refused_connect(local.proxy, target_for(remote.proxy, wanted))
    assert status == 526
    assert f"the peer presented NodeId {remote.node_id}, wanted {wanted}" in body


async def test_an_invalid_node_id_is_called_invalid_not_missing() -> None:
    with trio.fail_after(10):
        async with running_node() as node:
            truncated = str(node.node_id)[:-1]
            status, body = await refused_connect(node.proxy, f"{truncated}:443")
            assert status == 400
            assert body.startswith(f"invalid nodeId {truncated!r}")
            status, body = await refused_connect(node.proxy, f"example.com:{node.proxy.proxy_port}")
            assert status == 400 and body.startswith("missing nodeId: the target is HOST:PORT?nodeId=<NodeId>")
            status, body = await refused_connect(node.proxy, f"127.0.0.1:1?nodeid={node.node_id}")
            assert status == 400 and "the parameter is nodeId" in body


async def test_ipv6_addresses_print_in_brackets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    wanted = TLSConfig.generate().node_id
    with trio.fail_after(15):
        async with (
            tcp_server() as server,
            running_node(server.port, proxy_host="::1") as remote,
            running_node(proxy_host="::1") as local,
        ):
            port = remote.proxy.proxy_port
            status, body = await refused_connect(local.proxy, target_for(remote.proxy, wanted, host="::1"))
    assert status == 526
    assert f"forward to [::1]:{port}: certificate chain rejected" in body
    assert f"CONNECT to [::1]:{port} ({wanted}) answered 526" in caplog.text
    assert "::1:" not in caplog.text.replace("[::1]:", "")


async def test_a_bind_error_says_which_socket_failed() -> None:
    tls_config = TLSConfig.generate()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket()
    with udp, tcp:
        udp.bind(("127.0.0.1", 0))
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp_port, tcp_port = udp.getsockname()[1], tcp.getsockname()[1]
        with pytest.raises(ProxyBindError) as info:
            async with open_proxy(tls_config=tls_config, proxy_host="127.0.0.1", proxy_port=udp_port):
                pass
        assert str(info.value).startswith(f"cannot bind the UDP proxy socket to 127.0.0.1:{udp_port}: ")
        with pytest.raises(ProxyBindError) as info:
            async with open_proxy(tls_config=tls_config, proxy_host="127.0.0.1", forward_port=tcp_port):
                pass
        assert str(info.value).startswith(f"cannot bind the CONNECT listener (TCP) to 127.0.0.1:{tcp_port}: ")


# --- peers that do not know the start status are unaffected ----------------------------------------


async def test_an_original_reverse_never_sends_a_start_status(tmp_path: Path) -> None:
    """The forward side offers the start status ALPN; Node's TLS (the original's)
    ignores the offer, no protocol is agreed and nothing extra is expected."""
    ours, node = TLSConfig.generate(), TLSConfig.generate()
    data = random_bytes(1000, seed=3)
    with trio.fail_after(30):
        async with node_tls_peer("server", node, tmp_path) as peer:
            port = (await peer.expect("listening"))["port"]
            transport = await trio.open_tcp_stream("127.0.0.1", port)
            async with TLSStream(transport, ours, server_side=False, alpn=(start_status.ALPN,)) as stream:
                await stream.do_handshake()
                assert stream.alpn_protocol is None
                assert await echo_through(stream, data) == data


async def test_an_original_forward_gets_no_start_status() -> None:
    """An original forward offers no ALPN: the keynode reverse side sends it nothing
    but the tunnel's bytes (the echo comes back exactly)."""
    with trio.fail_after(10):
        async with tcp_server() as server, running_node(server.port) as remote:
            async with original_forward(("127.0.0.1", remote.proxy.proxy_port)) as forward:
                assert forward.tls is not None and forward.tls.alpn_protocol is None
                await forward.tls.send_all(b"exactly this")
                await forward.tls.send_eof()
                received = b""
                while chunk := await forward.tls.receive_some(4096):
                    received += chunk
                assert received == b"exactly this"
