"""Services behind one node (proxy/tunnel/services.py): chosen by the SNI the forward
side derives from the CONNECT port, authorised by NodeId after the chain is verified
and before any connection to the target, [forward] allow_targets, live policy swaps
(revoked), and the per-kind splicer seam. Real UDP, uTP and TLS on loopback."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.certificates import generate_certificate, rotate_key
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.tunnel.address_book import AddressBook
from proxy.tunnel.records import CallerIdentity, EndReason
from proxy.tunnel.services import Service, ServicePolicy, named_in, server_name_for
from tests.proxy.test_proxy_support import (
    Node,
    Server,
    connect_ok,
    connect_reading_refusal,
    digest_after_eof,
    echo_round,
    random_payload,
    receive_all,
    running_node,
    target_for,
    tcp_server,
)
from tests.proxy.test_strangers import original_forward


async def connect_answer(node: Node, target: str) -> tuple[int, str]:
    """A CONNECT's status and (for a refusal) its body."""
    status, body, stream = await connect_reading_refusal(node.proxy.forward_host, node.proxy.forward_port, target)
    await stream.aclose()
    return status, body.decode()


@asynccontextmanager
async def caller_of(remote: Node, **options: object) -> AsyncIterator[Node]:
    """A node whose address book knows ``remote``."""
    book = AddressBook({remote.node_id: ("127.0.0.1", remote.proxy.proxy_port)})
    async with running_node(None, address_book=book, **options) as node:  # type: ignore[arg-type]
        yield node


def three_services(default: Server, agent: Server, client: Server, allowed: tuple[NodeId, ...]) -> ServicePolicy:
    return ServicePolicy(
        default=Service("server", ("127.0.0.1", default.port), None),
        services=(
            Service("agent", ("127.0.0.1", agent.port), 1314),
            Service("client", ("127.0.0.1", client.port), 1315, allow=frozenset(allowed)),
        ),
    )


@given(st.binary(max_size=300))
def test_any_server_name_bytes_name_a_port_or_nothing(server_name: bytes) -> None:
    named = named_in(server_name)
    if isinstance(named, int):
        assert 0 < named < 65536 and server_name_for(port=named) == server_name.lower()
    elif named is not None:
        assert server_name_for(service=named) == server_name.lower()


def test_server_names_round_trip_and_strangers_name_nothing() -> None:
    assert server_name_for(port=1314) == b"1314.port.keynode"
    assert server_name_for(service="agent") == b"agent.service.keynode"
    assert named_in(b"1314.port.keynode") == 1314
    assert named_in(b"1314.PORT.Keynode") == 1314
    assert named_in(b"client-2.service.keynode") == "client-2"
    for other in (None, b"", b"localhost", b"0.port.keynode", b"70000.port.keynode", b"x.port.keynode",
                  b"a.b.service.keynode", b".service.keynode"):
        assert named_in(other) is None


async def test_three_services_on_one_udp_port_each_reached_by_an_allowed_node() -> None:
    """A node allowed everywhere reaches each service through <NodeId>:<port>, the
    original's form reaches the default, a port no service claims is 404."""
    with trio.fail_after(20):
        async with tcp_server() as default, tcp_server() as agent, tcp_server() as client:
            async with running_node(None) as remote:
                async with caller_of(remote) as local:
                    remote.proxy.set_policy(three_services(default, agent, client, (local.node_id,)))
                    for port, server in ((1314, agent), (1315, client)):
                        stream = await connect_ok(local.proxy, f"{remote.node_id}:{port}")
                        await echo_round(stream, f"to {port}".encode())
                        await stream.aclose()
                        assert len(server.peers) == 1
                    stream = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                    await echo_round(stream, b"to the default")
                    await stream.aclose()
                    assert len(default.peers) == 1
                    status, body = await connect_answer(local, f"{remote.node_id}:22")
                    assert status == 404 and "no service at port 22" in body
                    # By name: <name>.<NodeId>:<any port>.
                    for name, server in (("agent", agent), ("client", client), ("server", default)):
                        stream = await connect_ok(local.proxy, f"{name}.{remote.node_id}:443")
                        await echo_round(stream, f"to {name}".encode())
                        assert {status.info.service for status in local.proxy.connections()} >= {name}
                        await stream.aclose()
                        assert len(server.peers) == 2
                    status, body = await connect_answer(local, f"nope.{remote.node_id}:443")
                    assert status == 404 and "no service 'nope'" in body
                    assert (len(default.peers), len(agent.peers), len(client.peers)) == (2, 2, 2)
                    services = {status.info.service for status in remote.proxy.connections()}
                    assert services <= {"server", "agent", "client"}


async def test_a_node_not_in_the_allow_list_gets_403_and_the_target_no_connection() -> None:
    """The attacker's view: a verified node outside the list is refused with 403 naming
    the service and its NodeId; the service's target never sees a connection (its
    accepts are counted), while another service stays open to it."""
    with trio.fail_after(20):
        async with tcp_server() as default, tcp_server() as agent, tcp_server() as client:
            async with running_node(None) as remote, caller_of(remote) as stranger:
                friend = TLSConfig.generate().node_id
                remote.proxy.set_policy(three_services(default, agent, client, (friend,)))
                for _ in range(5):
                    status, body = await connect_answer(stranger, f"{remote.node_id}:1315")
                    assert status == 403
                    assert "'client'" in body and str(stranger.node_id) in body
                assert client.peers == []
                stream = await connect_ok(stranger.proxy, f"{remote.node_id}:1314")
                await echo_round(stream, b"agent is open")
                await stream.aclose()
                assert client.peers == [] and len(agent.peers) == 1
                refusals = [event for event in remote.events.lost if event.reason is not None]
                assert refusals == []  # refused starts were never established


async def test_without_services_every_port_reaches_the_server() -> None:
    """Wave-1 behaviour: no [services], so <NodeId>:22 and :65535 reach [server]."""
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port) as remote, caller_of(remote) as local:
            for port in (22, 65535):
                stream = await connect_ok(local.proxy, f"{remote.node_id}:{port}")
                await echo_round(stream, b"wave 1")
                await stream.aclose()
            assert len(server.peers) == 2


async def test_an_original_peer_without_alpn_or_sni_reaches_the_default_service() -> None:
    with trio.fail_after(20):
        async with tcp_server() as default, tcp_server() as agent, tcp_server() as client:
            async with running_node(None) as remote:
                remote.proxy.set_policy(three_services(default, agent, client, ()))
                async with original_forward(("127.0.0.1", remote.proxy.proxy_port)) as forward:
                    assert forward.tls is not None and forward.tls.alpn_protocol is None
                    await forward.tls.send_all(b"original")
                    await forward.tls.send_eof()
                    assert await receive_all(forward.tls) == b"original"
                assert (len(default.peers), len(agent.peers), len(client.peers)) == (1, 0, 0)


async def test_no_default_service_and_no_name_is_404() -> None:
    with trio.fail_after(20):
        async with tcp_server() as agent, running_node(None) as remote, caller_of(remote) as local:
            remote.proxy.set_policy(ServicePolicy(services=(Service("agent", ("127.0.0.1", agent.port), 1314),)))
            status, body = await connect_answer(local, target_for(remote.proxy, remote.node_id))
            assert status == 404 and "no default service" in body
            assert agent.peers == []


async def test_allow_targets_refuses_with_403_before_any_datagram() -> None:
    with trio.fail_after(20):
        sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the forbidden node's address
        sink.bind(("127.0.0.1", 0))
        other = TLSConfig.generate().node_id
        elsewhere = TLSConfig.generate().node_id
        book = AddressBook({other: ("127.0.0.1", sink.getsockname()[1])})
        async with running_node(None, address_book=book) as local:
            local.proxy.set_policy(ServicePolicy(allow_targets=frozenset({elsewhere})))
            sent = local.proxy.endpoint.stats.datagrams_sent
            for target in (f"{other}:1314", f"127.0.0.1:{sink.getsockname()[1]}?nodeId={other}"):
                status, body = await connect_answer(local, target)
                assert status == 403 and "allow_targets" in body and str(other) in body
            assert local.proxy.endpoint.stats.datagrams_sent == sent
            try:
                sink.recv(65536, socket.MSG_DONTWAIT)
                raise AssertionError("a datagram reached the forbidden target")
            except BlockingIOError:
                pass
        sink.close()


def rotated_identity() -> tuple[TLSConfig, NodeId]:
    """A node after one rotation, and its NodeId from before it (the chain's root)."""
    old_key = generate_key_pair()
    new_key, chain = rotate_key(old_key, [generate_certificate(old_key)])
    return TLSConfig(new_key, tuple(chain)), NodeId.from_public_key(old_key.public_key())


async def test_after_a_rotation_the_chain_claims_the_old_node_id() -> None:
    """A node allowed by its NodeId from before a rotation is still allowed: its chain
    (new leaf issued and signed by the old key) proves the old NodeId, as the forward
    side's verifier accepts it under that NodeId. Allowed by the new leaf's NodeId
    works too; a chain that borrows an allowed node's certificate is rejected (526)
    before authorisation, and the target sees nothing."""
    rotated, old_node_id = rotated_identity()
    with trio.fail_after(30):
        async with tcp_server() as default, tcp_server() as agent, tcp_server() as client:
            async with running_node(None) as remote:
                for allowed in (old_node_id, rotated.node_id):
                    remote.proxy.set_policy(three_services(default, agent, client, (allowed,)))
                    async with caller_of(remote, tls_config=rotated) as local:
                        stream = await connect_ok(local.proxy, f"{remote.node_id}:1315")
                        await echo_round(stream, b"rotated")
                        await stream.aclose()
                assert len(client.peers) == 2
                # An attacker appends the allowed node's certificate to its own chain.
                attacker_key = generate_key_pair()
                forged = TLSConfig(attacker_key, (generate_certificate(attacker_key), rotated.certificate_chain[0]))
                remote.proxy.set_policy(three_services(default, agent, client, (rotated.node_id,)))
                async with caller_of(remote, tls_config=forged) as attacker:
                    status, _ = await connect_answer(attacker, f"{remote.node_id}:1315")
                    assert status == 502  # the remote rejected its chain
                assert len(client.peers) == 2


async def test_a_policy_swap_revokes_one_tunnel_while_another_keeps_flowing() -> None:
    """Taking a node out of a list closes its live tunnel as revoked; a tunnel of
    another node carries on, sha256-equal; adding a node lets it in at once."""
    with trio.fail_after(30):
        async with (
            tcp_server() as default,
            tcp_server(digest_after_eof) as agent,
            tcp_server() as client,
            running_node(None) as remote,
            caller_of(remote) as first,
            caller_of(remote) as second,
        ):
            remote.proxy.set_policy(three_services(default, agent, client, (first.node_id,)))
            flowing = await connect_ok(second.proxy, f"{remote.node_id}:1314")
            payload = random_payload(4 << 20)
            await flowing.send_all(payload[: 1 << 20])
            doomed = await connect_ok(first.proxy, f"{remote.node_id}:1315")
            await echo_round(doomed, b"before")
            revoked = remote.proxy.set_policy(three_services(default, agent, client, (second.node_id,)))
            assert revoked == 1
            lost = await remote.events.wait_lost(1)
            assert lost[0].reason is EndReason.REVOKED and lost[0].remote_node_id == first.node_id
            assert await receive_all_or_reset(doomed)
            await flowing.send_all(payload[1 << 20 :])
            await flowing.send_eof()
            assert (await receive_all(flowing)).decode() == hashlib.sha256(payload).hexdigest()
            stream = await connect_ok(second.proxy, f"{remote.node_id}:1315")
            await echo_round(stream, b"now allowed")
            await stream.aclose()
            status, _ = await connect_answer(first, f"{remote.node_id}:1315")
            assert status == 403
            statuses = {event.reason for event in remote.events.lost}
            assert EndReason.REVOKED in statuses


async def receive_all_or_reset(stream: trio.SocketStream) -> bool:
    """The revoked client's end: EOF or a reset, never more data."""
    try:
        assert await receive_all(stream) == b""
    except (trio.BrokenResourceError, OSError):
        pass
    return True


async def test_a_splicer_for_the_service_kind_replaces_the_byte_splice() -> None:
    """The seam for the gRPC bridge: the application's splicer for kind "grpc" gets
    the tunnel, the server stream and the verified caller; other kinds splice bytes."""
    callers: list[CallerIdentity] = []

    async def tagging_splicer(tunnel: trio.abc.Stream, server: trio.abc.Stream, caller: CallerIdentity) -> None:
        callers.append(caller)
        await server.send_all(f"{caller.peer_node_id} {caller.service}\n".encode())
        async with trio.open_nursery() as nursery:

            async def up() -> None:
                while data := await tunnel.receive_some(65536):
                    await server.send_all(data)
                await server.send_eof()  # type: ignore[attr-defined]

            nursery.start_soon(up)
            while data := await server.receive_some(65536):
                await tunnel.send_all(data)
            await tunnel.send_eof()  # type: ignore[attr-defined]

    with trio.fail_after(20):
        async with tcp_server() as default, tcp_server() as grpc_server:
            async with running_node(None, splicers={"grpc": tagging_splicer}) as remote, caller_of(remote) as local:
                remote.proxy.set_policy(
                    ServicePolicy(
                        default=Service("server", ("127.0.0.1", default.port), None),
                        services=(Service("rpc", ("127.0.0.1", grpc_server.port), 50051, kind="grpc"),),
                    )
                )
                stream = await connect_ok(local.proxy, f"{remote.node_id}:50051")
                await stream.send_all(b"payload")
                await stream.send_eof()
                assert await receive_all(stream) == f"{local.node_id} rpc\npayload".encode()
                leaf = local.tls_config.leaf_certificate
                assert callers == [
                    CallerIdentity(remote.node_id, local.node_id, callers[0].peer_certificate_der, "rpc")
                ]
                assert callers[0].peer_certificate_der == leaf.public_bytes(Encoding.DER)
                assert callers[0].peer_certificate_sha256 == hashlib.sha256(leaf.public_bytes(Encoding.DER)).hexdigest()
                stream = await connect_ok(local.proxy, target_for(remote.proxy, remote.node_id))
                await echo_round(stream, b"plain bytes")  # the default is kind tcp
                await stream.aclose()
                assert len(callers) == 1
                await remote.events.wait_lost(1)
                assert remote.events.lost[0].reason is EndReason.CLOSED_LOCALLY



async def test_allow_targets_taken_away_revokes_a_live_forward_tunnel() -> None:
    """[forward] allow_targets reloaded without a node: the local tunnel to it ends as
    revoked (connection_lost_callback) and the next CONNECT gets 403."""
    with trio.fail_after(20):
        async with tcp_server() as server, running_node(server.port) as remote, caller_of(remote) as local:
            local.proxy.set_policy(ServicePolicy(allow_targets=frozenset({remote.node_id})))
            stream = await connect_ok(local.proxy, f"{remote.node_id}:22")
            await echo_round(stream, b"allowed")
            assert local.proxy.set_policy(ServicePolicy(allow_targets=frozenset())) == 1
            lost = await local.events.wait_lost(1)
            assert (lost[0].reason, lost[0].remote_node_id) == (EndReason.REVOKED, remote.node_id)
            assert await receive_all_or_reset(stream)
            status, _ = await connect_answer(local, f"{remote.node_id}:22")
            assert status == 403


async def test_open_connection_reverse_without_a_default_service_punches_and_serves_the_named_one() -> None:
    """A node with [services] only: open_connection_reverse prepares (punches) without a
    server connection; the caller that then arrives gets the service it names."""
    with trio.fail_after(20):
        async with tcp_server() as agent, running_node(None) as remote, caller_of(remote) as local:
            remote.proxy.set_policy(ServicePolicy(services=(Service("agent", ("127.0.0.1", agent.port), 1314),)))
            await remote.proxy.open_connection_reverse("127.0.0.1", local.proxy.proxy_port)
            assert [p.remote_port for p in remote.proxy.prepared_reverse_connections()] == [local.proxy.proxy_port]
            assert agent.peers == []
            stream = await connect_ok(local.proxy, f"{remote.node_id}:1314")
            await echo_round(stream, b"prepared, then named")
            assert remote.proxy.connection_reverse_count == 1  # the prepared connection, joined
            await stream.aclose()
            assert len(agent.peers) == 1
