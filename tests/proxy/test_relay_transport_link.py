"""Rendezvous messages over a TCP relay link (KEYED frames), the relay's TCP port in
relay addresses, and what a hostile link client gets (nothing)."""

from __future__ import annotations

import os
import time

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.identity.node_id import NodeId
from proxy.identity.tls_config import TLSConfig
from proxy.relay.errors import DatagramTooLarge
from proxy.relay.frames import KEYED, MAX_DATAGRAM, Keyed, decode_frames, encode_frame
from proxy.relay.link import RelayLink
from proxy.rendezvous.addresses import RelayAddress, keynode_addresses, parse_relay_server
from proxy.rendezvous.errors import RelayServerInvalid
from proxy.rendezvous.keys import KeyRing
from proxy.rendezvous.messages import LOOKUP, LOOKUP_REPLY, Lookup, decode_body
from proxy.rendezvous.wire import Opener, seal

from .test_relay_udp_support import udp_node, wait_for

NODE = NodeId(bytes(KeyRing(bytes(32)).node_id))


@given(st.binary(max_size=4096))
def test_keyed_frames_round_trip(message: bytes) -> None:
    data = encode_frame(Keyed(message))
    assert data[0] == KEYED
    assert decode_frames(data) == [Keyed(message)]


def test_a_keyed_frame_over_the_datagram_limit_is_refused() -> None:
    with pytest.raises(DatagramTooLarge):
        encode_frame(Keyed(bytes(MAX_DATAGRAM + 1)))


@given(st.integers(1, 65535), st.integers(1, 65535), st.sampled_from(["198.18.0.2", "2001:db8::2", "relay.example"]))
def test_relay_addresses_with_a_tcp_port_round_trip(port: int, tcp_port: int, host: str) -> None:
    address = RelayAddress(NODE, host, port, tcp_port)
    text = f"relay:{address.layer().args[0].replace(':', '!:')}:{port}:tcp={tcp_port}"
    assert keynode_addresses(text) == (address,)
    plain_host = f"[{host}]" if ":" in host else host
    assert parse_relay_server(f"{NODE}@{plain_host}:{port}:tcp={tcp_port}") == address
    assert parse_relay_server(f"{NODE}@{plain_host}:{port}") == RelayAddress(NODE, host, port)


@pytest.mark.parametrize("suffix", [":tcp=0", ":tcp=65536", ":tcp=", ":tcp=4443x", ":tcp=-1"])
def test_bad_tcp_ports_are_refused(suffix: str) -> None:
    with pytest.raises(RelayServerInvalid):
        parse_relay_server(f"{NODE}@198.18.0.2:4000{suffix}")


async def test_a_link_client_gets_answers_only_to_lookups_sealed_by_its_own_node_id() -> None:
    async with udp_node(serve=True, tcp_port=0) as relay:
        server = relay.service.relay_server
        assert server is not None
        client_config, other = TLSConfig.generate(), KeyRing(os.urandom(32))
        client = KeyRing.from_private_key(client_config.private_key)
        answers: list[bytes] = []
        link = RelayLink(client_config, f"{relay.node_id}@127.0.0.1:{server.port}", on_keyed=answers.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(link.run)
            await wait_for(lambda: link.registered)
            core = relay.service.core
            assert core is not None
            relay_key = bytes(relay.node_id)
            target = os.urandom(32)

            def lookup(keyring: KeyRing, message_type: int = LOOKUP) -> bytes:
                body = Lookup(os.urandom(12), target).encode()
                return seal(keyring, relay_key, message_type, body, int(time.time() * 1000))

            before = dict(core.counters)
            # sealed by another NodeId than the link proved; a type other than LOOKUP; garbage
            assert link.send_keyed(lookup(other))
            assert link.send_keyed(lookup(client, message_type=2))
            assert link.send_keyed(b"\x00\x00\x00\x06" + os.urandom(200))
            await wait_for(lambda: core.counters["received"] == before["received"] + 3)
            assert core.counters["unexpected_type"] == before["unexpected_type"] + 2
            await trio.sleep(0.2)
            assert answers == []
            # the genuine one is answered over the link: not found (nobody registered it)
            assert link.send_keyed(lookup(client))
            await wait_for(lambda: len(answers) == 1)
            opened = Opener(client).open(answers[0], int(time.time() * 1000))
            assert opened.sender == relay.node_id and opened.message_type == LOOKUP_REPLY
            reply = decode_body(opened.message_type, opened.body)
            assert reply.found is False and reply.target == target  # type: ignore[union-attr]
            assert relay.service.counters["relay"]["introductions"] == 0
            link.close()
            nursery.cancel_scope.cancel()
