"""The grpc-web codec, CORS policy and [grpc_web] config, sans-IO (Hypothesis for the
byte-level parts and hostile input)."""

from __future__ import annotations

import base64
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grpc_bridge import web_codec as codec
from grpc_bridge.web_cors import CorsPolicy
from grpc_bridge.web_errors import GrpcWebError, InvalidBase64, InvalidRequestFrame, RequestFrameTooLarge
from proxy.app.errors import ConfigError
from proxy.app.grpc_web_config import read_grpc_web
from proxy.identity.keys import generate_key_pair
from proxy.identity.node_id import NodeId


def frame(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


# --- text mode ------------------------------------------------------------------------


@given(st.lists(st.binary(max_size=200), max_size=8), st.lists(st.integers(min_value=0), max_size=10))
def test_base64_decoder_takes_padding_at_any_flush(flushes: list[bytes], cuts: list[int]) -> None:
    # A client may base64-encode each flush alone, so padding appears mid-stream.
    text = b"".join(base64.b64encode(piece) for piece in flushes)
    decoder = codec.Base64Decoder()
    out = b"".join(decoder.feed(piece) for piece in split_at(text, cuts))
    decoder.finish()
    assert out == b"".join(flushes)


@given(st.binary(min_size=1), st.lists(st.integers(min_value=0), max_size=5))
def test_base64_decoder_hostile_text_raises_only_invalid_base64(text: bytes, cuts: list[int]) -> None:
    decoder = codec.Base64Decoder()
    try:
        for piece in split_at(text, cuts):
            decoder.feed(piece)
        decoder.finish()
    except InvalidBase64:
        pass


@pytest.mark.parametrize("text", [b"AAA", b"AA=A", b"A===", b"AA!A", b"QUJD\nQUJD", b"QQ==QQ=", b"QUJDRA=="[:7]])
def test_base64_decoder_refuses(text: bytes) -> None:
    decoder = codec.Base64Decoder()
    with pytest.raises(InvalidBase64):
        decoder.feed(text)
        decoder.finish()


@given(st.lists(st.binary(max_size=300), max_size=6), st.lists(st.integers(min_value=0), max_size=10))
def test_text_encoder_encodes_each_frame_alone(payloads: list[bytes], cuts: list[int]) -> None:
    frames = [frame(payload) for payload in payloads] + [codec.trailers_frame([(b"grpc-status", b"0")])]
    stream = b"".join(frames)
    encoder = codec.TextEncoder()
    out = b"".join(encoder.feed(piece) for piece in split_at(stream, cuts)) + encoder.finish()
    assert out == b"".join(base64.b64encode(f) for f in frames)


def test_text_encoder_flushes_a_frame_cut_short() -> None:
    encoder = codec.TextEncoder()
    out = encoder.feed(frame(b"abcdefgh")[:7]) + encoder.finish()
    assert base64.b64decode(out) == frame(b"abcdefgh")[:7]


# --- request framing ------------------------------------------------------------------


@given(
    st.lists(st.tuples(st.sampled_from([0, 1]), st.binary(max_size=100)), max_size=6),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_request_frames_accept_any_split_of_valid_frames(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    body = b"".join(frame(payload, flags) for flags, payload in frames)
    checker = codec.RequestFrames(max_message=100)
    for piece in split_at(body, cuts):
        checker.feed(piece)
    checker.finish()
    assert checker.frames == len(frames)


@given(st.binary(max_size=300))
def test_request_frames_hostile_bytes_raise_only_typed_errors(body: bytes) -> None:
    checker = codec.RequestFrames(max_message=64)
    try:
        checker.feed(body)
        checker.finish()
    except GrpcWebError:
        pass


def test_request_frames_refusals() -> None:
    with pytest.raises(InvalidRequestFrame):
        codec.RequestFrames(100).feed(codec.trailers_frame([(b"grpc-status", b"0")]))
    with pytest.raises(RequestFrameTooLarge):
        codec.RequestFrames(100).feed(struct.pack(">BI", 0, 0xFFFFFFFF))
    checker = codec.RequestFrames(100)
    checker.feed(frame(b"12345")[:-1])
    with pytest.raises(InvalidRequestFrame):
        checker.finish()
    checker = codec.RequestFrames(100)
    checker.feed(b"\x00\x00")
    with pytest.raises(InvalidRequestFrame):
        checker.finish()


# --- headers, trailers, statuses ------------------------------------------------------


def test_content_types() -> None:
    assert codec.request_format(b"application/grpc-web") is codec.WebFormat.BINARY
    assert codec.request_format(b"application/grpc-web+proto; charset=x") is codec.WebFormat.BINARY
    assert codec.request_format(b"Application/GRPC-Web-Text") is codec.WebFormat.TEXT
    assert codec.request_format(b"application/grpc-web-text+proto") is codec.WebFormat.TEXT
    for other in (None, b"application/grpc", b"application/json", b"application/grpc-web+json", b""):
        assert codec.request_format(other) is None


def test_trailers_frame_layout() -> None:
    block = b"grpc-status:0\r\ngrpc-message:fine\r\nx-b-bin:q6ur\r\n"
    assert codec.trailers_frame([(b"grpc-status", b"0"), (b"grpc-message", b"fine"), (b"X-B-Bin", b"q6ur")]) == (
        b"\x80" + len(block).to_bytes(4, "big") + block
    )


def test_grpc_message_is_percent_encoded_and_capped() -> None:
    assert codec.percent_encode("50% off\n\u00e9") == b"50%25 off%0A%C3%A9"
    assert len(codec.percent_encode("\u00e9" * 20000)) <= codec.MAX_GRPC_MESSAGE
    trailers = dict(codec.non_grpc_answer(503, b"text/plain", b"x" * 100000))
    assert trailers[b"grpc-status"] == b"14" and len(trailers[b"grpc-message"]) == codec.MAX_GRPC_MESSAGE


@pytest.mark.parametrize(
    "status, code",
    [(400, 13), (401, 16), (403, 7), (404, 12), (429, 14), (431, 13), (502, 14), (503, 14), (504, 14)]
    + [(500, 2), (200, 2), (302, 2)],
)
def test_http_to_grpc_status_mapping(status: int, code: int) -> None:
    assert dict(codec.non_grpc_answer(status, b"text/html", b""))[b"grpc-status"] == str(code).encode()


def test_upstream_headers_rewrite_and_strip() -> None:
    web = [
        (b"content-type", b"application/grpc-web-text"), (b"accept", b"application/grpc-web-text"),
        (b"content-length", b"12"), (b"connection", b"keep-alive"), (b"transfer-encoding", b"chunked"),
        (b"te", b"gzip"), (b"upgrade", b"h2c"), (b"keep-alive", b"5"), (b"proxy-authorization", b"Basic eA=="),
        (b"origin", b"http://a"), (b"x-grpc-web", b"1"), (b"grpc-timeout", b"5S"), (b"x-custom", b"v"),
        (b"x-custom-bin", b"q6ur"), (b"x-user-agent", b"grpc-web-javascript/0.1"),
    ]
    headers = codec.upstream_request_headers(b"POST", b"/a.B/C", b"target:1", web)
    assert headers[:6] == [
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"), (b":authority", b"target:1"),
        (b"content-type", b"application/grpc"), (b"te", b"trailers"),
    ]
    rest = dict(headers[6:])
    assert rest == {
        b"grpc-timeout": b"5S", b"x-custom": b"v", b"x-custom-bin": b"q6ur",
        b"x-user-agent": b"grpc-web-javascript/0.1", b"grpc-accept-encoding": b"identity",
    }


def test_response_headers_and_trailers_only() -> None:
    upstream = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-m", b"1"), (b"content-length", b"0")]
    assert codec.web_response_headers(upstream, codec.WebFormat.TEXT) == [
        (b"content-type", b"application/grpc-web-text+proto"), (b"x-m", b"1"),
    ]
    only = upstream + [(b"grpc-status", b"12"), (b"grpc-message", b"no")]
    assert codec.trailer_metadata(only) == [(b"x-m", b"1"), (b"grpc-status", b"12"), (b"grpc-message", b"no")]


# --- CORS -----------------------------------------------------------------------------


def test_cors_preflight_for_allowed_origin_lists_requested_headers() -> None:
    policy = CorsPolicy(["http://app.example"])
    answer = dict(policy.preflight(b"http://app.example", b"x-grpc-web, X-Custom-Bin, bad header, content-type") or [])
    assert answer[b"access-control-allow-origin"] == b"http://app.example"
    assert answer[b"access-control-allow-methods"] == b"POST, OPTIONS"
    allowed = answer[b"access-control-allow-headers"].split(b", ")
    assert allowed == [b"content-type", b"grpc-timeout", b"x-grpc-web", b"x-user-agent", b"x-custom-bin"]
    assert policy.preflight(b"http://evil.example", b"x-grpc-web") is None
    assert policy.preflight(None, None) is None
    assert policy.allows(None) and not policy.allows(b"http://evil.example")
    assert CorsPolicy(["*"]).allows(b"http://any.example")


def test_cors_exposes_status_and_custom_headers() -> None:
    exposed = dict(CorsPolicy(["*"]).response_headers(b"http://a", [b"content-type", b"x-echo"]))
    assert exposed[b"access-control-expose-headers"] == b"grpc-status, grpc-message, grpc-status-details-bin, x-echo"
    assert CorsPolicy(["*"]).response_headers(None, [b"x-echo"]) == []


# --- [grpc_web] -----------------------------------------------------------------------


def test_read_grpc_web_forms() -> None:
    node_id = NodeId.from_public_key(generate_key_pair().public_key())
    config = read_grpc_web({"listen": "127.0.0.1:8080", "target": f"{node_id.encode()}:443", "allow_origins": ["*"]})
    assert config is not None
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert config.target.node_id == node_id and config.target.port == 443
    assert str(config.target) == f"{node_id.encode()}:443"
    local = read_grpc_web({"listen": "[::1]:0", "target": "localhost:50051"})
    assert local is not None and local.target.host == "localhost" and local.allow_origins == ()
    assert read_grpc_web(None) is None


@pytest.mark.parametrize(
    "table, key",
    [
        ({"target": "a:1"}, "grpc_web.listen"),
        ({"listen": "127.0.0.1:1"}, "grpc_web.target"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "port": 3}, "grpc_web.port"),
        ({"listen": "nope", "target": "a:1"}, "grpc_web.listen"),
        ({"listen": "127.0.0.1:1", "target": "0.0.0.0:1"}, "grpc_web.target"),
        ({"listen": "127.0.0.1:1", "target": 5}, "grpc_web.target"),
        ({"listen": "127.0.0.1:1", "target": "v" + "0" * 51 + "1:1"}, "grpc_web.target"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "allow_origins": "*"}, "grpc_web.allow_origins"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "allow_origins": ["ftp://a"]}, "grpc_web.allow_origins[0]"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "allow_origins": ["*", "http://a/path"]}, "grpc_web.allow_origins[1]"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "allow_origins": ["http://A.example"]}, "grpc_web.allow_origins[0]"),
        ({"listen": "127.0.0.1:1", "target": "a:1", "allow_origins": [3]}, "grpc_web.allow_origins[0]"),
        ("x", "grpc_web"),
    ],
)
def test_read_grpc_web_errors_name_the_key(table: object, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_grpc_web(table)
    assert caught.value.key == key
