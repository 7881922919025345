"""The CONNECT edge on its own: target parsing, Basic auth, h11 request reading, replies."""

from __future__ import annotations

import base64
import os
from urllib.parse import quote

import h11
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import BadConnectRequest, MethodNotAllowed, ProxyAuthRequired, UnknownNodeId
from proxy.identity.node_id import NodeId
from proxy.tunnel.address_book import AddressBook
from proxy.tunnel.http_connect import (
    ConnectTarget,
    HTTPConnectEdge,
    check_proxy_authorization,
    parse_connect_target,
)


def random_node_id() -> NodeId:
    return NodeId(os.urandom(32))


# --- targets ------------------------------------------------------------------


def test_target_with_node_id_query() -> None:
    node_id = random_node_id()
    target = parse_connect_target(f"127.0.0.1:4000?nodeId={quote(node_id.encode())}")
    assert target == ConnectTarget("127.0.0.1", 4000, (node_id,))


def test_target_ipv6_literal_in_brackets() -> None:
    node_id = random_node_id()
    target = parse_connect_target(f"[::1]:4000?nodeId={node_id}")
    assert target == ConnectTarget("::1", 4000, (node_id,))


def test_target_hostname_lowercased() -> None:
    node_id = random_node_id()
    assert parse_connect_target(f"LocalHost:1?nodeId={node_id}").host == "localhost"


def test_target_node_id_form_through_address_book() -> None:
    node_id = random_node_id()
    book = AddressBook({node_id: ("127.0.0.1", 5555)})
    target = parse_connect_target(f"{node_id}:443", book)
    assert target == ConnectTarget("127.0.0.1", 5555, (node_id,), service_port=443)  # the port names a service


def test_target_service_name_form_through_address_book() -> None:
    node_id = random_node_id()
    book = AddressBook({node_id: ("127.0.0.1", 5555)})
    target = parse_connect_target(f"agent.{node_id}:443", book)
    assert target == ConnectTarget("127.0.0.1", 5555, (node_id,), service_name="agent")
    with pytest.raises(UnknownNodeId):
        parse_connect_target(f"agent.{node_id}:443", AddressBook())
    with pytest.raises(BadConnectRequest):  # not a service name: an ordinary host without nodeId
        parse_connect_target(f"Agent!.{node_id}:443", book)


def test_target_node_id_form_unknown_node() -> None:
    with pytest.raises(UnknownNodeId) as info:
        parse_connect_target(f"{random_node_id()}:443", AddressBook())
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:4000",  # no nodeId
        "127.0.0.1:4000?nodeId=",  # empty nodeId
        "127.0.0.1:4000?nodeId=vabc",  # invalid nodeId
        "127.0.0.1:4000?nodeId={n}&nodeId={n}",  # two nodeIds
        "127.0.0.1:0?nodeId={n}",  # port 0
        "127.0.0.1:65536?nodeId={n}",
        "127.0.0.1:-1?nodeId={n}",
        "127.0.0.1:?nodeId={n}",
        "127.0.0.1?nodeId={n}",
        "0.0.0.0:4000?nodeId={n}",  # wildcard
        "[::]:4000?nodeId={n}",  # wildcard
        "[0:0::0]:4000?nodeId={n}",  # wildcard, spelled differently
        "::1:4000?nodeId={n}",  # unbracketed IPv6
        "[::1:4000?nodeId={n}",
        "[not-v6]:4000?nodeId={n}",
        "bad_host:4000?nodeId={n}",
        ":4000?nodeId={n}",
        "{n}:0",  # node id form, port 0
        "",
    ],
)
def test_bad_targets_are_400(target: str) -> None:
    node_id = random_node_id()
    book = AddressBook({node_id: ("127.0.0.1", 5555)})
    with pytest.raises(BadConnectRequest) as info:
        parse_connect_target(target.format(n=node_id), book)
    assert info.value.http_status == 400


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_any_target_text_is_parsed_or_rejected(text: str) -> None:
    try:
        target = parse_connect_target(text, AddressBook())
    except BadConnectRequest:
        return
    assert 0 < target.port < 65536 and target.node_ids


# --- authorization ----------------------------------------------------------------


def basic(credentials: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"proxy-authorization", b"Basic " + base64.b64encode(credentials))]


@pytest.mark.parametrize("credentials", [b"s3cret", b"s3cret:", b"user:s3cret", b":s3cret"])
def test_basic_auth_accepted(credentials: bytes) -> None:
    check_proxy_authorization(basic(credentials), "s3cret")


@pytest.mark.parametrize(
    "headers",
    [
        [],
        basic(b"wrong"),
        basic(b"s3cret:x"),
        basic(b"s3cre"),
        basic(b"s3cret\x00"),
        [(b"proxy-authorization", b"Bearer s3cret")],
        [(b"proxy-authorization", b"Basic !!notbase64")],
        [(b"authorization", b"Basic " + base64.b64encode(b"s3cret"))],
    ],
)
def test_basic_auth_rejected(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(ProxyAuthRequired) as info:
        check_proxy_authorization(headers, "s3cret")
    assert info.value.http_status == 407


def test_no_token_means_no_check() -> None:
    check_proxy_authorization([], None)


# --- the edge over an in-memory stream ------------------------------------------------


async def exchange(request: bytes, *, token: str | None = "tok", book: AddressBook | None = None):
    """Feed raw bytes to an edge; return (target or error, trailing data, response bytes)."""
    client, server = trio.testing.memory_stream_pair()
    edge = HTTPConnectEdge(server)
    outcome: ConnectTarget | BaseException | None = None
    with trio.fail_after(5):
        await client.send_all(request)
        await client.send_eof()
        try:
            if await edge.receive_request() is not None:
                outcome = edge.parse(auth_token=token, address_book=book)
                await edge.send_established()
        except (BadConnectRequest, MethodNotAllowed, ProxyAuthRequired) as error:
            outcome = error
            await edge.send_error_for(error)
        await server.aclose()
        response = b""
        while chunk := await client.receive_some(65536):
            response += chunk
    trailing = edge.trailing_data if isinstance(outcome, ConnectTarget) else b""
    return outcome, trailing, response


def parse_response(data: bytes) -> h11.Response:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="CONNECT", target="x:1", headers=[("host", "x:1")]))
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Response), event
    return event


def auth_header(token: str = "tok") -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(token.encode()) + b"\r\n"


async def test_connect_established_and_trailing_bytes_kept() -> None:
    node_id = random_node_id()
    request = (
        f"CONNECT 127.0.0.1:9?nodeId={node_id} HTTP/1.1\r\nHost: x\r\n".encode()
        + auth_header()
        + b"\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    )
    outcome, trailing, response = await exchange(request)
    assert outcome == ConnectTarget("127.0.0.1", 9, (node_id,))
    assert trailing == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert response == b"HTTP/1.1 200 Connection Established\r\n\r\n"


async def test_grpcio_style_headers_with_leading_space() -> None:
    node_id = random_node_id()
    book = AddressBook({node_id: ("::1", 7)})
    request = (
        f"CONNECT {node_id}:443 HTTP/1.1\r\nHost: {node_id}:443\r\nUser-Agent: grpc-httpcli/0.0\r\n".encode()
        + b"Proxy-Authorization: Basic "
        + base64.b64encode(b"user:tok")
        + b"\r\n\r\n"
    )
    outcome, _, response = await exchange(request, book=book)
    assert outcome == ConnectTarget("::1", 7, (node_id,), service_port=443)
    assert parse_response(response).status_code == 200


async def test_http10_connect_accepted() -> None:
    node_id = random_node_id()
    request = f"CONNECT 127.0.0.1:9?nodeId={node_id} HTTP/1.0\r\n".encode() + auth_header() + b"\r\n"
    outcome, _, _ = await exchange(request)
    assert isinstance(outcome, ConnectTarget)


async def test_non_connect_is_405() -> None:
    outcome, _, response = await exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(outcome, MethodNotAllowed)
    assert parse_response(response).status_code == 405


async def test_missing_auth_is_407_with_challenge() -> None:
    node_id = random_node_id()
    outcome, _, response = await exchange(f"CONNECT 127.0.0.1:9?nodeId={node_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert isinstance(outcome, ProxyAuthRequired)
    reply = parse_response(response)
    assert reply.status_code == 407
    assert dict(reply.headers)[b"proxy-authenticate"].startswith(b"Basic")


async def test_bad_target_is_400() -> None:
    outcome, _, response = await exchange(b"CONNECT 0.0.0.0:9?nodeId=x HTTP/1.1\r\nHost: x\r\n" + auth_header() + b"\r\n")
    assert isinstance(outcome, BadConnectRequest)
    assert parse_response(response).status_code == 400


async def test_connect_with_body_is_400() -> None:
    node_id = random_node_id()
    request = (
        f"CONNECT 127.0.0.1:9?nodeId={node_id} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n".encode()
        + auth_header()
        + b"\r\nabc"
    )
    outcome, _, response = await exchange(request)
    assert isinstance(outcome, BadConnectRequest)
    assert parse_response(response).status_code == 400


async def test_oversized_headers_are_400() -> None:
    request = b"CONNECT a:1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
    outcome, _, response = await exchange(request)
    assert isinstance(outcome, BadConnectRequest)
    assert parse_response(response).status_code == 400


async def test_incomplete_request_then_eof_is_dropped_silently() -> None:
    outcome, _, response = await exchange(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n")
    assert outcome is None and response == b""


@given(st.binary(max_size=600))
@settings(max_examples=200, deadline=None)
def test_hostile_request_bytes_get_a_typed_answer(data: bytes) -> None:
    async def main() -> None:
        outcome, _, response = await exchange(data)
        if isinstance(outcome, BaseException):
            # Every rejection is answered with an HTTP status (or nothing at all
            # when h11 cannot frame one), never a crash.
            assert response == b"" or response.startswith(b"HTTP/1.1 4")
        else:
            assert outcome is None or isinstance(outcome, ConnectTarget)

    trio.run(main)


@given(
    st.lists(
        st.sampled_from(
            [b"CONNECT ", b"GET ", b"127.0.0.1:9", b"?nodeId=", b" HTTP/1.1", b"\r\n", b"Host: x", b": ", b"\x00", b"\xff"]
        ),
        max_size=30,
    )
)
@settings(max_examples=200, deadline=None)
def test_hostile_request_fragments(parts: list[bytes]) -> None:
    async def main() -> None:
        outcome, _, _ = await exchange(b"".join(parts))
        assert outcome is None or isinstance(outcome, (ConnectTarget, BaseException))

    trio.run(main)
